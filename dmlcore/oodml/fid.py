"""Fréchet distance between two Gaussians, and between two feature sets (ooDML's shift measure).

    FD((mu1, S1), (mu2, S2)) = |mu1 - mu2|^2 + Tr(S1) + Tr(S2) - 2 Tr((S1 S2)^(1/2))

``Tr((S1 S2)^(1/2))`` is computed without ``scipy.linalg.sqrtm`` and its imaginary
round-off: the eigenvalues of ``S1 S2`` are those of the symmetric PSD matrix
``S1^(1/2) S2 S1^(1/2)`` (clipped at 0), so the trace is the sum of their square roots.

For two *sample* sets (``fid_between``) with covariances ``S1 = A^T A / (n1-1)`` and
``S2 = B^T B / (n2-1)`` (``A``, ``B`` the centred samples) the non-zero eigenvalues of
``S1 S2`` are the squared singular values of ``A B^T / sqrt((n1-1)(n2-1))``: when there
are fewer samples than dimensions (ooDML compares a few hundred class means in 2048-d)
the trace term is the nuclear norm of an ``n1 x n2`` matrix, exact and cheap.
"""

from __future__ import annotations

import numpy as np

__all__ = ["frechet_distance", "fid_between", "gaussian_stats", "sqrt_trace_product"]


def _sym_sqrt(s: np.ndarray) -> np.ndarray:
    """Square root of a symmetric PSD matrix (negative round-off eigenvalues clipped)."""
    w, v = np.linalg.eigh((s + s.T) / 2)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def sqrt_trace_product(s1: np.ndarray, s2: np.ndarray) -> float:
    """``Tr((S1 S2)^(1/2))`` for symmetric PSD ``S1``, ``S2``."""
    r = _sym_sqrt(np.asarray(s1, dtype=np.float64))
    m = r @ np.asarray(s2, dtype=np.float64) @ r
    w = np.linalg.eigvalsh((m + m.T) / 2)
    return float(np.sqrt(np.clip(w, 0.0, None)).sum())


def frechet_distance(mu1, s1, mu2, s2) -> float:
    """Fréchet distance between N(mu1, S1) and N(mu2, S2) (float64, never negative)."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(s1, np.float64)), np.atleast_2d(np.asarray(s2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise ValueError(f"shape mismatch: mu {mu1.shape} / {mu2.shape}, S {s1.shape} / {s2.shape}")
    d = mu1 - mu2
    fd = float(d @ d + np.trace(s1) + np.trace(s2) - 2.0 * sqrt_trace_product(s1, s2))
    return max(fd, 0.0)


def gaussian_stats(features) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (unbiased) covariance of ``n x d`` features; one sample gives a zero covariance."""
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or len(x) == 0:
        raise ValueError(f"features must be a non-empty n x d array, got shape {x.shape}")
    mu = x.mean(axis=0)
    if len(x) < 2:
        return mu, np.zeros((x.shape[1], x.shape[1]))
    return mu, np.cov(x, rowvar=False).reshape(x.shape[1], x.shape[1])


def fid_between(features_a, features_b) -> float:
    """Fréchet distance between the Gaussians fitted to two ``n x d`` feature sets.

    ooDML: ``features_a`` = the train class means, ``features_b`` = the test class means.
    Exact for any n and d: uses the ``d x d`` route when d is small, the ``n1 x n2``
    nuclear-norm route when there are fewer samples than dimensions.
    """
    a = np.asarray(features_a, dtype=np.float64)
    b = np.asarray(features_b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or not len(a) or not len(b):
        raise ValueError(f"need two non-empty n x d arrays of the same d, got {a.shape} and {b.shape}")
    n1, n2, d = len(a), len(b), a.shape[1]
    if d <= max(n1, n2) or n1 < 2 or n2 < 2:
        mu1, s1 = gaussian_stats(a)
        mu2, s2 = gaussian_stats(b)
        return frechet_distance(mu1, s1, mu2, s2)
    mu1, mu2 = a.mean(0), b.mean(0)
    ca, cb = a - mu1, b - mu2
    f1, f2 = n1 - 1, n2 - 1
    nuclear = np.linalg.svd(ca @ cb.T, compute_uv=False).sum() / np.sqrt(f1 * f2)
    dm = mu1 - mu2
    fd = float(dm @ dm + (ca * ca).sum() / f1 + (cb * cb).sum() / f2 - 2.0 * nuclear)
    return max(fd, 0.0)
