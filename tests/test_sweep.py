"""Studies on Ray Tune (``ray.init(num_cpus=2)``, shared) logged to a temporary SQLite MLflow store."""

from __future__ import annotations

import io
import signal
import sys
import time

import pytest
from rich.console import Console

from conftest import TINY_BASE, drive_until
from sweeper import tracking
from sweeper.study import load_study
from sweeper.tune import run_study

pytestmark = pytest.mark.slow


def _run(study, tmp_path, uri, **kw):
    out = io.StringIO()
    outcome = run_study(
        study, storage=tmp_path / "runs", tracking_uri=uri, console=Console(file=out, width=200), live=False, **kw
    )
    return outcome, out.getvalue()


def _runs(uri, study_name):
    t = tracking.Tracker(uri)
    exp = t.client.get_experiment_by_name(study_name)
    runs = t.search([exp.experiment_id], "")
    parents = [r for r in runs if tracking.TAG_PARENT not in r.data.tags]
    children = [r for r in runs if tracking.TAG_PARENT in r.data.tags]
    return t, parents, children


def test_grid_2x2_times_2_seeds_gives_8_child_runs(ray_session, study_file, tmp_path, mlflow_uri):
    study = load_study(
        study_file(
            "grid",
            axes={"loss.name": ["margin", "multi_similarity"], "model.embed_dim": [8, 16]},
            seeds=[0, 1],
            max_concurrent=2,
        )
    )
    outcome, text = _run(study, tmp_path, mlflow_uri)
    assert [t.status for t in outcome.trials] == ["done"] * 8, text
    assert len(outcome.ranked()) == 8 and outcome.best.value > 0

    tracker, parents, children = _runs(mlflow_uri, "grid")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    parent = parents[0]
    assert parent.data.tags["study"] == "grid" and parent.data.tags["role"] == "study"
    assert len(children) == 8
    assert {c.data.tags[tracking.TAG_PARENT] for c in children} == {parent.info.run_id}
    assert all(c.info.status == "FINISHED" for c in children)

    got = sorted(
        (c.data.params["loss.name"], c.data.params["model.embed_dim"], c.data.params["train.seed"]) for c in children
    )
    want = sorted((l, str(d), str(s)) for l in ("margin", "multi_similarity") for d in (8, 16) for s in (0, 1))
    assert got == want
    c = children[0]
    # params are every dotted key of the resolved config
    from dmlcore.config import all_keys

    assert {k for k in c.data.params} >= {k for k in all_keys() if not k.endswith(("params", "regularizers"))} - {
        "model.backbone_params"
    }
    assert c.data.params["data.dataset"] == "digits" and c.data.params["model.backbone_params.width"] == "8"
    # tags: study, trial key, version, host
    assert c.data.tags["study"] == "grid" and c.data.tags["trial_key"].startswith(outcome.execution + "/")
    assert c.data.tags["dmlcore_version"] and c.data.tags["host"] and c.data.tags["node_ip"]
    assert "git_commit" in c.data.tags  # the repo is a git checkout
    assert len({ch.data.tags["trial_key"] for ch in children}) == 8
    # per-epoch metrics, and the selected ("best/") values
    hist = tracker.client.get_metric_history(c.info.run_id, "test/recall_at_1")
    assert sorted(m.step for m in hist) == [1, 2]
    assert sorted(m.step for m in tracker.client.get_metric_history(c.info.run_id, "train/loss")) == [1, 2]
    assert "best/test/recall_at_1" in c.data.metrics and c.data.metrics["best_epoch"] == 2
    # the resolved config as an artifact
    assert "config.yaml" in [a.path for a in tracker.client.list_artifacts(c.info.run_id)]
    assert "leaderboard.csv" in [a.path for a in tracker.client.list_artifacts(parent.info.run_id)]
    # Tune's storage for this execution
    assert (outcome.exec_dir / "sweeper.json").is_file() and outcome.exec_dir.parent == (tmp_path / "runs").resolve()


def test_optuna_search_runs_n_samples_with_asha(ray_session, study_file, tmp_path, mlflow_uri):
    study = load_study(
        study_file(
            "search",
            search={
                "samples": 3,
                "seed": 1,
                "space": {
                    "optim.lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True},
                    "model.embed_dim": {"type": "int", "low": 8, "high": 24, "step": 8},
                    "loss.name": {"type": "categorical", "values": ["margin", "multi_similarity"]},
                },
            },
            scheduler={"type": "asha", "grace_period": 1, "reduction_factor": 2},
            max_concurrent=2,
        )
    )
    outcome, text = _run(study, tmp_path, mlflow_uri)
    assert len(outcome.trials) == 3, text
    assert all(t.status in ("done", "stopped") for t in outcome.trials), text
    _, parents, children = _runs(mlflow_uri, "search")
    assert len(parents) == 1 and len(children) == 3
    for c in children:
        assert c.info.status == "FINISHED"
        lr = float(c.data.params["optim.lr"])
        assert 1e-4 <= lr <= 1e-2
        assert c.data.params["model.embed_dim"] in ("8", "16", "24")
        assert c.data.params["loss.name"] in ("margin", "multi_similarity")
    assert len({c.data.params["optim.lr"] for c in children}) == 3  # three different proposals


def test_failing_trial_is_failed_in_mlflow_and_the_study_goes_on(ray_session, study_file, tmp_path, mlflow_uri):
    # a missing pretrained file passes validation (the path may exist on a worker) but fails the trial
    weights = tmp_path / "weights.pt"
    study = load_study(study_file("failing", axes={"model.pretrained": [None, str(weights)]}, max_concurrent=1))
    outcome, text = _run(study, tmp_path, mlflow_uri)
    status = {t.index: t.status for t in outcome.trials}
    assert status == {0: "done", 1: "failed"}, text
    (bad,) = outcome.failed
    assert "not found" in bad.error and "\n" not in bad.error
    tracker, parents, children = _runs(mlflow_uri, "failing")
    by_index = {c.data.tags["trial_index"]: c for c in children}
    assert by_index["0"].info.status == "FINISHED"
    failed = by_index["1"]
    assert failed.info.status == "FAILED"
    assert "not found" in failed.data.tags["error"]
    assert "error.txt" in [a.path for a in tracker.client.list_artifacts(failed.info.run_id)]
    assert parents[0].info.status == "FINISHED" and parents[0].data.tags["trials_failed"] == "1"
    # the summary lists it
    from sweeper.cli import print_outcome

    buf = io.StringIO()
    print_outcome(outcome, Console(file=buf, width=200))
    assert "Failed trials" in buf.getvalue() and "not found" in buf.getvalue()

    # --resume retries the errored trial (Tuner.restore(resume_errored=True)) in the same
    # MLflow run; the finished one is not run again
    import torch

    from dmlcore import registry

    net, _ = registry.build("backbone", "small_cnn", {"width": 8, "depth": 2}, pretrained=None)
    torch.save(net.state_dict(), weights)
    outcome, text = _run(study, tmp_path, mlflow_uri, resume=True)
    assert {t.index: t.status for t in outcome.trials} == {0: "done", 1: "done"}, text
    tracker, parents, after = _runs(mlflow_uri, "failing")
    assert len(parents) == 1 and len(after) == 2
    again = {c.data.tags["trial_index"]: c for c in after}
    assert again["1"].info.run_id == failed.info.run_id and again["1"].info.status == "FINISHED"
    assert "error" not in again["1"].data.tags
    assert again["0"].info.run_id == by_index["0"].info.run_id
    assert [m.step for m in tracker.client.get_metric_history(again["0"].info.run_id, "train/loss")] == [1, 2]



def _statuses(uri: str, study: str) -> list[str]:
    try:
        _, _, children = _runs(uri, study)
    except Exception:  # the store or the experiment does not exist yet
        return []
    return [c.info.status for c in children]


def test_killed_study_resumes_without_duplicate_runs(ray_session, study_file, tmp_path, mlflow_uri):
    """The driver runs as a subprocess joined to the session's Ray and is SIGKILLed once a
    trial has finished in MLflow; ``--resume`` then completes the study: the finished
    trial is not trained again and no MLflow run is duplicated."""
    path = study_file("killed", axes={"model.embed_dim": [8, 16]}, seeds=[0, 1], max_concurrent=2)
    cmd = [
        sys.executable, "-m", "sweeper.cli", "run", str(path), "--address", ray_session,
        "--storage", str(tmp_path / "runs"), "--tracking-uri", mlflow_uri, "--no-live",
    ]
    log_path = tmp_path / "driver.log"
    drive_until(cmd, cwd=tmp_path, log_path=log_path, sig=signal.SIGKILL, wait=30,
                until=lambda: _statuses(mlflow_uri, "killed").count("FINISHED") >= 1,
                what="a trial had finished in MLflow")
    _, parents, before = _runs(mlflow_uri, "killed")
    run_ids = {c.data.tags["trial_key"]: c.info.run_id for c in before}
    finished = [c.data.tags["trial_key"] for c in before if c.info.status == "FINISHED"]
    assert len(parents) == 1 and 1 <= len(finished) < 4, log_path.read_text()

    outcome, text = _run(load_study(path), tmp_path, mlflow_uri, resume=True)
    assert [t.status for t in outcome.trials] == ["done"] * 4, text

    tracker, parents, children = _runs(mlflow_uri, "killed")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    keys = [c.data.tags["trial_key"] for c in children]
    assert len(keys) == 4 and len(set(keys)) == 4, keys  # exactly one MLflow run per trial
    assert all(c.info.status == "FINISHED" for c in children)
    by_key = {c.data.tags["trial_key"]: c for c in children}
    for key, run_id in run_ids.items():
        assert by_key[key].info.run_id == run_id  # runs opened before the kill are continued
    for key in finished:  # not trained again: still exactly one value per epoch
        steps = [m.step for m in tracker.client.get_metric_history(run_ids[key], "train/loss")]
        assert sorted(steps) == [1, 2], (key, steps)


def test_fractional_gpus_pack_trials_onto_one_gpu(ray_session, study_file, tmp_path, mlflow_uri):
    """``resources.gpu: 0.25`` packs trials onto one GPU: the session's Ray has one (a
    logical resource; the trials train on the CPU), all four trials get GPU 0 and they
    run at the same time. With ``gpu: 1`` Ray would run them one after the other."""
    import ray

    assert ray.cluster_resources().get("GPU") == 1
    study = load_study(
        study_file(
            "packed",
            seeds=[0, 1, 2, 3],
            resources={"cpu": 0.5, "gpu": 0.25},
            max_concurrent=4,
            base={**TINY_BASE, "batch": {**TINY_BASE["batch"], "iterations_per_epoch": 12},
                  "train": {**TINY_BASE["train"], "epochs": 3}},
        )
    )
    outcome, text = _run(study, tmp_path, mlflow_uri)
    assert [t.status for t in outcome.trials] == ["done"] * 4, text
    _, parents, children = _runs(mlflow_uri, "packed")
    assert len(children) == 4
    assert [c.data.tags.get("gpu_ids") for c in children] == ["0"] * 4
    assert parents[0].data.params["study.resources.gpu"] == "0.25"
    spans = sorted((c.info.start_time, c.info.end_time) for c in children)
    overlap = max(sum(1 for s, e in spans if s <= t0 < e) for t0, _ in spans)
    assert overlap >= 2, spans  # more than one trial on the one GPU at a time
