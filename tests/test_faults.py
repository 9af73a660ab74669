"""Faults during a study: a trial's process killed mid-training; eight concurrent SQLite writers.

One study (the session's Ray, 2 CPUs) runs eight trials at the same time (a quarter CPU
each), all logging to the embedded SQLite store; while they run, the Ray worker process of
trial #000 is SIGKILLed. Two tests read the outcome.

Elsewhere:

* the driver killed mid-study and ``--resume`` (every trial finishes exactly once in
  MLflow; a finished trial is not trained again: still one value per epoch):
  ``tests/test_sweep.py::test_killed_study_resumes_without_duplicate_runs``;
* NaN loss, a raising loss, an impossible batch composition (one-line ``error`` tag, the
  others finish): ``tests/test_cluster.py::test_failing_trials_fail_with_one_line_and_the_others_finish``.
"""

from __future__ import annotations

import io
import os
import shutil
import signal
import sqlite3
import threading
import time

import pytest
from rich.console import Console

from conftest import TINY_BASE, write_study
from sweeper import tracking
from sweeper.study import load_study
from sweeper.tune import run_study

pytestmark = pytest.mark.slow

KILLED_EPOCHS = 6  # trial #000 (the one killed): long enough to be killed while it trains
EPOCHS = 2  # the seven others
KILL_AT = 3  # kill once this epoch is in MLflow: epoch 3 only starts after Tune took epoch 2's checkpoint


def _children(tracker: tracking.Tracker, name: str) -> list:
    exp = tracker.client.get_experiment_by_name(name)
    if exp is None:
        return []
    return [r for r in tracker.search([exp.experiment_id], "") if r.data.tags.get("role") == "trial"]


def _steps(tracker: tracking.Tracker, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in tracker.client.get_metric_history(run_id, key))


@pytest.fixture(scope="module")
def faulty_study(ray_session, tmp_path_factory, _mlflow_template_db):
    work = tmp_path_factory.mktemp("faults")
    db = work / "mlflow.db"
    shutil.copyfile(_mlflow_template_db, db)
    uri = f"sqlite:///{db}"
    path = write_study(
        work, "faults",
        zip=[{"train.seed": list(range(8)), "train.epochs": [KILLED_EPOCHS] + [EPOCHS] * 7}],
        resources={"cpu": 0.25}, max_concurrent=8, max_failures=1,
    )
    killed: dict[str, int] = {}
    stop = threading.Event()
    watcher = tracking.Tracker(uri)

    def kill_trial_0() -> None:
        while not stop.is_set():
            try:
                for run in _children(watcher, "faults"):
                    if run.data.tags.get("trial_index") != "0" or run.info.status != "RUNNING":
                        continue
                    steps = _steps(watcher, run.info.run_id, "train/loss")
                    if steps and steps[-1] >= KILL_AT:
                        pid = int(run.data.tags["pid"])  # the trial's Ray worker process
                        os.kill(pid, signal.SIGKILL)
                        killed.update(pid=pid, epoch=steps[-1])
                        return
            except Exception:  # the store is being created or is busy: look again
                pass
            time.sleep(0.1)

    thread = threading.Thread(target=kill_trial_0, daemon=True)
    thread.start()
    out = io.StringIO()
    try:
        outcome = run_study(
            load_study(path), storage=work / "runs", tracking_uri=uri, console=Console(file=out, width=200), live=False
        )
    finally:
        stop.set()
        thread.join(timeout=10)
    return {"outcome": outcome, "text": out.getvalue(), "killed": killed, "uri": uri, "db": db,
            "tracker": tracking.Tracker(uri)}


def test_killed_trial_process_is_retried_from_its_last_checkpoint(faulty_study):
    """SIGKILL the Ray worker process of a running trial (its pid is the run's ``pid`` tag)
    once epoch 3 is in MLflow; with ``max_failures: 1`` Tune restarts the trial from its
    last checkpoint (epoch >= 2) in the same MLflow run, which ends FINISHED with every
    epoch, and no epoch up to that checkpoint trained twice."""
    fs = faulty_study
    killed, t, text = fs["killed"], fs["tracker"], fs["text"]
    assert killed, "trial #000 finished before it could be killed: " + text
    assert [tr.status for tr in fs["outcome"].trials] == ["done"] * 8, text
    runs = [c for c in _children(t, "faults") if c.data.tags["trial_index"] == "0"]
    assert len(runs) == 1, runs  # the retry continued the same run
    run = runs[0]
    assert run.info.status == "FINISHED" and "error" not in run.data.tags
    assert run.data.tags["resumed"] == "true" and int(run.data.tags["pid"]) != killed["pid"]
    resumed_from = int(run.data.tags["resumed_from_epoch"])
    assert 2 <= resumed_from <= killed["epoch"], (resumed_from, killed)
    steps = _steps(t, run.info.run_id, "train/loss")
    assert sorted(set(steps)) == list(range(1, KILLED_EPOCHS + 1)), steps
    # not restarted from epoch 1: the epochs up to the checkpoint were trained once
    assert [s for s in steps if s <= resumed_from] == list(range(1, resumed_from + 1)), steps
    # an epoch after the checkpoint logged before the kill is logged again by the retry (at most)
    assert all(steps.count(s) <= 2 for s in steps), steps
    assert run.data.metrics["best_epoch"] == KILLED_EPOCHS


def test_eight_concurrent_trials_lose_no_metric_in_sqlite(faulty_study):
    """Eight trials log to the one embedded SQLite store at the same time: every epoch's
    metrics of every trial are there, exactly once (the killed-and-retried trial: once up
    to its checkpoint, at most twice after it)."""
    fs = faulty_study
    t = fs["tracker"]
    children = _children(t, "faults")
    assert len(children) == 8 and all(c.info.status == "FINISHED" for c in children), fs["text"]
    # they did run at the same time
    spans = sorted((c.info.start_time, c.info.end_time) for c in children)
    overlap = max(sum(1 for s, e in spans if s <= t0 < e) for t0, _ in spans)
    assert overlap >= 2, spans

    ids = {c.info.run_id: int(c.data.tags["trial_index"]) for c in children}
    with sqlite3.connect(fs["db"]) as con:
        rows = con.execute(
            "SELECT run_uuid, key, step, COUNT(*) FROM metrics WHERE run_uuid IN (%s) GROUP BY run_uuid, key, step"
            % ",".join("?" * len(ids)),
            list(ids),
        ).fetchall()
    per_run: dict[int, dict[str, dict[int, int]]] = {}
    for run_id, key, step, n in rows:
        if key.startswith("system/"):  # MLflow's system metrics: sampled every few seconds, not per epoch
            continue
        per_run.setdefault(ids[run_id], {}).setdefault(key, {})[step] = n
    assert sorted(per_run) == list(range(8))
    keysets = {frozenset(keys) for keys in per_run.values()}
    assert len(keysets) == 1, keysets  # every trial logged the same metrics
    (keys,) = keysets
    assert {"train/loss", "test/recall_at_1", "epoch", "best_epoch", "best/test/recall_at_1"} <= keys
    resumed_from = int(next(c for c in children if ids[c.info.run_id] == 0).data.tags["resumed_from_epoch"])
    for index, by_key in per_run.items():
        epochs = KILLED_EPOCHS if index == 0 else EPOCHS
        for key, counts in by_key.items():
            want = [epochs] if key.startswith("best") else list(range(1, epochs + 1))
            assert sorted(counts) == want, (index, key, counts)  # no epoch missing
            for step, n in counts.items():
                allowed = 2 if index == 0 and step > resumed_from and not key.startswith("best") else 1
                assert n <= allowed, (index, key, step, n)
    for c in children:  # and MLflow's own view of the latest values agrees
        assert c.data.metrics["epoch"] == c.data.metrics["best_epoch"] == (KILLED_EPOCHS if ids[c.info.run_id] == 0 else EPOCHS)
