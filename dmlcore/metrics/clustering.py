"""Clustering quality: NMI and pairwise F1 from one seeded faiss k-means.

k-means: faiss ``Kmeans`` with ``k`` = number of test classes, ``niter=20`` (as
pytorch-metric-learning and Roth et al.; faiss 1.15 stops earlier only at a fixed
point, when the objective no longer changes), ``nredo=1``, the given ``seed``, random
initialisation from the data, every point used for training (no subsampling). For
``distance="cosine"`` the L2-normalised embeddings are clustered (the space retrieval
ranks in), otherwise the raw ones.
On a faiss build with GPUs the k-means runs on the GPU.

Both scores come from the contingency table ``n_ij`` (class ``i``, cluster ``j``;
row sums ``a_i``, column sums ``b_j``, ``N`` points), kept sparse (only non-zero cells,
at most ``N``), so the cost is O(N log N) time and O(N) memory whatever the number of
classes and clusters (11k x 11k for SOP would be a 128M-cell dense table):

* ``nmi = MI / ((H(classes) + H(clusters)) / 2)`` with
  ``MI = sum n_ij/N log(N n_ij / (a_i b_j))`` and ``H = -sum p log p``: scikit-learn's
  ``normalized_mutual_info_score`` (arithmetic mean). As there: 1.0 when both
  labelings have a single group, 0.0 when MI is 0.
* ``f1``: the pairwise F-measure of DML papers. Over unordered pairs of points,
  ``TP = sum_ij C(n_ij, 2)`` (same class, same cluster), predicted positives
  ``sum_j C(b_j, 2)`` (same cluster), actual positives ``sum_i C(a_i, 2)`` (same class);
  precision ``P = TP / sum_j C(b_j,2)``, recall ``R = TP / sum_i C(a_i,2)``,
  ``F1 = 2PR/(P+R) = 2 TP / (sum_j C(b_j,2) + sum_i C(a_i,2))``. When there is no
  same-class and no same-cluster pair at all (both partitions are all singletons,
  hence identical) F1 is 1.0; otherwise a zero denominator in P or R gives F1 = 0.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ._common import check_distance, check_embeddings, check_labels, l2_normalize
from .search import faiss_num_gpus

KMEANS_NITER = 20


def kmeans(emb: Any, k: int, *, seed: int = 0, niter: int = KMEANS_NITER, gpu: bool | None = None) -> np.ndarray:
    """Cluster ids (int64, ``0..k-1``) of one seeded faiss k-means on the rows of ``emb`` as given."""
    import faiss

    x = check_embeddings(emb, np.float32, min_rows=1)
    n, d = x.shape
    k = int(k)
    if not 1 <= k <= n:
        raise ValueError(f"k-means needs 1 <= k <= n, got k={k} for n={n}")
    if k == 1:
        return np.zeros(n, dtype=np.int64)
    if gpu is None:
        gpu = faiss_num_gpus() > 0
    km = faiss.Kmeans(d, k, niter=int(niter), nredo=1, seed=int(seed), verbose=False,
                      min_points_per_centroid=1, max_points_per_centroid=max(256, -(-n // k) + 1),
                      gpu=bool(gpu))
    km.train(x)
    _, assign = km.index.search(x, 1)
    return assign.reshape(-1).astype(np.int64)


def contingency(labels: Any, clusters: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sparse contingency table: ``(cells, class_sizes, cluster_sizes)``.

    ``cells`` holds the non-zero counts ``n_ij`` (any order); ``class_sizes`` the
    ``a_i`` and ``cluster_sizes`` the ``b_j``.
    """
    a = check_labels(labels, len(to_1d(labels)), name="labels")
    b = check_labels(clusters, len(a), name="clusters")
    nb = int(b.max(initial=-1)) + 1
    _, cells = np.unique(a * nb + b, return_counts=True)
    return cells, np.bincount(a), np.bincount(b, minlength=nb)


def to_1d(x: Any) -> np.ndarray:
    from ._common import to_numpy

    return np.asarray(to_numpy(x)).reshape(-1)


def _entropy(counts: np.ndarray, n: int) -> float:
    p = counts[counts > 0] / n
    return float(-np.sum(p * np.log(p)))


def nmi(labels: Any, clusters: Any) -> float:
    """Normalized mutual information, arithmetic-mean normalisation (= scikit-learn's default)."""
    cells, a, b = contingency(labels, clusters)
    n = int(a.sum())
    if len(a) == len(b) == 1:
        return 1.0
    if len(a) == 1 or len(b) == 1:
        return 0.0
    # MI = sum over non-zero cells of n_ij/N * log(N n_ij / (a_i b_j)); the a_i, b_j terms
    # sum to the marginal entropies, which avoids looking up each cell's row and column.
    h_a, h_b = _entropy(a, n), _entropy(b, n)
    mi = float(np.sum(cells / n * np.log(cells / n))) + h_a + h_b
    if abs(mi) < 1e-15 * max(1.0, h_a + h_b):
        return 0.0
    mi = max(mi, 0.0)
    return float(mi / ((h_a + h_b) / 2.0))


def _pairs(c: np.ndarray) -> float:
    c = c.astype(np.float64)
    return float(np.sum(c * (c - 1.0) / 2.0))


def pairwise_f1(labels: Any, clusters: Any) -> float:
    """Pairwise F-measure of a clustering against the classes (module docstring)."""
    cells, a, b = contingency(labels, clusters)
    tp, same_class, same_cluster = _pairs(cells), _pairs(a), _pairs(b)
    if same_class + same_cluster == 0:
        return 1.0
    return 2.0 * tp / (same_class + same_cluster)


def clustering_metrics(emb: Any, labels: Any, *, distance: str = "cosine", seed: int = 0,
                       num_clusters: int | None = None, niter: int = KMEANS_NITER) -> dict[str, float]:
    """``{"nmi", "f1"}`` of one seeded k-means with k = number of classes (or ``num_clusters``)."""
    distance = check_distance(distance)
    x = check_embeddings(emb, np.float32, min_rows=1)
    y = check_labels(labels, x.shape[0])
    if distance == "cosine":
        x = l2_normalize(x)
    k = int(y.max()) + 1 if num_clusters is None else int(num_clusters)
    assign = kmeans(x, k, seed=seed, niter=niter)
    return {"nmi": nmi(y, assign), "f1": pairwise_f1(y, assign)}
