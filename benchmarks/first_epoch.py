"""From `sweeper run` to the first trial's first epoch, end to end (issue 20).

Runs `sweeper run` of a 2-trial study (the tiny trial of `sweep_overhead.py`: digits, one
epoch of 5 steps; one CPU each, both at once) on a local Ray, each time in a fresh
folder (MLflow SQLite store + Tune storage), alternating the variants process by process
so they share the machine's load:

* `plain`: as `sweeper run` starts Ray;
* `preload`: the Ray workers import what a trial imports (:data:`WARM`: Ray Tune, torch,
  torch._dynamo, MLflow and its SQL store, dmlcore, the sweeper) as they start (Ray's
  `RAY_preload_python_modules`: the raylet prestarts one worker per CPU when the driver
  connects), i.e. while the driver is still starting, before a trial reaches them.

From the MLflow runs: `trial_run` = seconds from the command's start to the first trial
run's creation, `epoch1` = to the first trial's first epoch logged (the `epoch` metric),
`epoch1_last` = to the last trial's; `total` = the command's wall time.

    python benchmarks/first_epoch.py [--repeat 3] [--variants plain,preload]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(HERE), str(ROOT)]
from sweep_overhead import BASE  # noqa: E402

WARM = ("ray.tune", "torch", "torch._dynamo", "mlflow", "mlflow.store.tracking.sqlalchemy_store", "dmlcore.data",
        "dmlcore.models", "dmlcore.losses", "dmlcore.metrics", "dmlcore.train", "sweeper.tracking", "sweeper.tune")
VARIANTS = {"plain": {}, "preload": {"RAY_preload_python_modules": ",".join(WARM)}}


def study_file(folder: Path) -> Path:
    spec = {"name": "first_epoch", "base": BASE, "seeds": [0, 1], "metric": "test/recall_at_1", "mode": "max",
            "resources": {"cpu": 1, "gpu": 0}, "max_concurrent": 2, "max_failures": 0}
    path = folder / "first_epoch.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def one(variant: str, cpus: int) -> dict[str, float]:
    folder = Path(tempfile.mkdtemp(prefix=f"dml-first-epoch-{variant}-"))
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_USAGE_STATS_ENABLED": "0", **VARIANTS[variant]}
    env.pop("RAY_ADDRESS", None)
    if variant != "preload":
        env.pop("RAY_preload_python_modules", None)
    study = study_file(folder)
    t0 = time.time()
    p = subprocess.run([sys.executable, "-m", "sweeper.cli", "run", str(study), "--no-live", "--num-cpus", str(cpus),
                        "--storage", str(folder / "tune"), "--tracking-uri", uri], env=env, cwd=str(folder),
                       capture_output=True, text=True, timeout=900)
    total = time.time() - t0
    if p.returncode != 0:
        raise SystemExit(f"sweeper run failed ({variant}):\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}")
    from mlflow import MlflowClient

    from sweeper.tracking import TAG_ROLE

    c = MlflowClient(uri)
    exp = c.get_experiment_by_name("first_epoch")
    trials = [r for r in c.search_runs([exp.experiment_id]) if r.data.tags.get(TAG_ROLE) == "trial"]
    starts = [r.info.start_time / 1000 - t0 for r in trials]
    epochs = []
    for r in trials:
        h = [m for m in c.get_metric_history(r.info.run_id, "epoch")]
        if h:
            epochs.append(min(m.timestamp for m in h) / 1000 - t0)
    if len(epochs) != 2:
        raise SystemExit(f"{variant}: expected 2 trials with an epoch, got {len(epochs)}")
    return {"trial_run": min(starts), "epoch1": min(epochs), "epoch1_last": max(epochs), "total": total}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--variants", default="plain,preload")
    ap.add_argument("--cpus", type=int, default=2)
    args = ap.parse_args()
    variants = [v for v in args.variants.split(",") if v]
    res: dict[str, list[dict[str, float]]] = {v: [] for v in variants}
    loads = [os.getloadavg()[0]]
    for i in range(args.repeat):
        for v in (variants if i % 2 == 0 else variants[::-1]):
            r = one(v, args.cpus)
            res[v].append(r)
            loads.append(os.getloadavg()[0])
            print(f"{v:8s} " + "  ".join(f"{k} {x:5.1f} s" for k, x in r.items()) + f"  (load {loads[-1]:.1f})", flush=True)
    print(f"load average {min(loads):.1f}-{max(loads):.1f}; median of {args.repeat} `sweeper run` each")
    for v in variants:
        med = {k: statistics.median(r[k] for r in res[v]) for k in res[v][0]}
        print(f"{v:8s} " + "  ".join(f"{k} {x:5.1f} s" for k, x in med.items()))
    if len(variants) == 2:
        a, b = variants
        d = [ra["epoch1"] - rb["epoch1"] for ra, rb in zip(res[a], res[b])]
        print(f"epoch1, {a} - {b}, run by run: " + ", ".join(f"{x:+.1f} s" for x in d))


if __name__ == "__main__":
    main()
