"""Chunked exact evaluation and blockwise embedding-space metrics equal brute force.

Every reference is computed here from its definition on the full n x n float64 distance
matrix (ties ranked by ascending gallery index, the documented rule), never by the code
under test. Sizes are small; one class of 2,100 points in 3-D makes mAP@R need
k = 2,099 > 2,048, faiss-GPU's k cap (the case that needs the torch top-k path on a GPU).
"""

from __future__ import annotations

import numpy as np
import pytest

from dmlcore.metrics import embedding_space as es
from dmlcore.metrics import evaluate_embeddings, pi_inter, pi_intra, rho_spectrum, singular_values


def brute_retrieval(x: np.ndarray, y: np.ndarray, distance: str, recall_k, map_at) -> dict[str, float]:
    """Recall@k, mAP@R, R-precision, mAP@M from the full float64 distance matrix."""
    x = x.astype(np.float32)
    if distance == "cosine":
        x = (x / np.sqrt((x.astype(np.float64) ** 2).sum(1))[:, None]).astype(np.float32)
    x64 = x.astype(np.float64)
    n = len(x)
    if distance == "cosine":
        D = -(x64 @ x64.T)
    else:
        D = ((x64[:, None, :] - x64[None, :, :]) ** 2).sum(-1)
    np.fill_diagonal(D, np.inf)  # self excluded (by index)
    idx = np.arange(n)
    out = {f"recall_at_{k}": [] for k in recall_k}
    out.update(map_at_r=[], r_precision=[], **{f"map_at_{map_at}": []})
    for q in range(n):
        order = np.lexsort((idx, D[q]))[: n - 1]  # by distance, ties by index
        rel = (y[order] == y[q]).astype(np.float64)
        R = int(rel.sum())
        if R == 0:
            continue
        prec = np.cumsum(rel) / np.arange(1, n)
        for k in recall_k:
            out[f"recall_at_{k}"].append(float(rel[: min(k, n - 1)].any()))
        out["map_at_r"].append(float((prec[:R] * rel[:R]).sum() / R))
        out["r_precision"].append(float(rel[:R].sum() / R))
        m = min(map_at, n - 1)
        out[f"map_at_{map_at}"].append(float((prec[:m] * rel[:m]).sum() / min(R, m)))
    return {k: float(np.mean(v)) for k, v in out.items()}


def _big_class_set(seed: int = 0):
    """2,100 points of class 0 plus 140 of 7 small classes, 3-D, integer coordinates (many exact ties)."""
    rng = np.random.default_rng(seed)
    y = np.r_[np.zeros(2100, dtype=np.int64), rng.integers(1, 8, 140)]
    x = rng.integers(-12, 13, (len(y), 3)).astype(np.float32)
    x[y > 0] += 3 * (y[y > 0, None] % 5).astype(np.float32)
    perm = rng.permutation(len(y))
    return x[perm], y[perm]


@pytest.fixture(scope="module")
def big_class():
    x, y = _big_class_set()
    return x, y, brute_retrieval(x, y, "euclidean", (1, 4), 1000)


@pytest.mark.parametrize("chunk", [1, 7, 2240])
def test_k_above_2048_every_chunk_size_equals_brute_force(big_class, chunk):
    x, y, ref = big_class
    assert np.bincount(y).max() - 1 > 2048  # mAP@R needs k = largest R > faiss GPU's cap
    got = evaluate_embeddings(x, y, recall_k=(1, 4), distance="euclidean", clustering=False, map_at=1000,
                              chunk_size=chunk, backend="faiss")
    assert got.keys() == ref.keys()
    for k in ref:
        assert got[k] == pytest.approx(ref[k], abs=1e-12), k


def test_k_above_2048_torch_topk_equals_brute_force(big_class):
    x, y, ref = big_class
    got = evaluate_embeddings(x, y, recall_k=(1, 4), distance="euclidean", clustering=False, map_at=1000,
                              chunk_size=333, backend="torch")
    for k in ref:
        assert got[k] == pytest.approx(ref[k], abs=1e-12), k


def test_cosine_every_chunk_size_equals_brute_force():
    rng = np.random.default_rng(1)
    n = 300
    y = rng.integers(0, 12, n)
    x = (rng.standard_normal((12, 8))[y] + 0.9 * rng.standard_normal((n, 8))).astype(np.float32)
    x[5] = x[17]  # an exact duplicate pair (tie decided by index)
    ref = brute_retrieval(x, y, "cosine", (1, 2, 8), 50)
    for chunk in [1, 2, 3, 64, n - 1, n]:
        got = evaluate_embeddings(x, y, recall_k=(1, 2, 8), distance="cosine", clustering=False, map_at=50,
                                  chunk_size=chunk, backend="faiss")
        for k in ref:
            assert got[k] == pytest.approx(ref[k], abs=1e-12), (chunk, k)


# ----------------------------------------------------------------------------- pi, rho blockwise


def brute_pi(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    x = x.astype(np.float64)
    u = x / np.linalg.norm(x, axis=1, keepdims=True)
    D = 1.0 - u @ u.T
    intra = []
    for c in np.unique(y):
        m = y == c
        k = int(m.sum())
        intra.append(D[np.ix_(m, m)].sum() / (k * (k - 1)) if k > 1 else np.nan)
    intra = np.array(intra)
    intra[np.isnan(intra)] = np.nanmax(intra)
    mu = np.array([x[y == c].mean(0) for c in np.unique(y)])
    mu /= np.linalg.norm(mu, axis=1, keepdims=True)
    Dm = 1.0 - mu @ mu.T
    C = len(mu)
    return float(intra.mean()), float((Dm.sum() - np.trace(Dm)) / (C * (C - 1)))


@pytest.mark.parametrize("block", [1, 5, 64, 10_000])
def test_pi_and_rho_blockwise_equal_brute_force(monkeypatch, block):
    rng = np.random.default_rng(2)
    n, d = 500, 16
    y = rng.integers(0, 9, n)
    y[0] = 9  # a one-sample class
    x = (rng.standard_normal((10, d))[y] * 2 + rng.standard_normal((n, d))).astype(np.float32)
    monkeypatch.setattr(es, "BLOCK_ROWS", block)
    intra, inter = brute_pi(x, y)
    assert pi_intra(x, y) == pytest.approx(intra, rel=1e-10)
    assert pi_inter(x, y) == pytest.approx(inter, rel=1e-10)
    s = np.linalg.svd(x.astype(np.float64), compute_uv=False)
    np.testing.assert_allclose(singular_values(x), s, rtol=1e-10)
    t = s[1:] / s[1:].sum()
    u = np.full(len(t), 1.0 / len(t))
    assert rho_spectrum(x, 2) == pytest.approx(float(np.sum(u * np.log(u / t))), rel=1e-9)
