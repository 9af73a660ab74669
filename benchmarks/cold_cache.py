"""Cold cache: training over a decoded cache whose pages are not in the page cache reads at disk speed.

Issue 20, item 4: a dataset larger than the page cache trains at disk speed, without OOM.
No memory cgroup smaller than the file can be made here, so the benchmark makes the page
cache effectively smaller than the cache file instead: before every batch it drops the
file's pages (``madvise(MADV_DONTNEED)`` on the process's mapping, then
``posix_fadvise(POSIX_FADV_DONTNEED)`` on the file, which needs no privilege), so every
batch's images come from the disk, as when the file is many times the page cache. It
checks that the drop works on the file system used (``mincore``: no page of the file
resident after it).

In one run, over the same decoded cache (``--images`` 4:3 JPEGs of ``--src-size`` px,
stored at 1.5 x 256/224 x ``--image-size`` on the shorter side or ``--store-side``, built
by the trainer with ``data.cache_dir``):

* the disk's read speed: the whole file read sequentially (8 MiB ``read``), and the
  trainer's access pattern: the batches of a training epoch (the same sampler, epoch and
  seed, so the same rows) gathered with the trainer's own call (the split's ``gather``,
  :meth:`DecodedCache.gather`), pages dropped before each batch; with the cache's
  per-batch ``MADV_WILLNEED`` (``DecodedCache.advise``, the default) and without it (the
  page faults' read-around alone); warm (pages cached) both ways. Bytes read from the
  device come from ``/proc/self/io``;
* training epochs (``Trainer.train_epoch``: augmentation, a small CNN, the loss, the
  optimiser step) over the same batches, pages dropped before each batch the same way,
  with and without the advice, and warm; the time spent in the gathers is timed apart;
* the process's ``RssAnon`` and ``RssFile`` growth during the epochs.

The page drops themselves are timed apart and left out of every time.

    python benchmarks/cold_cache.py [--images 6000] [--image-size 64] [--epochs 2] [--dir DIR]

Prints MB/s per read pattern and the bytes the device read, the epoch times with their
gather and step parts, the ratio cold epoch / cold read of the same batches, and the
gathers inside the cold epochs / the same gathers alone (~1: the trainer reads at the
speed the disk serves that pattern). ``--dir`` must be on a block device (not tmpfs):
the default is a temporary folder under the repository (``dml-cold-cache-*``, removed).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import mmap
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

MB = 1e6


def status(key: str) -> int:
    for ln in open("/proc/self/status"):
        if ln.startswith(key + ":"):
            return int(ln.split()[1]) * 1024
    return 0


def read_bytes() -> int:
    """Bytes this process made the block layer read (``/proc/self/io``)."""
    for ln in open("/proc/self/io"):
        if ln.startswith("read_bytes:"):
            return int(ln.split()[1])
    return 0


def mount_of(path: Path) -> tuple[str, str, str]:
    """(mount point, file system type, source) of the mount holding ``path``."""
    best = ("/", "?", "?")
    real = str(path.resolve())
    for ln in open("/proc/self/mountinfo"):
        left, right = ln.split(" - ")
        mnt = left.split()[4]
        fstype, src = right.split()[:2]
        if (real == mnt or real.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best[0]):
            best = (mnt, fstype, src)
    return best


_libc = ctypes.CDLL(None, use_errno=True)


def resident_pages(flat: np.ndarray) -> int:
    """Pages of the mapping ``flat`` (page-aligned) in the page cache (``mincore``)."""
    page = mmap.PAGESIZE
    n = (flat.nbytes + page - 1) // page
    vec = (ctypes.c_ubyte * n)()
    if _libc.mincore(ctypes.c_void_p(flat.ctypes.data), ctypes.c_size_t(flat.nbytes), vec):
        raise OSError(ctypes.get_errno(), "mincore")
    return int(sum(v & 1 for v in vec))


class Evictor:
    """Drops every page of the cache file from this process's mapping and the page cache."""

    def __init__(self, cache) -> None:
        self.cache = cache
        self.fd = os.open(cache.images_file, os.O_RDONLY)
        self.seconds = 0.0
        self.calls = 0

    def __call__(self) -> None:
        t = time.perf_counter()
        self.cache._map.madvise(mmap.MADV_DONTNEED)  # unmap our page-table entries first:
        os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_DONTNEED)  # mapped pages are not dropped
        self.seconds += time.perf_counter() - t
        self.calls += 1


def write_jpegs(root: Path, n: int, classes: int, width: int) -> None:
    """``n`` 4:3 JPEGs in ``classes`` folders: a per-class pattern plus noise (cheap to make)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0 : width * 3 // 4, 0:width] / width
    pats = []
    for c in range(classes):
        f1, f2 = 2 + c % 7, 3 + (c * 5) % 11
        pats.append(np.stack([np.sin(f1 * np.pi * xx + c), np.cos(f2 * np.pi * yy), np.sin((f1 + f2) * np.pi * (xx + yy))], -1) * 100 + 128)
    for c in range(classes):
        (root / f"class_{c:03d}").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        c = i % classes
        img = (pats[c] + rng.normal(0, 20, pats[c].shape)).clip(0, 255).astype(np.uint8)
        Image.fromarray(img).save(root / f"class_{c:03d}" / f"{i:06d}.jpg", quality=90)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=6000)
    ap.add_argument("--classes", type=int, default=60)
    ap.add_argument("--src-size", type=int, default=160, help="JPEG width (4:3)")
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--store-side", type=int, default=None, help="data.store_side (default: 1.5 x 256/224 x image size)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=2, help="epochs per condition (each a distinct set of batches)")
    ap.add_argument("--width", type=int, default=8, help="small_cnn width (a tiny model: the reads dominate)")
    ap.add_argument("--depth", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    ap.add_argument("--dir", default=None, help="where the JPEGs and the cache go (a block device, not tmpfs)")
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()

    import torch

    from dmlcore.config import load_config
    from dmlcore.train import Trainer, epoch_seed, seed_everything

    # One thread: on a shared 2-core machine two intra-op threads wait on each other (a step
    # took 10x longer with 2 threads at load 6 than with 1).
    torch.set_num_threads(args.threads)
    base = Path(args.dir) if args.dir else REPO
    tmp = Path(tempfile.mkdtemp(prefix="dml-cold-cache-", dir=base))
    mnt, fstype, src = mount_of(tmp)
    print(f"folder {tmp} on {src} ({fstype}, mounted at {mnt}); load average {os.getloadavg()[0]:.1f}")
    if fstype in ("tmpfs", "ramfs", "overlay", "devtmpfs"):
        print(f"warning: {fstype} is memory-backed or layered: dropping its pages may not send reads to a disk")
    try:
        t0 = time.perf_counter()
        write_jpegs(tmp / "data", args.images, args.classes, args.src_size)
        print(f"wrote {args.images} JPEGs of {args.src_size}x{args.src_size * 3 // 4} in {time.perf_counter() - t0:.1f}s")
        over = {
            "data.dataset": "imagefolder", "data.root": str(tmp / "data"), "data.image_size": args.image_size,
            "data.augmentation": "base", "data.augmentation_params": {}, "data.num_workers": 0,
            "data.cache_dir": str(tmp / "cache"), "data.store_side": args.store_side,
            "model.backbone": "small_cnn", "model.backbone_params": {"width": args.width, "depth": args.depth},
            "model.embed_dim": 32, "loss.name": "multi_similarity", "batch.size": args.batch, "batch.samples_per_class": 4,
            "optim.lr": 1e-3, "train.epochs": args.epochs, "train.seed": 0, "train.device": "cpu",
            "eval.clustering": False, "eval.embedding_metrics": False,
        }
        t0 = time.perf_counter()
        t = Trainer(load_config(None, over), progress=False).build()
        split = t.data.train
        cache = split.store.cache
        assert cache is not None and t.train_images is None, "the trainer must read the decoded cache"
        size = cache.images_file.stat().st_size
        print(f"cache {size / MB:.0f} MB ({len(cache.paths)} images, stored side {cache.side} px) "
              f"built in {time.perf_counter() - t0:.1f}s; train split {len(split)} images")
        evict = Evictor(cache)

        evict()
        left = resident_pages(cache._flat)
        print(f"resident pages of the file after the drop: {left} of {size // mmap.PAGESIZE} (mincore)")
        assert left <= 16, "the page drop does not work on this file system: pick --dir on a block device"

        def batches(epoch: int) -> list[np.ndarray]:
            seed_everything(epoch_seed(t.cfg.train.seed, epoch))
            if hasattr(t.sampler, "set_epoch"):
                t.sampler.set_epoch(epoch)
            return [np.asarray(b, dtype=np.int64) for b in t.sampler]

        plan = {e: batches(e) for e in range(1, args.epochs + 1)}
        epoch_bytes = {e: int(sum(3 * h * w for _, h, w in cache.index[split.indices[np.concatenate(b)]].tolist()))
                       for e, b in plan.items()}

        def seq_read() -> dict:
            evict()
            r0, t1 = read_bytes(), time.perf_counter()
            with open(cache.images_file, "rb", buffering=0) as f:
                while f.read(8 << 20):
                    pass
            dt = time.perf_counter() - t1
            return {"s": dt, "mb_s": size / MB / dt, "io": read_bytes() - r0}

        def gather_read(epoch: int, cold: bool, advise: bool) -> dict:
            cache.advise = advise
            r0, e0, t1 = read_bytes(), evict.seconds, time.perf_counter()
            for b in plan[epoch]:
                if cold:
                    evict()
                split.gather(b)
            dt = time.perf_counter() - t1 - (evict.seconds - e0)  # the page drops are not the read
            cache.advise = True
            return {"s": dt, "mb_s": epoch_bytes[epoch] / MB / dt, "io": read_bytes() - r0, "drop_s": evict.seconds - e0}

        plain_gather = split.gather

        def train(epoch: int, cold: bool, advise: bool) -> dict:
            cache.advise = advise
            anon0, file0 = status("RssAnon"), status("RssFile")
            peak = {"anon": 0, "file": 0, "file_abs": 0, "gather_s": 0.0}

            def gather(js):
                if cold:
                    evict()
                t2 = time.perf_counter()
                out = plain_gather(js)
                peak["gather_s"] += time.perf_counter() - t2
                peak["anon"] = max(peak["anon"], status("RssAnon") - anon0)
                peak["file"] = max(peak["file"], status("RssFile") - file0)
                peak["file_abs"] = max(peak["file_abs"], status("RssFile"))
                return out

            split.gather = gather
            r0, e0, t1 = read_bytes(), evict.seconds, time.perf_counter()
            try:
                t.train_epoch(epoch, _NoBar())
            finally:
                split.gather = plain_gather
                cache.advise = True
            dt = time.perf_counter() - t1 - (evict.seconds - e0)
            return {"s": dt, "drop_s": evict.seconds - e0, "gather_s": peak["gather_s"], "io": read_bytes() - r0, "anon_growth": peak["anon"], "file_growth": peak["file"], "rss_file_max": peak["file_abs"],
                    "rss_anon": status("RssAnon")}

        # warm-up: the model's first steps (allocator pools, autograd) are not timed
        train(1, cold=False, advise=True)
        res: dict[str, list[dict]] = {}
        add = lambda k, v: res.setdefault(k, []).append(v)  # noqa: E731
        add("seq", seq_read())
        for e in plan:  # interleaved, so that a change of the machine's load hits every condition
            add("read_cold", gather_read(e, True, True))
            add("train_cold", train(e, True, True))
            add("read_cold_noadvise", gather_read(e, True, False))
            add("train_cold_noadvise", train(e, True, False))
            gather_read(e, False, True)  # the split's pages cached
            for _ in range(3):  # short: repeated, interleaved (the times below are per pass)
                add("read_warm", gather_read(e, False, True))
                add("read_warm_noadvise", gather_read(e, False, False))
            add("train_warm", train(e, False, True))
            add("seq", seq_read())
        evict_per_batch = evict.seconds / max(1, evict.calls)
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)

    per = lambda k: len(res[k]) // args.epochs  # noqa: E731  (passes per epoch)
    s = lambda k: sum(r["s"] for r in res[k]) / per(k)  # noqa: E731
    io = lambda k: sum(r["io"] for r in res[k]) / MB / per(k)  # noqa: E731
    nbytes = sum(epoch_bytes.values()) / MB
    nb = sum(len(b) for b in plan.values())
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, python {platform.python_version()}, "
          f"load average now {os.getloadavg()[0]:.1f}")
    print(f"{args.epochs} epochs x {nb // args.epochs} batches of {args.batch}, {nbytes / args.epochs:.0f} MB of pixels per epoch; "
          f"small_cnn width {args.width} depth {args.depth}, {args.image_size} px crops, CPU, {args.threads} torch thread(s)")
    print(f"page drop: {evict_per_batch * 1e3:.2f} ms per batch (timed apart: not in the times below)")
    print(f"{'':44}{'s':>8}{'MB/s':>9}{'read MB':>9}")
    seq = sorted(res["seq"], key=lambda r: r["s"])
    seq = [seq[len(seq) // 2]] + [r for r in res["seq"]]  # the median first, then every read in order
    each = ", ".join(f"{r['mb_s']:.0f}" for r in seq[1:])
    print(f"{'sequential read, cold (8 MiB reads), median':44}{seq[0]['s']:>8.2f}{seq[0]['mb_s']:>9.0f}{seq[0]['io'] / MB:>9.0f}"
          f"   (each: {each} MB/s)")
    for k, name in (("read_cold", "batch gather, cold, MADV_WILLNEED"), ("read_cold_noadvise", "batch gather, cold, fault read-around only"),
                    ("read_warm", "batch gather, warm, MADV_WILLNEED"), ("read_warm_noadvise", "batch gather, warm, no advice")):
        print(f"{name:44}{s(k):>8.2f}{nbytes / s(k):>9.0f}{io(k):>9.0f}")
    g = lambda k: sum(r["gather_s"] for r in res[k])  # noqa: E731
    print(f"{'':44}{'epoch s':>8}{'gather s':>9}{'read MB':>9}{'step s':>8}")
    for k, name in (("train_cold", "training epochs, cold, MADV_WILLNEED"), ("train_cold_noadvise", "training epochs, cold, read-around only"),
                    ("train_warm", "training epochs, warm (pages cached)")):
        print(f"{name:44}{s(k):>8.2f}{g(k):>9.2f}{io(k):>9.0f}{s(k) - g(k):>8.2f}")
    for adv, suffix in (("MADV_WILLNEED", ""), ("read-around only", "_noadvise")):
        tc, rc, gc = s("train_cold" + suffix), s("read_cold" + suffix), g("train_cold" + suffix)
        print(f"{adv}: the gathers inside the cold epochs / the same gathers alone {gc / rc:.2f}x; "
              f"cold epoch / cold read of its batches {tc / rc:.1f}x (the reads {gc / tc:.0%} of the epoch); "
              f"read amplification {io('read_cold' + suffix) / nbytes:.2f}x; disk reads at {nbytes / rc / seq[0]['mb_s']:.0%} "
              f"of the sequential speed")
    print(f"speed-up of MADV_WILLNEED, cold: read {s('read_cold_noadvise') / s('read_cold'):.1f}x, "
          f"epoch {s('train_cold_noadvise') / s('train_cold'):.2f}x; warm gather with/without it "
          f"{s('read_warm') / s('read_warm_noadvise'):.2f}x the time; "
          f"step (epoch - gathers) cold / warm {(s('train_cold') - g('train_cold')) / (s('train_warm') - g('train_warm')):.2f}")
    cold = res["train_cold"] + res["train_cold_noadvise"]
    warm = res["train_warm"]
    print(f"memory during the cold epochs: RssAnon growth at most {max(r['anon_growth'] for r in cold) / MB:.1f} MB "
          f"(RssAnon {cold[-1]['rss_anon'] / MB:.0f} MB), RssFile at most {max(r['rss_file_max'] for r in cold) / MB:.0f} MB "
          f"(growth within an epoch {max(r['file_growth'] for r in cold) / MB:.1f} MB); warm epochs (the split's pages "
          f"mapped): RssFile {max(r['rss_file_max'] for r in warm) / MB:.0f} MB; cache {size / MB:.0f} MB")
    print("RESULT " + json.dumps({k: v for k, v in res.items()}))


class _NoBar:
    def advance(self) -> None:
        pass


if __name__ == "__main__":
    main()
