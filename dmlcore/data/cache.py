"""Decode once, share everywhere: a node-local cache of a decoded, resized file dataset.

The first run on a node that asks for ``(dataset files, resolution)`` decodes every image
once (in parallel, with the CPUs the run may use) into one memory-mapped uint8 array
``N x s x s x 3`` under ``data.cache_dir``; every later run on that node, and every
DataLoader worker, maps the same file: no JPEG decoding, and the operating system's page
cache holds the pixels once for all of them. Concurrent runs that start together wait
on a file lock while the first one builds; a half-written cache is never used (the
metadata file that marks it complete is written last, atomically).

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
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from dmlcore.resources import available_cpus

from .errors import CorruptImageError

log = logging.getLogger(__name__)

FORMAT = 1


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
    """A memory-mapped ``N x side x side x 3`` uint8 array of a file dataset."""

    def __init__(self, cache_dir: str | os.PathLike, name: str, paths: Sequence[str], side: int) -> None:
        self.side = int(side)
        self.paths = list(paths)
        self.dir = Path(cache_dir).expanduser() / "dmlcore-decoded" / f"{name}-{self.side}px-{cache_key(self.paths, self.side)}"
        self.images_file = self.dir / "images.u8"
        self.meta_file = self.dir / "meta.json"
        self._array: np.ndarray | None = None
        self.bad: dict[int, str] = {}
        self.built_here = False
        self.build_seconds = 0.0

    # ---- build -------------------------------------------------------------------------
    def ensure(self, decode) -> "DecodedCache":
        """Open the cache, building it first (under a lock) if no run on this node has.

        ``decode(i) -> np.uint8 (side x side x 3)`` decodes file ``i``; it raises
        :class:`CorruptImageError` for an unreadable file.
        """
        if self._array is not None:
            return self
        if not self.meta_file.is_file():
            self.dir.mkdir(parents=True, exist_ok=True)
            with open(self.dir / "lock", "a+") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)  # the others wait here while one builds
                try:
                    if not self.meta_file.is_file():
                        self._build(decode)
                finally:
                    fcntl.flock(lock, fcntl.LOCK_UN)
        meta = json.loads(self.meta_file.read_text())
        n = int(meta["n"])
        self.bad = {int(k): v for k, v in meta.get("bad", {}).items()}
        self._array = np.memmap(self.images_file, dtype=np.uint8, mode="r", shape=(n, self.side, self.side, 3))
        return self

    def _build(self, decode) -> None:
        t0 = time.perf_counter()
        n, s = len(self.paths), self.side
        tmp = self.images_file.with_suffix(".tmp")
        arr = np.memmap(tmp, dtype=np.uint8, mode="w+", shape=(max(n, 1), s, s, 3))
        bad: dict[int, str] = {}

        def one(i: int) -> None:
            try:
                img = decode(i)
                if img.shape != (s, s, 3):
                    raise CorruptImageError(self.paths[i], f"decoded to {img.shape}, expected {(s, s, 3)}")
                arr[i] = img
            except CorruptImageError as err:
                bad[i] = err.reason

        # PIL releases the GIL while decoding: threads use every CPU the run may use.
        with ThreadPoolExecutor(max_workers=max(1, available_cpus())) as pool:
            list(pool.map(one, range(n), chunksize=64))
        arr.flush()
        del arr
        os.replace(tmp, self.images_file)
        meta_tmp = self.meta_file.with_suffix(".tmp")
        meta_tmp.write_text(json.dumps({"format": FORMAT, "n": n, "side": s, "bad": {str(k): v for k, v in bad.items()}}))
        os.replace(meta_tmp, self.meta_file)  # written last: marks the cache complete
        self.built_here = True
        self.build_seconds = time.perf_counter() - t0
        log.info("decoded %d images into %s in %.1fs (%d unreadable)", n, self.dir, self.build_seconds, len(bad))

    # ---- read ----------------------------------------------------------------------------
    def array(self) -> np.ndarray:
        if self._array is None:
            raise RuntimeError("DecodedCache.ensure() first")
        return self._array

    def get(self, i: int) -> torch.Tensor:
        """Image ``i`` as a uint8 tensor ``3 x side x side`` (a copy)."""
        if i in self.bad:
            raise CorruptImageError(self.paths[i], self.bad[i])
        return torch.from_numpy(np.ascontiguousarray(self.array()[i].transpose(2, 0, 1)))

    def gather(self, idx: np.ndarray) -> torch.Tensor:
        """Images ``idx`` as one uint8 batch ``B x 3 x side x side`` (one copy out of the map).

        The caller handles indices in :attr:`bad` (their slots hold zeros)."""
        batch = self.array()[np.asarray(idx, dtype=np.int64)]  # B x s x s x 3, a copy
        return torch.from_numpy(batch).permute(0, 3, 1, 2).contiguous()

    def __getstate__(self) -> dict:
        # DataLoader workers re-open the map instead of pickling the pixels.
        state = dict(self.__dict__)
        state["_array"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        if self.meta_file.is_file():
            self.ensure(None)
