#!/usr/bin/env python
"""Speed and memory of one evaluation pass: ``dmlcore.metrics`` vs two baselines.

For two synthetic clustered test sets (SOP-size: 60,000 x 128 with 11,316 classes;
CUB-size: 8,000 x 512 with 100 classes) it runs, each in a fresh subprocess:

* ``ours``: ``evaluate_embeddings`` (one faiss kNN search feeding Recall@k, mAP@R,
  R-Precision and mAP@1000, one seeded faiss k-means feeding NMI and F1);
* ``sklearn``: brute force with scikit-learn: ``NearestNeighbors(algorithm="brute")``
  on the L2-normalised embeddings, the same metrics computed by hand on the full
  ``n x K`` neighbour matrix, ``KMeans(init="random", n_init=1, max_iter=20, tol=0)``,
  ``normalized_mutual_info_score`` and ``pair_confusion_matrix`` for F1;
* ``ours_retrieval`` / ``sklearn_retrieval``: the same two without the clustering (the
  kNN part alone);
* ``pml``: pytorch-metric-learning's ``AccuracyCalculator`` with ``k = min(1000, n-1)``
  (precision_at_1, mean_average_precision_at_r, r_precision, mean_average_precision
  = mAP@1000 here, NMI);
* ``pml_default``: the same with its default ``k=None`` (whole gallery), only where the
  ``n x n`` neighbour tables fit comfortably in memory;
* on the CUB-size set also the embedding-space metrics: ``ours_embedding``
  (``embedding_space_metrics``) vs ``brute_embedding`` (scipy ``cdist`` per class,
  ``pdist`` for uniformity, ``numpy.linalg.svd``).

Time is the wall time of the metric call alone (imports and data loading excluded;
the fastest of ``--repeat`` runs per subprocess, default 3 for n <= 10,000 and 1 above,
and of ``--rounds`` subprocesses per method run in rotating order, as the machine may be
shared);
memory is the growth of the child's peak RSS (``VmHWM`` of ``/proc/self/status``, else
``resource.getrusage`` ``ru_maxrss``, which Linux carries over from the parent) during
that call (tracemalloc cannot see faiss' allocations). The table prints each
method's metric values (retrieval values must agree; clustering values differ between
k-means implementations, except ours vs PML which both run faiss k-means with seed
1234) and the time and memory ratios baseline / ours.

Usage::

    python benchmarks/eval_speed.py            # default sizes (SOP-size takes minutes on 2 cores)
    python benchmarks/eval_speed.py --quick    # 6,000 x 128 and 2,000 x 512
    python benchmarks/eval_speed.py --methods ours,pml --cases cub --json out.json
    python benchmarks/eval_speed.py --rounds 2   # the numbers in docs/metrics.md
    python benchmarks/eval_speed.py --n 1000000 --dim 128   # the scale case (docs/scale.md)

``--n N --dim D`` replaces the two cases by one synthetic set of ``N x D`` embeddings with
``--classes`` classes (default ``N // 100``) and runs ``ours_retrieval_scale`` (exact Recall@k,
mAP@R, R-Precision, mAP@1000), ``gemm`` (the physical floor: one float32 GEMM
``N x D`` times ``D x N``, in 4,096 x 8,192 tiles so that no ``N x N`` matrix exists;
when it would take longer than ``--time-limit`` only the first blocks are timed and
the time is scaled by the rows, said in the output), ``ours_clustering`` (faiss k-means
NMI/F1; O(N x classes): at 1M x 128 with 10,000 classes about 50 minutes on 2 cores,
``--classes 1000`` about 5), ``ours_embedding_scale`` (pi, rho without uniformity) and
``pml`` when ``N <= --pml-max-n``. Peak RSS (``peak_MB``) is the child's absolute peak, data included.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

CASES = {
    "sop": dict(n=60_000, d=128, classes=11_316, noise=1.4, recall_k=(1, 10, 100, 1000)),
    "cub": dict(n=8_000, d=512, classes=100, noise=3.3, recall_k=(1, 2, 4, 8)),
}
QUICK = {
    "sop": dict(n=6_000, d=128, classes=1_132, noise=1.4, recall_k=(1, 10, 100, 1000)),
    "cub": dict(n=2_000, d=512, classes=25, noise=3.3, recall_k=(1, 2, 4, 8)),
}
METHODS = ("ours", "sklearn", "pml", "pml_default", "ours_retrieval", "sklearn_retrieval", "ours_embedding",
           "brute_embedding", "gemm", "ours_clustering", "ours_embedding_scale", "ours_retrieval_scale")
SCALE_METHODS = ("ours_retrieval_scale", "gemm", "pml", "ours_clustering", "ours_embedding_scale")
SCALE_GROUPS = (("ours_retrieval_scale", "gemm", "pml"), ("ours_clustering",), ("ours_embedding_scale",))
GEMM_SECONDS = 60.0
GROUPS = (("ours", "sklearn", "pml", "pml_default"), ("ours_retrieval", "sklearn_retrieval", "gemm"),
          ("ours_embedding", "brute_embedding"), ("ours_clustering",), ("ours_embedding_scale",))
EMBEDDING_METHODS = ("ours_embedding", "brute_embedding")
MAP_AT = 1000
SEED = 1234  # faiss' default k-means seed, which PML's FaissKMeans uses


def make_clustered(n: int, d: int, classes: int, noise: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Unit class centres plus isotropic noise of total norm ~``noise``; every class has >= 2 samples."""
    rng = np.random.default_rng(seed)
    y = np.concatenate([np.repeat(np.arange(classes), 2), rng.integers(0, classes, n - 2 * classes)])
    rng.shuffle(y)
    centres = rng.standard_normal((classes, d))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    x = centres[y] + noise / np.sqrt(d) * rng.standard_normal((n, d))
    return x.astype(np.float32), y.astype(np.int64)


# ----------------------------------------------------------------------------- methods


def run_ours(x, y, recall_k, clustering=True):
    from dmlcore.metrics import evaluate_embeddings

    return evaluate_embeddings(x, y, recall_k=recall_k, distance="cosine", clustering=clustering, map_at=MAP_AT,
                               seed=SEED)


def run_ours_retrieval(x, y, recall_k):
    return run_ours(x, y, recall_k, clustering=False)


def run_sklearn_retrieval(x, y, recall_k):
    return run_sklearn(x, y, recall_k, clustering=False)


def run_sklearn(x, y, recall_k, clustering=True):
    from sklearn.cluster import KMeans
    from sklearn.metrics import normalized_mutual_info_score
    from sklearn.metrics.cluster import pair_confusion_matrix
    from sklearn.neighbors import NearestNeighbors

    n = len(x)
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    counts = np.bincount(y)
    R = counts[y] - 1
    K = min(max(max(recall_k), int(R.max()), MAP_AT), n - 1)
    ind = NearestNeighbors(n_neighbors=K + 1, algorithm="brute").fit(xn).kneighbors(xn, return_distance=False)
    is_self = ind == np.arange(n)[:, None]
    ind = np.take_along_axis(ind, np.argsort(is_self, axis=1, kind="stable"), axis=1)[:, :K]
    rel = y[ind] == y[:, None]
    valid = R > 0
    out = {}
    for k in recall_k:
        out[f"recall_at_{k}"] = float(rel[:, : min(k, n - 1)].any(axis=1)[valid].mean())
    cum = np.cumsum(rel, axis=1)
    prec = cum / np.arange(1, K + 1)
    ap = np.cumsum(prec * rel, axis=1)
    rows = np.arange(n)
    r_idx = np.maximum(R - 1, 0)
    Rs = np.maximum(R, 1)
    out["map_at_r"] = float((ap[rows, r_idx] / Rs)[valid].mean())
    out["r_precision"] = float((cum[rows, r_idx] / Rs)[valid].mean())
    m = min(MAP_AT, n - 1)
    out[f"map_at_{MAP_AT}"] = float((ap[:, m - 1] / np.maximum(np.minimum(R, m), 1))[valid].mean())
    if not clustering:
        return out
    # tol=0: no early stop on centre shift (faiss and PML run all 20 iterations); sklearn still
    # stops at a fixed point (assignments unchanged), where further iterations change nothing
    km = KMeans(n_clusters=len(counts), init="random", n_init=1, max_iter=20, tol=0.0, random_state=0).fit(xn)
    out["nmi"] = float(normalized_mutual_info_score(y, km.labels_))
    (tn, fp), (fn, tp) = pair_confusion_matrix(y, km.labels_)
    out["f1"] = float(2 * tp / (2 * tp + fp + fn))
    return out


def _pml(x, y, k):
    import logging

    import torch
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

    logging.getLogger("PML").setLevel(logging.ERROR)
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    include = ("precision_at_1", "mean_average_precision_at_r", "r_precision", "NMI")
    if k is not None:
        include += ("mean_average_precision",)
    calc = AccuracyCalculator(include=include, k=k, device=torch.device("cpu"))
    r = calc.get_accuracy(xn, y, xn, y, ref_includes_query=True)
    out = {"recall_at_1": r["precision_at_1"], "map_at_r": r["mean_average_precision_at_r"],
           "r_precision": r["r_precision"]}
    if k is not None:
        out[f"map_at_{MAP_AT}"] = r["mean_average_precision"]
    out["nmi"] = r["NMI"]
    return {k_: float(v) for k_, v in out.items()}


def run_pml(x, y, recall_k):
    return _pml(x, y, min(MAP_AT, len(x) - 1))


def run_pml_default(x, y, recall_k):
    return _pml(x, y, None)


def run_ours_embedding(x, y, recall_k):
    from dmlcore.metrics import embedding_space_metrics

    return embedding_space_metrics(x, y, rho_m=2)


def run_brute_embedding(x, y, recall_k):
    from scipy.spatial.distance import cdist, pdist
    from scipy.stats import entropy

    x = x.astype(np.float64)
    intra, mus = [], []
    for c in np.unique(y):
        f = x[y == c]
        dm = cdist(f, f, "cosine")
        intra.append(dm.sum() / (len(f) ** 2 - len(f)) if len(f) > 1 else np.nan)
        mu = f.mean(0)
        mus.append(mu / np.linalg.norm(mu))
    intra = np.array(intra)
    intra[np.isnan(intra)] = np.nanmax(intra)
    dm = cdist(np.array(mus), np.array(mus), "cosine")
    inter = dm.sum() / (len(mus) ** 2 - len(mus))
    s = np.linalg.svd(x, compute_uv=False)[1:]
    s /= s.sum()
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    unif = float(np.log(np.mean(np.exp(-2.0 * pdist(xn, "sqeuclidean")))))
    ratio = float(intra.mean() / max(inter, 1e-8))
    return {"pi_intra": float(intra.mean()), "pi_inter": float(inter), "pi_ratio": ratio,
            "rho_spectrum": float(entropy(np.ones(len(s)) / len(s), s)), "uniformity": unif}


def run_gemm(x, y, recall_k):
    """One float32 GEMM of x (n x d) by x.T in 4,096 x 8,192 tiles; extrapolated past GEMM_SECONDS."""
    n = len(x)
    qb, gb = 4096, 8192
    xt = np.ascontiguousarray(x.T)
    out = np.empty((qb, gb), dtype=np.float32)
    limit = float(os.environ.get("EVAL_SPEED_GEMM_SECONDS", GEMM_SECONDS))
    t0 = time.perf_counter()
    done = 0
    while done < n:
        q = x[done : done + qb]
        for g in range(0, n, gb):
            cols = xt[:, g : g + gb]
            np.matmul(q, cols, out=out[: len(q), : cols.shape[1]])
        done += len(q)
        if time.perf_counter() - t0 > limit:
            break
    return {"_time_scale": n / done, "gemm_rows_timed": float(done)}


def run_ours_retrieval_scale(x, y, recall_k):
    """``evaluate_embeddings``' retrieval loop (same calls, same memory: the per-query arrays are
    allocated for all n), stopped after ``EVAL_SPEED_GEMM_SECONDS`` with the time scaled by the
    queries done; the metric values are only reported when every query ran."""
    from dmlcore.metrics._common import l2_normalize
    from dmlcore.metrics.retrieval import aggregate, needed_k, per_query_metrics, relevant_counts
    from dmlcore.metrics.search import iter_knn

    limit = float(os.environ.get("EVAL_SPEED_GEMM_SECONDS", GEMM_SECONDS))
    n = len(x)
    t0 = time.perf_counter()
    xn = l2_normalize(x)
    R = relevant_counts(y)
    K = needed_k(recall_k, int(R.max()), MAP_AT, n - 1)
    per_query: dict = {}
    done = 0
    for start, stop, _, idx in iter_knn(xn, K, distance="cosine", labels=y, _prepared=True):
        rel = y[idx] == y[start:stop, None]
        for name, values in per_query_metrics(rel, R[start:stop], recall_k, MAP_AT, n - 1).items():
            if name not in per_query:
                per_query[name] = np.empty(n, dtype=np.float64)
            per_query[name][start:stop] = values
        done = stop
        if time.perf_counter() - t0 > limit and done < n:
            break
    out = aggregate(per_query, R > 0) if done == n else {}
    return dict(out, _time_scale=n / done, queries_timed=float(done), K=float(K))


def run_ours_clustering(x, y, recall_k):
    from dmlcore.metrics import clustering_metrics

    return clustering_metrics(x, y, distance="cosine", seed=SEED)


def run_ours_embedding_scale(x, y, recall_k):
    from dmlcore.metrics import embedding_space_metrics

    return embedding_space_metrics(x, y, rho_m=2, with_uniformity=False)


RUNNERS = {m: globals()[f"run_{m}"] for m in METHODS}


def _peak_kb(resource) -> int:
    """Peak RSS of this process in KB: ``VmHWM`` (reset by exec; ``ru_maxrss`` keeps the parent's
    peak across fork + exec, which hides the child's own peak when the parent was larger)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def child(method: str, data: str, result: str, repeat: int = 1) -> None:
    import resource

    # import everything a method may use before the baseline RSS reading
    import faiss  # noqa: F401
    import sklearn.neighbors  # noqa: F401
    import torch  # noqa: F401
    import pytorch_metric_learning.utils.accuracy_calculator  # noqa: F401
    import dmlcore.metrics  # noqa: F401

    z = np.load(data)
    x, y, recall_k = z["x"], z["y"], tuple(int(k) for k in z["recall_k"])
    base = _peak_kb(resource)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        values = RUNNERS[method](x, y, recall_k)
        times.append((time.perf_counter() - t0) * values.pop("_time_scale", 1.0))
    peak = _peak_kb(resource)
    Path(result).write_text(json.dumps({"time_s": min(times), "times_s": times, "mem_mb": (peak - base) / 1024,
                                        "peak_mb": peak / 1024, "base_mb": base / 1024, "values": values}))


# ----------------------------------------------------------------------------- driver


def mem_total_gb() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return 16.0


def pml_default_gb(n: int) -> float:
    # float32 distances + int64 indices + float32 labels of the n x (n-1) kNN result, plus the
    # bool relevance mask, the int64 cumulative counts and float64 precision tables it builds
    return n * (n - 1) * (4 + 8 + 4 + 1 + 8 + 8) / 2**30


def run_child(method: str, data: str, timeout: float, repeat: int) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = f.name
    try:
        p = subprocess.run([sys.executable, __file__, "--child", method, "--data", data, "--result", out,
                            "--repeat", str(repeat)],
                           capture_output=True, text=True, timeout=timeout, cwd=ROOT)
        if p.returncode != 0:
            tail = (p.stderr or p.stdout).strip().splitlines()[-3:]
            return {"error": f"exit {p.returncode}: {' | '.join(tail)}"}
        return json.loads(Path(out).read_text())
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    finally:
        os.unlink(out)


def fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.6f}" if abs(v) < 100 else f"{v:.1f}"
    return str(v)


def print_case(name: str, spec: dict, results: dict, notes: list[str]) -> None:
    print(f"\n## {name}: {spec['n']:,} x {spec['d']} embeddings, {spec['classes']:,} classes, "
          f"recall_k={list(spec['recall_k'])}")
    for group in (SCALE_GROUPS if name == "scale" else GROUPS):
        rows = [m for m in group if m in results]
        if not rows:
            continue
        ref = results.get(group[0], {})
        keys: list[str] = []
        for m in rows:
            for k in results[m].get("values", {}):
                if k not in keys:
                    keys.append(k)
        head = ["method", "time_s", "all_times_s", "mem_MB", "peak_MB", "time_x", "mem_x", "max|diff|"] + keys
        table = [head]
        for m in rows:
            r = results[m]
            if "error" in r or "skipped" in r:
                table.append([m, r.get("error") or r.get("skipped")] + [""] * (len(head) - 2))
                continue
            tx = mx = diff = "-"
            if m != group[0] and "time_s" in ref:
                tx = f"{r['time_s'] / ref['time_s']:.2f}"
                mx = f"{max(r['mem_mb'], 1.0) / max(ref['mem_mb'], 1.0):.2f}"
                common = [k for k in r["values"] if k in ref.get("values", {}) and k not in ("nmi", "f1")]
                if common:
                    diff = f"{max(abs(r['values'][k] - ref['values'][k]) for k in common):.1e}"
            alltimes = "/".join(f"{t:.1f}" for t in r.get("times_s", [r["time_s"]]))
            table.append([m, f"{r['time_s']:.2f}", alltimes, f"{r['mem_mb']:.0f}", f"{r['peak_mb']:.0f}", tx, mx, diff]
                         + [fmt(r["values"].get(k)) for k in keys])
        full = [row for row in table if not (len(row) > 2 and row[2] == "")]
        widths = [max(len(str(row[i])) for row in full) for i in range(len(head))]
        for i, row in enumerate(table):
            if len(row) > 2 and row[2] == "":
                print("  " + str(row[0]).ljust(widths[0]) + "  " + str(row[1]))
                continue
            print("  " + "  ".join(str(c).ljust(w) for c, w in zip(row, widths)))
            if i == 0:
                print("  " + "  ".join("-" * w for w in widths))
    print("  time_s: fastest run (all_times_s: every run; gemm: scaled by rows when only gemm_rows_timed rows ran); "
          "peak_MB: the child's peak RSS, data included; mem_MB: growth of peak RSS during the call (largest over "
          "rounds); time_x / mem_x: baseline divided by ours (> 1: ours is faster / smaller); max|diff|: largest "
          "difference of the shared retrieval (or embedding-space) metrics from ours")
    for note in notes:
        print(f"  note: {note}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes (seconds instead of minutes)")
    ap.add_argument("--cases", default="sop,cub", help="comma-separated: sop, cub")
    ap.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {METHODS}")
    ap.add_argument("--timeout", type=float, default=3600.0, help="per method, seconds")
    ap.add_argument("--json", help="also write the raw results here")
    ap.add_argument("--rounds", type=int, default=1,
                    help="fresh subprocesses per method, interleaved across methods; fastest time, largest memory")
    ap.add_argument("--repeat", type=int, default=0,
                    help="runs per method in its subprocess, the fastest reported (default: 3 for n <= 10,000, else 1)")
    ap.add_argument("--n", type=int, help="one synthetic set of this many embeddings instead of the two cases")
    ap.add_argument("--dim", type=int, default=128, help="with --n: embedding dimension")
    ap.add_argument("--classes", type=int, help="with --n: number of classes (default n // 100)")
    ap.add_argument("--pml-max-n", type=int, default=100_000, help="with --n: run PML only up to this n")
    ap.add_argument("--time-limit", type=float, default=GEMM_SECONDS,
                    help="with --n: time the GEMM floor and ours_retrieval_scale at most this long (s), then scale by rows")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(args.child, args.data, args.result, args.repeat or 1)
        return 0

    specs = QUICK if args.quick else CASES
    os.environ["EVAL_SPEED_GEMM_SECONDS"] = str(args.time_limit)
    if args.n:
        specs = {"scale": dict(n=args.n, d=args.dim, classes=args.classes or max(2, args.n // 100), noise=1.4,
                               recall_k=(1, 10, 100, 1000))}
        args.cases = "scale"
        if args.methods == ",".join(METHODS):
            args.methods = ",".join(m for m in SCALE_METHODS if m != "pml" or args.n <= args.pml_max_n)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad:
        ap.error(f"unknown methods {bad}; choose from {METHODS}")
    print(f"# eval_speed ({'quick' if args.quick else 'default'} sizes), {datetime.date.today()}, "
          f"{platform.machine()} with {os.cpu_count()} CPU cores, {mem_total_gb():.0f} GB RAM, "
          f"python {platform.python_version()}")
    all_results = {}
    for case in [c.strip() for c in args.cases.split(",") if c.strip()]:
        spec = specs[case]
        x, y = make_clustered(spec["n"], spec["d"], spec["classes"], spec["noise"])
        notes: list[str] = []
        results: dict[str, dict] = {}
        with tempfile.TemporaryDirectory() as tmp:
            data = os.path.join(tmp, "data.npz")
            np.savez(data, x=x, y=y, recall_k=np.array(spec["recall_k"]))
            todo = []
            for m in methods:
                if m in EMBEDDING_METHODS and case not in ("cub", "scale"):
                    continue
                if m == "pml_default":
                    need = pml_default_gb(spec["n"])
                    if need > 0.4 * mem_total_gb():
                        results[m] = {"skipped": f"not run: k=None holds n x (n-1) tables, ~{need:.0f} GB"}
                        notes.append(f"PML's default k=None (whole gallery) needs ~{need:.0f} GB for n={spec['n']:,} "
                                     f"(the machine has {mem_total_gb():.0f} GB); the 'pml' row uses k={MAP_AT}.")
                        continue
                todo.append(m)
            repeat = args.repeat or (3 if spec["n"] <= 10_000 else 1)
            runs: dict[str, list[dict]] = {m: [] for m in todo}
            for rnd in range(args.rounds):
                # rotate the order each round so that load spikes do not always hit the same method
                for m in todo[rnd % len(todo):] + todo[: rnd % len(todo)]:
                    print(f"  running {case}/{m} (round {rnd + 1}/{args.rounds}) ...", file=sys.stderr, flush=True)
                    runs[m].append(run_child(m, data, args.timeout, repeat))
            for m in todo:
                ok = [r for r in runs[m] if "error" not in r]
                if not ok:
                    results[m] = runs[m][0]
                    continue
                results[m] = dict(ok[0], time_s=min(r["time_s"] for r in ok), mem_mb=max(r["mem_mb"] for r in ok),
                                  times_s=sorted(t for r in ok for t in r["times_s"]))
        if "sklearn" in results:
            notes.append("sklearn's NMI/F1 come from sklearn KMeans (another k-means), so they differ from ours.")
        if "pml" in results:
            notes.append("PML reports precision_at_1 (= recall_at_1) but no recall_at_k for k > 1 and no F1.")
        notes.append("load average (1/5/15 min) after this case: " + " / ".join(f"{v:.1f}" for v in os.getloadavg())
                     + f" on {os.cpu_count()} cores (other jobs share the machine: timings are noisy)")
        print_case(case, spec, results, notes)
        all_results[case] = {"spec": {k: (list(v) if isinstance(v, tuple) else v) for k, v in spec.items()},
                             "results": results}
    if args.json:
        Path(args.json).write_text(json.dumps(all_results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
