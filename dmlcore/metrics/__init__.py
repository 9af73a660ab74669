"""Evaluation metrics: retrieval, clustering and embedding-space metrics.

One evaluation pass = one exact kNN search (Recall@k, mAP@R, R-Precision, mAP@1000)
+ one seeded k-means (NMI, F1); the embedding-space metrics (pi_intra, pi_inter,
pi_ratio, rho spectral decay, uniformity) come from one embedding matrix.
Definitions and conventions: ``docs/metrics.md`` and each module's docstring.
"""

from .closed_set import closed_set_metrics
from .clustering import clustering_metrics, contingency, kmeans, nmi, pairwise_f1
from .embedding_space import (
    embedding_space_metrics,
    per_class_intra,
    pi_inter,
    pi_intra,
    pi_ratio,
    rho_spectrum,
    singular_values,
    spectrum,
    uniformity,
)
from .evaluate import evaluate_embeddings
from .search import iter_knn, knn, resolve_backend
from .retrieval import metric_name, per_query_metrics, retrieval_metrics

__all__ = [
    "evaluate_embeddings",
    "closed_set_metrics",
    "embedding_space_metrics",
    "knn",
    "iter_knn",
    "resolve_backend",
    "retrieval_metrics",
    "per_query_metrics",
    "metric_name",
    "clustering_metrics",
    "kmeans",
    "nmi",
    "pairwise_f1",
    "contingency",
    "pi_intra",
    "pi_inter",
    "pi_ratio",
    "per_class_intra",
    "rho_spectrum",
    "spectrum",
    "singular_values",
    "uniformity",
]
