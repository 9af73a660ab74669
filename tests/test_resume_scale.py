"""Issue 20 (done-when at small size; ``benchmarks/resume_scale.py`` is the 2,000-trial run):
a study of 30 tiny trials whose driver is SIGKILLed once about half are done resumes with
``--resume`` to exactly one MLflow run per trial, every one FINISHED, the runs of the killed
attempt continued and the finished trials not trained again."""

from __future__ import annotations

import collections
import io
import os
import re
import signal
import sys

import pytest
from rich.console import Console

from conftest import TINY_BASE, drive_until
from sweeper import tracking
from sweeper.study import load_study
from sweeper.tune import run_study

pytestmark = pytest.mark.slow

N, KILL_AT = 30, 15
BASE = {**TINY_BASE, "batch": {**TINY_BASE["batch"], "iterations_per_epoch": 1}, "train": {**TINY_BASE["train"], "epochs": 1}}
DONE = re.compile(r"^\[(\d+)/\d+\]\s+done\b")


def _children(uri: str, name: str) -> list:
    t = tracking.Tracker(uri)
    exp = t.client.get_experiment_by_name(name)
    return [r for r in t.search([exp.experiment_id], "") if tracking.TAG_PARENT in r.data.tags]


def test_sigkilled_study_of_30_trials_resumes_without_a_duplicate_run(ray_session, tmp_path, mlflow_uri):
    import yaml

    path = tmp_path / "scale.yaml"
    path.write_text(yaml.safe_dump({"name": "scale", "base": BASE, "seeds": list(range(N)), "max_concurrent": 2,
                                    "metric": "test/recall_at_1", "mode": "max"}, sort_keys=False))
    cmd = [sys.executable, "-m", "sweeper.cli", "run", str(path), "--address", ray_session,
           "--storage", str(tmp_path / "runs"), "--tracking-uri", mlflow_uri, "--no-live"]
    log_path = tmp_path / "driver.log"

    def killed_at() -> bool:
        done = [int(m.group(1)) for ln in log_path.read_text().splitlines() if (m := DONE.match(ln))]
        return max(done or [0]) >= KILL_AT

    drive_until(cmd, cwd=tmp_path, log_path=log_path, until=killed_at, sig=signal.SIGKILL, wait=30, poll=0.2,
                env={**os.environ, "PYTHONUNBUFFERED": "1"}, what=f"{KILL_AT} trials were done")
    before = _children(mlflow_uri, "scale")
    keys_before = collections.Counter(r.data.tags["trial_key"] for r in before)
    assert max(keys_before.values()) == 1, keys_before  # no duplicate even before the resume
    finished = {r.data.tags["trial_key"]: r.info.run_id for r in before if r.info.status == "FINISHED"}
    opened = {r.data.tags["trial_key"]: r.info.run_id for r in before}
    assert KILL_AT <= len(finished) < N, (len(finished), log_path.read_text()[-2000:])

    out = io.StringIO()
    outcome = run_study(load_study(path), storage=tmp_path / "runs", tracking_uri=mlflow_uri, resume=True,
                        console=Console(file=out, width=200), live=False, analyses=False)
    assert f"{len(finished)} of {N} trials finished earlier" in out.getvalue(), out.getvalue()
    assert [t.status for t in outcome.trials] == ["done"] * N, out.getvalue()

    after = _children(mlflow_uri, "scale")
    keys = collections.Counter(r.data.tags["trial_key"] for r in after)
    assert len(after) == N and len(keys) == N and set(keys.values()) == {1}  # exactly one run per trial
    assert all(r.info.status == "FINISHED" for r in after)
    by_key = {r.data.tags["trial_key"]: r for r in after}
    assert all(by_key[k].info.run_id == rid for k, rid in opened.items())  # the killed attempt's runs continued
    tracker = tracking.Tracker(mlflow_uri)
    for key in list(finished)[:3]:  # not trained again: one value of the one epoch
        steps = [m.step for m in tracker.client.get_metric_history(finished[key], "train/loss")]
        assert steps == [1], (key, steps)
    started = [ln for ln in out.getvalue().splitlines() if re.match(r"^\[\d+/\d+\]\s+started\b", ln)]
    assert len(started) == N - len(finished), started  # only the unfinished trials ran again


def test_a_trial_killed_after_its_last_checkpoint_resumes_as_done(ray_session, tmp_path, mlflow_uri):
    """The window the 30-trial kill sometimes hits, made deterministic: a trial whose last
    checkpoint was written but whose run was not FINISHED yet (its run set back to RUNNING
    here) is resumed from that checkpoint with nothing left to train; it must still come
    back done, with its metric, in the leaderboard, not "stopped" without a value."""
    import yaml

    path = tmp_path / "window.yaml"
    path.write_text(yaml.safe_dump({"name": "window", "base": BASE, "seeds": [0, 1], "max_concurrent": 2,
                                    "metric": "test/recall_at_1", "mode": "max"}, sort_keys=False))
    kw = dict(storage=tmp_path / "runs", tracking_uri=mlflow_uri, live=False, analyses=False)
    first = run_study(load_study(path), console=Console(file=io.StringIO(), width=200), **kw)
    assert [t.status for t in first.trials] == ["done", "done"]
    tracker = tracking.Tracker(mlflow_uri)
    victim = first.trials[1]
    tracker.set_status(victim.run_id, "RUNNING")  # as if SIGKILLed before set_terminated
    tracker.set_status(first.parent_run_id, "KILLED")

    out = io.StringIO()
    outcome = run_study(load_study(path), resume=True, console=Console(file=out, width=200), **kw)
    assert "1 of 2 trials finished earlier" in out.getvalue(), out.getvalue()
    again = {t.index: t for t in outcome.trials}[victim.index]
    assert again.status == "done" and again.value == victim.value, (again, out.getvalue())
    assert again.run_id == victim.run_id and tracker.get_run(victim.run_id).info.status == "FINISHED"
    assert victim.index in {t.index for t in outcome.ranked()}
    steps = [m.step for m in tracker.client.get_metric_history(victim.run_id, "train/loss")]
    assert steps == [1], steps  # not trained again
