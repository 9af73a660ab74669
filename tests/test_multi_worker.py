"""Multi-worker trials (``resources: {workers: 2, cpu: 1, gpu: 0}``): Ray Train inside the
Tune trial, on the session's ``ray.init(num_cpus=2)`` (with the ``trial_driver`` resource
and the dashboard, as the sweeper starts it). Plumbing only, not data-parallel math:
FINISHED child runs with per-epoch metrics, ASHA stopping a trial and the next one
starting, ``--resume`` after a SIGKILL continuing from the checkpoint, the refusal of a
study whose workers fit nowhere. Every wait has a timeout."""

from __future__ import annotations

import io
import signal
import sys
import time

import pytest
from rich.console import Console

from conftest import TINY_BASE, drive_until
from sweeper import multi_worker, tracking
from sweeper.preflight import PreflightError
from sweeper.study import load_study
from sweeper.tune import run_study

pytestmark = pytest.mark.slow

TWO_WORKERS = {"workers": 2, "cpu": 1, "gpu": 0}


def _base(epochs: int) -> dict:
    return {**TINY_BASE, "train": {**TINY_BASE["train"], "epochs": epochs}}


def _run(study, tmp_path, uri, **kw):
    out = io.StringIO()
    outcome = run_study(
        study, storage=tmp_path / "runs", tracking_uri=uri, console=Console(file=out, width=200), live=False, **kw
    )
    return outcome, out.getvalue()


def _children(uri: str, study: str) -> list:
    t = tracking.Tracker(uri)
    exp = t.client.get_experiment_by_name(study)
    if exp is None:
        return []
    return [r for r in t.search([exp.experiment_id], "") if tracking.TAG_PARENT in r.data.tags]


def _steps(uri: str, run_id: str, key: str = "train/loss") -> list[int]:
    return sorted(m.step for m in tracking.Tracker(uri).client.get_metric_history(run_id, key))


# ----------------------------------------------------------------------------- pure functions
def test_concurrency_cap_and_placement_count_whole_workers_per_node():
    nodes = [{"CPU": 3, "GPU": 2}, {"CPU": 8, "GPU": 2}]
    assert multi_worker.worker_slots(1, 1, nodes[0]) == 2  # 2 GPUs bound it
    assert multi_worker.concurrency_cap(2, 1, 1, nodes) == 2  # 4 GPU workers / 2
    assert multi_worker.concurrency_cap(2, 1, 0, nodes) == 5  # 11 CPU workers / 2
    assert multi_worker.concurrency_cap(2, 1.5, 0, [{"CPU": 2}, {"CPU": 2}]) == 1  # 1 worker per node
    assert multi_worker.workers_problems(2, 1.5, 0, [{"CPU": 2}, {"CPU": 2}], "the Ray cluster") == []
    (line,) = multi_worker.workers_problems(3, 1.5, 0, [{"CPU": 2}, {"CPU": 2}], "the Ray cluster")
    assert "3 workers x (1.5 CPU, 0 GPU) = 4.5 CPUs" in line and "can place 2 such workers" in line
    assert multi_worker.trial_resources(load_study_resources(workers=2)) == {"trial_driver": 1.0}
    assert multi_worker.trial_resources(load_study_resources(workers=1, cpu=2)) == {"cpu": 2.0}


def load_study_resources(**kw):
    from sweeper.study import Resources

    return Resources(**kw)


def test_resume_finds_the_latest_train_checkpoint_of_a_trial(tmp_path):
    from sweeper.tune import latest_checkpoint

    for name in ("checkpoint_000001", "checkpoint_000003", "checkpoint_000002"):
        d = tmp_path / "train-abc_00000" / name
        d.mkdir(parents=True)
        (d / "checkpoint.pt").write_bytes(b"x")
    (tmp_path / "train-abc_00001" / "checkpoint_000009").mkdir(parents=True)  # another trial
    (tmp_path / "train-abc_00001" / "checkpoint_000009" / "checkpoint.pt").write_bytes(b"x")
    assert latest_checkpoint(tmp_path, "abc_00000") == tmp_path / "train-abc_00000" / "checkpoint_000003" / "checkpoint.pt"
    assert latest_checkpoint(tmp_path, "abc_00002") is None
    # only those of epochs MLflow has (the workers may have checkpointed further)
    assert latest_checkpoint(tmp_path, "abc_00000", 2) == tmp_path / "train-abc_00000" / "checkpoint_000002" / "checkpoint.pt"
    assert latest_checkpoint(tmp_path, "abc_00000", 0) is None


def test_unknown_resources_key_is_refused():
    from sweeper.study import Resources

    with pytest.raises(ValueError, match="worker"):
        Resources(worker=2)
    with pytest.raises(ValueError):
        Resources(workers=0)


# ----------------------------------------------------------------------------- on Ray
def test_multi_worker_sweep_is_capped_to_the_cluster_and_never_reuses_actors(ray_session, study_file):
    from sweeper.tune import build_tune_config

    many = load_study(study_file("cap", resources=TWO_WORKERS, seeds=[0, 1, 2], max_concurrent=3))
    tc, _ = build_tune_config(many)
    assert tc.max_concurrent_trials == 1 and tc.reuse_actors is False  # 2 CPUs // (2 workers x 1 CPU)
    plain = load_study(study_file("plain", seeds=[0, 1, 2], max_concurrent=3))
    tc, _ = build_tune_config(plain)
    assert tc.max_concurrent_trials == 3 and tc.reuse_actors is True  # one-worker trials: unchanged


def test_study_asking_more_workers_than_the_cluster_has_is_refused_in_seconds(
        ray_session, study_file, tmp_path, mlflow_uri):
    study = load_study(study_file("toomany", resources={"workers": 3, "cpu": 1, "gpu": 0}))
    t0 = time.perf_counter()
    with pytest.raises(PreflightError) as err:
        _run(study, tmp_path, mlflow_uri)
    assert time.perf_counter() - t0 < 15
    (line,) = err.value.problems
    assert line.startswith("resources.workers: each trial asks for 3 workers x (1 CPU, 0 GPU) = 3 CPUs"), line
    assert "can place 2 such workers" in line
    assert not (tmp_path / "runs").exists()  # nothing written, no trial started


def test_two_worker_study_with_asha_finishes_and_the_trial_after_a_stopped_one_starts(
        ray_session, study_file, tmp_path, mlflow_uri):
    """Two 2-worker trials on 2 CPUs, one at a time (the cap: 2 CPUs // 2 workers). ASHA
    (``max_t: 2`` of 3 epochs) stops the first at epoch 2; the second must then start (an
    ASHA stop kills the trial: its workers' placement group has to be released, its actor
    must not be reused) and is stopped after its first epoch: unable to learn (lr 1e-9)
    with a margin of 1.0 instead of 0.2, its margin loss is above the first trial's at
    epoch 1 by construction (every pair is active: d_ap - 0.2 + 2.2 - d_an > 1.3 on unit
    embeddings), not by how much 3 steps of learning happen to lower it. The epoch Tune
    stopped it at is in MLflow when the study returns; no later epoch ever gets there."""
    study = load_study(study_file(
        "mw", base=_base(3), resources=TWO_WORKERS,
        zip=[{"optim.lr": [0.02, 1.0e-9], "loss.params": [{"margin": 0.2}, {"margin": 1.0}]}],
        scheduler={"metric": "train/loss", "mode": "min", "grace_period": 1, "reduction_factor": 2, "max_t": 2},
    ))
    t0 = time.perf_counter()
    outcome, text = _run(study, tmp_path, mlflow_uri)
    wall = time.perf_counter() - t0
    assert [t.status for t in outcome.trials] == ["stopped", "stopped"], text
    runs = {int(r.data.tags[tracking.TAG_TRIAL_INDEX]): r for r in _children(mlflow_uri, "mw")}
    assert sorted(runs) == [0, 1]  # one run per trial
    assert all(r.info.status == "FINISHED" and r.data.tags.get("early_stopped") == "true" for r in runs.values())
    assert _steps(mlflow_uri, runs[0].info.run_id) == [1, 2]  # every epoch Tune took, once
    assert _steps(mlflow_uri, runs[0].info.run_id, "test/recall_at_1") == [1, 2]
    assert _steps(mlflow_uri, runs[1].info.run_id) == [1]
    loss = {i: tracking.Tracker(mlflow_uri).client.get_metric_history(r.info.run_id, "train/loss") for i, r in runs.items()}
    assert loss[1][0].value > loss[0][0].value, loss  # why ASHA stopped it
    time.sleep(3)  # the stopped trial's workers train on until Tune's kill reaches them
    assert _steps(mlflow_uri, runs[1].info.run_id) == [1]  # ... and none of that epoch gets to MLflow
    train_dirs = list((tmp_path / "runs").glob("*/train-*"))
    assert len(train_dirs) == 2, train_dirs  # both trained through Ray Train
    print(f"2 two-worker trials with ASHA: {wall:.1f} s")


def test_sigkilled_multi_worker_study_resumes_from_its_checkpoint(ray_session, study_file, tmp_path, mlflow_uri):
    """The driver (a subprocess joined to the session's Ray) is SIGKILLed once the trial's
    first epoch is in MLflow; ``--resume`` continues the same MLflow run from the Train
    checkpoint of that epoch (tag ``resumed_from_epoch``), each epoch logged once."""
    path = study_file("mwkill", base={**_base(4), "train": {**_base(4)["train"], "checkpoint_every": 1}},
                      resources=TWO_WORKERS)
    cmd = [sys.executable, "-m", "sweeper.cli", "run", str(path), "--address", ray_session,
           "--storage", str(tmp_path / "runs"), "--tracking-uri", mlflow_uri, "--no-live"]
    log_path = tmp_path / "driver.log"

    def first_epoch_checkpointed() -> bool:
        runs = _children(mlflow_uri, "mwkill")
        return bool(runs and _steps(mlflow_uri, runs[0].info.run_id)
                    and list((tmp_path / "runs").glob("*/train-*/checkpoint_*/checkpoint.pt")))

    drive_until(cmd, cwd=tmp_path, log_path=log_path, until=first_epoch_checkpointed, sig=signal.SIGKILL,
                what="the first epoch was in MLflow and checkpointed", wait=30)
    (before,) = _children(mlflow_uri, "mwkill")
    done_before = _steps(mlflow_uri, before.info.run_id)
    assert before.info.status == "RUNNING" and 1 <= len(done_before) < 4, log_path.read_text()

    outcome, text = _run(load_study(path), tmp_path, mlflow_uri, resume=True)
    assert [t.status for t in outcome.trials] == ["done"], text
    (after,) = _children(mlflow_uri, "mwkill")
    assert after.info.run_id == before.info.run_id and after.info.status == "FINISHED"
    resumed = int(after.data.tags["resumed_from_epoch"])
    assert 1 <= resumed <= max(done_before)  # the newest checkpoint of an epoch MLflow has
    steps = _steps(mlflow_uri, after.info.run_id)
    assert sorted(set(steps)) == [1, 2, 3, 4] and len(steps) <= 4 + (max(done_before) - resumed), steps
