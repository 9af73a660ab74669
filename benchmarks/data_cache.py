"""Data cache: an 8-trial sweep with the shared decoded cache vs each trial decoding JPEGs.

The benchmark writes real JPEG files (an ImageFolder tree of textured images at
`--src-size` px), then runs `--trials` trials one after the other, each in a fresh
Python process as a Ray worker would be: build the data and train `--epochs` epochs of
a small CNN, evaluating after the last (`sweeper`-free, plain `dmlcore`). Two conditions:

* baseline: `data.cache_dir` unset: every trial decodes and resizes every JPEG itself;
* cached: `data.cache_dir` set: the first trial decodes once into the node-local
  memory-mapped cache, the other trials map it.

    python benchmarks/data_cache.py [--images 3000] [--trials 8] [--epochs 3] [--image-size 64]

Prints wall time per condition and the ratio baseline / cached.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TRIAL = r"""
import json, sys, time
t0 = time.perf_counter()
from dmlcore.config import load_config
from dmlcore.train import Trainer
over = json.loads(sys.argv[1])
cfg = load_config(None, over)
r = Trainer(cfg, progress=False).fit()
print(json.dumps({"seconds": time.perf_counter() - t0, "recall_at_1": r.final.get("test/recall_at_1")}))
"""


def write_jpegs(root: Path, n: int, classes: int, size: int) -> None:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size] / size
    for i in range(n):
        c = i % classes
        f1, f2 = 2 + c % 7, 3 + (c * 5) % 11
        base = np.stack([np.sin(f1 * np.pi * xx + c), np.cos(f2 * np.pi * yy), np.sin((f1 + f2) * np.pi * (xx + yy))], -1)
        img = ((base * 0.5 + 0.5) * 200 + rng.normal(0, 20, base.shape)).clip(0, 255).astype(np.uint8)
        d = root / f"class_{c:03d}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(d / f"{i:06d}.jpg", quality=90)


def run_trials(root: Path, trials: int, epochs: int, image_size: int, cache_dir: str | None, workers: int) -> list[dict]:
    out = []
    for seed in range(trials):
        over = {
            "data.dataset": "imagefolder", "data.root": str(root), "data.image_size": image_size,
            "data.augmentation": "standard", "data.num_workers": workers, "data.cache_dir": cache_dir,
            "model.backbone": "small_cnn", "model.backbone_params": {"width": 16, "depth": 3}, "model.embed_dim": 32,
            "loss.name": "multi_similarity", "batch.size": 64, "batch.samples_per_class": 4,
            "optim.lr": 1e-3, "train.epochs": epochs, "eval.every": epochs, "train.seed": seed, "train.device": "cpu",
            "eval.clustering": False, "eval.embedding_metrics": False,
        }
        proc = subprocess.run([sys.executable, "-c", TRIAL, json.dumps(over)], capture_output=True, text=True)
        if proc.returncode:
            raise SystemExit(proc.stderr[-2000:])
        out.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=3000)
    ap.add_argument("--classes", type=int, default=60)
    ap.add_argument("--src-size", type=int, default=320)
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--trials", type=int, default=8)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--workers", type=int, default=-1)
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="dml-cache-bench-"))
    try:
        t0 = time.perf_counter()
        write_jpegs(tmp / "data", args.images, args.classes, args.src_size)
        print(f"wrote {args.images} JPEGs of {args.src_size}px in {time.perf_counter() - t0:.1f}s")
        t0 = time.perf_counter()
        base = run_trials(tmp / "data", args.trials, args.epochs, args.image_size, None, args.workers)
        t_base = time.perf_counter() - t0
        t0 = time.perf_counter()
        cached = run_trials(tmp / "data", args.trials, args.epochs, args.image_size, str(tmp / "cache"), args.workers)
        t_cache = time.perf_counter() - t0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"machine: {platform.machine()}, {__import__('os').cpu_count()} CPUs, python {platform.python_version()}")
    print(f"{args.trials} trials x ({args.epochs} epochs + 1 eval), {args.images} images, {args.image_size}px, small_cnn, CPU")
    print(f"{'':28}{'sweep s':>9}{'first':>8}{'later (mean)':>14}")
    for name, t, rs in (("baseline: decode per trial", t_base, base), ("shared decoded cache", t_cache, cached)):
        later = sum(r["seconds"] for r in rs[1:]) / max(1, len(rs) - 1)
        print(f"{name:28}{t:>9.1f}{rs[0]['seconds']:>8.1f}{later:>14.1f}")
    same = all(abs((a["recall_at_1"] or 0) - (b["recall_at_1"] or 0)) < 1e-9 for a, b in zip(base, cached))
    print(f"identical test recall in both conditions: {same}")
    print(f"ratio baseline/cached wall time: {t_base / t_cache:.2f}x")


if __name__ == "__main__":
    main()
