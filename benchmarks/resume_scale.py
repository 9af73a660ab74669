"""A study of thousands of tiny trials through `sweeper run`, SIGKILLed halfway, then `--resume`d.

1. Writes a study of `--trials` tiny trials (the trial of `sweep_overhead.py`: digits,
   16 px, one epoch of 5 steps; one trial per seed) and starts `sweeper run` on it
   (`--no-live`, its own local Ray of `--cpus` CPUs, an MLflow SQLite store) in a new
   process group.
2. When its output says `--kill-at` trials are done, SIGKILLs the driver's process group
   and every process it started (Ray's head and workers): no handler runs, nothing is
   saved, MLflow keeps the runs that were RUNNING.
3. Counts the MLflow child runs by `trial_key`, then starts `sweeper run --resume` and
   measures the time from its start to its first "started" line (the first new trial:
   Ray's start-up, the plan, the preflight and the reading of what the killed attempt
   left are all in it), and waits for it to finish.
4. Counts the child runs by `trial_key` again: exactly one per trial, all FINISHED.

    python benchmarks/resume_scale.py [--trials 2000] [--kill-at 1000] [--cpus 2] [--workdir DIR]

Prints the numbers; exits 1 when a run is duplicated, a trial is missing or the resume
took a minute or more to start its first new trial (the goal of issue 20).
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from sweep_overhead import BASE, marginal, window  # noqa: E402

LINE = re.compile(r"^\[(\d+)/(\d+)\]\s+(\w+)")


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (from /proc: children of children...)."""
    kids: dict[int, list[int]] = collections.defaultdict(list)
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            kids[ppid].append(int(d.name))
    out, todo = [], [pid]
    while todo:
        for c in kids.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL ``proc``'s process group and every process below it (Ray's, started by it)."""
    below = descendants(proc.pid)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for pid in below:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=60)


def sweeper_cmd(study: Path, work: Path, uri: str, cpus: int, *extra: str) -> list[str]:
    exe = Path(sys.executable).with_name("sweeper")
    head = [str(exe)] if exe.exists() else [sys.executable, "-m", "sweeper.cli"]
    return [*head, "run", str(study), "--storage", str(work / "runs"), "--tracking-uri", uri,
            "--no-live", "--num-cpus", str(cpus), *extra]


def follow(log: Path, proc: subprocess.Popen, until, timeout: float) -> tuple[re.Match | None, float]:
    """Read ``log`` as ``proc`` writes it until ``until(match)`` is true for a progress line;
    returns (that match, time it was read) or (None, time) when the process ended first."""
    end = time.time() + timeout
    with open(log, errors="replace") as fh:
        buf = ""
        while time.time() < end:
            chunk = fh.read()
            if chunk:
                buf += chunk
                *lines, buf = buf.split("\n")
                for ln in lines:
                    m = LINE.match(ln.strip())
                    if m and until(m):
                        return m, time.time()
                continue
            if proc.poll() is not None:
                return None, time.time()
            time.sleep(0.2)
    raise SystemExit(f"timed out after {timeout:.0f} s waiting on {log}")


def child_runs(uri: str, study: str) -> list:
    from sweeper import tracking

    t = tracking.Tracker(uri)
    exp = t.client.get_experiment_by_name(study)
    return [r for r in t.search([exp.experiment_id], "") if tracking.TAG_PARENT in r.data.tags]


def census(runs: list) -> tuple[int, int, int, collections.Counter]:
    """(child runs, distinct trial keys, runs beyond one per key, statuses)."""
    keys = collections.Counter(r.data.tags.get("trial_key") for r in runs)
    return len(runs), len(keys), sum(n - 1 for n in keys.values()), collections.Counter(r.info.status for r in runs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=2000)
    ap.add_argument("--kill-at", type=int, default=None, help="trials done when the driver is killed (default: half)")
    ap.add_argument("--cpus", type=int, default=2)
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--timeout", type=float, default=4 * 3600, help="seconds each phase may take")
    args = ap.parse_args()
    kill_at = args.kill_at if args.kill_at is not None else args.trials // 2
    work = (args.workdir or Path(tempfile.mkdtemp(prefix="dml-resume-scale-"))).resolve()
    work.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{work / 'mlflow.db'}"
    name = "resume-scale"
    study = work / f"{name}.yaml"
    study.write_text(yaml.safe_dump({
        "name": name, "base": BASE, "seeds": list(range(args.trials)), "metric": "test/recall_at_1", "mode": "max",
        "resources": {"cpu": 1}, "max_concurrent": args.cpus,
    }, sort_keys=False))
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "RAY_USAGE_STATS_ENABLED": "0", "MLFLOW_LOGGING_LEVEL": "WARNING"}
    print(f"workdir {work}; {args.trials} trials, SIGKILL at {kill_at} done, {args.cpus} CPUs; "
          f"load average {os.getloadavg()[0]:.1f}", flush=True)

    # 1-2. run, kill
    log1 = work / "first.log"
    t0 = time.time()
    with open(log1, "w") as out:
        proc = subprocess.Popen(sweeper_cmd(study, work, uri, args.cpus), cwd=work, stdout=out,
                                stderr=subprocess.STDOUT, env=env, start_new_session=True)
    m, t_kill = follow(log1, proc, lambda m: m.group(3) in ("done", "stopped", "failed") and int(m.group(1)) >= kill_at,
                       args.timeout)
    if m is None:
        raise SystemExit(f"the first attempt ended before {kill_at} trials were done: see {log1}")
    kill_tree(proc)
    print(f"first attempt: {m.group(1)} trials done after {t_kill - t0:.0f} s "
          f"({(t_kill - t0) / int(m.group(1)):.2f} s/trial); SIGKILLed", flush=True)
    first_runs = child_runs(uri, name)
    runs, keys, dup, st = census(first_runs)
    print(f"after the kill: {runs} child runs, {keys} trial keys, {dup} duplicates, {dict(st)}", flush=True)
    ends = sorted(r.info.end_time / 1000.0 for r in first_runs if r.info.status == "FINISHED" and r.info.end_time)
    sizes = [n for n in (20, 200, 500, 1000, 2000, 5000) if n <= len(ends)]
    if sizes:  # the growth inside one driver (sweep_overhead.py's marginal cost, same definition)
        print("first attempt, marginal s/trial at n trials done (window w): " + ", ".join(
            f"n={n} (w={window(n)}): {marginal(ends, n):.3f}" for n in sizes), flush=True)

    # 3-4. resume
    log2 = work / "resume.log"
    t1 = time.time()
    with open(log2, "w") as out:
        proc = subprocess.Popen(sweeper_cmd(study, work, uri, args.cpus, "--resume"), cwd=work, stdout=out,
                                stderr=subprocess.STDOUT, env=env, start_new_session=True)
    m, t_first = follow(log2, proc, lambda m: m.group(3) == "started", args.timeout)
    start_s = (t_first - t1) if m is not None else float("nan")
    print(f"resume: first new trial started {start_s:.1f} s after `sweeper run --resume` began", flush=True)
    try:
        rc = proc.wait(timeout=args.timeout)
    finally:
        if proc.poll() is None:
            kill_tree(proc)
    t_end = time.time()
    resumed = [ln for ln in log2.read_text(errors="replace").splitlines() if ln.startswith("resuming ")]
    print(f"resume: exit code {rc} after {t_end - t1:.0f} s; {resumed[0] if resumed else 'no resuming line'}")
    runs, keys, dup, st = census(child_runs(uri, name))
    print(f"after the resume: {runs} child runs, {keys} trial keys, {dup} duplicates, {dict(st)}")
    ok = rc == 0 and dup == 0 and keys == args.trials and st.get("FINISHED", 0) == args.trials and start_s < 60
    print(f"{'OK' if ok else 'FAILED'}: {args.trials} trials, one run each: {dup == 0 and keys == args.trials}; "
          f"all FINISHED: {st.get('FINISHED', 0) == args.trials}; resume started in {start_s:.1f} s (< 60 s: {start_s < 60})")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
