"""Pictures of a run (issue 19, item 2): the retrieval grid's marks and neighbour order on a
hand-made embedding, the spectrum chart's values against numpy's SVD, every picture drawn,
a failing picture is one warning, and a trial logs its pictures (or none with
``eval.pictures: false``) and still FINISHES when a picture fails."""

from __future__ import annotations

import logging
import math
import os
import textwrap

import numpy as np
import pytest
from PIL import Image

from dmlcore import pictures
from dmlcore.pictures import PictureInputs, Split

# Six unit vectors (angles in degrees) of two classes, chosen so that no two candidate
# neighbours of a query are at the same angle.
ANGLES = [0, 10, 25, 45, 100, 180]
LABELS = [0, 0, 1, 0, 1, 1]
# Their 3 nearest neighbours by angle (= cosine distance), self excluded, worked out by hand:
#   q0 (0):   1 (10), 2 (25), 3 (45)      q1 (10):  0 (10), 2 (15), 3 (35)
#   q2 (25):  1 (15), 3 (20), 0 (25)      q3 (45):  2 (20), 1 (35), 0 (45)
#   q4 (100): 3 (55), 2 (75), 5 (80)      q5 (180): 4 (80), 3 (135), 2 (155)
NEIGHBOURS = [[1, 2, 3], [0, 2, 3], [1, 3, 0], [2, 1, 0], [3, 2, 5], [4, 3, 2]]
CORRECT = [[True, False, True], [True, False, True], [False, False, False],
           [False, True, True], [False, True, True], [True, False, True]]
# Worst first: fewest correct (q2: 0), then the nearest first neighbour (q0 and q1 at 10
# degrees: by row, q0 first), then q3 (20), q4 (55), q5 (80).
WORST_ORDER = [2, 0, 1, 3, 4, 5]


def _hand_made() -> tuple[np.ndarray, np.ndarray]:
    a = np.radians(ANGLES)
    return np.stack([np.cos(a), np.sin(a)], axis=1).astype(np.float32), np.asarray(LABELS)


def _inputs(emb, labels, **kw) -> PictureInputs:
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 255, size=(len(labels), 12, 12, 3), dtype=np.uint8)
    split = Split(emb, labels, image=lambda i: imgs[i], name=lambda c: f"class{c}")
    return PictureInputs(test=split, **kw)


def test_retrieval_neighbours_and_marks_on_a_hand_made_embedding():
    emb, labels = _hand_made()
    idx, dist = pictures.top_neighbours(emb, emb, 3, "cosine", query_index=np.arange(6))
    assert idx.tolist() == NEIGHBOURS
    expected_d = [[1 - math.cos(math.radians(ANGLES[q] - ANGLES[n])) for n in row] for q, row in enumerate(NEIGHBOURS)]
    np.testing.assert_allclose(dist, expected_d, atol=1e-6)
    assert pictures.neighbour_marks(labels, idx, labels).tolist() == CORRECT
    table = pictures.retrieval_table(_inputs(emb, labels), k=3, n_worst=6, n_random=0)
    assert table["queries"].tolist() == WORST_ORDER
    assert table["neighbours"].tolist() == [NEIGHBOURS[q] for q in WORST_ORDER]
    assert table["correct"].tolist() == [CORRECT[q] for q in WORST_ORDER]
    worst, rand = pictures.pick_queries(np.asarray(CORRECT), dist[:, 0], 2, 3, seed=0)
    assert worst.tolist() == [2, 0] and len(rand) == 3 and set(rand) <= {1, 3, 4, 5} and list(rand) == sorted(rand)


def test_retrieval_grid_borders_are_green_for_the_same_class_and_red_otherwise(tmp_path):
    emb, labels = _hand_made()
    (path,) = pictures.retrieval_grid(_inputs(emb, labels), tmp_path, k=3, n_worst=6, n_random=0)
    img = np.asarray(Image.open(path).convert("RGB"))
    T, P = pictures.TILE, pictures
    for r, q in enumerate(WORST_ORDER):  # all six queries are in the "worst" section
        y = P.HEAD + r * (T + P.CAPTION) + 1
        assert tuple(img[y, P.MARGIN + 1]) == P.COLOURS["query"], r
        for j, ok in enumerate(CORRECT[q]):
            x = P.MARGIN + T + P.GAP + j * T + 1
            assert tuple(img[y, x]) == P.COLOURS["correct" if ok else "wrong"], (r, j)
    # a split that cannot return its images: grey placeholder tiles (with the class name), same marks
    (path,) = pictures.retrieval_grid(PictureInputs(test=Split(emb, labels)), tmp_path, k=3, n_worst=6, n_random=0)
    img = np.asarray(Image.open(path).convert("RGB"))
    y = P.HEAD + 1
    assert tuple(img[y, P.MARGIN + 1]) == P.COLOURS["query"]
    assert tuple(img[y + P.BORDER, P.MARGIN + P.BORDER]) == (200, 200, 200)


def test_a_gallery_of_another_split_keeps_the_query_itself():
    emb, labels = _hand_made()
    idx, _ = pictures.top_neighbours(emb[:2], emb, 2, "cosine")  # closed set: no self-exclusion
    assert idx.tolist() == [[0, 1], [1, 0]]


def test_spectrum_chart_plots_numpys_singular_values():
    rng = np.random.default_rng(3)
    emb = rng.normal(size=(40, 6)) @ np.diag([5.0, 3.0, 2.0, 1.0, 0.5, 0.1])
    sv = np.linalg.svd(emb, compute_uv=False)  # computed here, independently of dmlcore
    chart = pictures.spectrum_chart(emb, rho_m=2)
    left, right = chart.panels
    np.testing.assert_allclose(left.series[0]["y"], sv, rtol=1e-10)
    assert left.series[0]["x"].tolist() == [1, 2, 3, 4, 5, 6]
    s = sv[1:] / sv[1:].sum()  # rho@2 drops the first value
    np.testing.assert_allclose(right.series[0]["y"], s, rtol=1e-10)
    assert right.series[0]["x"].tolist() == [2, 3, 4, 5, 6]
    assert right.series[1]["kind"] == "hline" and right.series[1]["y"][0] == pytest.approx(1 / 5)
    rho = sum(0.2 * math.log(0.2 / v) for v in s)  # KL(U || s)
    assert f"{rho:.3g}" in right.title


def test_similarity_pairs_are_every_pair_once_by_class():
    rng = np.random.default_rng(5)
    emb = rng.normal(size=(9, 4)).astype(np.float32)
    labels = np.array([0, 1, 0, 2, 1, 0, 2, 2, 1])
    for distance in ("cosine", "euclidean"):
        pos, neg = pictures.pair_similarities(emb, labels, distance, max_rows=50, seed=0)
        want = {True: [], False: []}  # every pair i < j, in that order, by brute force here
        for i in range(9):
            for j in range(i + 1, 9):
                a, b = emb[i].astype(np.float64), emb[j].astype(np.float64)
                v = a @ b / np.linalg.norm(a) / np.linalg.norm(b) if distance == "cosine" else np.linalg.norm(a - b)
                want[bool(labels[i] == labels[j])].append(v)
        np.testing.assert_allclose(pos, want[True], atol=1e-5)
        np.testing.assert_allclose(neg, want[False], atol=1e-5)
        assert len(pos) + len(neg) == 36


def test_tiles_are_nearest_neighbour_resizes():
    rng = np.random.default_rng(4)
    for (h, w), size in (((16, 16), 48), ((8, 16), 32), ((10, 20), 48)):  # whole factors, and not
        stack = rng.integers(0, 256, size=(3, h, w, 3), dtype=np.uint8)
        want = np.zeros((3, size, size, 3), dtype=np.uint8)
        for y in range(size):  # tile pixel (y, x) is source pixel (y * h // size, x * w // size)
            for x in range(size):
                want[:, y, x] = stack[:, y * h // size, x * w // size]
        got = pictures.fit_all(stack, size)
        assert len(got) == 3 and all((g == t).all() for g, t in zip(got, want)), (h, w, size)
        assert [(g == t).all() for g, t in zip(pictures.fit_all(list(stack), size), want)] == [True] * 3


def test_png_writer_round_trips_exactly(tmp_path):
    from dmlcore import charts

    rng = np.random.default_rng(2)
    a = rng.integers(0, 256, size=(37, 53, 3), dtype=np.uint8)  # noise: every row difference wraps modulo 256
    a[5:9] = 255  # and a flat band (rows equal to the row above)
    back = np.asarray(Image.open(charts.save_png(a, tmp_path / "a.png")))
    assert back.dtype == np.uint8 and back.shape == a.shape and (back == a).all()
    im = Image.fromarray(np.dstack([a, a[:, :, :1]]), "RGBA")  # another mode: stored as its RGB
    back = np.asarray(Image.open(charts.save_png(im, tmp_path / "b.png")))
    assert (back == np.asarray(im.convert("RGB"))).all()


def test_render_runs_the_numerical_libraries_on_one_thread_and_sets_them_back(tmp_path, monkeypatch):
    import torch
    from threadpoolctl import threadpool_info

    before = torch.get_num_threads()
    seen = {}

    def probe(inputs, out):
        seen["torch"] = torch.get_num_threads()
        seen["pools"] = {(p["internal_api"], p["filepath"]): p["num_threads"] for p in threadpool_info()}
        return []

    monkeypatch.setattr(pictures, "PICTURES", {"probe": probe})
    torch.set_num_threads(2)
    try:
        pools_before = {(p["internal_api"], p["filepath"]): p["num_threads"] for p in threadpool_info()}
        res = pictures.render(_inputs(*_hand_made()), tmp_path)
        assert not res.failed and seen["torch"] == 1
        assert seen["pools"] and all(n == 1 for n in seen["pools"].values()), seen["pools"]
        assert torch.get_num_threads() == 2
        after = {(p["internal_api"], p["filepath"]): p["num_threads"] for p in threadpool_info()}
        assert {k: v for k, v in after.items() if k in pools_before} == pools_before
    finally:
        torch.set_num_threads(before)


def test_every_picture_is_drawn_and_a_failing_one_is_one_warning(tmp_path, monkeypatch, caplog):
    rng = np.random.default_rng(1)
    labels = np.repeat(np.arange(4), 10)
    emb = (rng.normal(size=(40, 8)) + 3 * np.eye(8)[labels]).astype(np.float32)
    history = [{"epoch": e, "train/loss": 1 / e, "test/recall_at_1": 0.2 * e, "val/recall_at_1": 0.1 * e,
                "train/rho_spectrum": 0.5, "train/pi_ratio": 0.4} for e in (1, 2, 3)]
    inputs = _inputs(emb, labels, train=Split(emb, labels), history=history, best_epoch=2)
    res = pictures.render(inputs, tmp_path / "all")
    names = sorted(p.name for p in res.files)
    assert names == ["embedding_map.html", "embedding_map.png", "learning_curves.png", "retrieval_grid.png",
                     "similarities.png", "spectrum.png"], names
    assert not res.failed and not res.skipped
    for p in res.files:
        if p.suffix == ".png":
            im = Image.open(p)
            assert im.width > 100 and np.asarray(im.convert("L")).std() > 5, p  # not blank
    page = (tmp_path / "all" / "embedding_map.html").read_text()
    assert page.count("rgb(") == 40 and "data:image/jpeg;base64," in page and "class class3" not in page

    def broken(inputs, out):
        raise ValueError("no figure today")

    def no_umap(x, seed, distance):
        raise ModuleNotFoundError("No module named 'umap'")

    monkeypatch.setitem(pictures.PICTURES, "similarities", broken)
    monkeypatch.setitem(pictures.MAP_METHODS, "umap", no_umap)
    monkeypatch.setattr(pictures, "_WARNED", set())  # warned once per process: from now on
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="dmlcore.pictures"):
        res = pictures.render(inputs, tmp_path / "broken")
        pictures.render(inputs, tmp_path / "again", ["embedding_map"])
    assert res.failed == {"similarities": "ValueError: no figure today"}
    assert "similarities.png" not in {p.name for p in res.files} and len(res.files) == 5
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert sum("similarities failed" in w for w in warnings) == 1, warnings
    assert sum("umap is not available" in w and "pip install umap-learn" in w for w in warnings) == 1, warnings


def test_trainer_keeps_the_selected_epochs_embeddings():
    from conftest import TINY_BASE
    from dmlcore.config import RunConfig
    from dmlcore.train import Trainer

    base = {**TINY_BASE, "eval": {**TINY_BASE["eval"], "embedding_metrics": True, "pictures": True}}
    trainer = Trainer(RunConfig.model_validate({**base, "eval": {**base["eval"], "select_on": "test"}}), progress=False)
    result = trainer.fit()
    emb, labels = trainer.best_embeddings["test"]
    # R@1 of the kept embeddings, by brute force here: it is the selected epoch's test R@1
    x = emb.numpy().astype(np.float64)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    sim = x @ x.T
    np.fill_diagonal(sim, -np.inf)
    r1 = float(np.mean(labels[sim.argmax(axis=1)] == labels))
    assert r1 == pytest.approx(result.best["test/recall_at_1"], abs=1e-6)
    assert trainer.best_embeddings["train"][0].shape == (len(trainer.data.train_eval), 16)
    off = RunConfig.model_validate({**base, "eval": {**base["eval"], "pictures": False}, "train": {**base["train"], "epochs": 1}})
    trainer = Trainer(off, progress=False)
    trainer.fit()
    assert trainer.best_embeddings is None  # nothing kept in memory when the pictures are off


def test_log_pictures_failure_is_a_warning_and_the_run_finishes(mlflow_uri, monkeypatch, caplog):
    from conftest import TINY_BASE
    from dmlcore.config import RunConfig
    from dmlcore.train import Trainer
    from sweeper import tracking
    from sweeper.pictures import TAG_FAILED, log_pictures

    cfg = RunConfig.model_validate({**TINY_BASE, "eval": {**TINY_BASE["eval"], "pictures": True}})
    tracker = tracking.Tracker(mlflow_uri)
    logger, _ = tracking.open_run(tracker, tracker.experiment_id("p"), "p", cfg, {})

    def broken(inputs, out):
        raise RuntimeError("backend exploded")

    monkeypatch.setitem(pictures.PICTURES, "retrieval_grid", broken)
    with caplog.at_level(logging.WARNING), tracking.recording(logger, killed=(SystemExit,)):
        trainer = Trainer(cfg, reporter=logger, progress=False)
        logged = log_pictures(trainer, trainer.fit(), logger)
    run = tracker.get_run(logger.run_id)
    assert run.info.status == "FINISHED"
    assert "retrieval_grid: RuntimeError: backend exploded" in run.data.tags[TAG_FAILED]
    assert "pictures/retrieval_grid.png" not in logged and "pictures/learning_curves.png" in logged
    assert {f.path for f in tracker.client.list_artifacts(logger.run_id, "pictures")} == set(logged)
    assert "time/pictures_s" in run.data.metrics
    assert sum("retrieval_grid failed" in r.getMessage() for r in caplog.records) == 1


PLUGIN = '''
"""Breaks two pictures in every trial that imports it (fault injection)."""
from dmlcore import pictures


def _no_umap(x, seed, distance):
    raise ModuleNotFoundError("No module named 'umap'")


def _broken(inputs, out):
    raise ValueError("histogram backend failed")


pictures.MAP_METHODS["umap"] = _no_umap
pictures.PICTURES["similarities"] = _broken
'''


@pytest.mark.slow
def test_trials_log_pictures_or_none_and_a_failing_picture_never_fails_a_trial(
        ray_session, tmp_path, mlflow_uri, monkeypatch):
    from rich.console import Console

    from conftest import TINY_BASE, write_study
    from sweeper import tracking
    from sweeper.study import load_study
    from sweeper.tune import run_study

    pkg = tmp_path / "src" / "broken_pictures"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(textwrap.dedent(PLUGIN))
    monkeypatch.syspath_prepend(str(pkg.parent))
    base = {**TINY_BASE, "eval": {**TINY_BASE["eval"], "embedding_metrics": True, "pictures": True}}
    path = write_study(tmp_path, "pics", base=base, plugins=["broken_pictures"], max_concurrent=2,
                       axes={"eval.pictures": [True, False]})
    outcome = run_study(load_study(path), storage=tmp_path / "runs", tracking_uri=mlflow_uri,
                        console=Console(file=open(os.devnull, "w"), width=200), live=False)
    assert [t.status for t in outcome.trials] == ["done", "done"], outcome.trials
    tracker = tracking.Tracker(mlflow_uri)
    runs = {r.data.params["eval.pictures"]: r for r in tracker.children(outcome.experiment_id, outcome.parent_run_id)}
    on, off = runs["True"], runs["False"]
    assert on.info.status == off.info.status == "FINISHED"
    files = {f.path for f in tracker.client.list_artifacts(on.info.run_id, "pictures")}
    pngs = {f for f in files if f.endswith(".png")}
    assert pngs == {"pictures/retrieval_grid.png", "pictures/embedding_map.png", "pictures/spectrum.png",
                    "pictures/learning_curves.png"}, files
    assert "pictures/embedding_map.html" in files
    assert "similarities: ValueError: histogram backend failed" in on.data.tags["pictures_failed"]
    assert not tracker.client.list_artifacts(off.info.run_id, "pictures")
    assert "pictures_failed" not in off.data.tags and "time/pictures_s" not in off.data.metrics
