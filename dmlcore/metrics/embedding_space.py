"""Embedding-space metrics on (train) embeddings, from one embedding matrix.

Roth et al., "Revisiting Training Strategies and Generalization Performance in Deep
Metric Learning" (ICML 2020), as their public code computes them; cosine distances
``d(u, v) = 1 - u.v / (||u|| ||v||)`` throughout. For ``Phi`` (``n x d``) with classes
``c = 1..C`` of sizes ``n_c``:

* ``pi_intra = (1/C) sum_c pi_c`` with
  ``pi_c = 1/(n_c (n_c - 1)) sum_{i != j in c} d(phi_i, phi_j)`` (mean pairwise cosine
  distance within the class, diagonal excluded). A one-sample class has no pair and
  gets the largest ``pi_c`` of the other classes (NaN when no class has two samples).
  Computed in O(n d) without any pairwise matrix: with unit rows ``x_i`` and class sums
  ``S_c``, ``sum_{i != j in c} x_i.x_j = ||S_c||^2 - sum_{i in c} ||x_i||^2``.
* ``pi_inter = 1/(C (C-1)) sum_{c != c'} d(mu_c, mu_c')`` with ``mu_c`` the mean of the
  class's embeddings as given, L2-normalised (NaN for a single class). O(C d) the same way.
* ``pi_ratio = pi_intra / max(pi_inter, 1e-8)``.
* ``rho_spectrum`` with parameter ``m`` (the paper's rho is ``m = 2``): ``s`` = singular
  values of the *uncentred* ``Phi`` (descending); drop the first ``|m| - 1``; normalise
  to sum 1; with ``U`` uniform of the same length, ``m > 0`` gives ``KL(U || s)`` (=
  ``scipy.stats.entropy(U, s)``, computed by :func:`kl_divergence` without importing
  ``scipy.stats``), ``m < 0`` gives ``KL(s || U)``. Higher = the embedding
  uses fewer directions. A zero singular value makes ``KL(U || s)`` infinite
  (rank-deficient embeddings, e.g. fewer samples than dimensions).
* ``uniformity`` (Wang & Isola, ICML 2020):
  ``log( 1/(n(n-1)) sum_{i != j} exp(-t ||x_i - x_j||^2) )`` with ``t = 2`` over the
  L2-normalised rows ``x_i`` (lower = more uniform on the sphere; in ``[-4t, 0]``).
  Computed in row chunks, O(chunk x n) memory.

All arithmetic is float64. Memory does not grow with ``n`` beyond the input: every
pass reads the rows in blocks of :data:`BLOCK_ROWS` (converted to float64 one block at a
time), so 1,000,000 x 128 float32 embeddings need O(block x d + C x d) on top of the
input, never an ``n x n`` matrix nor a float64 copy of the whole matrix. The singular
values come from a blockwise (tall-skinny) QR: ``R`` of ``[R_prev; block]`` is
updated block by block and ``svd(R)`` (``d x d``) has the singular values of the whole
matrix (QR is backward stable, unlike the eigenvalues of the Gram matrix, which square
the condition number). ``uniformity`` is the one O(n^2)-time metric (chunked, O(chunk
x n) memory); ``embedding_space_metrics(..., with_uniformity=False)`` skips it for large n.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ._common import check_embeddings, check_labels, l2_normalize

PI_RATIO_EPS = 1e-8
BLOCK_ROWS = 1 << 16


def _blocks(x: np.ndarray, block: int | None = None):
    """``(start, float64 block)`` over the rows of ``x``."""
    block = BLOCK_ROWS if block is None else max(1, int(block))
    for s in range(0, x.shape[0], block):
        yield s, np.asarray(x[s : s + block], dtype=np.float64)


def _unit(b: np.ndarray) -> np.ndarray:
    norms = np.sqrt(np.einsum("ij,ij->i", b, b))
    return b / np.maximum(norms, 1e-12)[:, None]


def _class_stats(x: np.ndarray, y: np.ndarray, normalise: bool, block: int | None = None
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-class sums ``(C, d)`` of the (unit, with ``normalise``) rows, sizes, and sums of squared norms."""
    C = int(y.max(initial=-1)) + 1
    sums = np.zeros((C, x.shape[1]), dtype=np.float64)
    sq = np.zeros(C, dtype=np.float64)
    for s, b in _blocks(x, block):
        if normalise:
            b = _unit(b)
        yb = y[s : s + len(b)]
        _add_rows(sums, yb, b)
        sq += np.bincount(yb, weights=np.einsum("ij,ij->i", b, b), minlength=C)
    return sums, np.bincount(y, minlength=C).astype(np.int64), sq


def _add_rows(sums: np.ndarray, yb: np.ndarray, b: np.ndarray) -> None:
    """``sums[yb[i]] += b[i]`` for every row (sort + reduceat, no Python loop over rows)."""
    order = np.argsort(yb, kind="stable")
    ys = yb[order]
    starts = np.flatnonzero(np.r_[True, ys[1:] != ys[:-1]])
    sums[ys[starts]] += np.add.reduceat(b[order], starts, axis=0)


def per_class_intra(emb: Any, labels: Any) -> np.ndarray:
    """``pi_c`` for every class ``0..C-1`` (NaN for one-sample classes)."""
    x = _as_float(emb)
    y = check_labels(labels, x.shape[0])
    sums, sizes, sq_norms = _class_stats(x, y, normalise=True)
    sizes = sizes.astype(np.float64)
    pair_sim = np.einsum("ij,ij->i", sums, sums) - sq_norms  # sum over ordered pairs i != j
    n_pairs = sizes * (sizes - 1.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(sizes > 1, 1.0 - pair_sim / n_pairs, np.nan)


def pi_intra(emb: Any, labels: Any) -> float:
    """Mean over classes of the mean within-class cosine distance (module docstring)."""
    pc = per_class_intra(emb, labels)
    ok = ~np.isnan(pc)
    if not ok.any():
        return float("nan")
    pc = np.where(ok, pc, pc[ok].max())
    return float(pc.mean())


def pi_inter(emb: Any, labels: Any) -> float:
    """Mean pairwise cosine distance between the L2-normalised class means."""
    x = _as_float(emb)
    y = check_labels(labels, x.shape[0])
    sums, sizes, _ = _class_stats(x, y, normalise=False)
    C = len(sizes)
    if C < 2:
        return float("nan")
    mu = l2_normalize(sums / sizes[:, None])
    total = mu.sum(axis=0)
    pair_sim = total @ total - np.einsum("ij,ij->", mu, mu)
    return float(1.0 - pair_sim / (C * (C - 1.0)))


def pi_ratio(intra: float, inter: float) -> float:
    return float(intra / max(inter, PI_RATIO_EPS))


def singular_values(emb: Any) -> np.ndarray:
    """Singular values of the uncentred embedding matrix, descending (float64).

    Blockwise QR (module docstring) when there are more rows than columns; the ``d x d``
    factor's singular values are those of the whole matrix.
    """
    x = _as_float(emb)
    n, d = x.shape
    if n <= d:
        return np.linalg.svd(np.asarray(x, dtype=np.float64), compute_uv=False)
    R = np.zeros((0, d))
    for _, b in _blocks(x, max(BLOCK_ROWS, 2 * d)):
        R = np.linalg.qr(np.vstack([R, b]), mode="r")
    return np.linalg.svd(R, compute_uv=False)


def _as_float(emb: Any) -> np.ndarray:
    """The embeddings as a float32 or float64 array (not copied to float64: blocks are converted)."""
    keep32 = str(getattr(emb, "dtype", "")) in ("float32", "torch.float32")
    return check_embeddings(emb, np.float32 if keep32 else np.float64, min_rows=1)


def spectrum(emb: Any, m: int = 1) -> np.ndarray:
    """Normalised singular-value spectrum: the first ``|m| - 1`` values dropped, sums to 1.

    ``m = 1`` (default) keeps every value: the curve to plot. All NaN when every
    remaining singular value is zero.
    """
    if int(m) == 0:
        raise ValueError("m must be non-zero (m = 1 keeps every singular value)")
    full = singular_values(emb)
    s = full[abs(int(m)) - 1 :]
    if len(s) == 0:
        raise ValueError(f"m={m} drops all {len(full)} singular values")
    total = s.sum()
    if total <= 0:  # all-zero embeddings: no spectrum to speak of
        return np.full(len(s), np.nan)
    return s / total


def kl_divergence(p: Any, q: Any) -> float:
    """``KL(p || q)`` of two 1-d non-negative weight vectors, each normalised to sum 1.

    What ``scipy.stats.entropy(p, q)`` computes (the sum of ``scipy.special.rel_entr``:
    ``p log(p / q)`` where both are positive, 0 where ``p == 0 <= q``, inf where ``p > 0
    == q``, NaN where either is NaN), in numpy: importing ``scipy.stats`` costs a fresh
    trial 0.6 s and this is all the metrics need of it.
    """
    p = np.asarray(p, dtype=np.float64)
    q = np.asarray(q, dtype=np.float64)
    with np.errstate(invalid="ignore"):  # as scipy: an all-zero vector gives NaN, quietly
        p = p / p.sum()
        q = q / q.sum()
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        terms = np.where(
            (p > 0) & (q > 0), p * np.log(p / q),
            np.where((p == 0) & (q >= 0), 0.0, np.inf),
        )
    terms = np.where(np.isnan(p) | np.isnan(q), np.nan, terms)
    return float(np.sum(terms))


def rho_spectrum(emb: Any, m: int = 2) -> float:
    """Spectral decay rho: KL(U || s) for ``m > 0``, KL(s || U) for ``m < 0`` (module docstring)."""
    s = spectrum(emb, m)
    uniform = np.full(len(s), 1.0 / len(s))
    return kl_divergence(uniform, s) if m > 0 else kl_divergence(s, uniform)


def uniformity(emb: Any, t: float = 2.0, chunk_size: int | None = None) -> float:
    """Wang & Isola's uniformity loss of the L2-normalised rows (module docstring)."""
    x = l2_normalize(check_embeddings(emb, np.float64, min_rows=2))
    n = x.shape[0]
    if chunk_size is None:
        chunk_size = max(1, (1 << 22) // n)
    total = 0.0
    for s in range(0, n, chunk_size):
        e = min(s + chunk_size, n)
        sq = np.maximum(2.0 - 2.0 * (x[s:e] @ x.T), 0.0)  # ||x_i - x_j||^2 of unit vectors
        k = np.exp(-t * sq)
        k[np.arange(e - s), np.arange(s, e)] = 0.0  # i == j excluded by index
        total += float(k.sum())
    return float(np.log(total / (n * (n - 1.0))))


def rho_name(m: int) -> str:
    """Metric name of ``rho_spectrum@m`` (MLflow forbids "@"): ``rho_spectrum_at_1``, ``..._at_neg1``."""
    return f"rho_spectrum_at_{m}" if m >= 0 else f"rho_spectrum_at_neg{-m}"


def embedding_space_metrics(
    emb: Any, labels: Any, rho_m: int = 2, rho_at: tuple[int, ...] = (), uniformity_rows: int | None = None,
    seed: int = 0, *, with_uniformity: bool = True,
) -> dict[str, float]:
    """``{"pi_intra", "pi_inter", "pi_ratio", "rho_spectrum", "uniformity"}`` of one embedding matrix.

    ``rho_spectrum`` is ``rho_spectrum@rho_m``; ``rho_at`` adds ``rho_spectrum_at_{m}`` for each
    ``m`` (Roth et al.'s README: ``rho_spectrum@1`` is the paper's spectral decay, ``@2`` the
    robust variant). ``uniformity_rows``: uniformity (O(n^2)) on a seeded uniform sample of
    that many rows (an estimate of the same pairwise mean), all rows when None;
    ``with_uniformity=False`` leaves it out (the rest is O(n d^2), read in blocks).
    """
    x = _as_float(emb)
    if x.shape[0] < 2:
        raise ValueError(f"embeddings has {x.shape[0]} rows; at least 2 needed")
    y = check_labels(labels, x.shape[0])
    intra = pi_intra(x, y)
    inter = pi_inter(x, y)
    xu = x
    if uniformity_rows is not None and x.shape[0] > uniformity_rows:
        rows = np.sort(np.random.default_rng(seed).choice(x.shape[0], int(uniformity_rows), replace=False))
        xu = x[rows]
    out = {
        "pi_intra": intra,
        "pi_inter": inter,
        "pi_ratio": pi_ratio(intra, inter),
        "rho_spectrum": rho_spectrum(x, rho_m),
    }
    if with_uniformity:
        out["uniformity"] = uniformity(xu)
    for m in rho_at:
        out[rho_name(int(m))] = rho_spectrum(x, int(m))
    return out

