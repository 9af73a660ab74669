"""Closed-set retrieval (``eval.protocol: closed_set``): queries search a separate reference set.

The setting of Guided DML's evaluation (MyModel_CIFAR10.py:662-699): the queries are the
test images, the reference set is *every* train image, both hold the same classes, and no
query is excluded from the reference set (they are different images). For query ``q``,
``R_q`` = the number of references of its class (5,000 on CIFAR-10); ``rel_q(i)`` = the
``i``-th nearest reference (tie rule of :mod:`dmlcore.metrics.search`) has the query's class.

* ``recall_at_k`` (the k of ``eval.recall_k``): a relevant reference among the k nearest;
  ``precision_at_1`` = ``recall_at_1`` (pytorch-metric-learning's ``precision_at_1``).
* ``r_precision``, ``map_at_r``: as :mod:`dmlcore.metrics.retrieval`, with the ``R_q`` above
  (PML ``AccuracyCalculator(k="max_bin_count")`` with ``ref_includes_query=False``).
* ``nmi``: one seeded k-means over the *query* embeddings, k = number of classes (PML
  clusters the queries).
* ``knn_accuracy``, ``knn_precision``, ``knn_recall``, ``knn_f1``: the 1-NN classifier fitted
  on the references (predicted class = class of the nearest reference), accuracy and the
  macro-averaged precision / recall / F1 over the classes present in the queries or the
  predictions (sklearn ``average="macro"``; a class never predicted has precision 0).
"""

from __future__ import annotations

from typing import Any, Iterable

import numpy as np

from ._common import check_distance, check_embeddings, l2_normalize, to_numpy
from .clustering import KMEANS_NITER, kmeans, nmi
from .retrieval import aggregate, check_recall_k, per_query_metrics
from .search import iter_knn


def macro_scores(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float]:
    """Accuracy and macro precision / recall / F1 (sklearn's definitions, zero_division=0)."""
    classes = np.union1d(y_true, y_pred)
    prec, rec, f1 = [], [], []
    for c in classes:
        tp = float(np.sum((y_pred == c) & (y_true == c)))
        npred, ntrue = float(np.sum(y_pred == c)), float(np.sum(y_true == c))
        p = tp / npred if npred else 0.0
        r = tp / ntrue if ntrue else 0.0
        prec.append(p)
        rec.append(r)
        f1.append(2 * p * r / (p + r) if p + r else 0.0)
    return {
        "knn_accuracy": float(np.mean(y_true == y_pred)),
        "knn_precision": float(np.mean(prec)),
        "knn_recall": float(np.mean(rec)),
        "knn_f1": float(np.mean(f1)),
    }


def closed_set_metrics(query: Any, query_labels: Any, reference: Any, reference_labels: Any,
                       recall_k: Iterable[int] = (1,), distance: str = "euclidean", clustering: bool = True,
                       seed: int = 0, chunk_size: int | None = None, backend: str = "auto") -> dict[str, float]:
    """Closed-set metrics of ``query`` embeddings against ``reference`` embeddings (module docstring).

    ``distance``: ``"euclidean"`` on the raw embedding (the protocol) or ``"cosine"``.
    """
    distance = check_distance(distance)
    xq = check_embeddings(query, np.float32, min_rows=1, name="query embeddings")
    xr = check_embeddings(reference, np.float32, min_rows=1, name="reference embeddings")
    if xq.shape[1] != xr.shape[1]:
        raise ValueError(f"reference embeddings have dimension {xr.shape[1]} but the queries have {xq.shape[1]}")
    yq_raw = np.asarray(to_numpy(query_labels)).reshape(-1)
    yr_raw = np.asarray(to_numpy(reference_labels)).reshape(-1)
    if len(yq_raw) != len(xq) or len(yr_raw) != len(xr):
        raise ValueError("one label per query and per reference embedding is needed")
    classes, inv = np.unique(np.concatenate([yr_raw, yq_raw]), return_inverse=True)
    yr, yq = inv[: len(yr_raw)], inv[len(yr_raw):]
    if distance == "cosine":
        xq, xr = l2_normalize(xq), l2_normalize(xr)
    ks = check_recall_k([1, *recall_k])
    R = np.bincount(yr, minlength=len(classes))[yq]
    nb = len(xr)
    K = max(1, min(max(max(ks), int(R.max(initial=0))), nb))
    per_query: dict[str, np.ndarray] = {}
    pred = np.empty(len(xq), dtype=np.int64)
    for start, stop, _, idx in iter_knn(xq, K, gallery=xr, distance=distance, exclude_self=False,
                                        chunk_size=chunk_size, backend=backend, labels=yq, gallery_labels=yr):
        rel = yr[idx] == yq[start:stop, None]
        pred[start:stop] = yr[idx[:, 0]]
        for name, values in per_query_metrics(rel, R[start:stop], ks, None, nb).items():
            per_query.setdefault(name, np.empty(len(xq), dtype=np.float64))[start:stop] = values
    out = aggregate(per_query, R > 0)
    out["precision_at_1"] = out["recall_at_1"]
    out.update(macro_scores(yq, pred))
    if clustering:
        n_cls = len(np.unique(yq))
        assign = kmeans(xq, n_cls, seed=seed, niter=KMEANS_NITER) if len(xq) >= n_cls else np.zeros(len(xq), np.int64)
        out["nmi"] = nmi(yq, assign)
    return out


__all__ = ["closed_set_metrics", "macro_scores"]
