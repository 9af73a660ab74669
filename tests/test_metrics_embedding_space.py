"""Embedding-space metrics (Roth et al. 2020; Wang & Isola 2020): hand-computed and brute force."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
import torch
from scipy.spatial.distance import cdist, pdist
from scipy.stats import entropy

from dmlcore.metrics.embedding_space import kl_divergence
from dmlcore.metrics import (
    embedding_space_metrics,
    per_class_intra,
    pi_inter,
    pi_intra,
    rho_spectrum,
    spectrum,
    uniformity,
)

# --------------------------------------------------------------------------------- brute force


def brute_intra(x, y):
    vals = []
    for c in np.unique(y):
        f = x[y == c].astype(np.float64)
        if len(f) < 2:
            vals.append(np.nan)
            continue
        dm = cdist(f, f, "cosine")
        vals.append((dm.sum() - np.trace(dm)) / (len(f) ** 2 - len(f)))
    vals = np.array(vals)
    vals[np.isnan(vals)] = np.nanmax(vals)
    return vals.mean()


def brute_inter(x, y):
    mus = np.stack([x[y == c].astype(np.float64).mean(0) for c in np.unique(y)])
    mus /= np.linalg.norm(mus, axis=1, keepdims=True)
    dm = cdist(mus, mus, "cosine")
    C = len(mus)
    return (dm.sum() - np.trace(dm)) / (C * C - C)


def brute_rho(x, m):
    s = np.linalg.svd(x.astype(np.float64), compute_uv=False)[abs(m) - 1 :]
    s = s / s.sum()
    u = np.ones(len(s)) / len(s)
    return entropy(u, s) if m > 0 else entropy(s, u)


def brute_uniformity(x, t=2.0):
    xn = x.astype(np.float64) / np.linalg.norm(x.astype(np.float64), axis=1, keepdims=True)
    return math.log(np.mean(np.exp(-t * pdist(xn, "sqeuclidean"))))


def data(kind, seed=0):
    rng = np.random.default_rng(seed)
    if kind == "random":
        return rng.standard_normal((300, 24)).astype(np.float32), rng.integers(0, 15, 300)
    y = np.concatenate([rng.integers(0, 20, 280), [20, 21]])  # two one-sample classes
    x = 3 * rng.standard_normal((22, 24))[y] + rng.standard_normal((282, 24))
    return x.astype(np.float32), y


# --------------------------------------------------------------------------------- hand-computed


def test_hand_computed():
    # class A: (1,0), (0,1) -> cos distance 1;  class B: (2,0), (1,0) -> 0;  class C: (0,3) alone
    x = np.array([[1, 0], [0, 1], [2, 0], [1, 0], [0, 3]], dtype=np.float32)
    y = np.array([0, 0, 1, 1, 2])
    np.testing.assert_allclose(per_class_intra(x, y)[:2], [1.0, 0.0], atol=1e-12)
    assert math.isnan(per_class_intra(x, y)[2])
    assert pi_intra(x, y) == pytest.approx((1 + 0 + 1) / 3, abs=1e-12)  # C gets the max, 1
    # means: A (.5,.5) -> 45 deg, B (1.5,0) -> 0 deg, C (0,3) -> 90 deg
    # pairs: A-B 1 - 1/sqrt2, A-C 1 - 1/sqrt2, B-C 1
    inter = (2 * (1 - 1 / math.sqrt(2)) + 1) / 3
    assert pi_inter(x, y) == pytest.approx(inter, abs=1e-12)
    # Phi^T Phi = diag(1+4+1, 1+9) -> singular values sqrt(10), sqrt(6)
    s = np.array([math.sqrt(10), math.sqrt(6)]) / (math.sqrt(10) + math.sqrt(6))
    np.testing.assert_allclose(spectrum(x), s, atol=1e-12)
    assert rho_spectrum(x, 1) == pytest.approx(0.5 * math.log(0.5 / s[0]) + 0.5 * math.log(0.5 / s[1]), abs=1e-12)
    assert rho_spectrum(x, -1) == pytest.approx(s[0] * math.log(s[0] / 0.5) + s[1] * math.log(s[1] / 0.5), abs=1e-12)
    assert rho_spectrum(x, 2) == pytest.approx(0.0, abs=1e-12)  # one value left: uniform
    # unit rows: three at (1,0), two at (0,1); unordered pairs: 4 at distance 0, 6 at ||.||^2 = 2
    assert uniformity(x) == pytest.approx(math.log((4 + 6 * math.exp(-4)) / 10), abs=1e-12)
    m = embedding_space_metrics(x, y)
    assert list(m) == ["pi_intra", "pi_inter", "pi_ratio", "rho_spectrum", "uniformity"]
    assert m["pi_ratio"] == pytest.approx((2 / 3) / inter, abs=1e-12)
    assert m["rho_spectrum"] == pytest.approx(0.0, abs=1e-12)


# --------------------------------------------------------------------------------- brute force


@pytest.mark.parametrize("kind", ["random", "clustered"])
def test_against_brute_force(kind):
    x, y = data(kind)
    m = embedding_space_metrics(x, y)
    assert m["pi_intra"] == pytest.approx(brute_intra(x, y), abs=1e-9)
    assert m["pi_inter"] == pytest.approx(brute_inter(x, y), abs=1e-9)
    assert m["pi_ratio"] == pytest.approx(brute_intra(x, y) / max(brute_inter(x, y), 1e-8), abs=1e-9)
    assert m["rho_spectrum"] == pytest.approx(brute_rho(x, 2), abs=1e-9)
    assert m["uniformity"] == pytest.approx(brute_uniformity(x), abs=1e-9)
    for mm in (1, 3, -1, -2):
        assert rho_spectrum(x, mm) == pytest.approx(brute_rho(x, mm), abs=1e-9)
    assert embedding_space_metrics(x, y, rho_m=4)["rho_spectrum"] == pytest.approx(brute_rho(x, 4), abs=1e-9)
    assert uniformity(x, chunk_size=7) == pytest.approx(brute_uniformity(x), abs=1e-9)
    assert uniformity(x, t=0.5) == pytest.approx(brute_uniformity(x, 0.5), abs=1e-9)
    assert embedding_space_metrics(torch.tensor(x), torch.tensor(y)) == pytest.approx(m, abs=1e-12)


def test_spectrum_helper():
    x, _ = data("random")
    s = spectrum(x)
    assert s.shape == (24,) and s.sum() == pytest.approx(1.0) and np.all(np.diff(s) <= 0)
    assert spectrum(x, 3).shape == (22,)
    with pytest.raises(ValueError, match="non-zero"):
        spectrum(x, 0)
    with pytest.raises(ValueError, match="drops all"):
        spectrum(x[:, :1], 2)
    # rank-deficient embeddings (rank 2 in 4-d): near-zero singular values -> very large rho
    assert rho_spectrum(np.repeat(x[:2, :4], 3, axis=0), 2) > 5
    assert np.isnan(spectrum(np.zeros((4, 3)))).all()


def test_kl_divergence_is_scipy_entropy():
    """rho's KL in numpy (no scipy.stats import in a trial) equals scipy.stats.entropy(p, q)."""
    rng = np.random.default_rng(3)
    for n in (1, 2, 7, 64, 513):
        p, q = rng.random(n) * 5, rng.random(n) ** 3
        assert kl_divergence(p, q) == pytest.approx(float(entropy(p, q)), rel=1e-12, abs=1e-15)
        u = np.full(n, 1.0 / n)
        assert kl_divergence(u, q) == pytest.approx(float(entropy(u, q)), rel=1e-12, abs=1e-15)
    # the special cases of rel_entr: p = 0 adds nothing, p > 0 = q is inf, NaN stays NaN
    cases = [([0.0, 1.0, 3.0], [0.5, 0.25, 0.25]), ([0.2, 0.8], [0.0, 1.0]), ([0.0, 1.0], [0.0, 1.0]),
             ([np.nan, 1.0], [0.5, 0.5]), ([0.5, 0.5], [np.nan, 1.0]), ([1.0, 1.0], [0.0, 0.0])]
    for p, q in cases:
        want = float(entropy(p, q))
        got = kl_divergence(p, q)
        assert (math.isnan(got) and math.isnan(want)) or got == pytest.approx(want, rel=1e-12), (p, q, got, want)
    assert math.isinf(kl_divergence([0.2, 0.8], [0.0, 1.0]))


def test_edge_cases():
    x, y = data("random")
    with pytest.raises(ValueError, match="NaN/inf"):
        embedding_space_metrics(np.where(np.eye(300, 24) > 0, np.inf, x), y)
    with pytest.raises(ValueError, match="labels has 299 entries"):
        embedding_space_metrics(x, y[:-1])
    # every class a singleton: pi_intra undefined; a single class: pi_inter undefined
    m = embedding_space_metrics(x[:10], np.arange(10))
    assert math.isnan(m["pi_intra"]) and math.isnan(m["pi_ratio"]) and not math.isnan(m["pi_inter"])
    m = embedding_space_metrics(x[:10], np.zeros(10))
    assert math.isnan(m["pi_inter"]) and math.isnan(m["pi_ratio"]) and not math.isnan(m["pi_intra"])


def test_pi_intra_is_vectorised_at_sop_size():
    rng = np.random.default_rng(0)
    y = np.concatenate([np.arange(11316), rng.integers(0, 11316, 40000 - 11316)])  # every class present
    x = rng.standard_normal((40000, 32)).astype(np.float32)
    t = time.perf_counter()
    per_class = per_class_intra(x, y)
    v = pi_intra(x, y)
    assert time.perf_counter() - t < 5.0  # O(n d); a pairwise loop over 11k classes takes far longer
    assert np.isfinite(v) and per_class.shape == (11316,)
    for c in range(40):
        f = x[y == c].astype(np.float64)
        if len(f) > 1:
            dm = cdist(f, f, "cosine")
            assert per_class[c] == pytest.approx(dm.sum() / (len(f) ** 2 - len(f)), abs=1e-9)
        else:
            assert math.isnan(per_class[c])
