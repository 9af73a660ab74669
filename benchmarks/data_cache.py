"""Data cache: an 8-trial sweep with the shared decoded cache vs each trial decoding JPEGs.

The benchmark writes real JPEG files (an ImageFolder tree of textured images at
`--src-size` px), then runs `--trials` trials one after the other, each in a fresh
Python process as a Ray worker would be: build the data and train `--epochs` epochs of
a small CNN, evaluating after the last (`sweeper`-free, plain `dmlcore`). Two conditions:

* baseline: `data.cache_dir` unset: every trial decodes and resizes every JPEG itself;
* cached: `data.cache_dir` set: the first trial decodes once into the node-local
  memory-mapped cache, the other trials map it.

    python benchmarks/data_cache.py [--images 3000] [--trials 8] [--epochs 3] [--image-size 64] [--small]

Prints wall time per condition and the ratio baseline / cached. Then, in the same run
(issues 15 and 20), the mean training-epoch time of a later trial (cache already built)
for: the whole-image cache (this code), the square cache of commit ``--square-commit``
(the code before whole-image crops, exported with ``git archive`` and run in the same
way), and the same epoch from an in-memory uint8 tensor (the images gathered once
from the cache and handed to the trainer as a resident tensor). The JPEGs are 4:3, so
the whole-image cache holds 1.33x the pixels of the square one at the same side, and
1.5^2 more at its default stored side. ``--small`` skips the decode-per-trial baseline
and uses fewer images/trials (< 2 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import os
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
t = Trainer(cfg, progress=False).build()
if over.pop("_in_memory", False) or len(sys.argv) > 2:
    import numpy as np
    imgs = t.data.train.gather(np.arange(len(t.data.train)))
    assert isinstance(imgs, __import__("torch").Tensor), "in-memory baseline needs images of one size"
    t.train_images = imgs
r = t.fit()
ep = [h["time/epoch_s"] for h in r.history]
print(json.dumps({"seconds": time.perf_counter() - t0, "recall_at_1": r.final.get("test/recall_at_1"), "epoch_s": sum(ep) / len(ep)}))
"""


def write_jpegs(root: Path, n: int, classes: int, size: int) -> None:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0 : size * 3 // 4, 0:size] / size  # 4:3 (W x H), as most CUB/CARS images
    for i in range(n):
        c = i % classes
        f1, f2 = 2 + c % 7, 3 + (c * 5) % 11
        base = np.stack([np.sin(f1 * np.pi * xx + c), np.cos(f2 * np.pi * yy), np.sin((f1 + f2) * np.pi * (xx + yy))], -1)
        img = ((base * 0.5 + 0.5) * 200 + rng.normal(0, 20, base.shape)).clip(0, 255).astype(np.uint8)
        d = root / f"class_{c:03d}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(d / f"{i:06d}.jpg", quality=90)


def run_trials(root: Path, trials: int, epochs: int, image_size: int, cache_dir: str | None, workers: int,
               pythonpath: str | None = None, in_memory: bool = False) -> list[dict]:
    out = []
    for seed in range(trials):
        over = {
            "data.dataset": "imagefolder", "data.root": str(root), "data.image_size": image_size,
            "data.augmentation": "base" if pythonpath is None else "standard",
            "data.augmentation_params": {} if pythonpath is None else {"scale_min": 0.08}, "data.num_workers": workers, "data.cache_dir": cache_dir,
            "model.backbone": "small_cnn", "model.backbone_params": {"width": 16, "depth": 3}, "model.embed_dim": 32,
            "loss.name": "multi_similarity", "batch.size": 64, "batch.samples_per_class": 4,
            "optim.lr": 1e-3, "train.epochs": epochs, "eval.every": epochs, "train.seed": seed, "train.device": "cpu",
            "eval.clustering": False, "eval.embedding_metrics": False,
        }
        env = dict(os.environ)
        if pythonpath:
            env["PYTHONPATH"] = pythonpath
        argv = [sys.executable, "-c", TRIAL, json.dumps(over)] + (["in-memory"] if in_memory else [])
        proc = subprocess.run(argv, capture_output=True, text=True, env=env)
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
    ap.add_argument("--square-commit", default="16d9447", help="commit with the square cache, for the same-run comparison")
    ap.add_argument("--small", action="store_true", help="1200 images, 2 trials, 2 epochs, no decode-per-trial baseline")
    args = ap.parse_args()
    if args.small:
        args.images, args.trials, args.epochs, args.classes = 1200, 2, 2, 40

    repo = Path(__file__).resolve().parents[1]
    tmp = Path(tempfile.mkdtemp(prefix="dml-cache-bench-"))
    try:
        t0 = time.perf_counter()
        write_jpegs(tmp / "data", args.images, args.classes, args.src_size)
        print(f"wrote {args.images} JPEGs of {args.src_size}x{args.src_size * 3 // 4}px in {time.perf_counter() - t0:.1f}s")
        old = tmp / "square"
        old.mkdir()
        arch = subprocess.run(["git", "-C", str(repo), "archive", args.square_commit, "dmlcore"], capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", str(old)], input=arch.stdout, check=True)
        base = None
        if not args.small:
            t0 = time.perf_counter()
            base = run_trials(tmp / "data", args.trials, args.epochs, args.image_size, None, args.workers)
            t_base = time.perf_counter() - t0
        t0 = time.perf_counter()
        cached = run_trials(tmp / "data", args.trials, args.epochs, args.image_size, str(tmp / "cache"), args.workers)
        t_cache = time.perf_counter() - t0
        square = run_trials(tmp / "data", args.trials, args.epochs, args.image_size, str(tmp / "cache-sq"), args.workers,
                            pythonpath=str(old))
        memory = run_trials(tmp / "data", 1, args.epochs, args.image_size, str(tmp / "cache"), args.workers, in_memory=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, python {platform.python_version()}")
    print(f"{args.trials} trials x ({args.epochs} epochs + 1 eval), {args.images} images, {args.image_size}px, small_cnn, CPU")
    if base is not None:
        print(f"{'':28}{'sweep s':>9}{'first':>8}{'later (mean)':>14}")
        for name, t, rs in (("baseline: decode per trial", t_base, base), ("shared decoded cache", t_cache, cached)):
            later = sum(r["seconds"] for r in rs[1:]) / max(1, len(rs) - 1)
            print(f"{name:28}{t:>9.1f}{rs[0]['seconds']:>8.1f}{later:>14.1f}")
        same = all(abs((a["recall_at_1"] or 0) - (b["recall_at_1"] or 0)) < 1e-9 for a, b in zip(base, cached))
        print(f"identical test recall in both conditions: {same}")
        print(f"ratio baseline/cached wall time: {t_base / t_cache:.2f}x")
    ep = lambda rs: sum(r["epoch_s"] for r in rs[1:] or rs) / max(1, len(rs[1:] or rs))  # noqa: E731
    e_whole, e_square, e_mem = ep(cached), ep(square), memory[0]["epoch_s"]
    print(f"training epoch of a later trial (cache built): whole-image cache {e_whole:.2f}s, "
          f"square cache @{args.square_commit} {e_square:.2f}s, in-memory tensor {e_mem:.2f}s")
    print(f"speed whole-image / square cache: {e_square / e_whole:.2f} (goal >= 0.90)")
    print(f"speed cached / in-memory epoch:   {e_mem / e_whole:.2f} (goal >= 0.90)")


if __name__ == "__main__":
    main()
