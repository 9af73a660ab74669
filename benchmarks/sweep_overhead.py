"""Sweep overhead: per-trial cost of the sweeper (Ray Tune + MLflow) vs the trainer in a plain loop.

Both run the same `--trials` tiny trials (digits, 16 px, small CNN, 1 epoch, a few
steps, different seeds). Baseline: `dmlcore.train.Trainer(cfg).fit()` called in a
plain Python loop in one process. Sweeper: the same trials as one study through
`sweeper.tune.run_study` (local Ray, `--cpus` CPUs, one CPU per trial, an MLflow
SQLite store in a temporary directory). Ray's start-up is timed apart: a laptop pays it
once per `sweeper run`, a cluster not at all.

    python benchmarks/sweep_overhead.py [--trials 50] [--cpus 2]

Prints total wall time of each and the per-trial overhead (sweeper - loop) / trials,
with and without Ray's start-up.
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import tempfile
import time
from pathlib import Path

import yaml

BASE = {
    "data": {"dataset": "digits", "image_size": 16, "augmentation": "none"},
    "model": {"backbone": "small_cnn", "backbone_params": {"width": 16, "depth": 2}, "embed_dim": 16},
    "loss": {"name": "multi_similarity"},
    "batch": {"size": 40, "samples_per_class": 8, "iterations_per_epoch": 5},
    "optim": {"lr": 1e-3},
    "train": {"epochs": 1, "device": "cpu"},
    "eval": {"recall_k": [1], "clustering": False, "embedding_metrics": False},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=50)
    ap.add_argument("--cpus", type=int, default=2)
    args = ap.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

    from dmlcore.config import from_dict
    from dmlcore.train import Trainer

    t0 = time.perf_counter()
    for seed in range(args.trials):
        Trainer(from_dict({**BASE, "train": {**BASE["train"], "seed": seed}}), progress=False).fit()
    t_loop = time.perf_counter() - t0

    import ray
    from rich.console import Console

    from sweeper.study import load_study
    from sweeper.tune import run_study

    tmp = Path(tempfile.mkdtemp(prefix="dml-sweep-bench-"))
    study = {"name": "overhead", "base": BASE, "seeds": list(range(args.trials)), "metric": "test/recall_at_1",
             "mode": "max", "resources": {"cpu": 1}, "max_concurrent": args.cpus}
    path = tmp / "study.yaml"
    path.write_text(yaml.safe_dump(study))
    t0 = time.perf_counter()
    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    t_ray = time.perf_counter() - t0
    t0 = time.perf_counter()
    run_study(load_study(path), storage=str(tmp / "runs"), tracking_uri=f"sqlite:///{tmp / 'mlflow.db'}",
              console=Console(file=io.StringIO()), live=False, analyses=False)
    t_study = time.perf_counter() - t0
    t_sweep = t_ray + t_study
    ray.shutdown()

    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs; {args.trials} tiny trials, {args.cpus} concurrent under Ray")
    print(f"{'plain loop (1 process)':28}{t_loop:>8.1f} s  {t_loop / args.trials:>6.2f} s/trial")
    print(f"{'sweeper (Ray Tune + MLflow)':28}{t_sweep:>8.1f} s  {t_sweep / args.trials:>6.2f} s/trial")
    print(f"{'  of which Ray start-up':28}{t_ray:>8.1f} s")
    print(f"per-trial overhead: {(t_sweep - t_loop) / args.trials:+.2f} s with Ray's start-up, "
          f"{(t_study - t_loop) / args.trials:+.2f} s without; ratio sweeper/loop: {t_sweep / t_loop:.2f} "
          f"({t_study / t_loop:.2f} without start-up)")


if __name__ == "__main__":
    main()
