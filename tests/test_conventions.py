"""MLflow conventions on a quick trial's child run (sweeper/conventions.py): system
metrics, the split as dataset inputs with a digest of its file and class lists, the
experiment kind and description, source and user tags."""

from __future__ import annotations

import getpass
import hashlib
import io
import json

import numpy as np
import pytest
from rich.console import Console

from conftest import TINY_BASE
from sweeper import tracking
from sweeper.study import load_study
from sweeper.tune import run_study

pytestmark = pytest.mark.slow


def _digest(classes: list[tuple[int, str]], files: list[str]) -> str:
    """The documented digest, written out: sha256 of the compact, key-sorted JSON of the
    side's classes [id, name] and its files, first 32 hex digits."""
    text = json.dumps({"classes": [[c, n] for c, n in classes], "files": files}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def test_a_trial_run_has_system_metrics_split_inputs_and_the_experiment_kind(ray_session, study_file, tmp_path,
                                                                             mlflow_uri):
    base = {**TINY_BASE, "train": {**TINY_BASE["train"], "epochs": 1}}
    path = study_file("conventions", base=base, description="Tiny conventions study.", seeds=[0])
    out = io.StringIO()
    outcome = run_study(load_study(path), storage=tmp_path / "runs", tracking_uri=mlflow_uri,
                        console=Console(file=out, width=200), live=False)
    assert [t.status for t in outcome.trials] == ["done"], out.getvalue()

    t = tracking.Tracker(mlflow_uri)
    exp = t.client.get_experiment_by_name("conventions")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    assert exp.tags["mlflow.note.content"] == "Tiny conventions study."
    (child,) = [r for r in t.search([exp.experiment_id], "") if tracking.TAG_PARENT in r.data.tags]

    # system metrics: CPU and memory of the node, at least one sample
    keys = set(child.data.metrics)
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= keys, sorted(keys)
    assert 0 < child.data.metrics["system/system_memory_usage_megabytes"]

    # source and user
    tags = child.data.tags
    assert tags["mlflow.source.name"] == str(path) and tags["mlflow.source.type"] == "LOCAL"
    assert tags["mlflow.user"] == getpass.getuser()

    # the split: digits' standard split (classes 0-4 train, 5-9 test, no val), in memory:
    # its file list is the sample numbers of scikit-learn's digits in those classes
    from sklearn.datasets import load_digits

    labels = load_digits().target
    inputs = {i.dataset.name: i for i in child.inputs.dataset_inputs}
    assert set(inputs) == {"digits/train", "digits/test"}, set(inputs)
    for side, classes in (("train", range(0, 5)), ("test", range(5, 10))):
        di = inputs[f"digits/{side}"]
        files = [f"#{i}" for i in np.flatnonzero(np.isin(labels, list(classes)))]
        expected = _digest([(c, str(c)) for c in classes], files)
        assert di.dataset.digest == expected, side
        assert {tg.key: tg.value for tg in di.tags}["mlflow.data.context"] == side
        assert json.loads(di.dataset.profile)["num_samples"] == len(files)


def test_sweeper_train_follows_the_same_conventions(tmp_path, mlflow_uri, monkeypatch):
    from sweeper.cli import main

    monkeypatch.chdir(tmp_path)
    sets = ["data.dataset=digits", "data.image_size=16", "data.augmentation=none",
            "model.backbone_params={width: 8, depth: 2}", "model.embed_dim=16", "batch.size=32",
            "batch.samples_per_class=8", "batch.iterations_per_epoch=2", "train.epochs=1", "train.device=cpu",
            "eval.recall_k=[1]", "eval.clustering=false", "eval.embedding_metrics=false", "eval.on_init=false"]
    args = ["train", "--tracking-uri", mlflow_uri, "--experiment", "single"]
    for s in sets:
        args += ["--set", s]
    assert main(args) == 0
    t = tracking.Tracker(mlflow_uri)
    exp = t.client.get_experiment_by_name("single")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    (run,) = t.search([exp.experiment_id], "")
    assert "system/cpu_utilization_percentage" in run.data.metrics
    assert run.data.tags["mlflow.user"] == getpass.getuser() and run.data.tags["mlflow.source.name"] == "sweeper"
    assert sorted(i.dataset.name for i in run.inputs.dataset_inputs) == ["digits/test", "digits/train"]
