"""kNN search and retrieval metrics: hand-computed cases, brute force, PML, edge cases."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

from dmlcore.metrics import evaluate_embeddings, iter_knn, knn, retrieval_metrics

# ---------------------------------------------------------------------------------
# helpers: data and an independent brute-force implementation
# ---------------------------------------------------------------------------------


def clustered(n=300, d=16, classes=20, noise=1.0, seed=0, singletons=0):
    rng = np.random.default_rng(seed)
    y = np.concatenate([np.repeat(np.arange(classes), 2), rng.integers(0, classes, n - 2 * classes - singletons),
                        classes + np.arange(singletons)])
    rng.shuffle(y)
    centres = rng.standard_normal((classes + singletons, d))
    x = centres[y] + noise * rng.standard_normal((n, d))
    return x.astype(np.float32), y


def brute_force(x, y, recall_k=(1, 2, 4, 8), map_at=1000, distance="cosine"):
    """Full float64 distance matrix, ranks by (distance, index), explicit per-query formulas."""
    x = np.asarray(x, dtype=np.float32).astype(np.float64)
    n = len(x)
    if distance == "cosine":
        x32 = np.asarray(x, dtype=np.float32)
        x = (x32 / np.linalg.norm(x32.astype(np.float64), axis=1, keepdims=True)).astype(np.float32).astype(np.float64)
        dist = 1.0 - x @ x.T
    else:
        dist = ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)
    res = {f"recall_at_{k}": [] for k in recall_k}
    res.update(map_at_r=[], r_precision=[], **{f"map_at_{map_at}": []})
    G = n - 1
    for q in range(n):
        others = np.array([j for j in range(n) if j != q])
        order = others[np.lexsort((others, dist[q, others]))]
        rel = (y[order] == y[q]).astype(float)
        R = int(rel.sum())
        if R == 0:
            continue
        for k in recall_k:
            res[f"recall_at_{k}"].append(float(rel[: min(k, G)].any()))
        prec = np.cumsum(rel) / np.arange(1, G + 1)
        res["r_precision"].append(rel[:R].sum() / R)
        res["map_at_r"].append(sum(prec[i] for i in range(R) if rel[i]) / R)
        M = min(map_at, G)
        res[f"map_at_{map_at}"].append(sum(prec[i] for i in range(M) if rel[i]) / min(R, M))
    return {k: float(np.mean(v)) for k, v in res.items()}


def assert_close(a: dict, b: dict, tol=1e-6):
    assert set(a) == set(b), (set(a) ^ set(b))
    for k in a:
        assert a[k] == pytest.approx(b[k], abs=tol), k


# ---------------------------------------------------------------------------------
# hand-computed: 6 points on a line (and the same ranking on a circle for cosine)
# ---------------------------------------------------------------------------------

LINE = np.array([0.0, 1.0, 3.0, 7.0, 12.0, 20.0])
LINE_Y = np.array([0, 0, 1, 1, 0, 1])
# Neighbour lists by hand (distances |x_i - x_j|, no ties):
#   q0: 1,2,3,4,5  rel A: 1 0 0 1 0      q3: 2,4,1,0,5  rel B: 1 0 0 0 1
#   q1: 0,2,3,4,5  rel A: 1 0 0 1 0      q4: 3,5,2,1,0  rel A: 0 0 0 1 1
#   q2: 1,0,3,4,5  rel B: 0 0 1 0 1      q5: 4,3,2,1,0  rel B: 0 1 1 0 0
# every query has R = 2, gallery G = 5.
LINE_KNN = np.array([[1, 2, 3, 4, 5], [0, 2, 3, 4, 5], [1, 0, 3, 4, 5],
                     [2, 4, 1, 0, 5], [3, 5, 2, 1, 0], [4, 3, 2, 1, 0]])
LINE_EXPECTED = {
    "recall_at_1": 3 / 6,  # q0 q1 q3
    "recall_at_2": 4 / 6,  # + q5
    "recall_at_4": 6 / 6,
    "recall_at_8": 1.0,  # k > gallery: clipped, any positive exists
    "r_precision": (0.5 + 0.5 + 0 + 0.5 + 0 + 0.5) / 6,
    "map_at_r": (0.5 + 0.5 + 0 + 0.5 + 0 + (1 / 2) / 2) / 6,
    # AP over the 5 neighbours, normalised by min(R, 5) = 2
    "map_at_1000": ((1 + 2 / 4) / 2 + (1 + 2 / 4) / 2 + (1 / 3 + 2 / 5) / 2 + (1 + 2 / 5) / 2
                    + (1 / 4 + 2 / 5) / 2 + (1 / 2 + 2 / 3) / 2) / 6,
}


def test_line_hand_computed_euclidean():
    x = LINE[:, None]
    d, i = knn(x, 5, distance="euclidean")
    np.testing.assert_array_equal(i, LINE_KNN)
    np.testing.assert_allclose(d[0], [1, 3, 7, 12, 20])
    np.testing.assert_allclose(d[3], [4, 5, 6, 7, 13])
    got = evaluate_embeddings(x, LINE_Y, distance="euclidean", clustering=False)
    assert_close(got, LINE_EXPECTED, 1e-12)
    assert got["map_at_1000"] == pytest.approx(417 / 720, abs=1e-12)
    assert_close(retrieval_metrics(LINE_KNN, LINE_Y), LINE_EXPECTED, 1e-12)


def test_circle_hand_computed_cosine():
    # angle = 8 degrees per unit: every angular gap < 180 deg, so cosine ranks like the line
    ang = np.deg2rad(8 * LINE)
    x = np.stack([np.cos(ang), np.sin(ang)], axis=1) * np.array([[1], [2], [0.5], [3], [1], [7]])  # norms ignored
    d, i = knn(x, 5)
    np.testing.assert_array_equal(i, LINE_KNN)
    np.testing.assert_allclose(d[0], 1 - np.cos(np.deg2rad(8 * np.array([1, 3, 7, 12, 20]))), atol=1e-6)
    assert_close(evaluate_embeddings(x, LINE_Y, clustering=False), LINE_EXPECTED, 1e-12)


# ---------------------------------------------------------------------------------
# brute force and pytorch-metric-learning
# ---------------------------------------------------------------------------------


@pytest.mark.parametrize("distance", ["cosine", "euclidean"])
@pytest.mark.parametrize("kind", ["random", "clustered"])
def test_matches_brute_force(distance, kind):
    if kind == "random":
        rng = np.random.default_rng(1)
        x, y = rng.standard_normal((250, 8)).astype(np.float32), rng.integers(0, 12, 250)
    else:
        x, y = clustered(n=260, d=12, classes=15, noise=0.8, seed=2, singletons=3)
    ks = (1, 2, 4, 8, 16, 300)
    got = evaluate_embeddings(x, y, recall_k=ks, distance=distance, clustering=False)
    ref = brute_force(x, y, ks, 1000, distance)
    assert_close(got, ref, 1e-9)
    # a small M so that some classes have R > M
    got = evaluate_embeddings(x, y, recall_k=ks, distance=distance, clustering=False, map_at=5)
    assert got["map_at_5"] == pytest.approx(brute_force(x, y, ks, 5, distance)["map_at_5"], abs=1e-9)


def test_knn_matches_brute_force_order():
    x, _ = clustered(n=200, d=10, seed=3)
    xn = x / np.linalg.norm(x.astype(np.float64), axis=1, keepdims=True).astype(np.float32)
    dist = 1.0 - xn.astype(np.float64) @ xn.astype(np.float64).T
    np.fill_diagonal(dist, np.inf)
    order = np.lexsort((np.broadcast_to(np.arange(200), dist.shape), dist), axis=1)[:, :20]
    d, i = knn(x, 20)
    np.testing.assert_array_equal(i, order)
    np.testing.assert_allclose(d, np.take_along_axis(dist, order, 1), atol=2e-6)
    assert d.dtype == np.float32 and i.dtype == np.int64


def test_matches_pml_accuracy_calculator():
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

    x, y = clustered(n=400, d=16, classes=25, noise=1.2, seed=4, singletons=4)
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    calc = AccuracyCalculator(include=("precision_at_1", "mean_average_precision_at_r", "r_precision",
                                       "mean_average_precision"), k=len(x) - 1, device=torch.device("cpu"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = calc.get_accuracy(xn, y, xn, y, ref_includes_query=True)
    got = evaluate_embeddings(x, y, recall_k=(1,), clustering=False)
    assert got["recall_at_1"] == pytest.approx(ref["precision_at_1"], abs=1e-6)
    assert got["map_at_r"] == pytest.approx(ref["mean_average_precision_at_r"], abs=1e-6)
    assert got["r_precision"] == pytest.approx(ref["r_precision"], abs=1e-6)
    # PML divides by R, we by min(R, 1000): identical while R <= 1000. (PML needs k <= the
    # gallery size: with k = 1000 > 399 faiss pads with index -1 and its mAP exceeds 1.)
    assert got["map_at_1000"] == pytest.approx(ref["mean_average_precision"], abs=1e-6)


# ---------------------------------------------------------------------------------
# one pass, chunking, backends, determinism
# ---------------------------------------------------------------------------------


def test_chunked_equals_unchunked_exactly():
    x, y = clustered(n=300, d=8, classes=30, noise=1.5, seed=5, singletons=2)
    ref = evaluate_embeddings(x, y, recall_k=(1, 2, 4, 8, 32), clustering=False, chunk_size=300)
    for cs in (1, 7, 64, 1000):
        assert evaluate_embeddings(x, y, recall_k=(1, 2, 4, 8, 32), clustering=False, chunk_size=cs) == ref
    d0, i0 = knn(x, 25, chunk_size=300)
    for cs in (1, 13):
        d1, i1 = knn(x, 25, chunk_size=cs)
        np.testing.assert_array_equal(i1, i0)
        np.testing.assert_allclose(d1, d0, atol=1e-6)


@pytest.mark.parametrize("distance", ["cosine", "euclidean"])
def test_torch_backend_equals_faiss(distance):
    x, y = clustered(n=250, d=8, classes=20, noise=1.5, seed=6)
    a = evaluate_embeddings(x, y, distance=distance, clustering=False, backend="faiss")
    b = evaluate_embeddings(x, y, distance=distance, clustering=False, backend="torch", chunk_size=17)
    assert a == b
    np.testing.assert_array_equal(knn(x, 10, distance=distance, backend="torch")[1],
                                  knn(x, 10, distance=distance, backend="faiss")[1])


def test_one_search_feeds_every_metric(monkeypatch):
    from dmlcore.metrics import search as knn_mod

    calls = []
    real = knn_mod._Searcher.search

    def spy(self, xq, k):
        calls.append((len(xq), k))
        return real(self, xq, k)

    monkeypatch.setattr(knn_mod._Searcher, "search", spy)
    x, y = clustered(n=200, d=8, classes=10, seed=7)
    evaluate_embeddings(x, y, recall_k=(1, 4), clustering=False, map_at=50, chunk_size=10_000)
    # one call over all queries, K = max(4, max R, 50) (+1 self, +8 margin)
    assert len(calls) == 1 and calls[0][0] == 200
    R = np.bincount(y).max() - 1
    assert calls[0][1] == max(4, R, 50) + 1 + 8


def test_deterministic_and_accepts_torch():
    x, y = clustered(n=200, d=8, classes=10, seed=8)
    a = evaluate_embeddings(x, y, seed=3)
    t = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    b = evaluate_embeddings(t, torch.tensor(y), seed=3)
    assert a == b
    assert list(a) == ["recall_at_1", "recall_at_2", "recall_at_4", "recall_at_8", "map_at_r", "r_precision",
                       "map_at_1000", "nmi", "f1"]
    assert all(isinstance(v, float) and "@" not in k for k, v in a.items())


def test_metric_names_follow_arguments():
    x, y = clustered(n=60, d=4, classes=5, seed=9)
    r = evaluate_embeddings(x, y, recall_k=[10, 1, 100, 10], map_at=None, clustering=False)
    assert list(r) == ["recall_at_1", "recall_at_10", "recall_at_100", "map_at_r", "r_precision"]
    assert "map_at_20" in evaluate_embeddings(x, y, map_at=20, clustering=False)


# ---------------------------------------------------------------------------------
# edge cases
# ---------------------------------------------------------------------------------


def test_duplicate_embeddings_documented_rule():
    # rows 1, 3, 5 are the same vector; labels A, B, A. Query excluded by index, the
    # other duplicates come first (distance 0), equal distances by ascending index.
    rng = np.random.default_rng(10)
    x = rng.standard_normal((8, 5)).astype(np.float32)
    x[3] = x[1]
    x[5] = x[1]
    y = np.array([2, 0, 3, 1, 4, 0, 5, 6])
    for backend in ("faiss", "torch"):
        for cs in (1, 3, 8):
            d, i = knn(x, 3, chunk_size=cs, backend=backend)
            np.testing.assert_array_equal(i[1, :2], [3, 5])
            np.testing.assert_array_equal(i[3, :2], [1, 5])
            np.testing.assert_array_equal(i[5, :2], [1, 3])
            np.testing.assert_allclose(d[[1, 3, 5], :2], 0.0, atol=1e-6)
    r = evaluate_embeddings(x, y, recall_k=(1, 2), clustering=False)
    # only queries 1 and 5 (class 0) have a relevant item: q1 -> 3 (miss), 5 (hit@2); q5 -> 1 (hit@1)
    assert r["recall_at_1"] == 0.5 and r["recall_at_2"] == 1.0
    assert r["map_at_r"] == pytest.approx((0 + 1) / 2)
    assert r["map_at_1000"] == pytest.approx((1 / 2 + 1) / 2)


def test_many_exact_duplicates_beyond_search_window():
    # 40 identical rows: tie runs longer than k + 1 + margin are searched again
    x = np.ones((40, 3), dtype=np.float32)
    for backend in ("faiss", "torch"):
        _, i = knn(x, 3, backend=backend)
        expected = np.array([[j for j in range(40) if j != q][:3] for q in range(40)])
        np.testing.assert_array_equal(i, expected)


def test_tie_runs_beyond_the_widest_search_warn(monkeypatch):
    from dmlcore.metrics import search

    monkeypatch.setattr(search, "MIN_RESEARCH_CAP", 16)
    x = np.ones((200, 3), dtype=np.float32)  # 200 identical rows; k=1 searches 10, re-searches up to 40
    with pytest.warns(RuntimeWarning, match="200 queries have runs"):
        d, i = knn(x, 1)
    assert (i[:, 0] != np.arange(200)).all() and np.allclose(d, 0.0, atol=1e-6)


def test_singleton_classes_are_excluded():
    x, y = clustered(n=100, d=6, classes=8, seed=11, singletons=5)
    r = evaluate_embeddings(x, y, clustering=False)
    keep = np.bincount(y)[y] > 1
    # metrics over the non-singleton queries, ranking against the full gallery
    assert_close(r, brute_force(x, y), 1e-9)
    assert keep.sum() == 95
    with pytest.warns(RuntimeWarning, match="NaN"):
        r = evaluate_embeddings(np.eye(4, dtype=np.float32), [0, 1, 2, 3], clustering=False)
    assert all(math.isnan(v) for v in r.values())


def test_k_larger_than_gallery():
    x, y = clustered(n=12, d=3, classes=3, seed=12)
    r = evaluate_embeddings(x, y, recall_k=(1, 11, 50), clustering=False)
    assert r["recall_at_11"] == 1.0 and r["recall_at_50"] == 1.0
    d, i = knn(x, 50)
    assert i.shape == (12, 11)
    assert all(sorted(i[q]) == [j for j in range(12) if j != q] for q in range(12))


def test_bad_inputs():
    x, y = clustered(n=20, d=3, classes=4, seed=13)
    bad = x.copy()
    bad[3, 1] = np.nan
    bad[7, 0] = np.inf
    with pytest.raises(ValueError, match=r"embeddings contain 2 NaN/inf values \(from the model\?\)"):
        evaluate_embeddings(bad, y)
    with pytest.raises(ValueError, match="embeddings contain 1 NaN/inf"):
        knn(torch.tensor(bad[:5]), 2)
    with pytest.raises(ValueError, match="labels has 19 entries but the embeddings have 20 rows"):
        evaluate_embeddings(x, y[:-1])
    with pytest.raises(ValueError, match="2-D"):
        evaluate_embeddings(x[0], y[:1])
    with pytest.raises(ValueError, match="at least 2"):
        evaluate_embeddings(x[:1], y[:1])
    with pytest.raises(ValueError, match="recall_k"):
        evaluate_embeddings(x, y, recall_k=(0, 1))
    with pytest.raises(ValueError, match="distance"):
        evaluate_embeddings(x, y, distance="manhattan")
    with pytest.raises(ValueError, match="backend"):
        knn(x, 2, backend="annoy")
    import faiss

    if faiss.get_num_gpus() == 0:
        with pytest.raises(ValueError, match="faiss build with GPUs"):
            knn(x, 2, backend="faiss_gpu")
    with pytest.raises(ValueError, match="neighbours per query"):
        retrieval_metrics(knn(x, 1)[1], y)


def test_separate_gallery():
    x, _ = clustered(n=50, d=4, seed=14)
    q, g = x[:10], x[10:]
    d, i = knn(q, 5, gallery=g, distance="euclidean")
    full = ((q[:, None].astype(float) - g[None].astype(float)) ** 2).sum(-1)
    np.testing.assert_array_equal(i, np.argsort(full, axis=1, kind="stable")[:, :5])
    chunks = list(iter_knn(q, 5, gallery=g, distance="euclidean", chunk_size=4))
    assert [(s, e) for s, e, _, _ in chunks] == [(0, 4), (4, 8), (8, 10)]
