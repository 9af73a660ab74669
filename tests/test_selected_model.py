"""The selected model (issue 19, item 1): kept at the selected epoch, carried through a
checkpoint restore, logged as an MLflow LoggedModel per child run, and used by
``sweeper embed`` / ``sweeper retrieve`` (bad input: one line, exit 2)."""

from __future__ import annotations

import copy
import io
import logging

import numpy as np
import pytest
import torch
from rich.console import Console

from conftest import TINY_BASE
from dmlcore.config import RunConfig
from dmlcore.train import ListReporter, Trainer
from sweeper import tracking
from sweeper.cli import main
from sweeper.study import load_study
from sweeper.tune import run_study


# ----------------------------------------------------------------------------- the trainer
def _scripted_eval(values):
    """Trainer.evaluate returning test/recall_at_1 = values[call] (the selected epoch is then known)."""
    calls = []

    def evaluate(self):
        calls.append(1)
        return {"test/recall_at_1": values[len(calls) - 1]}

    return evaluate


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_selected_weights_are_kept_and_survive_a_restore(monkeypatch):
    """Best at epoch 1 of 3 (select_on test): the weights of epoch 1 are kept, the checkpoints
    of epochs 2 and 3 carry them (``best_model``), and a trainer resumed from the epoch-2
    checkpoint ends with exactly the epoch-1 weights."""
    cfg = RunConfig.model_validate({**copy.deepcopy(TINY_BASE), "name": "sel",
                                    "train": {"epochs": 3, "device": "cpu", "checkpoint_every": 1},
                                    "eval": {**TINY_BASE["eval"], "select_on": "test"}})
    monkeypatch.setattr(Trainer, "evaluate", _scripted_eval([0.9, 0.5, 0.4]))
    rep = ListReporter()
    t = Trainer(cfg, reporter=rep, progress=False)
    res = t.fit()
    ckpts = dict(rep.checkpoints)
    assert res.best_epoch == 1 and t.best_state_epoch == 1
    assert _same(t.best_state, ckpts[1]["model"])  # the epoch-1 weights themselves
    assert not _same(ckpts[1]["model"], ckpts[3]["model"])  # training went on
    assert "best_model" not in ckpts[1]  # there the selected weights are the checkpoint's own
    assert _same(ckpts[2]["best_model"], ckpts[1]["model"]) and _same(ckpts[3]["best_model"], ckpts[1]["model"])
    assert all(v.device.type == "cpu" for v in t.best_state.values())

    monkeypatch.setattr(Trainer, "evaluate", _scripted_eval([0.4]))  # epoch 3 of the resumed run
    resumed = Trainer(cfg, reporter=ListReporter(), progress=False)
    res2 = resumed.fit(resume=ckpts[2])
    assert res2.best_epoch == 1 and resumed.best_state_epoch == 1
    assert _same(resumed.best_state, ckpts[1]["model"])
    assert _same(resumed.model.state_dict(), t.model.state_dict())  # and it trained on exactly as before


def test_select_on_last_keeps_the_last_evaluated_weights():
    cfg = RunConfig.model_validate({**copy.deepcopy(TINY_BASE), "name": "last"})
    t = Trainer(cfg, progress=False)
    t.fit()
    assert t.best_state_epoch == 2 and _same(t.best_state, t.model.state_dict())


# ----------------------------------------------------------------------------- a quick study
@pytest.fixture(scope="module")
def study_runs(ray_session, tmp_path_factory, _mlflow_template_db):
    """A 2-trial study (seeds 0, 1; select_on test, best at some epoch of 3) with its MLflow store."""
    import shutil

    tmp = tmp_path_factory.mktemp("selected-model")
    db = tmp / "mlflow.db"
    shutil.copyfile(_mlflow_template_db, db)
    uri = f"sqlite:///{db}"
    from conftest import write_study

    base = copy.deepcopy(TINY_BASE)
    base["train"]["epochs"] = 3
    base["eval"]["select_on"] = "test"
    base["batch"]["iterations_per_epoch"] = 2
    study = load_study(write_study(tmp, "selmodel", base=base, seeds=[0, 1]))
    out = io.StringIO()
    outcome = run_study(study, storage=tmp / "runs", tracking_uri=uri, console=Console(file=out, width=200),
                        live=False, analyses=False)
    assert [t.status for t in outcome.trials] == ["done", "done"], out.getvalue()
    tracker = tracking.Tracker(uri)
    exp = tracker.client.get_experiment_by_name("selmodel")
    children = [r for r in tracker.search([exp.experiment_id], "") if tracking.TAG_PARENT in r.data.tags]
    return uri, tracker, children, tmp


def test_each_child_run_carries_its_selected_model(study_runs):
    uri, tracker, children, _ = study_runs
    assert len(children) == 2
    for run in children:
        rid = run.info.run_id
        models = tracker.client.search_logged_models(experiment_ids=[run.info.experiment_id],
                                                     filter_string=f"source_run_id = '{rid}'")
        assert len(models) == 1, rid
        lm = models[0]
        best_epoch = int(run.data.metrics["best_epoch"])
        assert lm.name == "selected_model" and str(lm.status).endswith("READY")
        assert lm.tags["selected_epoch"] == str(best_epoch) and run.data.tags["model_id"] == lm.model_id
        assert [(o.model_id, o.step) for o in run.outputs.model_outputs] == [(lm.model_id, best_epoch)]
        assert lm.params["train.seed"] == run.data.params["train.seed"]
        linked = {(m.key, m.step): m.value for m in lm.metrics}
        hist = {m.step: m.value for m in tracker.client.get_metric_history(rid, "test/recall_at_1")}
        assert linked[("test/recall_at_1", best_epoch)] == hist[best_epoch] == max(hist.values())
        last = max(hist)
        assert linked[("best/test/recall_at_1", last)] == run.data.metrics["best/test/recall_at_1"]
        steps = [m.step for m in tracker.client.get_metric_history(rid, "test/recall_at_1")]
        assert sorted(steps) == [1, 2, 3]  # linking added no rows to the run's history
        assert len(tracker.client.get_metric_history(rid, "best/test/recall_at_1")) == 1
        files = {f.path for f in tracker.client.list_logged_model_artifacts(lm.model_id)}
        assert {"MLmodel", "input_example.json", "extra_files"} <= files, files
        assert "model_error" not in run.data.tags


def _recall_at_1(emb: np.ndarray, labels: np.ndarray) -> float:
    """Brute force: cosine similarity, the query itself excluded, nearest neighbour's label."""
    x = emb.astype(np.float64)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    sim = x @ x.T
    np.fill_diagonal(sim, -np.inf)
    return float(np.mean(labels[np.argmax(sim, axis=1)] == labels))


def test_embed_reproduces_the_logged_test_recall(study_runs, capsys):
    uri, tracker, children, tmp = study_runs
    run = children[0]
    rid = run.info.run_id
    out = tmp / "emb.npy"
    assert main(["embed", rid, "--data", "test", "--out", str(out), "--tracking-uri", uri]) == 0
    emb, labels = np.load(out), np.load(tmp / "emb.labels.npy")
    assert emb.dtype == np.float32 and emb.shape == (len(labels), 16)
    best_epoch = int(run.data.metrics["best_epoch"])
    logged = {m.step: m.value for m in tracker.client.get_metric_history(rid, "test/recall_at_1")}[best_epoch]
    assert abs(_recall_at_1(emb, labels) - logged) <= 1e-6
    assert abs(run.data.metrics["best/test/recall_at_1"] - logged) <= 1e-12
    # the same model through its models:/ URI
    out2 = tmp / "emb2.npy"
    assert main(["embed", f"models:/{run.data.tags['model_id']}", "--out", str(out2), "--tracking-uri", uri]) == 0
    assert np.array_equal(np.load(out2), emb)


def test_retrieve_ranks_a_gallery_as_the_embeddings_do(study_runs, capsys):
    import json

    from PIL import Image

    from dmlcore.data.base import build_data

    uri, tracker, children, tmp = study_runs
    rid = children[1].info.run_id
    cfg = RunConfig.model_validate({**copy.deepcopy(TINY_BASE), "name": "g"})
    test = build_data(cfg).test
    gal = tmp / "gallery"
    for i in range(12):  # a few test digits as PNG files, in class folders
        img, y = test.uint8()[i * 7]
        (gal / str(y)).mkdir(parents=True, exist_ok=True)
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(gal / str(y) / f"{i:02d}.png")
    files = sorted(gal.rglob("*.png"))
    assert main(["embed", rid, "--data", str(gal), "--out", str(tmp / "g.npy"), "--tracking-uri", uri]) == 0
    g = np.load(tmp / "g.npy")
    assert (tmp / "g.paths.txt").read_text().split() == [str(p) for p in files]
    capsys.readouterr()
    q = files[3]
    assert main(["retrieve", rid, str(q), "--gallery", str(gal), "-k", "4", "--json", "--tracking-uri", uri]) == 0
    got = json.loads(capsys.readouterr().out)
    x = g.astype(np.float64) / np.linalg.norm(g, axis=1, keepdims=True)
    want = np.argsort(-(x @ x[3]), kind="stable")[:4]  # cosine similarity to the query, by hand
    assert [n["path"] for n in got[0]["neighbours"]] == [str(files[j]) for j in want]
    assert got[0]["neighbours"][0]["path"] == str(q) and got[0]["neighbours"][0]["distance"] < 1e-5


# ----------------------------------------------------------------------------- bad input
def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:"), err
    return err[0]


def test_embed_of_a_run_id_that_does_not_exist(study_runs, capsys):
    uri, *_ = study_runs
    capsys.readouterr()
    assert main(["embed", "0123456789abcdef0123456789abcdef", "--out", "x.npy", "--tracking-uri", uri]) == 2
    assert "no such run" in _one_error_line(capsys)
    assert main(["embed", "models:/m-0123456789abcdef", "--out", "x.npy", "--tracking-uri", uri]) == 2
    assert "no such model" in _one_error_line(capsys)


def test_embed_of_a_run_without_a_model(study_runs, capsys):
    uri, tracker, children, _ = study_runs
    rid = tracker.create_run(children[0].info.experiment_id, "bare", {"role": "trial"})
    capsys.readouterr()
    assert main(["embed", rid, "--out", "x.npy", "--tracking-uri", uri]) == 2
    assert "has no selected model" in _one_error_line(capsys)


def test_retrieve_with_an_image_that_does_not_decode(study_runs, capsys):
    uri, tracker, children, tmp = study_runs
    bad = tmp / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (tmp / "gal-bad").mkdir()
    (tmp / "gal-bad" / "broken.png").write_bytes(b"nope")
    (tmp / "gal-ok").mkdir()
    from PIL import Image

    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(tmp / "gal-ok" / "ok.png")
    capsys.readouterr()
    assert main(["retrieve", children[0].info.run_id, str(bad), "--gallery", str(tmp / "gal-ok"),
                 "--tracking-uri", uri]) == 2
    assert "broken.png" in _one_error_line(capsys)
    assert main(["embed", children[0].info.run_id, "--data", str(tmp / "gal-bad"), "--out", str(tmp / "b.npy"),
                 "--tracking-uri", uri]) == 2
    assert "broken.png" in _one_error_line(capsys)


def test_a_model_that_cannot_be_logged_does_not_fail_the_run(mlflow_uri, caplog):
    from sweeper.models import log_selected_model

    tracker = tracking.Tracker(mlflow_uri)
    cfg = RunConfig.model_validate({**copy.deepcopy(TINY_BASE), "name": "nolog"})
    logger, _ = tracking.open_run(tracker, tracker.experiment_id("nolog"), "nolog", cfg, {"role": "trial"})
    t = Trainer(cfg, progress=False)
    res = t.fit()
    t.best_state = {"not": torch.zeros(1)}  # weights the rebuilt network refuses
    with caplog.at_level(logging.WARNING, logger="sweeper.models"):
        assert log_selected_model(logger, t, res) is None
    assert len([r for r in caplog.records if r.name == "sweeper.models"]) == 1
    assert "state_dict" in tracker.get_run(logger.run_id).data.tags["model_error"]
    assert tracker.client.search_logged_models(experiment_ids=[tracker.experiment_id("nolog")]) == []


def test_log_model_false_logs_no_model_and_touches_no_run():
    """``eval.log_model: false``: no LoggedModel, not even an attempt (no run tag); with the
    default the same trainer is attempted (and, having no weights, tagged ``model_error``)."""
    from types import SimpleNamespace

    from dmlcore.config import RunConfig
    from sweeper.models import log_selected_model

    calls = []
    logger = SimpleNamespace(run_id="r1", tracker=SimpleNamespace(set_tags=lambda rid, tags: calls.append(tags)))
    off = RunConfig.model_validate({"eval": {"log_model": False}})
    assert off.eval.log_model is False
    assert log_selected_model(logger, SimpleNamespace(cfg=off, best_state=None), None) is None
    assert calls == []
    on = RunConfig.model_validate({})
    assert log_selected_model(logger, SimpleNamespace(cfg=on, best_state=None), None) is None
    assert len(calls) == 1 and "model_error" in calls[0]
