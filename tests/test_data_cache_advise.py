"""The decoded cache's read advice (``DecodedCache.willneed``, ``madvise(MADV_WILLNEED)`` per
batch): it changes how uncached pages reach the page cache, never what a batch holds."""

from __future__ import annotations

import ctypes
import mmap
import os
import sys

import numpy as np
import pytest
import torch

from dmlcore.data.cache import DecodedCache
from dmlcore.data.errors import CorruptImageError
from dmlcore.data.images import ImageBatch


def image(i: int, h: int, w: int) -> np.ndarray:
    return np.random.default_rng(i).integers(0, 256, (h, w, 3), dtype=np.uint8)


def make_cache(root, n: int, sizes, bad=()):
    def decode(i):
        if i in bad:
            raise CorruptImageError(f"img{i}", "broken")
        return image(i, *sizes[i])

    def size_of(i):
        if i in bad:
            raise CorruptImageError(f"img{i}", "broken")
        return sizes[i]

    return DecodedCache(root, "adv", [f"img{i}" for i in range(n)], 32).ensure(decode, size_of)


def reference(idx, sizes, bad):
    """The batch gather must return, built here from the decoder's images alone."""
    good = [i for i in idx if i not in bad]
    hmax = max((sizes[i][0] for i in good), default=32)
    wmax = max((sizes[i][1] for i in good), default=32)
    out = np.zeros((len(idx), 3, hmax, wmax), dtype=np.uint8)
    for k, i in enumerate(idx):
        if i not in bad:
            h, w = sizes[i]
            out[k, :, :h, :w] = image(i, h, w).transpose(2, 0, 1)
    return out


def test_advised_gather_returns_the_same_batch_as_without_advice(tmp_path):
    rng = np.random.default_rng(0)
    n = 120
    sizes = {i: (int(rng.integers(5, 60)), int(rng.integers(5, 60))) for i in range(n)}
    bad = {3, 4, 50}
    cache = make_cache(tmp_path, n, sizes, bad)
    perm = rng.permutation(n)
    batches = [perm[:16], perm[16:80], np.arange(20, 40), np.arange(40, 20, -1), np.array([7, 7, 8, 7]),
               np.array([5]), np.array([3, 4]), np.array([4, 5, 3]), np.arange(n)]
    for idx in batches:
        want = reference(idx.tolist(), sizes, bad)
        got = {}
        for adv in (True, False):
            cache.advise = adv
            b = cache.gather(idx)
            got[adv] = b
            pixels = b.pixels if isinstance(b, ImageBatch) else b
            assert pixels.dtype == torch.uint8 and np.array_equal(pixels.numpy(), want), (idx, adv)
        if isinstance(got[True], ImageBatch):
            assert torch.equal(got[True].sizes, got[False].sizes)
            assert got[True].sizes.tolist() == [[sizes[i][0], sizes[i][1]] if i not in bad else list(want.shape[2:])
                                                for i in idx.tolist()]
        else:
            assert not isinstance(got[False], ImageBatch)
    # the same images one by one
    for i in (0, 1, 119):
        assert np.array_equal(cache.get(i).numpy(), image(i, *sizes[i]).transpose(2, 0, 1))


class Recorder:
    def __init__(self):
        self.calls = []

    def madvise(self, option, start, length):
        self.calls.append((option, start, length))


def test_willneed_advises_exactly_the_pages_of_the_batch_in_file_order(tmp_path):
    rng = np.random.default_rng(1)
    n = 200
    sizes = {i: (int(rng.integers(10, 80)), int(rng.integers(10, 80))) for i in range(n)}
    bad = {10, 11}
    cache = make_cache(tmp_path, n, sizes, bad)
    page = mmap.PAGESIZE
    for idx in (rng.choice(n, 64, replace=False), np.arange(30, 60), np.array([9, 10, 11, 12]), np.array([10]),
                rng.integers(0, n, 50)):
        rec = Recorder()
        cache._map, real = rec, cache._map
        try:
            cache.willneed(cache.index[idx])
        finally:
            cache._map = real
        want = set()  # pages that hold a byte of a requested image, from the index alone
        for i in idx.tolist():
            o, h, w = (int(v) for v in cache.index[i])
            if h:
                want.update(range(o // page, (o + 3 * h * w - 1) // page + 1))
        got = []
        for option, start, length in rec.calls:
            assert option == mmap.MADV_WILLNEED and start % page == 0 and length > 0
            got.extend(range(start // page, (start + length - 1) // page + 1))
        assert set(got) == want and len(got) == len(want), idx  # every page once, no other
        starts = [c[1] for c in rec.calls]
        assert starts == sorted(starts)  # in file order
        assert not want or len(rec.calls) <= len([i for i in set(idx.tolist()) if i not in bad])


_libc = ctypes.CDLL(None, use_errno=True)


def resident(flat: np.ndarray) -> int:
    n = (flat.nbytes + mmap.PAGESIZE - 1) // mmap.PAGESIZE
    vec = (ctypes.c_ubyte * n)()
    assert _libc.mincore(ctypes.c_void_p(flat.ctypes.data), ctypes.c_size_t(flat.nbytes), vec) == 0
    return sum(v & 1 for v in vec)


def read_bytes() -> int:
    for ln in open("/proc/self/io"):
        if ln.startswith("read_bytes:"):
            return int(ln.split()[1])
    raise AssertionError("no read_bytes in /proc/self/io")


@pytest.mark.skipif(not sys.platform.startswith("linux") or not os.path.exists("/proc/self/io"),
                    reason="mincore, posix_fadvise and /proc/self/io are Linux")
def test_a_cold_batch_reads_its_images_bytes_once(tmp_path):
    """With the pages of the cache file dropped, one advised batch makes the device read its
    images' bytes (not the kernel's read-around about every first touch)."""
    n, h, w = 300, 219, 292  # 192 KB per image, 57 MB
    sizes = {i: (h, w) for i in range(n)}
    cache = make_cache(tmp_path, n, sizes)
    fd = os.open(cache.images_file, os.O_RDONLY)
    try:
        os.fsync(fd)  # clean pages only are dropped

        def drop():
            cache._map.madvise(mmap.MADV_DONTNEED)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)

        drop()
        if resident(cache._flat) > 16:
            pytest.skip("the page drop does not empty the page cache on this file system (tmpfs?)")
        idx = np.random.default_rng(2).permutation(n)[:32]  # rows spread over the file
        nbytes = 32 * 3 * h * w
        r0 = read_bytes()
        batch = cache.gather(idx)
        got = read_bytes() - r0
        if got < nbytes // 2:
            pytest.skip(f"the device reads are not accounted here ({got} bytes read for {nbytes})")
        assert got <= 1.2 * nbytes + 32 * 2 * mmap.PAGESIZE, (got, nbytes)
        assert np.array_equal(batch.numpy(), reference(idx.tolist(), sizes, set()))
    finally:
        os.close(fd)
