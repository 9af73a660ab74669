"""NMI and pairwise F1 from one seeded k-means: hand-computed, brute force, sklearn, PML."""

from __future__ import annotations

import math
import warnings
from itertools import combinations

import numpy as np
import pytest
import torch
from sklearn.metrics import normalized_mutual_info_score

from dmlcore.metrics import clustering_metrics, contingency, evaluate_embeddings, kmeans, nmi, pairwise_f1


def brute_f1(y, c):
    """Pairwise F-measure by enumerating every unordered pair."""
    tp = fp = fn = 0
    for i, j in combinations(range(len(y)), 2):
        same_y, same_c = y[i] == y[j], c[i] == c[j]
        tp += same_y and same_c
        fp += same_c and not same_y
        fn += same_y and not same_c
    if tp == 0:
        return 1.0 if fp == fn == 0 else 0.0
    p, r = tp / (tp + fp), tp / (tp + fn)
    return 2 * p * r / (p + r)


def test_hand_computed():
    y = [0, 0, 1, 1]
    c = [0, 0, 0, 1]
    # classes a = (2, 2), clusters b = (3, 1), cells n00 = 2, n10 = 1, n11 = 1 (N = 4)
    mi = (0.5 * math.log(0.5 / (0.5 * 0.75)) + 0.25 * math.log(0.25 / (0.5 * 0.75))
          + 0.25 * math.log(0.25 / (0.5 * 0.25)))
    h_y = math.log(2)
    h_c = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert nmi(y, c) == pytest.approx(mi / ((h_y + h_c) / 2), abs=1e-12)
    assert nmi(y, c) == pytest.approx(0.3437110184854509, abs=1e-12)
    # pairs: TP = C(2,2) = 1, same class = 2, same cluster = C(3,2) = 3 -> P = 1/3, R = 1/2
    assert pairwise_f1(y, c) == pytest.approx(0.4, abs=1e-12)
    cells, a, b = contingency(y, c)
    assert sorted(cells) == [1, 1, 2] and list(a) == [2, 2] and list(b) == [3, 1]


@pytest.mark.parametrize("seed", range(4))
def test_against_sklearn_and_brute_force(seed):
    rng = np.random.default_rng(seed)
    n = 120
    y = rng.integers(0, 1 + seed * 4, n)
    c = np.where(rng.random(n) < 0.6, y, rng.integers(0, 7, n)) * 3 + 11  # arbitrary ids
    assert nmi(y, c) == pytest.approx(normalized_mutual_info_score(y, c), abs=1e-10)
    assert pairwise_f1(y, c) == pytest.approx(brute_f1(y, c), abs=1e-12)


def test_degenerate_partitions():
    assert nmi([1, 1, 1], [5, 5, 5]) == 1.0 == normalized_mutual_info_score([1, 1, 1], [5, 5, 5])
    assert nmi([0, 1, 2], [0, 0, 0]) == 0.0 == normalized_mutual_info_score([0, 1, 2], [0, 0, 0])
    assert nmi([0, 0, 1, 1], [0, 1, 0, 1]) == pytest.approx(0.0, abs=1e-15)
    assert nmi([0, 1, 2], [2, 0, 1]) == pytest.approx(1.0)
    assert pairwise_f1([0, 1, 2], [2, 0, 1]) == 1.0  # all singletons: no pairs anywhere
    assert pairwise_f1([0, 0, 1], [0, 1, 2]) == 0.0 == brute_f1([0, 0, 1], [0, 1, 2])
    with pytest.raises(ValueError, match="clusters has 2 entries"):
        nmi([0, 1, 2], [0, 1])


def test_kmeans_seeded_and_separated_clusters():
    rng = np.random.default_rng(0)
    centres = 10 * rng.standard_normal((6, 8))
    y = np.repeat(np.arange(6), 30)
    x = (centres[y] + 0.1 * rng.standard_normal((180, 8))).astype(np.float32)
    a = kmeans(x, 6, seed=1)
    assert np.array_equal(a, kmeans(x, 6, seed=1))
    assert clustering_metrics(x, y, distance="euclidean", seed=1) == {"nmi": nmi(y, a), "f1": pairwise_f1(y, a)}
    # two far-apart groups: Lloyd's iterations find them from any start
    two = np.repeat([0, 1], 40)
    x2 = (np.array([[5.0] * 4, [-5.0] * 4])[two] + rng.standard_normal((80, 4))).astype(np.float32)
    for s in range(3):
        assert clustering_metrics(x2, two, distance="euclidean", seed=s) == {"nmi": 1.0, "f1": 1.0}
    r = clustering_metrics(torch.tensor(x2), torch.tensor(two), seed=5)
    assert r["nmi"] == pytest.approx(1.0) and r["f1"] == pytest.approx(1.0)
    assert kmeans(x, 1).tolist() == [0] * 180
    with pytest.raises(ValueError, match="1 <= k <= n"):
        kmeans(x[:3], 4)


def test_nmi_matches_pml_with_same_seed():
    # PML's AccuracyCalculator runs faiss.Kmeans(niter=20) with faiss' default seed 1234
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

    rng = np.random.default_rng(3)
    y = rng.integers(0, 12, 400)
    x = (rng.standard_normal((12, 16))[y] + 0.9 * rng.standard_normal((400, 16))).astype(np.float32)
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    calc = AccuracyCalculator(include=("NMI",), device=torch.device("cpu"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = calc.get_accuracy(xn, y, xn, y, ref_includes_query=True)["NMI"]
    ours = evaluate_embeddings(x, y, seed=1234)
    assert ours["nmi"] == pytest.approx(ref, abs=1e-9)
    assert ours == evaluate_embeddings(x, y, seed=1234)  # deterministic
