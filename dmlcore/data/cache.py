"""Decode once, share everywhere: a node-local cache of a decoded, resized file dataset.

The first run on a node that asks for ``(dataset files, stored side)`` decodes every
image once (in parallel, with the CPUs the run may use) into one memory-mapped uint8 file
under ``data.cache_dir``; every later run on that node, and every DataLoader worker, maps
the same file: no JPEG decoding, and the operating system's page cache holds the pixels
once for all of them. Concurrent runs that start together wait on a file lock while the
first one builds; a half-written cache is never used (the metadata file that marks it
complete is written last, atomically).

Images are stored **whole** (shorter side resized to the stored side, aspect ratio kept,
see :func:`dmlcore.data.images.stored_size`) in a variable-size layout: image ``i`` is
``3 x h_i x w_i`` (channels first, so a batch needs no transpose) at byte offset
``offset_i`` of ``images.u8``; ``index.npy`` holds ``(offset, h, w)`` per image. A batch
read (:meth:`DecodedCache.gather`) copies each image into one zero-padded
``B x 3 x max h x max w`` tensor and returns it with the extents
(:class:`~dmlcore.data.images.ImageBatch`), or a plain tensor when all have one size.
The memory map is read through the page cache, so a dataset larger than RAM still
trains, at disk speed: pages are evicted, never copied into the process. Before copying a
batch, :meth:`DecodedCache.gather` asks the kernel for exactly its images' pages
(``madvise(MADV_WILLNEED)``, one call per image, in file order): reads of uncached images
are then issued together, and only their bytes are read. Without it each first touch of
an uncached page faults alone and the kernel's read-around reads ``read_ahead_kb`` about
it (8 MB on the development VM: 25x the bytes of a batch, ~1/20 of the disk's speed, see
``benchmarks/cold_cache.py``); with the pages cached the calls cost a page lookup each.

The key is a hash of the file list (paths, sizes, modification times) and the stored
side, so a changed dataset gets a new cache. Unreadable files are recorded in the
metadata and raise :class:`CorruptImageError` on access, so ``data.on_corrupt`` applies
exactly as without the cache.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import mmap
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from dmlcore.resources import available_cpus

from .errors import CorruptImageError
from .images import ImageBatch

log = logging.getLogger(__name__)

FORMAT = 2
"""2: whole images, variable-size layout (1 was the ``N x s x s x 3`` central square)."""


def cache_key(paths: Sequence[str], side: int) -> str:
    h = hashlib.sha1(f"v{FORMAT}|{side}|{len(paths)}".encode())
    for p in paths:
        try:
            st = os.stat(p)
            h.update(f"{os.path.abspath(p)}|{st.st_size}|{st.st_mtime_ns}\n".encode())
        except OSError:
            h.update(f"{os.path.abspath(p)}|missing\n".encode())
    return h.hexdigest()[:16]


class DecodedCache:
    """Whole decoded images of a file dataset in one memory-mapped file (variable-size layout)."""

    def __init__(self, cache_dir: str | os.PathLike, name: str, paths: Sequence[str], side: int) -> None:
        self.side = int(side)
        self.paths = list(paths)
        self.dir = Path(cache_dir).expanduser() / "dmlcore-decoded" / f"{name}-{self.side}px-{cache_key(self.paths, self.side)}"
        self.images_file = self.dir / "images.u8"
        self.index_file = self.dir / "index.npy"
        self.meta_file = self.dir / "meta.json"
        self._flat: np.ndarray | None = None
        self._map: mmap.mmap | None = None
        self.index: np.ndarray | None = None
        self.bad: dict[int, str] = {}
        self.built_here = False
        self.build_seconds = 0.0

    # ---- build -------------------------------------------------------------------------
    def ensure(self, decode, size_of=None) -> "DecodedCache":
        """Open the cache, building it first (under a lock) if no run on this node has.

        ``decode(i) -> np.uint8 (h x w x 3)`` decodes file ``i`` to its stored size;
        ``size_of(i) -> (h, w)`` gives that size from the file header alone (without it,
        every file is decoded twice). Both raise :class:`CorruptImageError` for an
        unreadable file.
        """
        if self._flat is not None:
            return self
        if not self.meta_file.is_file():
            self.dir.mkdir(parents=True, exist_ok=True)
            with open(self.dir / "lock", "a+") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)  # the others wait here while one builds
                try:
                    if not self.meta_file.is_file():
                        self._build(decode, size_of)
                finally:
                    fcntl.flock(lock, fcntl.LOCK_UN)
        meta = json.loads(self.meta_file.read_text())
        self.bad = {int(k): v for k, v in meta.get("bad", {}).items()}
        self.index = np.load(self.index_file)
        with open(self.images_file, "rb") as f:  # the map outlives the descriptor
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self._flat = np.frombuffer(self._map, dtype=np.uint8, count=max(1, int(meta["bytes"])))
        return self

    def _build(self, decode, size_of) -> None:
        t0 = time.perf_counter()
        n = len(self.paths)
        bad: dict[int, str] = {}
        sizes = np.zeros((n, 2), dtype=np.int64)
        size_of = size_of or (lambda i: decode(i).shape[:2])

        def measure(i: int) -> None:
            try:
                sizes[i] = size_of(i)
            except CorruptImageError as err:
                bad[i] = err.reason

        workers = max(1, available_cpus())
        with ThreadPoolExecutor(max_workers=workers) as pool:
            list(pool.map(measure, range(n), chunksize=256))
        nbytes = 3 * sizes[:, 0] * sizes[:, 1]
        offsets = np.concatenate([[0], np.cumsum(nbytes)[:-1]]) if n else np.zeros(0, dtype=np.int64)
        total = int(nbytes.sum())
        tmp = self.images_file.with_suffix(".tmp")
        flat = np.memmap(tmp, dtype=np.uint8, mode="w+", shape=(max(total, 1),))

        def one(i: int) -> None:
            if i in bad:
                return
            try:
                img = decode(i)
                h, w = (int(v) for v in sizes[i])
                if img.shape != (h, w, 3):
                    raise CorruptImageError(self.paths[i], f"decoded to {img.shape}, expected {(h, w, 3)}")
                o = int(offsets[i])
                flat[o : o + 3 * h * w] = np.ascontiguousarray(img.transpose(2, 0, 1)).reshape(-1)
            except CorruptImageError as err:
                bad[i] = err.reason

        # PIL releases the GIL while decoding: threads use every CPU the run may use.
        with ThreadPoolExecutor(max_workers=workers) as pool:
            list(pool.map(one, range(n), chunksize=64))
        flat.flush()
        del flat
        for i in bad:
            sizes[i] = (0, 0)
        np.save(self.index_file.with_suffix(".tmp.npy"), np.concatenate([offsets.reshape(-1, 1), sizes], 1).astype(np.int64))
        os.replace(self.index_file.with_suffix(".tmp.npy"), self.index_file)
        os.replace(tmp, self.images_file)
        meta_tmp = self.meta_file.with_suffix(".tmp")
        meta_tmp.write_text(json.dumps({"format": FORMAT, "n": n, "side": self.side, "bytes": total,
                                        "bad": {str(k): v for k, v in bad.items()}}))
        os.replace(meta_tmp, self.meta_file)  # written last: marks the cache complete
        self.built_here = True
        self.build_seconds = time.perf_counter() - t0
        log.info("decoded %d images into %s in %.1fs (%d unreadable)", n, self.dir, self.build_seconds, len(bad))

    # ---- read ----------------------------------------------------------------------------
    def _view(self, i: int) -> np.ndarray:
        if self._flat is None or self.index is None:
            raise RuntimeError("DecodedCache.ensure() first")
        o, h, w = (int(v) for v in self.index[i])
        return self._flat[o : o + 3 * h * w].reshape(3, h, w)

    def size(self, i: int) -> tuple[int, int]:
        """Stored ``(h, w)`` of image ``i`` (``(0, 0)`` for an unreadable file)."""
        assert self.index is not None
        return int(self.index[i, 1]), int(self.index[i, 2])

    def get(self, i: int) -> torch.Tensor:
        """Image ``i`` as a uint8 tensor ``3 x h x w`` (a copy)."""
        if i in self.bad:
            raise CorruptImageError(self.paths[i], self.bad[i])
        return torch.from_numpy(np.array(self._view(i)))

    def gather(self, idx: np.ndarray) -> "torch.Tensor | ImageBatch":
        """Images ``idx`` as one uint8 batch ``B x 3 x H x W``: a plain tensor when they share
        one size, else an :class:`ImageBatch` padded to the largest extents (one copy out of
        the map). The caller handles indices in :attr:`bad` (their slots hold zeros)."""
        idx = np.asarray(idx, dtype=np.int64)
        if self._flat is None or self.index is None:
            raise RuntimeError("DecodedCache.ensure() first")
        rows = self.index[idx]
        hs, ws = rows[:, 1], rows[:, 2]
        good = hs > 0
        hmax = int(hs.max()) if good.any() else self.side
        wmax = int(ws.max()) if good.any() else self.side
        if self.advise:
            self.willneed(rows)
        out = np.zeros((len(idx), 3, hmax, wmax), dtype=np.uint8)
        flat = self._flat
        for k, (o, h, w) in enumerate(rows.tolist()):
            if h:
                out[k, :, :h, :w] = flat[o : o + 3 * h * w].reshape(3, h, w)
        pixels = torch.from_numpy(out)
        hs = np.where(good, hs, hmax)
        ws = np.where(good, ws, wmax)
        if (hs == hmax).all() and (ws == wmax).all():
            return pixels
        return ImageBatch(pixels, torch.from_numpy(np.stack([hs, ws], 1)))

    advise = True
    """Ask the kernel for a batch's pages before copying it (:meth:`willneed`); False leaves
    uncached pages to the page faults' read-around (for benchmarks)."""

    def willneed(self, rows: np.ndarray) -> None:
        """Start reading the pages of images ``rows`` (``(offset, h, w)`` rows of :attr:`index`)
        that are not cached: one ``madvise(MADV_WILLNEED)`` per run of adjacent images, in
        file order, so that the disk gets them all at once and only their bytes. Only a hint:
        the bytes read from the map are the same with or without it."""
        if self._map is None or not hasattr(mmap, "MADV_WILLNEED"):
            return
        rows = rows[rows[:, 1] > 0]
        if not len(rows):
            return
        page = mmap.PAGESIZE
        start = (rows[:, 0] // page) * page
        end = rows[:, 0] + 3 * rows[:, 1] * rows[:, 2]
        order = np.argsort(start, kind="stable")
        start, end = start[order].tolist(), end[order].tolist()
        lo, hi = start[0], end[0]
        for a, b in zip(start[1:], end[1:]):
            if a > hi:  # a gap: advise the run so far
                self._map.madvise(mmap.MADV_WILLNEED, lo, hi - lo)
                lo = a
            hi = max(hi, b)
        self._map.madvise(mmap.MADV_WILLNEED, lo, hi - lo)

    def __getstate__(self) -> dict:
        # DataLoader workers re-open the map instead of pickling the pixels.
        state = dict(self.__dict__)
        state["_flat"] = None
        state["_map"] = None
        state["index"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        if self.meta_file.is_file():
            self.ensure(None)
