"""ooDML: Fréchet distance against closed forms, and the FID-graded split sequence."""

import json

import numpy as np
import pytest
import torch
from scipy import linalg

from dmlcore.config import load_config
from dmlcore.oodml.fid import fid_between, frechet_distance, gaussian_stats
from dmlcore.oodml.splits import select_splits, split_sequence


def _spd(rng, d):
    a = rng.normal(size=(d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


# ----------------------------------------------------------------------------- FID
def test_identical_gaussians_give_zero():
    rng = np.random.default_rng(0)
    mu, s = rng.normal(size=6), _spd(rng, 6)
    assert frechet_distance(mu, s, mu, s) == pytest.approx(0.0, abs=1e-9)


def test_translation_only_gives_squared_mean_difference():
    rng = np.random.default_rng(1)
    mu, s = rng.normal(size=5), _spd(rng, 5)
    dmu = np.array([1.0, -2.0, 0.5, 0.0, 3.0])
    assert frechet_distance(mu, s, mu + dmu, s) == pytest.approx(float(dmu @ dmu), rel=1e-9)


def test_diagonal_covariances_closed_form():
    a, b = np.array([1.0, 4.0, 0.25, 9.0]), np.array([4.0, 1.0, 1.0, 0.0])
    mu1, mu2 = np.zeros(4), np.array([1.0, 0.0, 0.0, 2.0])
    expected = 5.0 + a.sum() + b.sum() - 2 * np.sqrt(a * b).sum()
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-10)


def test_general_covariances_match_scipy_sqrtm():
    rng = np.random.default_rng(2)
    s1, s2 = _spd(rng, 7), _spd(rng, 7)
    mu1, mu2 = rng.normal(size=7), rng.normal(size=7)
    ref = (mu1 - mu2) @ (mu1 - mu2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(linalg.sqrtm(s1 @ s2).real)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(ref, rel=1e-8)


@pytest.mark.parametrize("n1,n2,d", [(40, 30, 5), (6, 9, 50)])  # d x d route and n1 x n2 nuclear-norm route
def test_fid_between_equals_gaussian_formula_on_sample_stats(n1, n2, d):
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(n1, d)), rng.normal(loc=0.3, size=(n2, d)) * 1.5
    (m1, s1), (m2, s2) = gaussian_stats(a), gaussian_stats(b)
    assert fid_between(a, b) == pytest.approx(frechet_distance(m1, s1, m2, s2), rel=1e-7, abs=1e-9)
    assert fid_between(a, a) == pytest.approx(0.0, abs=1e-8)


def test_samples_from_known_gaussians_approach_closed_form():
    rng = np.random.default_rng(4)
    d = 3
    mu1, mu2 = np.zeros(d), np.array([1.0, -1.0, 0.5])
    s1, s2 = _spd(rng, d), _spd(rng, d)
    exact = frechet_distance(mu1, s1, mu2, s2)
    a = rng.multivariate_normal(mu1, s1, size=20000)
    b = rng.multivariate_normal(mu2, s2, size=20000)
    assert fid_between(a, b) == pytest.approx(exact, rel=0.05)


# ----------------------------------------------------------------------------- splits
def _class_means(n_classes=24, d=6, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n_classes, d)) * np.linspace(2.0, 0.5, d)


def test_split_sequence_properties():
    means = _class_means()
    tr, te = list(range(0, 24, 2)), list(range(1, 24, 2))
    recs = split_sequence(means, tr, te, iters=10, removal_iters=6)
    assert recs[0].kind == "start" and recs[0].train == tuple(tr)
    assert {r.kind for r in recs} >= {"start", "swap", "removal"}
    for r in recs:
        assert not set(r.train) & set(r.test)
        if r.kind in ("start", "swap"):  # swaps keep every class, removal drops some
            assert sorted(r.train + r.test) == list(range(24))
            assert len(r.train) == len(tr)
        assert r.fid == pytest.approx(fid_between(means[list(r.train)], means[list(r.test)]))
    swaps = [r for r in recs if r.kind == "swap"]
    assert max(r.fid for r in swaps) > recs[0].fid  # swapping makes the split harder
    removal = [r for r in recs if r.kind == "removal"]
    assert all(min(len(r.train), len(r.test)) >= 6 for r in removal)  # default: half of each side
    chosen = select_splits(recs, 5)
    fids = [r.fid for r in chosen]
    assert len(chosen) == 5 and fids == sorted(fids)
    assert fids[0] == min(r.fid for r in recs) and fids[-1] == max(r.fid for r in recs)
    assert len({r.key() for r in chosen}) == 5
    again = select_splits(split_sequence(means, tr, te, iters=10, removal_iters=6), 5)
    assert [(r.key(), r.fid) for r in again] == [(r.key(), r.fid) for r in chosen]


def test_easier_splits_go_down():
    means = _class_means(seed=1)
    tr, te = list(range(12)), list(range(12, 24))
    recs = split_sequence(means, tr, te, iters=3, removal_iters=0, easy_iters=4)
    easy = [r for r in recs if r.kind == "easy"]
    assert easy and min(r.fid for r in easy) < recs[0].fid


TINY = {
    "data.dataset": "digits",
    "data.image_size": 16,
    "model.backbone": "small_cnn",
    "model.backbone_params": {"width": 8, "depth": 2},
    "model.embed_dim": 16,
}


def test_make_splits_writes_the_split_file_build_data_reads(tmp_path):
    from dmlcore.data.base import build_data
    from dmlcore.guided import save_model_checkpoint
    from dmlcore.models.embedding import build_model
    from dmlcore.oodml.splits import make_splits

    cfg = load_config(None, TINY)
    out = tmp_path / "digits_splits.json"
    doc = make_splits(cfg, n=4, out=out)
    saved = json.loads(out.read_text())
    assert saved["dataset"] == "digits" and "random init" in saved["encoder"]
    assert saved["splits"] == doc["splits"]
    fids = [s["fid"] for s in doc["splits"]]
    assert len(fids) == 4 and fids == sorted(fids)
    for s in doc["splits"]:
        assert not set(s["train_classes"]) & set(s["test_classes"])
        if s["kind"] != "removal":
            assert sorted(s["train_classes"] + s["test_classes"]) == list(range(10))
    # deterministic, and the same encoder given as a checkpoint path gives the same splits
    torch.manual_seed(0)
    ckpt = save_model_checkpoint(build_model(cfg.model), cfg, tmp_path / "enc.pt")
    via_ckpt = make_splits(cfg, n=4, encoder=str(ckpt))
    assert via_ckpt["encoder"] == str(ckpt)
    assert via_ckpt["splits"] == doc["splits"]
    # the data layer reads it: data.split = FILE#INDEX
    data = build_data(cfg.with_overrides({"data.split": f"{out}#2"}))
    assert data.test.class_ids.tolist() == sorted(doc["splits"][2]["test_classes"])
    assert data.info["fid"] == pytest.approx(fids[2])
