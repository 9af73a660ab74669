"""The toy experiment of Roth et al. 2020 (dmlcore.toy): rho-regularisation flattens the train
embedding spectrum and helps retrieval of unseen classes that differ in directions the training
task never needed.

The numbers asserted here were measured first (5 seeds, triplet loss, 8-d sphere, 150 steps;
docs/revisiting.md): mean train rho@2 1.37 (distance_weighted) / 1.48 (rho_distance p=0) vs 0.86
(p=0.3); mean test R@1 0.850 / 0.860 vs 0.911; mAP@R 0.48 / 0.51 vs 0.72; the regularised run
wins on every seed (also on 10 seeds). The thresholds below leave room for platform numerics but
fail if the effect goes away.
"""

from __future__ import annotations

import numpy as np
import pytest

from dmlcore import toy
from dmlcore.metrics import embedding_space_metrics

SEEDS = range(5)
P = 0.3
BASE, CONTROL, REG = toy.BASELINE, toy.method_name(toy.RHO, {"p": 0.0}), toy.method_name(toy.RHO, {"p": P})


@pytest.fixture(scope="module")
def runs():
    return toy.compare(toy.ToySetup(), SEEDS, p=P, control=True)


def _mean(runs, method, metric):
    return float(np.mean([r.metrics[metric] for r in runs if r.method == method]))


def test_data_layout():
    s = toy.ToySetup()
    d = toy.make_data(s, 0)
    K = s.n_train_classes
    assert d.x_train.shape == (K * s.train_samples, 2) and set(d.y_train) == set(range(K))
    centres = np.array([d.x_train[d.y_train == k].mean(0) for k in range(K)])
    t = np.linspace(-1, 1, K)
    assert np.allclose(centres, np.stack([t, t], 1), atol=0.1)  # train classes lie on the diagonal
    for k in range(K):  # ... each filling a small square around its centre
        assert np.abs(d.x_train[d.y_train == k] - t[k]).max() <= s.train_halfwidth + 1e-6
    # test groups: 2 lines (vertical, horizontal) x 2 sides x test_groups around every interior centre
    n_groups = (K - 2) * 2 * 2 * s.test_groups
    assert d.y_test.max() + 1 == n_groups and len(d.x_test) == n_groups * s.test_samples
    for c in range(n_groups):
        pts = d.x_test[d.y_test == c]
        kind = d.test_kind[d.y_test == c][0]
        spread = pts.std(0)
        assert spread[0] < 0.05 and spread[1] < 0.05
        centre = pts.mean(0)
        # a vertical group shares the x of a train centre, a horizontal one the y
        near = np.abs(t[1:-1] - centre[kind]).min()
        assert near < 0.03, (c, kind, centre)


def test_2d_embedding_has_no_spectral_decay_to_measure():
    """Why the toy does not use the unit circle: with d = 2, rho@2 keeps one singular value."""
    rng = np.random.default_rng(0)
    for _ in range(3):
        x = rng.standard_normal((50, 2))
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        y = rng.integers(0, 5, 50)
        assert embedding_space_metrics(x, y, rho_m=2)["rho_spectrum"] == pytest.approx(0.0, abs=1e-12)


def test_runs_are_seeded():
    s = toy.ToySetup(steps=30)
    a = toy.train_toy(s, toy.RHO, {"p": P}, seed=3)
    b = toy.train_toy(s, toy.RHO, {"p": P}, seed=3)
    assert a.metrics == b.metrics and np.array_equal(a.test_emb, b.test_emb)
    c = toy.train_toy(s, toy.RHO, {"p": P}, seed=4)
    assert c.metrics != a.metrics


def test_both_methods_solve_the_training_task(runs):
    assert len(runs) == 3 * len(SEEDS)
    for r in runs:
        assert r.metrics["train_recall_at_1"] >= 0.95, (r.method, r.seed, r.metrics)
        assert 0.0 <= r.metrics["test_recall_at_1"] <= 1.0 and r.metrics["rho_spectrum"] >= 0.0


def test_rho_regularisation_flattens_the_spectrum(runs):
    reg, base, ctrl = (_mean(runs, m, "rho_spectrum") for m in (REG, BASE, CONTROL))
    assert reg < base - 0.2 and reg < ctrl - 0.2, (reg, base, ctrl)
    wins, n = toy.wins(runs, REG, BASE, "rho_spectrum", lower=True)
    assert wins >= 4, f"lower rho on only {wins}/{n} seeds"
    # denser embedding (higher pi_ratio), as in the paper
    assert _mean(runs, REG, "pi_ratio") > 2 * _mean(runs, BASE, "pi_ratio")


def test_rho_regularisation_helps_test_retrieval(runs):
    reg, base, ctrl = (_mean(runs, m, "test_recall_at_1") for m in (REG, BASE, CONTROL))
    assert reg > base + 0.02 and reg > ctrl + 0.02, (reg, base, ctrl)
    wins, n = toy.wins(runs, REG, BASE, "test_recall_at_1")
    assert wins >= 4, f"higher R@1 on only {wins}/{n} seeds"
    assert _mean(runs, REG, "test_map_at_r") > _mean(runs, BASE, "test_map_at_r") + 0.05


def test_summary_table_and_cli(runs, tmp_path, capsys):
    rows = toy.summarize(runs)
    assert [r["method"] for r in rows] == [BASE, CONTROL, REG] and all(r["n"] == len(SEEDS) for r in rows)
    assert rows[2]["rho_spectrum:mean"] == pytest.approx(_mean(runs, REG, "rho_spectrum"))
    text = toy.format_table(rows)
    assert REG in text and "±" in text
    out = tmp_path / "toy.png"
    assert toy.main(["--seeds", "1", "--steps", "20", "--no-control", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "distance_weighted" in printed and "rho_distance p=0.3" in printed and str(out) in printed
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image as mpimg

    assert mpimg.imread(out).ndim == 3
