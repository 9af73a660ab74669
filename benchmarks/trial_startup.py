"""A trial's fixed start-up in a fresh worker process: imports and first-call costs.

Runs, in a fresh Python process (`python -X importtime`), what a Ray worker does for its
first trial (`sweeper.tune._run_trial`): import Ray Tune and the sweeper, open the MLflow
store and the trial's run (params, tags, config.yaml), build and fit the tiny trial of
`sweep_overhead.py` (digits, one epoch of 5 steps) reporting to MLflow; then fits the same
trial again in the same process. Fixed start-up = (imports + first trial) - second trial.

    python benchmarks/trial_startup.py [--tree PATH] [--against PATH] [--repeat 3]

`--tree` runs another checkout's code (e.g. a copy of main); `--against PATH` runs a
second checkout's code too, alternating the two process by process, so a before/after
ratio is measured under the same load (a shared machine's load moves within a minute).
Prints the median over `--repeat` fresh processes of each and the largest imports
(cumulative, top level) of the last one. The child runs in the checkout's folder (a
`-c` script has the current folder first on sys.path: run elsewhere, `--tree` would
import the current folder's code).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent

CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
from ray import tune  # noqa: F401  (a worker has Ray; the trial function imports Tune)
from sweeper import tracking
import sweeper.tune  # noqa: F401
from dmlcore.config import from_dict
from dmlcore.train import Trainer
t_imports = time.perf_counter() - t0
sys.path.insert(0, sys.argv[1])
from sweep_overhead import BASE

def trial(seed, uri):
    cfg = from_dict({**BASE, "train": {**BASE["train"], "seed": seed}, "name": f"t{seed}"})
    tracker = tracking.Tracker(uri)
    exp = tracker.experiment_id("startup")
    logger, _ = tracking.open_run(tracker, exp, cfg.name, cfg, {"role": "trial"}, f"startup/{seed}")
    with tracking.recording(logger, killed=(SystemExit,)):
        Trainer(cfg, reporter=logger, progress=False).fit()

uri = sys.argv[2]
t1 = time.perf_counter()
trial(0, uri)
t_first = time.perf_counter() - t1
t2 = time.perf_counter()
trial(1, uri)
t_second = time.perf_counter() - t2
try:
    from dmlcore.lazy import is_loaded  # a deferred module (dmlcore/lazy.py) is not loaded
except ImportError:  # --tree: an older checkout
    def is_loaded(m):
        return m in sys.modules
lazy = sorted(m for m in ("scipy.stats", "scipy.special", "torch._dynamo", "torch._inductor", "pytorch_metric_learning",
                          "sklearn", "faiss", "pandas", "optuna", "matplotlib") if is_loaded(m))
print("RESULT " + json.dumps({"imports": t_imports, "first": t_first, "second": t_second, "loaded": lazy}))
"""


def one(tree: Path, uri: str) -> tuple[dict, str]:
    env = {**os.environ, "PYTHONPATH": str(tree), "MPLBACKEND": "Agg", "RAY_USAGE_STATS_ENABLED": "0",
           "MLFLOW_LOGGING_LEVEL": "WARNING"}
    p = subprocess.run([sys.executable, "-X", "importtime", "-c", CHILD, str(HERE), uri], env=env,
                       capture_output=True, text=True, timeout=600, cwd=str(tree))
    line = next((ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if line is None:
        raise SystemExit(f"the child failed:\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}")
    return json.loads(line[7:]), p.stderr


def top_imports(importtime: str, n: int = 8) -> list[tuple[float, str]]:
    rows = []
    for ln in importtime.splitlines():
        m = re.match(r"import time:\s+\d+ \|\s+(\d+) \| (\S.*)$", ln)  # top level: no indent
        if m:
            rows.append((int(m.group(1)) / 1e6, m.group(2)))
    return sorted(rows, reverse=True)[:n]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tree", type=Path, default=HERE.parent, help="the checkout whose code runs")
    ap.add_argument("--against", type=Path, default=None, help="a second checkout, run alternately (before/after)")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    trees = [args.tree.resolve()] + ([args.against.resolve()] if args.against else [])
    tmp = Path(tempfile.mkdtemp(prefix="dml-startup-"))
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    one(trees[0], uri)  # creates the store (a schema migration, not a trial's cost)
    res: dict[Path, list[dict]] = {t: [] for t in trees}
    imp: dict[Path, str] = {}
    loads = [os.getloadavg()[0]]
    for _ in range(args.repeat):
        for t in trees:
            r, imp[t] = one(t, uri)
            res[t].append(r)
            loads.append(os.getloadavg()[0])
    print(f"load average {min(loads):.1f}-{max(loads):.1f} during the run; median of {args.repeat} fresh processes each")
    fixed_of = {}
    for t in trees:
        med = {k: statistics.median(r[k] for r in res[t]) for k in ("imports", "first", "second")}
        fixed_of[t] = med["imports"] + med["first"] - med["second"]
        print(f"\ncode: {t}")
        print(f"imports {med['imports']:.2f} s, first trial {med['first']:.2f} s, second trial {med['second']:.2f} s: "
              f"fixed start-up {fixed_of[t]:.2f} s")
        print("loaded by a tiny trial:", ", ".join(res[t][-1]["loaded"]))
        print("largest top-level imports (cumulative s):")
        for sec, name in top_imports(imp[t]):
            print(f"  {sec:6.2f}  {name}")
    if len(trees) == 2:
        print(f"\nfixed start-up, {trees[0].name} / {trees[1].name}: {fixed_of[trees[0]] / fixed_of[trees[1]]:.2f}")


if __name__ == "__main__":
    main()
