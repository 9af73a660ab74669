"""Issue 20, item 4 (a dataset larger than memory trains, at disk speed, without OOM), at small
scale: a training epoch reads every image of a decoded cache (``dmlcore.data.cache``) four
times larger than the memory the training process may still allocate.

What it proves. The child process limits its data segment with ``RLIMIT_DATA`` (private
and anonymous memory: heap, ``malloc``'s arenas, numpy and torch buffers) to what it uses
after start-up plus ``HEADROOM``; a control allocation of twice the headroom then fails
with ``MemoryError`` (the limit bites). The cache's memory map is a shared, read-only file
mapping: its pages are page cache, not the process's memory, so they do not count against
the limit, and the epoch over ``4 x HEADROOM`` of pixels completes: nothing accumulates the
mapped data in process memory (each batch is copied out and freed). The child also
reports ``RssFile`` (mapped page-cache pages, which the kernel may evict, clean, at any
time) against ``RssAnon``. The speed once pages are actually evicted is shown by
``benchmarks/cold_cache.py`` (pages of the cache file dropped before every batch: the
trainer's gathers read at the disk's speed for that pattern, ~95% of a sequential read,
and a cold epoch costs about the warm one plus those reads), and that a cold batch reads its
bytes once by ``tests/test_data_cache_advise.py``. See docs/scale.md.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from dmlcore.data.cache import DecodedCache

MB = 1 << 20
HEADROOM = 64 * MB
SIDE = 320  # stored images 3 x 320 x 320 = 300 KiB

CHILD = r"""
import json, resource, sys
import numpy as np, torch, torch.nn.functional as F
from dmlcore.data.cache import DecodedCache

def status(key):
    for ln in open("/proc/self/status"):
        if ln.startswith(key + ":"):
            return int(ln.split()[1]) * 1024
    return 0

root, n, side, headroom = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
torch.set_num_threads(1)
cache = DecodedCache(root, "big", [f"img{i}" for i in range(n)], side).ensure(decode=None)
model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, stride=2), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                            torch.nn.Flatten(), torch.nn.Linear(8, 16))
opt = torch.optim.SGD(model.parameters(), lr=0.01)

def step(idx):
    x = cache.gather(idx).float().div_(255)
    x = F.interpolate(x, size=(48, 48), mode="bilinear", align_corners=False)
    loss = model(x).pow(2).mean()
    opt.zero_grad(); loss.backward(); opt.step()
    return loss.item()

step(np.arange(16))  # warm-up: allocator pools and autograd buffers exist before the limit
limit = status("VmData") + headroom
resource.setrlimit(resource.RLIMIT_DATA, (limit, resource.getrlimit(resource.RLIMIT_DATA)[1]))
try:
    np.ones(2 * headroom, dtype=np.uint8)
    control = "allocated"
except MemoryError:
    control = "MemoryError"
anon0 = status("RssAnon")
order = np.random.default_rng(0).permutation(n)
read = 0
for b in range(0, n, 16):
    idx = order[b:b + 16]
    step(idx)
    read += int(sum(3 * h * w for _, h, w in cache.index[idx].tolist()))
print("RESULT " + json.dumps({"control": control, "read": read, "limit": limit, "anon_growth": status("RssAnon") - anon0,
                              "rss_file": status("RssFile"), "vmdata": status("VmData")}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_DATA and /proc are Linux")
def test_an_epoch_reads_a_cache_four_times_the_memory_it_may_allocate(tmp_path):
    n = (4 * HEADROOM) // (3 * SIDE * SIDE) + 1

    def decode(i: int) -> np.ndarray:  # a distinct, cheap image per index
        return np.full((SIDE, SIDE, 3), i % 251, dtype=np.uint8)

    cache = DecodedCache(tmp_path, "big", [f"img{i}" for i in range(n)], SIDE)
    cache.ensure(decode, size_of=lambda i: (SIDE, SIDE))
    size = cache.images_file.stat().st_size
    assert size >= 4 * HEADROOM
    assert int(cache.get(n - 1)[0, 0, 0]) == (n - 1) % 251
    del cache

    env = {**os.environ, "MALLOC_ARENA_MAX": "2", "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path), str(n), str(SIDE), str(HEADROOM)],
                       capture_output=True, text=True, timeout=300, env=env)
    line = next((ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")), None)
    assert p.returncode == 0 and line is not None, p.stdout[-2000:] + p.stderr[-4000:]
    r = json.loads(line[7:])
    assert r["control"] == "MemoryError", r  # the limit bites: 2 x headroom of private memory fails
    assert r["read"] == size >= 4 * HEADROOM, r  # every stored pixel went through the map in one epoch
    print("beyond-memory epoch:", {k: (f"{v / MB:.0f} MB" if isinstance(v, int) else v) for k, v in r.items()})
    assert r["vmdata"] <= r["limit"] and r["anon_growth"] < HEADROOM, r
