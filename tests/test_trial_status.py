"""Who ends a trial's MLflow run when Tune stops the trial (a scheduler's early stop, a
study shutting down): the driver, never the trial. Tune's stop only sets an event and
does not wait for the trial's thread (``session.finish(timeout=0)``), so the thread's
``SystemExit`` reaches the trial's code at some later moment; a status written then used
to land after the driver had settled the run FINISHED, and turned it KILLED (CI, stop 23:
``test_optuna_search_runs_n_samples_with_asha``). This test replays that order without
Ray: the driver settles first, then the trial's thread gets its ``SystemExit``."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from conftest import TINY_BASE
from sweeper import tracking, tune as tunemod


@pytest.mark.filterwarnings("ignore:`get_trial_id` is meant to only be called")
def test_a_trial_stopped_by_tune_leaves_its_run_to_the_driver(monkeypatch, mlflow_uri, tmp_path):
    import ray.tune

    tracker = tracking.Tracker(mlflow_uri)
    exp = tracker.client.create_experiment("status")
    parent = tracker.client.create_run(exp).info.run_id
    base = {**TINY_BASE, "train": {**TINY_BASE["train"], "epochs": 3}, "eval": {**TINY_BASE["eval"], "log_model": False}}
    ctx = tunemod.TrialContext("status", "e1", base, "test/recall_at_1", "max", tracking_uri=mlflow_uri,
                               experiment_id=exp, parent_run_id=parent, cwd=str(tmp_path))
    first_report, stop = threading.Event(), threading.Event()

    def report(metrics, checkpoint=None):  # Tune's session on a stop: blocks, then SystemExit
        first_report.set()
        stop.wait(60)
        raise SystemExit(0)

    monkeypatch.setattr(ray.tune, "report", report)
    monkeypatch.setattr(ray.tune, "get_checkpoint", lambda: None)
    errors: list[BaseException] = []

    def trial():
        try:
            tunemod.run_trial({"point": {"index": 0, "overrides": {}}}, ctx)
        except BaseException as err:  # noqa: BLE001 (SystemExit is what Tune's stop raises)
            errors.append(err)

    thread = threading.Thread(target=trial, daemon=True)
    thread.start()
    assert first_report.wait(120), "the trial never reported its first epoch"
    (run,) = tracker.children(exp, parent)
    assert run.info.status == "RUNNING"
    assert [m.step for m in tracker.client.get_metric_history(run.info.run_id, "train/loss")] == [1]

    # the driver: ASHA stopped the trial at epoch 1
    outcome = tunemod.StudyOutcome("status", "e1", Path(tmp_path), "test/recall_at_1", "max", [],
                                   experiment_id=exp, parent_run_id=parent)
    outcome.trials.append(tunemod.TrialOutcome("local", 0, {}, "stopped"))
    tunemod._settle_mlflow(tracker, outcome, ctx)
    assert tracker.client.get_run(run.info.run_id).info.status == "FINISHED"

    stop.set()  # only now does the trial's thread get Tune's SystemExit
    thread.join(60)
    assert not thread.is_alive() and len(errors) == 1 and isinstance(errors[0], SystemExit)
    after = tracker.client.get_run(run.info.run_id)
    assert after.info.status == "FINISHED" and after.data.tags.get("early_stopped") == "true"
    assert [m.step for m in tracker.client.get_metric_history(run.info.run_id, "train/loss")] == [1]


def test_recording_leaves_the_status_on_a_killed_exception_when_told(mlflow_uri):
    tracker = tracking.Tracker(mlflow_uri)
    exp = tracker.client.create_experiment("rec")
    ids = []
    for status in (None, "KILLED"):
        run_id = tracker.client.create_run(exp).info.run_id
        ids.append(run_id)
        with pytest.raises(SystemExit):
            with tracking.recording(tracking.RunLogger(tracker, run_id), killed=(SystemExit,), killed_status=status):
                raise SystemExit(0)
    assert [tracker.client.get_run(i).info.status for i in ids] == ["RUNNING", "KILLED"]
