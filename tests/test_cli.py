"""The ``sweeper`` command line: show, train, list, keys, run --dry-run, ui; one-line errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from sweeper.cli import main

TINY_SET = [
    "data.dataset=digits", "data.image_size=16", "data.augmentation=none",
    "model.backbone_params={width: 8, depth: 2}", "model.embed_dim=16",
    "batch.size=32", "batch.samples_per_class=8", "batch.iterations_per_epoch=3",
    "optim.lr=1e-3", "train.epochs=2", "train.device=cpu",
    "eval.recall_k=[1, 2]", "eval.clustering=false", "eval.embedding_metrics=false",
]


def _sets(items):
    out = []
    for s in items:
        out += ["--set", s]
    return out


def _sweeper_cmd() -> list[str]:
    script = Path(sys.executable).with_name("sweeper")
    return [str(script)] if script.exists() else [sys.executable, "-m", "sweeper.cli"]


def test_show_prints_trial_table_and_size(study_file, capsys):
    path = study_file(axes={"loss.name": ["margin", "multi_similarity"], "model.embed_dim": [8, 16]}, seeds=[0, 1])
    assert main(["show", str(path)]) == 0
    out = capsys.readouterr().out
    assert "8 trials" in out and "multi_similarity" in out and "train.seed" in out
    assert main(["show", str(path), "--set", "train.epochs=1"]) == 0


def test_show_error_is_one_red_line(study_file, capsys):
    path = study_file(axes={"loss.name": ["margn"]})
    assert main(["show", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "did you mean 'margin'" in err and "tiny.yaml" in err


def test_train_wrong_key_one_line_exit_2_no_traceback(tmp_path):
    r = subprocess.run(
        _sweeper_cmd() + ["train", "--set", "model.embdim=64", "--no-mlflow"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )
    assert r.returncode == 2, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, r.stderr
    assert "model.embdim" in lines[0] and "did you mean 'model.embed_dim'" in lines[0]
    assert "Traceback" not in r.stderr + r.stdout
    assert not (tmp_path / "mlflow.db").exists()


def test_train_bad_registry_name_and_missing_file(capsys, tmp_path):
    assert main(["train", "--set", "loss.name=margn", "--no-mlflow"]) == 2
    assert "did you mean 'margin'" in capsys.readouterr().err
    assert main(["train", str(tmp_path / "nope.yaml"), "--no-mlflow"]) == 2
    assert "nope.yaml: no such file" in capsys.readouterr().err


@pytest.mark.slow
def test_train_logs_one_mlflow_run(tmp_path, mlflow_uri, capsys):
    from sweeper import tracking

    ckpt = tmp_path / "ckpt" / "checkpoint.pt"
    rc = main(["train", *_sets(TINY_SET), "--tracking-uri", mlflow_uri, "--experiment", "cli", "--checkpoint", str(ckpt)])
    assert rc == 0
    out = capsys.readouterr().out
    assert "best (epoch 2)" in out and "test/recall_at_1" in out
    assert ckpt.is_file()
    t = tracking.Tracker(mlflow_uri)
    exp = t.client.get_experiment_by_name("cli")
    (run,) = t.search([exp.experiment_id], "")
    assert run.info.status == "FINISHED" and run.data.tags["role"] == "train"
    assert run.data.params["model.embed_dim"] == "16" and run.data.params["loss.name"] == "margin"
    assert sorted(m.step for m in t.client.get_metric_history(run.info.run_id, "test/recall_at_1")) == [1, 2]
    pictures = {f.path for f in t.client.list_artifacts(run.info.run_id, "pictures")}  # eval.pictures: on by default
    assert {"pictures/retrieval_grid.png", "pictures/learning_curves.png", "pictures/embedding_map.html"} <= pictures


def test_list_and_keys(capsys):
    assert main(["list", "losses"]) == 0
    out = capsys.readouterr().out
    assert "margin" in out and "multi_similarity" in out
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert all(k in out for k in ("dataset", "backbone", "digits", "small_cnn"))
    assert main(["list", "lose"]) == 2
    assert "did you mean 'loss'" in capsys.readouterr().err
    assert main(["keys"]) == 0
    out = capsys.readouterr().out
    assert "model.embed_dim" in out and "train.epochs" in out and "150" in out
    assert main(["keys", "nothing"]) == 2


def test_run_dry_run_and_resume_without_execution(study_file, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = study_file(axes={"model.embed_dim": [8, 16]})
    assert main(["run", str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "2 trials" in out and "dry run" in out and str(tmp_path / "runs" / "tiny") in out
    assert not (tmp_path / "runs").exists()
    assert main(["run", str(path), "--resume", "--storage", str(tmp_path / "runs")]) == 2
    assert "no earlier execution" in capsys.readouterr().err


def test_ui_binds_localhost_on_the_same_store(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert main(["ui", "--print-command"]) == 0
    out = capsys.readouterr().out
    assert "--host 127.0.0.1" in out and f"sqlite:///{tmp_path / 'mlflow.db'}" in out
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking:5000")
    assert main(["ui", "--print-command", "--port", "5050"]) == 0
    assert "http://tracking:5000" in capsys.readouterr().out
