"""One evaluation pass over test embeddings: one kNN search, one k-means."""

from __future__ import annotations

from typing import Any, Iterable

import numpy as np

from ._common import check_distance, check_embeddings, check_labels, l2_normalize
from .clustering import KMEANS_NITER, kmeans, nmi, pairwise_f1
from .search import iter_knn
from .retrieval import aggregate, check_map_at, check_recall_k, needed_k, per_query_metrics, relevant_counts


def evaluate_embeddings(emb: Any, labels: Any, recall_k: Iterable[int] = (1, 2, 4, 8), distance: str = "cosine",
                        clustering: bool = True, map_at: int | None = 1000, seed: int = 0,
                        chunk_size: int | None = None, backend: str = "auto") -> dict[str, float]:
    """Retrieval and clustering metrics of a class-disjoint test set.

    Every sample queries all the *other* samples (self excluded by index). One exact
    kNN search with ``K = min(max(max(recall_k), largest R, map_at), n - 1)`` feeds
    ``recall_at_<k>``, ``map_at_r``, ``r_precision`` and ``map_at_<map_at>``
    (definitions, the handling of one-sample classes and the tie rule:
    :mod:`dmlcore.metrics.retrieval`, :mod:`dmlcore.metrics.search`); the neighbour lists
    are consumed chunk by chunk, so memory stays O(chunk_size x n). With
    ``clustering``, one k-means seeded with ``seed`` (k = number of classes) feeds
    ``nmi`` and ``f1`` (:mod:`dmlcore.metrics.clustering`).

    Args:
        emb: ``(n, d)`` embeddings, torch tensor or array-like; NaN/inf is an error.
        labels: ``(n,)`` class ids.
        recall_k: the k of ``recall_at_k`` (clipped to the gallery size ``n - 1``).
        distance: ``"cosine"`` (L2-normalise, inner product) or ``"euclidean"``.
        clustering: compute ``nmi`` and ``f1``.
        map_at: M of ``map_at_M`` (None or 0: skip).
        seed: k-means seed.
        chunk_size: queries per search call (default: :func:`dmlcore.metrics.search.default_chunk_size`).
        backend: kNN backend (``"auto"``, ``"faiss"``, ``"faiss_gpu"``, ``"torch"``).

    Returns:
        ``{"recall_at_1": ..., ..., "map_at_r": ..., "r_precision": ...,
        "map_at_1000": ..., "nmi": ..., "f1": ...}`` (plain floats).
    """
    distance = check_distance(distance)
    x = check_embeddings(emb, np.float32, min_rows=2)
    n = x.shape[0]
    y = check_labels(labels, n)
    ks = check_recall_k(recall_k)
    m = check_map_at(map_at)
    if distance == "cosine":
        x = l2_normalize(x)
    R = relevant_counts(y)
    K = needed_k(ks, int(R.max()), m, n - 1)

    per_query: dict[str, np.ndarray] = {}
    for start, stop, _, idx in iter_knn(x, K, distance=distance, chunk_size=chunk_size, backend=backend,
                                        labels=y, _prepared=True):
        rel = y[idx] == y[start:stop, None]
        for name, values in per_query_metrics(rel, R[start:stop], ks, m, n - 1).items():
            if name not in per_query:
                per_query[name] = np.empty(n, dtype=np.float64)
            per_query[name][start:stop] = values
    out = aggregate(per_query, R > 0)

    if clustering:
        assign = kmeans(x, int(y.max()) + 1, seed=seed, niter=KMEANS_NITER)
        out["nmi"] = nmi(y, assign)
        out["f1"] = pairwise_f1(y, assign)
    return out
