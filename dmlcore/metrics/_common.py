"""Input checks and conversions shared by the metric modules.

Every public metric function accepts torch tensors (any device, any float dtype,
with or without grad) or anything ``numpy.asarray`` understands, and turns it into
a C-contiguous numpy array here, with the same one-line errors everywhere.
"""

from __future__ import annotations

from typing import Any

import numpy as np

DISTANCES = ("cosine", "euclidean")


def to_numpy(x: Any) -> np.ndarray:
    """A numpy view/copy of a torch tensor (detached, on the CPU) or an array-like."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # torch.Tensor without importing torch
        x = x.detach().cpu()
        if str(x.dtype) in ("torch.bfloat16", "torch.float16"):
            x = x.float()
        return x.numpy()
    return np.asarray(x)


def check_embeddings(emb: Any, dtype: type = np.float32, min_rows: int = 1, name: str = "embeddings") -> np.ndarray:
    """``emb`` as a C-contiguous ``(n, d)`` array of ``dtype``; finite values only."""
    x = to_numpy(emb)
    if x.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (n, d) array, got shape {tuple(x.shape)}")
    if x.shape[0] < min_rows:
        raise ValueError(f"{name} has {x.shape[0]} rows; at least {min_rows} needed")
    if x.shape[1] < 1:
        raise ValueError(f"{name} has 0 columns")
    if not np.issubdtype(x.dtype, np.number) or np.issubdtype(x.dtype, np.complexfloating):
        raise ValueError(f"{name} must be real numbers, got dtype {x.dtype}")
    if np.issubdtype(x.dtype, np.floating):
        bad = int(np.count_nonzero(~np.isfinite(x)))
        if bad:
            raise ValueError(f"{name} contain {bad} NaN/inf values (from the model?)")
    return np.ascontiguousarray(x, dtype=dtype)


def check_labels(labels: Any, n: int, name: str = "labels") -> np.ndarray:
    """``labels`` as class ids ``0..C-1`` (int64, length ``n``), in sorted order of the originals."""
    y = to_numpy(labels)
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array of class ids, got shape {tuple(y.shape)}")
    if len(y) != n:
        raise ValueError(f"{name} has {len(y)} entries but the embeddings have {n} rows")
    if np.issubdtype(y.dtype, np.floating) and not np.all(np.isfinite(y)):
        raise ValueError(f"{name} contain NaN/inf values")
    _, inverse = np.unique(y, return_inverse=True)
    return inverse.reshape(-1).astype(np.int64, copy=False)


def check_distance(distance: str) -> str:
    if distance not in DISTANCES:
        raise ValueError(f"distance must be one of {DISTANCES}, got {distance!r}")
    return distance


def l2_normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Rows divided by ``max(||row||, eps)`` (norms taken in float64); keeps the dtype.

    A zero row stays zero (like ``torch.nn.functional.normalize``).
    """
    norms = np.sqrt(np.einsum("ij,ij->i", x, x, dtype=np.float64))
    return (x / np.maximum(norms, eps)[:, None]).astype(x.dtype, copy=False)
