"""Exact k-nearest-neighbour search, chunked over queries, with a documented tie rule.

Backends (``backend=``):

* ``"faiss"``: faiss ``IndexFlatIP`` (cosine) / ``IndexFlatL2`` (euclidean) on the CPU.
* ``"faiss_gpu"``: the same flat index on GPU 0 (needs a faiss build with GPUs; faiss
  GPU search is limited to k <= 2048, larger k falls back to ``"torch"``).
* ``"torch"``: chunked ``matmul`` + ``topk`` on CUDA when available (else the CPU), in
  full float32 (TF32 is switched off for the call).
* ``"auto"`` (default): ``"faiss_gpu"`` when ``faiss.get_num_gpus() > 0``, else ``"torch"``
  when ``torch.cuda.is_available()``, else ``"faiss"``.

Memory: queries are processed ``chunk_size`` at a time, so the peak is
O(chunk_size x n_gallery) on top of the embeddings (O(chunk_size x k) plus a fixed
4096 x 1024 block for faiss), never n x n.

Self-exclusion: with ``exclude_self`` (the default when no separate gallery is given)
the gallery of query ``i`` is every *other* sample. The query is removed by **index**:
``k + 1`` candidates are searched and the entry whose index is ``i`` is dropped (or the
last one when ``i`` is not among them, which happens when ``i`` has many exact
duplicates). A duplicate of the query at distance 0 is therefore a legitimate
neighbour, and two identical embeddings retrieve each other.

Tie rule (deterministic): neighbours are ranked by distance; **equal distances are
ranked by ascending gallery index**. The float32 search cannot decide ties by itself
(faiss orders exact duplicates arbitrarily, and two rows of equal exact distance may
get float32 distances a few ulps apart, differently on different BLAS code paths and
chunk sizes). So within each result row, runs of consecutive candidates whose float32
distances differ by at most ``tol`` (a bound on the float32 rounding error,
``8 * sqrt(d) * 2**-24 * scale`` with ``scale = 1`` for cosine and
``(||q|| + max ||g||)**2`` for euclidean) are re-scored in float64 from the float32
embeddings (products exact, summed in float64 by one row kernel, so identical
vectors give bit-identical scores) and sorted by ``(float64 distance, index)``. ``8`` candidates
beyond the needed ``k`` are searched so that a tie run crossing the cut-off is seen; a
row whose tie run reaches the end of its candidate list is searched again with twice
the width (up to ``max(4 * width, 4096)``; beyond that, for degenerate inputs such as
thousands of identical embeddings, membership at the cut-off follows the backend's
deterministic order and a warning says how many queries were affected). The result
is the same for every chunk size and backend up to float32 rounding of the returned
distances.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from typing import Any, Iterator

import numpy as np

from ._common import check_distance, check_embeddings, check_labels, l2_normalize

BACKENDS = ("auto", "faiss", "faiss_gpu", "torch")
_U = 2.0**-24  # unit roundoff of float32
TIE_FACTOR = 8.0
SEARCH_MARGIN = 8
MIN_RESEARCH_CAP = 4096  # widest re-search of a row whose tie run crosses the cut-off: max(4 x width, this)
_FAISS_GPU_MAX_K = 2048
# Default working-set bounds (elements) per search call, see default_chunk_size.
_CPU_BUDGET = 1 << 24
_GPU_BUDGET = 1 << 27
_FAISS_BUDGET = 1 << 22
_FAISS_MAX_CHUNK = 16384


def faiss_num_gpus() -> int:
    try:
        import faiss

        return int(faiss.get_num_gpus())
    except Exception:  # pragma: no cover - faiss always importable in this project
        return 0


def _torch_cuda() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:  # pragma: no cover
        return False


def resolve_backend(backend: str = "auto") -> str:
    """The concrete backend ``"auto"`` stands for on this machine (see module doc)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "faiss_gpu" and faiss_num_gpus() == 0:
        raise ValueError("backend 'faiss_gpu' needs a faiss build with GPUs (faiss.get_num_gpus() is 0 here)")
    if backend != "auto":
        return backend
    if faiss_num_gpus() > 0:
        return "faiss_gpu"
    if _torch_cuda():
        return "torch"
    return "faiss"


@contextlib.contextmanager
def _full_fp32_matmul() -> Iterator[None]:
    """Disable TF32 for CUDA matmuls inside the block (restores the previous setting)."""
    import torch

    m = torch.backends.cuda.matmul
    if hasattr(m, "fp32_precision"):
        old = m.fp32_precision
        try:
            m.fp32_precision = "ieee"
            yield
        finally:
            m.fp32_precision = old
    else:  # pragma: no cover - older torch
        old = m.allow_tf32
        try:
            m.allow_tf32 = False
            yield
        finally:
            m.allow_tf32 = old


class _Searcher:
    """Float32 top-k search over a fixed gallery; ``search`` returns ascending scores.

    The score is ``-<q, g>`` for cosine (vectors already normalised) and ``||q - g||^2``
    for euclidean; smaller is nearer.
    """

    def __init__(self, xb: np.ndarray, distance: str, backend: str):
        self.xb = xb
        self.nb, self.d = xb.shape
        self.distance = distance
        self.backend = backend
        self._index = None
        self._gpu_index = None
        self._torch = None
        if backend in ("faiss", "faiss_gpu"):
            import faiss

            index = faiss.IndexFlatIP(self.d) if distance == "cosine" else faiss.IndexFlatL2(self.d)
            index.add(xb)
            self._index = index
            if backend == "faiss_gpu":
                self._res = faiss.StandardGpuResources()
                self._gpu_index = faiss.index_cpu_to_gpu(self._res, 0, index)

    def _torch_state(self):
        if self._torch is None:
            import torch

            dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
            xb_t = torch.from_numpy(self.xb).to(dev)
            sq = (xb_t * xb_t).sum(1) if self.distance == "euclidean" else None
            self._torch = (torch, dev, xb_t, sq)
        return self._torch

    def search(self, xq: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        if self.backend == "torch":
            return self._search_torch(xq, k)
        if self.backend == "faiss_gpu":
            if k <= _FAISS_GPU_MAX_K:
                D, I = self._gpu_index.search(xq, k)
            elif _torch_cuda():  # faiss GPU k-selection stops at 2048
                return self._search_torch(xq, k)
            else:  # pragma: no cover - faiss GPUs without torch CUDA
                D, I = self._index.search(xq, k)
        else:
            D, I = self._index.search(xq, k)
        D = np.asarray(D, dtype=np.float32)
        if self.distance == "cosine":
            D = -D
        return D, np.asarray(I, dtype=np.int64)

    def _search_torch(self, xq: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        torch, dev, xb_t, sq = self._torch_state()
        ctx = _full_fp32_matmul() if dev.type == "cuda" else contextlib.nullcontext()
        with ctx, torch.no_grad():
            q = torch.from_numpy(xq).to(dev)
            sim = q @ xb_t.T
            if self.distance == "cosine":
                score = sim.neg_()
            else:
                score = sim.mul_(-2.0).add_(sq[None, :]).add_((q * q).sum(1)[:, None])
            D, I = torch.topk(score, k, dim=1, largest=False, sorted=True)
        return D.float().cpu().numpy(), I.cpu().numpy().astype(np.int64, copy=False)


def _exact_scores(xq: np.ndarray, xb: np.ndarray, qi: np.ndarray, gi: np.ndarray, distance: str) -> np.ndarray:
    """Float64 scores of the pairs ``(xq[qi[t]], xb[gi[t]])``.

    Products of float32 values are exact in float64; each pair is reduced by the same
    row kernel whatever its position in memory, so identical vectors get
    bit-identical scores (checked by the duplicate-embedding tests).
    """
    out = np.empty(len(qi), dtype=np.float64)
    d = xq.shape[1]
    block = max(1, (1 << 22) // d)
    for s in range(0, len(qi), block):
        q = xq[qi[s : s + block]]
        g = xb[gi[s : s + block]]
        if distance == "cosine":
            out[s : s + block] = -np.einsum("ij,ij->i", q, g, dtype=np.float64)
        else:
            diff = q.astype(np.float64)
            diff -= g
            out[s : s + block] = np.einsum("ij,ij->i", diff, diff)
    return out


def _canonicalise(S: np.ndarray, I: np.ndarray, xq: np.ndarray, xb: np.ndarray, tol: np.ndarray,
                  distance: str, rel: np.ndarray | None) -> np.ndarray:
    """Re-rank near-tie runs of each row by (float64 score, index), in place.

    Returns, per row, the start position of the row's last tie run (used to detect a
    run that may continue past the searched candidates). With ``rel`` (relevance of
    each candidate to its query) only runs that mix relevant and irrelevant
    candidates are re-ranked: reordering the others cannot change any label-based
    metric.
    """
    c, K = S.shape
    small = np.diff(S, axis=1) <= tol[:, None]
    start = np.ones((c, K), dtype=bool)
    start[:, 1:] = ~small
    last_start = K - 1 - np.argmax(start[:, ::-1], axis=1)
    if not small.any():
        return last_start
    member = np.zeros((c, K), dtype=bool)
    member[:, 1:] |= small
    member[:, :-1] |= small
    flat = np.flatnonzero(member)
    gid = np.cumsum(start.reshape(-1))[flat]  # run ids, increasing along rows
    if rel is not None:
        _, first, counts = np.unique(gid, return_index=True, return_counts=True)
        nrel = np.add.reduceat(rel.reshape(-1)[flat].astype(np.int64), first)
        keep = np.repeat((nrel > 0) & (nrel < counts), counts)
        flat, gid = flat[keep], gid[keep]
        if len(flat) == 0:
            return last_start
    rows = flat // K
    If = I.reshape(-1)
    Sf = S.reshape(-1)
    cand = If[flat]
    exact = _exact_scores(xq, xb, rows, cand, distance)
    order = np.lexsort((cand, exact, gid))
    If[flat] = cand[order]
    Sf[flat] = exact[order]
    return last_start


def _prepare(emb: Any, distance: str, name: str) -> np.ndarray:
    x = check_embeddings(emb, np.float32, min_rows=1, name=name)
    return l2_normalize(x) if distance == "cosine" else x


def _tolerance(xq: np.ndarray, distance: str, d: int, gmax: float) -> np.ndarray:
    base = TIE_FACTOR * math.sqrt(d) * _U
    if distance == "cosine":
        return np.full(len(xq), base)
    qn = np.sqrt(np.einsum("ij,ij->i", xq, xq, dtype=np.float64))
    return base * (qn + gmax) ** 2


def default_chunk_size(n_gallery: int, k: int, backend: str) -> int:
    """Queries per search call.

    faiss never materialises ``chunk x n_gallery`` (it scans the gallery in blocks of
    1024 for query blocks of 4096), so its chunk is bounded by the ``chunk x k`` result
    (~4M entries; 4096 queries at k = 1000). The torch path holds the ``chunk x
    n_gallery`` score matrix: ~16M elements (64 MB) on the CPU, ~128M on a GPU.
    """
    if backend in ("faiss", "faiss_gpu"):
        return int(min(max(_FAISS_BUDGET // max(k, 1), 1), _FAISS_MAX_CHUNK))
    budget = _GPU_BUDGET if _torch_cuda() else _CPU_BUDGET
    return max(1, budget // max(n_gallery, k, 1))


def iter_knn(emb: Any, k: int, *, gallery: Any = None, distance: str = "cosine", exclude_self: bool | None = None,
             chunk_size: int | None = None, backend: str = "auto", labels: Any = None,
             gallery_labels: Any = None, _prepared: bool = False) -> Iterator[tuple[int, int, np.ndarray, np.ndarray]]:
    """Yield ``(start, stop, scores, indices)`` for query rows ``start:stop``.

    ``scores`` are float32 ranking scores (``-cos`` for cosine, squared L2 for
    euclidean; re-scored tie runs hold their float64 scores rounded to float32),
    ascending; ``indices`` int64 gallery indices; ``k`` is clipped to the
    gallery size. See :func:`knn` for the arguments. ``labels`` (and
    ``gallery_labels`` with a separate gallery) only restrict the tie re-ranking to runs
    that mix same-label and other-label candidates, which is all label-based metrics
    need; leave them out to get the canonical order of every run.
    """
    distance = check_distance(distance)
    backend = resolve_backend(backend)
    if _prepared:
        xq = emb
        xb = emb if gallery is None else gallery
    else:
        xq = _prepare(emb, distance, "embeddings")
        xb = xq if gallery is None else _prepare(gallery, distance, "gallery")
    if xb.shape[1] != xq.shape[1]:
        raise ValueError(f"gallery has dimension {xb.shape[1]} but the queries have {xq.shape[1]}")
    if exclude_self is None:
        exclude_self = gallery is None
    if exclude_self and xb.shape[0] != xq.shape[0]:
        raise ValueError("exclude_self needs the queries to be the gallery (same rows)")
    nq, nb, d = xq.shape[0], xb.shape[0], xq.shape[1]
    n_other = nb - 1 if exclude_self else nb
    if n_other < 1:
        raise ValueError("the gallery is empty: at least 2 samples are needed when each query is excluded "
                         "from its own gallery")
    if int(k) < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    k_out = min(int(k), n_other)
    qlab = glab = None
    if labels is not None:
        qlab = check_labels(labels, nq) if not _prepared else np.asarray(labels)
        if gallery is None:
            glab = qlab
        elif gallery_labels is None:
            raise ValueError("gallery_labels are needed with labels and a separate gallery")
        else:
            glab = np.asarray(gallery_labels)
            if len(glab) != nb:
                raise ValueError(f"gallery_labels has {len(glab)} entries but the gallery has {nb} rows")
            # compare on a common label space
            _, inv = np.unique(np.concatenate([to_plain(labels), to_plain(gallery_labels)]), return_inverse=True)
            qlab, glab = inv[:nq], inv[nq:]
    ks0 = min(k_out + int(exclude_self) + SEARCH_MARGIN, nb)
    k_cap = min(nb, max(4 * ks0, MIN_RESEARCH_CAP))
    if chunk_size is None:
        chunk_size = default_chunk_size(nb, ks0, backend)
    chunk_size = max(1, int(chunk_size))
    gmax = float(np.sqrt(np.einsum("ij,ij->i", xb, xb, dtype=np.float64).max())) if distance == "euclidean" else 0.0
    searcher = _Searcher(xb, distance, backend)
    n_unresolved = 0

    for start in range(0, nq, chunk_size):
        stop = min(start + chunk_size, nq)
        out_S = np.empty((stop - start, k_out), dtype=np.float32)
        out_I = np.empty((stop - start, k_out), dtype=np.int64)
        pending = np.arange(start, stop)
        ks = ks0
        while len(pending):
            sub = max(1, chunk_size * ks0 // ks)
            still = []
            for s in range(0, len(pending), sub):
                rows = pending[s : s + sub]
                q = xq[rows]
                S, I = searcher.search(q, ks)
                rel = None if qlab is None else glab[I] == qlab[rows][:, None]
                tol = _tolerance(q, distance, d, gmax)
                last_start = _canonicalise(S, I, q, xb, tol, distance, rel)
                if exclude_self:
                    is_self = I == rows[:, None]
                    self_in = is_self[:, : k_out + 1].any(axis=1)
                    need = k_out + self_in.astype(np.int64)
                else:
                    need = np.full(len(rows), k_out)
                straddle = (last_start <= need - 1) & (ks < nb)
                done = ~straddle if ks < k_cap else np.ones(len(rows), dtype=bool)
                if ks >= k_cap:
                    n_unresolved += int(straddle.sum())
                if exclude_self:
                    order = np.argsort(is_self, axis=1, kind="stable")[:, :k_out]
                    S = np.take_along_axis(S, order, axis=1)
                    I = np.take_along_axis(I, order, axis=1)
                else:
                    S, I = S[:, :k_out], I[:, :k_out]
                loc = rows[done] - start
                out_S[loc] = S[done]
                out_I[loc] = I[done]
                still.append(rows[~done])
            pending = np.concatenate(still) if still else pending[:0]
            ks = min(2 * ks, k_cap)
        yield start, stop, out_S, out_I

    if n_unresolved:
        warnings.warn(
            f"{n_unresolved} queries have runs of (near-)equal distances crossing the rank cut-off that are longer "
            f"than the search window ({k_cap}); which tied neighbours are kept there follows the backend's "
            "deterministic order (degenerate embeddings?)",
            RuntimeWarning,
            stacklevel=2,
        )


def to_plain(x: Any) -> np.ndarray:
    from ._common import to_numpy

    return np.asarray(to_numpy(x)).reshape(-1)


def scores_to_distances(S: np.ndarray, distance: str) -> np.ndarray:
    """Ranking scores to distances: ``1 - cos`` (clipped to [0, 2]) for cosine, ``||q - g||`` for euclidean."""
    if distance == "cosine":
        return np.clip(1.0 + S, 0.0, 2.0)
    return np.sqrt(np.maximum(S, 0.0))


def knn(emb: Any, k: int, *, gallery: Any = None, distance: str = "cosine", exclude_self: bool | None = None,
        chunk_size: int | None = None, backend: str = "auto") -> tuple[np.ndarray, np.ndarray]:
    """Exact k nearest neighbours of every row of ``emb``.

    Args:
        emb: ``(n, d)`` queries (torch tensor or array-like).
        k: neighbours per query; clipped to the gallery size (``n - 1`` with self-exclusion).
        gallery: ``(m, d)`` gallery; default: ``emb`` itself.
        distance: ``"cosine"`` (rows L2-normalised, inner product) or ``"euclidean"``.
        exclude_self: drop each query from its own gallery, by index. Default: True
            when ``gallery`` is None, else False.
        chunk_size: queries per search call (default: :func:`default_chunk_size`).
        backend: ``"auto"``, ``"faiss"``, ``"faiss_gpu"`` or ``"torch"``.

    Returns:
        ``(distances, indices)``: float32 ``(n, k')`` distances (``1 - cos`` or the
        euclidean distance) and int64 ``(n, k')`` gallery indices, nearest first, ties
        by ascending index (module docstring).
    """
    chunks_D, chunks_I = [], []
    for _, _, S, I in iter_knn(emb, k, gallery=gallery, distance=distance, exclude_self=exclude_self,
                               chunk_size=chunk_size, backend=backend):
        chunks_D.append(scores_to_distances(S, distance).astype(np.float32))
        chunks_I.append(I)
    return np.concatenate(chunks_D), np.concatenate(chunks_I)
