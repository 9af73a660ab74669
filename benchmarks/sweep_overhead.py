"""Sweep overhead: per-trial cost of the sweeper (Ray Tune + MLflow) vs the trainer in a plain loop,
and how it grows with the number of trials already done.

Every trial is the same tiny run (digits, 16 px, small CNN, 1 epoch of 5 steps, its own
seed). Baseline: `dmlcore.train.Trainer(cfg).fit()` called in a plain Python loop in one
process, `--loop-trials` times (its per-trial cost does not depend on the study size).
Sweeper: ONE study of max(`--trials`) trials through `sweeper.tune.run_study` (local Ray,
`--cpus` CPUs, one CPU per trial, an MLflow SQLite store in a temporary directory). Ray's
start-up is timed apart: a laptop pays it once per `sweeper run`, a cluster not at all.

The marginal cost at size n is read from the MLflow child runs' end times (one paged
`search_runs` after the study): the wall time between the (n - w)-th and the n-th trial
to finish, divided by w (w = max(10, n / 10)); with `--cpus` trials at a time this is the
study's throughput at that point, the number that must stay flat as trials accumulate.

    python benchmarks/sweep_overhead.py [--trials 20,200,2000] [--cpus 2] [--loop-trials 20]
    python benchmarks/sweep_overhead.py --trials 20,200,2000 --from-store sqlite:////tmp/.../mlflow.db --study overhead

The second form only reads a store's trial end times (a run still going, or another study
such as resume_scale.py's) and prints the marginal costs, without a loop baseline.

Prints, for each size, the marginal seconds per trial, the overhead over the loop's
seconds per trial, the ratio to the marginal cost at the smallest size (goal at 2,000:
within 1.3x of at 20), and the study's totals.
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
    # the platform's per-trial machinery only: a run's pictures and its LoggedModel are
    # measured by their own benchmarks (pictures_overhead.py; docs/models.md)
    "eval": {"recall_k": [1], "clustering": False, "embedding_metrics": False, "pictures": False, "log_model": False},
}


def sizes(text: str) -> list[int]:
    out = sorted({int(x) for x in str(text).split(",") if x.strip()})
    if not out or out[0] < 2:
        raise SystemExit(f"--trials {text}: give sizes of 2 trials or more, e.g. 20,200,2000")
    return out


def window(n: int) -> int:
    return max(10, n // 10) if n > 10 else n - 1


def marginal(ends: list[float], n: int) -> float:
    """Seconds per trial between the (n - w)-th and the n-th finished trial (1-based)."""
    w = window(n)
    return (ends[n - 1] - ends[n - 1 - w]) / w


def child_end_times(uri: str, study: str) -> list[float]:
    from sweeper import tracking

    t = tracking.Tracker(uri)
    exp = t.client.get_experiment_by_name(study)
    runs = t.search([exp.experiment_id], f"tags.`{tracking.TAG_ROLE}` = 'trial'")
    return sorted(r.info.end_time / 1000.0 for r in runs if r.info.status == "FINISHED" and r.info.end_time)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", default="50", help="study sizes at which to read the marginal cost, e.g. 20,200,2000")
    ap.add_argument("--cpus", type=int, default=2)
    ap.add_argument("--loop-trials", type=int, default=20, help="trials of the plain-loop baseline")
    ap.add_argument("--from-store", metavar="URI", help="only read the trial end times of this MLflow store")
    ap.add_argument("--study", default="overhead", help="with --from-store: the study (experiment) name")
    args = ap.parse_args()
    ns = sizes(args.trials)
    if args.from_store:
        ends = child_end_times(args.from_store, args.study)
        print(f"{args.study}: {len(ends)} FINISHED trials in {args.from_store}")
        table(ns, ends, None, ends[0] if ends else 0.0)
        return
    total = ns[-1]
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

    from dmlcore.config import from_dict
    from dmlcore.train import Trainer

    Trainer(from_dict(BASE), progress=False).fit()  # imports and first-call costs, not per trial
    t0 = time.perf_counter()
    for seed in range(args.loop_trials):
        Trainer(from_dict({**BASE, "train": {**BASE["train"], "seed": seed}}), progress=False).fit()
    loop = (time.perf_counter() - t0) / args.loop_trials

    import ray
    from rich.console import Console

    from sweeper.study import load_study
    from sweeper.tune import run_study

    tmp = Path(tempfile.mkdtemp(prefix="dml-sweep-bench-"))
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    print(f"store {uri} (read a run still going with --from-store {uri})", flush=True)
    study = {"name": "overhead", "base": BASE, "seeds": list(range(total)), "metric": "test/recall_at_1",
             "mode": "max", "resources": {"cpu": 1}, "max_concurrent": args.cpus}
    path = tmp / "study.yaml"
    path.write_text(yaml.safe_dump(study))
    t0 = time.perf_counter()
    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    t_ray = time.perf_counter() - t0
    start = time.time()
    t0 = time.perf_counter()
    outcome = run_study(load_study(path), storage=str(tmp / "runs"), tracking_uri=uri,
                        console=Console(file=io.StringIO()), live=False, analyses=False)
    t_study = time.perf_counter() - t0
    ray.shutdown()
    ends = child_end_times(uri, "overhead")
    done = sum(t.status == "done" for t in outcome.trials)

    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; "
          f"one study of {total} tiny trials, {args.cpus} concurrent under Ray; {done} done, {len(ends)} FINISHED in MLflow")
    print(f"plain loop (1 process, {args.loop_trials} trials): {loop:.3f} s/trial")
    print(f"sweeper: Ray start-up {t_ray:.1f} s, study {t_study:.1f} s ({t_study / total:.3f} s/trial on average)")
    if len(ends) < total:
        print(f"only {len(ends)} of {total} trials FINISHED: marginal costs above that size are not measured")
    table(ns, ends, loop, start)


def table(ns: list[int], ends: list[float], loop: float | None, start: float) -> None:
    print(f"{'size n':>8} {'window':>7} {'marginal s/trial':>17} {'overhead vs loop':>17} {'ratio to n=' + str(ns[0]):>14} "
          f"{'wall to n-th trial':>19}")
    first = None
    for n in ns:
        if n > len(ends):
            continue
        m = marginal(ends, n)
        first = m if first is None else first
        over = f"{m - loop:>+17.3f}" if loop is not None else f"{'':>17}"
        print(f"{n:>8} {window(n):>7} {m:>17.3f} {over} {m / first:>14.2f} {ends[n - 1] - start:>17.1f} s")


if __name__ == "__main__":
    main()
