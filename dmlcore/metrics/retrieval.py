"""Retrieval metrics on a class-disjoint test set from one kNN search.

Setting: every test sample is a query; its gallery is every *other* test sample
(``G = n - 1`` items). For query ``q`` with class ``y_q``, ``R_q`` = number of other
samples of class ``y_q``; ``rel_q(i)`` = 1 when the ``i``-th nearest neighbour
(1-based, tie rule of :mod:`dmlcore.metrics.search`) has class ``y_q``;
``P_q(i) = (1/i) * sum_{j<=i} rel_q(j)``.

* ``recall_at_k``: fraction of queries with at least one relevant item among their
  ``min(k, G)`` nearest neighbours (the DML "Recall@k", e.g. Song et al. 2016; for
  ``k >= G`` it is 1, every counted query having a relevant item).
* ``r_precision`` (Musgrave et al. 2020): mean of ``(1/R_q) sum_{i<=R_q} rel_q(i)``.
* ``map_at_r`` (Musgrave et al. 2020): mean of ``(1/R_q) sum_{i<=R_q} P_q(i) rel_q(i)``.
* ``map_at_<M>`` (``map_at_1000`` by default): with ``M' = min(M, G)``, mean of
  ``AP@M'_q = (1/min(R_q, M')) sum_{i<=M'} P_q(i) rel_q(i)``. Normalising by
  ``min(R_q, M')`` (the usual IR definition of AP@k) makes a perfect ranking score 1
  for every query; dividing by ``R_q`` (pytorch-metric-learning's
  ``mean_average_precision`` with ``k=M``) would cap queries of classes with more than
  ``M`` other samples below 1, mixing ranking quality with class size. The two agree
  whenever ``R_q <= M`` (always true on CUB, CARS and SOP with M = 1000). Roth et al.'s
  reference code divides by the class size ``R_q + 1`` instead, so its values are
  lower by about a factor ``R/(R+1)``.

Queries without any relevant item (``R_q = 0``, one-sample classes) are **excluded
from every retrieval average**, as pytorch-metric-learning's ``AccuracyCalculator``
does; when no query is left, the metrics are NaN.
"""

from __future__ import annotations

import warnings
from typing import Any, Iterable, Sequence

import numpy as np

from ._common import check_labels, to_numpy


def metric_name(kind: str, k: int | None = None) -> str:
    """Stable, MLflow-safe names: ``recall_at_1``, ``map_at_r``, ``map_at_1000``, ..."""
    return f"{kind}_at_{k}" if k is not None else kind


def check_recall_k(recall_k: Iterable[int]) -> list[int]:
    try:
        ks = sorted({int(k) for k in recall_k})
    except (TypeError, ValueError):
        raise ValueError(f"recall_k must be a list of positive integers, got {recall_k!r}") from None
    if not ks or ks[0] < 1:
        raise ValueError(f"recall_k must be a non-empty list of positive integers, got {recall_k!r}")
    return ks


def check_map_at(map_at: int | None) -> int | None:
    if map_at is None or map_at == 0:
        return None
    if int(map_at) < 1:
        raise ValueError(f"map_at must be a positive integer or None, got {map_at!r}")
    return int(map_at)


def needed_k(recall_k: Sequence[int], max_r: int, map_at: int | None, n_other: int) -> int:
    """Neighbours one search must return to feed every metric: max(recall k, R, M), <= G."""
    return max(1, min(max(max(recall_k), max_r, map_at or 0), n_other))


def per_query_metrics(rel: np.ndarray, R: np.ndarray, recall_k: Sequence[int], map_at: int | None,
                      n_other: int) -> dict[str, np.ndarray]:
    """Per-query values from the relevance of each ranked neighbour.

    ``rel``: ``(c, K)`` bool, ``rel[q, i]`` = the ``(i+1)``-th neighbour of ``q`` shares
    its class; ``R``: ``(c,)`` relevant-item counts; ``K`` must be at least
    :func:`needed_k`. Rows with ``R = 0`` get meaningless values (callers drop them).
    Every reduction is row-local and sequential, so the values do not depend on how
    queries are chunked.
    """
    c, K = rel.shape
    R = np.asarray(R, dtype=np.int64)
    need = needed_k(recall_k, int(R.max(initial=0)), map_at, n_other)
    if K < need:
        raise ValueError(f"the kNN result has {K} neighbours per query but {need} are needed "
                         f"(max of recall_k, the largest R and map_at, clipped to the gallery size {n_other})")
    rows = np.arange(c)
    cum = np.cumsum(rel, axis=1, dtype=np.int32)  # relevant items within the first i+1
    ap_cum = cum.astype(np.float64)  # -> P(i) rel(i), then its running sum
    ap_cum *= rel
    ap_cum /= np.arange(1, K + 1, dtype=np.float64)
    np.cumsum(ap_cum, axis=1, out=ap_cum)
    Rs = np.maximum(R, 1)
    r_idx = np.clip(R - 1, 0, K - 1)
    out: dict[str, np.ndarray] = {}
    for k in recall_k:
        out[metric_name("recall", k)] = (cum[:, min(k, n_other) - 1] > 0).astype(np.float64)
    out["map_at_r"] = ap_cum[rows, r_idx] / Rs
    out["r_precision"] = cum[rows, r_idx] / Rs
    if map_at is not None:
        m = min(map_at, n_other)
        out[metric_name("map", map_at)] = ap_cum[:, m - 1] / np.maximum(np.minimum(R, m), 1)
    return out


def aggregate(per_query: dict[str, np.ndarray], valid: np.ndarray) -> dict[str, float]:
    """Mean of each per-query array over the ``valid`` queries (NaN when none is)."""
    n_valid = int(valid.sum())
    if n_valid == 0:
        warnings.warn("no query has another sample of its class in the gallery: retrieval metrics are NaN",
                      RuntimeWarning, stacklevel=3)
        return {k: float("nan") for k in per_query}
    return {k: float(np.mean(v[valid])) for k, v in per_query.items()}


def relevant_counts(labels: np.ndarray) -> np.ndarray:
    """``R`` per sample: how many *other* samples share its class (labels ``0..C-1``)."""
    counts = np.bincount(labels)
    return counts[labels] - 1


def retrieval_metrics(knn_indices: Any, labels: Any, recall_k: Iterable[int] = (1, 2, 4, 8),
                      map_at: int | None = 1000) -> dict[str, float]:
    """Recall@k, mAP@R, R-Precision and mAP@M from a precomputed self-excluded kNN result.

    Args:
        knn_indices: ``(n, K)`` neighbour indices of each sample among the others,
            nearest first (e.g. ``knn(emb, K)[1]``); ``K`` must be at least
            ``min(max(recall_k, largest R, map_at), n - 1)``.
        labels: ``(n,)`` class ids.
        recall_k: the k of ``recall_at_k``.
        map_at: M of ``map_at_M`` (None: skip).

    Returns:
        ``{"recall_at_1": ..., "map_at_r": ..., "r_precision": ..., "map_at_1000": ...}``
        averaged over queries that have at least one relevant item (module docstring).
    """
    idx = np.asarray(to_numpy(knn_indices))
    if idx.ndim != 2:
        raise ValueError(f"knn_indices must be a 2-D (n, K) array, got shape {tuple(idx.shape)}")
    n = idx.shape[0]
    y = check_labels(labels, n)
    if n < 2:
        raise ValueError("at least 2 samples are needed")
    if idx.size and (idx.min() < 0 or idx.max() >= n):
        raise ValueError("knn_indices contain indices outside 0..n-1 (missing neighbours?)")
    ks = check_recall_k(recall_k)
    m = check_map_at(map_at)
    R = relevant_counts(y)
    rel = y[idx] == y[:, None]
    per_q = per_query_metrics(rel, R, ks, m, n - 1)
    return aggregate(per_q, R > 0)
