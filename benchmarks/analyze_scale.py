#!/usr/bin/env python
"""Wall time of ``sweeper analyze`` on a synthetic 2,000-run study (issue 20, item 2).

Builds an MLflow SQLite store with one parent run (tagged ``study=analyze_scale``) and
``--runs`` child runs (default 2,000: 8 losses x 5 embedding sizes x 10 learning rates x
5 seeds), each with 9 params, ``--metrics`` metrics (default 30: the ``best/...``
test and train metrics the analyses read plus per-epoch curves) logged at ``--epochs``
steps (default 50), i.e. 3,000,000 metric rows. The parent and its experiment are
created with ``MlflowClient`` (so the schema is MLflow's own); the children's rows are
inserted with one ``executemany`` per table (``log_batch`` would take minutes for 3M
rows; the rows are the ones ``log_batch`` writes: ``metrics`` with every step,
``latest_metrics`` with the last). Then it times, each in a fresh subprocess,

* ``sweeper analyze <parent run id>`` with an empty analysis cache (``cold``), and
* the same again (``warm``: the run listing is served from the cache of the execution),

and prints the wall times against the goal (< 30 s on 2 cores).

Usage::

    python benchmarks/analyze_scale.py                 # 2,000 runs x 30 metrics x 50 epochs
    python benchmarks/analyze_scale.py --runs 200      # smaller
    python benchmarks/analyze_scale.py --keep DIR      # keep the store and outputs in DIR
"""

from __future__ import annotations

import argparse
import itertools
import os
import platform
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
GOAL_S = 30.0
LOSSES = ["margin", "triplet", "contrastive", "multisimilarity", "proxynca", "arcface", "softtriple", "npair"]
EMBED = [32, 64, 128, 256, 512]
LRS = [1e-6, 3e-6, 1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2]
BEST = ["best/test/recall_at_1", "best/test/recall_at_2", "best/test/recall_at_4", "best/test/recall_at_8",
        "best/test/map_at_r", "best/test/r_precision", "best/test/nmi", "best/test/f1",
        "best/train/pi_ratio", "best/train/rho_spectrum", "best/train/pi_intra", "best/train/pi_inter",
        "best/train/uniformity"]


def metric_names(count: int) -> list[str]:
    curves = [f"test/{m.split('/')[-1]}" for m in BEST] + ["train/loss", "train/lr", "train/grad_norm", "epoch_time"]
    names = (BEST + curves)[:count]
    names += [f"extra/m{i}" for i in range(count - len(names))]
    return names


def build_store(path: Path, n_runs: int, n_metrics: int, n_epochs: int, seed: int = 0) -> tuple[str, str]:
    """The store at ``path``; returns ``(tracking_uri, parent_run_id)``."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{path}"
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("analyze_scale", artifact_location=(path.parent / "artifacts").as_uri())
    parent = client.create_run(exp, tags={"study": "analyze_scale"}, run_name="analyze_scale")
    pid = parent.info.run_id
    client.set_terminated(pid)
    rng = np.random.default_rng(seed)
    con = sqlite3.connect(path)
    (template,) = con.execute("SELECT * FROM runs WHERE run_uuid = ?", (pid,)).fetchall()
    cols = [c[1] for c in con.execute("PRAGMA table_info(runs)")]
    names = metric_names(n_metrics)
    grid = list(itertools.product(LOSSES, EMBED, LRS, range(5)))
    t0 = int(time.time() * 1000) - 10 * 86_400_000
    runs, tags, params, metrics, latest = [], [], [], [], []
    for i in range(n_runs):
        loss, dim, lr, s = grid[i % len(grid)]
        rid = uuid.UUID(int=int(rng.integers(0, 2**63)) << 64 | i).hex
        start, end = t0 + i * 60_000, t0 + i * 60_000 + 55_000
        row = dict(zip(cols, template))
        row.update(run_uuid=rid, name=f"trial_{i:05d}", status="FINISHED", start_time=start, end_time=end,
                   artifact_uri=f"{row['artifact_uri'].rsplit('/', 2)[0]}/{rid}/artifacts")
        runs.append(tuple(row[c] for c in cols))
        tags += [("mlflow.parentRunId", pid, rid), ("mlflow.runName", row["name"], rid), ("study", "analyze_scale", rid)]
        for k, v in {"loss.name": loss, "model.embed_dim": dim, "optim.lr": lr, "train.seed": s,
                     "batch.size": 112, "data.name": "cub200", "train.epochs": n_epochs, "miner.name": "distance",
                     "name": f"trial_{i:05d}"}.items():
            params.append((k, str(v), rid))
        quality = 0.3 + 0.05 * LOSSES.index(loss) / len(LOSSES) + 0.02 * np.log10(dim) - 0.01 * abs(np.log10(lr) + 5)
        for j, m in enumerate(names):
            base = quality * (1 + 0.1 * j / len(names)) + 0.01 * rng.standard_normal()
            curve = base * (1 - np.exp(-np.arange(1, n_epochs + 1) / 8.0)) + 0.002 * rng.standard_normal(n_epochs)
            for step, v in enumerate(curve):
                metrics.append((m, float(v), start + step * 1000, rid, step, 0))
            latest.append((m, float(curve[-1]), start + (n_epochs - 1) * 1000, n_epochs - 1, 0, rid))
    con.executemany(f"INSERT INTO runs ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})", runs)
    con.executemany("INSERT INTO tags (key, value, run_uuid) VALUES (?, ?, ?)", tags)
    con.executemany("INSERT INTO params (key, value, run_uuid) VALUES (?, ?, ?)", params)
    con.executemany("INSERT INTO metrics (key, value, timestamp, run_uuid, step, is_nan) VALUES (?, ?, ?, ?, ?, ?)",
                    metrics)
    con.executemany("INSERT INTO latest_metrics (key, value, timestamp, step, is_nan, run_uuid) "
                    "VALUES (?, ?, ?, ?, ?, ?)", latest)
    con.commit()
    con.close()
    return uri, pid


def time_analyze(uri: str, pid: str, out: Path) -> tuple[float, str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), MPLBACKEND="Agg", RAY_USAGE_STATS_ENABLED="0")
    exe = Path(sys.executable).with_name("sweeper")
    cmd = [str(exe), "analyze", pid, "--tracking-uri", uri, "--out", str(out)]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=out.parent)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"sweeper analyze failed (exit {p.returncode}):\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}")
    return wall, p.stdout


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=2000)
    ap.add_argument("--metrics", type=int, default=30)
    ap.add_argument("--epochs", type=int, default=50)
    ap.add_argument("--keep", help="build the store and write the outputs in this folder (kept)")
    args = ap.parse_args(argv)
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="analyze_scale_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        db = work / "mlflow.db"
        if db.exists():
            db.unlink()
        t0 = time.perf_counter()
        uri, pid = build_store(db, args.runs, args.metrics, args.epochs)
        build = time.perf_counter() - t0
        print(f"# analyze_scale, {platform.machine()} with {os.cpu_count()} CPU cores, python "
              f"{platform.python_version()}")
        print(f"store: {args.runs:,} child runs x {args.metrics} metrics x {args.epochs} epochs "
              f"({args.runs * args.metrics * args.epochs:,} metric rows, {db.stat().st_size / 2**20:.0f} MB), "
              f"built in {build:.1f} s")
        out = work / "analysis"
        shutil.rmtree(out, ignore_errors=True)
        cold, text = time_analyze(uri, pid, out)
        warm, _ = time_analyze(uri, pid, out)
        files = sorted(p.name for p in out.iterdir())
        print(f"sweeper analyze, cold cache: {cold:.1f} s; warm cache: {warm:.1f} s "
              f"(goal < {GOAL_S:.0f} s: {'met' if max(cold, warm) < GOAL_S else 'MISSED'})")
        print(f"outputs: {', '.join(files)}")
        print(f"load average (1/5/15 min): {' / '.join(f'{v:.1f}' for v in os.getloadavg())}")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
