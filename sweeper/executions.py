"""The executions of a storage root (``sweeper ls``) and what the driver records about
its own execution in ``sweeper.json`` for that.

Every execution folder ``<storage>/<execution>/`` holds ``sweeper.json``
(:data:`sweeper.tune.STATE_FILE`, plain JSON). Besides what resume needs, the driver
writes there (:func:`running_fields` when it starts or resumes, :func:`summary_fields`
when it ends):

* ``status``: ``running``, then ``finished`` / ``interrupted`` / ``failed``;
* ``driver``: ``{pid, host, proc_start}`` of the process running it;
* ``summary``: trial counts by status, the best value and trial, when it ended.

``sweeper ls`` decides a status honestly (:func:`decide_status`): a ``running`` state
whose driver process is gone (same host, the pid no longer exists or is another
process) is ``interrupted``; on another host the pid cannot be checked and the status
says so (``running?``). Counts of an execution without a summary (running, or its
driver died) come from MLflow: one batched search per tracking store (the child runs of
all those executions at once), skipped with ``--no-mlflow``.
"""

from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

STATE_FILE = "sweeper.json"  # = sweeper.tune.STATE_FILE (not imported: tune pulls in Ray pieces)
STATUSES = ("running", "finished", "interrupted", "failed", "running?", "unknown")
"""What ``sweeper ls`` reports: the four an execution can be in, ``running?`` (a driver on
another host: not checkable from here) and ``unknown`` (a state written before statuses were recorded)."""
TIME_FORMAT = "%Y-%m-%dT%H:%M:%S"


# ----------------------------------------------------------------------------- the driver's side
def _proc_start(pid: int) -> str | None:
    """The start time of process ``pid`` in clock ticks since boot (Linux ``/proc``), else None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    try:
        return stat.rsplit(")", 1)[1].split()[19]  # field 22, counted after the command name
    except IndexError:
        return None


def running_fields(metric: str, mode: str, total: int) -> dict[str, Any]:
    """Written into ``sweeper.json`` when a driver starts (or resumes) the execution."""
    pid = os.getpid()
    return {
        "status": "running",
        "metric": metric,
        "mode": mode,
        "total": total,
        "driver": {"pid": pid, "host": socket.gethostname(), "proc_start": _proc_start(pid)},
        "started_at": time.strftime(TIME_FORMAT),
    }


def outcome_status(outcome: Any) -> str:
    """``finished``, ``interrupted`` or ``failed`` (it ended with no finished trial) of a StudyOutcome."""
    if outcome.interrupted:
        return "interrupted"
    if outcome.best is None and any(t.status == "failed" for t in outcome.trials):
        return "failed"
    return "finished"


def summary_fields(outcome: Any) -> dict[str, Any]:
    """Written into ``sweeper.json`` when the driver ends the execution."""
    best = outcome.best
    return {
        "status": outcome_status(outcome),
        "summary": {
            "trials": outcome.counts(),
            "total": outcome.total,
            "metric": outcome.metric,
            "mode": outcome.mode,
            "best": None if best is None else {"value": best.value, "trial": best.name, "run_id": best.run_id},
            "ended": time.strftime(TIME_FORMAT),
        },
    }


# ----------------------------------------------------------------------------- sweeper ls
@dataclass
class Execution:
    study: str
    execution: str
    path: str
    status: str
    status_detail: str = ""
    trials: dict[str, int] = field(default_factory=dict)
    """Trials by status (done, stopped, failed, running, pending, interrupted, not started)."""
    total: int | None = None
    metric: str | None = None
    mode: str | None = None
    best: dict[str, Any] | None = None
    """``{"value": 0.81, "trial": "#003", "run_id": "..."}`` or None."""
    started: str | None = None
    ended: str | None = None
    parent_run_id: str | None = None
    experiment_id: str | None = None
    tracking_uri: str | None = None
    counts_from: str = "state"
    """Where the trial counts come from: ``state`` (sweeper.json), ``mlflow`` or ``none``."""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def pid_alive(pid: int, proc_start: str | None = None) -> bool:
    """Process ``pid`` exists on this host (and, when ``proc_start`` is known, is the same process)."""
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    except (OSError, ValueError, TypeError):
        return False
    if proc_start is not None:
        now = _proc_start(int(pid))
        if now is not None and now != proc_start:
            return False  # the pid was reused by another process
    return True


def decide_status(state: Mapping[str, Any], host: str | None = None) -> tuple[str, str]:
    """(status, detail) of an execution from its ``sweeper.json``."""
    status = state.get("status")
    if status is None:
        return "unknown", "state written before statuses were recorded"
    if status != "running":
        return str(status), ""
    driver = state.get("driver") or {}
    host = host or socket.gethostname()
    if driver.get("host") and driver["host"] != host:
        return "running?", f"driver on {driver['host']} (pid {driver.get('pid')}): not checkable from {host}"
    if pid_alive(driver.get("pid"), driver.get("proc_start")):
        return "running", f"driver pid {driver.get('pid')}"
    return "interrupted", f"driver pid {driver.get('pid')} is gone"


def state_files(root: Path) -> list[Path]:
    """``sweeper.json`` files under ``root``: ``root/<study>/<execution>/`` (the default
    ``./runs``) and ``root/<execution>/`` (a ``--storage`` folder)."""
    found = set(root.glob(f"*/{STATE_FILE}")) | set(root.glob(f"*/*/{STATE_FILE}"))
    return sorted(found)


def scan(root: str | Path, study: str | None = None) -> list[tuple[Path, dict[str, Any]]]:
    """(execution folder, state) of every readable execution under ``root``; unreadable ones are skipped."""
    out = []
    for path in state_files(Path(root).expanduser()):
        try:
            state = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(state, dict) or "parent_run_id" not in state:
            continue
        if study is not None and state.get("study") != study:
            continue
        out.append((path.parent, state))
    return out


def from_state(exec_dir: Path, state: Mapping[str, Any], host: str | None = None) -> Execution:
    status, detail = decide_status(state, host)
    summary = state.get("summary") or {}
    ex = Execution(
        study=str(state.get("study", exec_dir.parent.name)),
        execution=str(state.get("execution", exec_dir.name)),
        path=str(exec_dir.resolve()),
        status=status,
        status_detail=detail,
        started=state.get("created"),
        parent_run_id=state.get("parent_run_id"),
        experiment_id=state.get("experiment_id"),
        tracking_uri=state.get("tracking_uri"),
        metric=state.get("metric"),
        mode=state.get("mode"),
        total=state.get("total"),
    )
    fresh = summary and str(summary.get("ended", "")) >= str(state.get("started_at", ""))
    if fresh and status != "running":  # a summary older than the last (re)start is stale
        ex.trials = {k: int(v) for k, v in (summary.get("trials") or {}).items()}
        ex.total, ex.best, ex.ended = summary.get("total", ex.total), summary.get("best"), summary.get("ended")
        ex.metric, ex.mode = summary.get("metric", ex.metric), summary.get("mode", ex.mode)
    else:
        ex.counts_from = "none"
    return ex


def _store_uri(stored: str | None, given: str | None) -> str | None:
    """The usable URI of a stored (password-free) one: itself, or ``given`` /
    ``$MLFLOW_TRACKING_URI`` when they redact to it; None when no password is known or
    the SQLite file is not there (reading would create an empty store)."""
    from . import tracking

    if not stored:
        return None
    uri = stored
    if "***" in stored:
        uri = next((c for c in (given, os.environ.get("MLFLOW_TRACKING_URI")) if c and tracking.redact_uri(c) == stored), None)
        if uri is None:
            return None
    db = tracking.sqlite_path(uri)
    if db is not None and not db.is_file():
        return None
    return uri


_MLFLOW_TRIAL_STATUS = {"RUNNING": "running", "SCHEDULED": "pending", "FINISHED": "done", "FAILED": "failed",
                        "KILLED": "interrupted"}


def fill_from_mlflow(executions: list[Execution], tracking_uri: str | None = None) -> None:
    """Trial counts (and the best value so far) of the executions without a summary: one
    batched search of their child runs per tracking store. A store that cannot be read
    leaves them as they are."""
    need = [e for e in executions if e.counts_from == "none" and e.parent_run_id and e.experiment_id]
    by_uri: dict[str, list[Execution]] = {}
    for e in need:
        uri = _store_uri(e.tracking_uri, tracking_uri)
        if uri is not None:
            by_uri.setdefault(uri, []).append(e)
    if not by_uri:
        return
    from . import tracking

    for uri, group in by_uri.items():
        try:
            tracker = tracking.Tracker(uri)
            exps = sorted({str(e.experiment_id) for e in group})
            runs = tracker.search(exps, f"tags.`{tracking.TAG_ROLE}` = 'trial'")
        except Exception:  # the store is down, refuses, ...: ls still lists the states
            continue
        by_parent: dict[str, list[Any]] = {}
        for r in runs:
            by_parent.setdefault(r.data.tags.get(tracking.TAG_PARENT, ""), []).append(r)
        for e in group:
            children = by_parent.get(str(e.parent_run_id), [])
            counts: dict[str, int] = {}
            for r in children:
                k = _MLFLOW_TRIAL_STATUS.get(r.info.status, r.info.status.lower())
                counts[k] = counts.get(k, 0) + 1
            e.trials, e.counts_from = counts, "mlflow"
            metric = e.metric
            if metric:
                vals = [(r.data.metrics.get(f"best/{metric}"), r) for r in children if r.info.status == "FINISHED"]
                vals = [(v, r) for v, r in vals if v is not None]
                if vals:
                    v, r = (min if e.mode == "min" else max)(vals, key=lambda x: x[0])
                    index = r.data.tags.get(tracking.TAG_TRIAL_INDEX)
                    name = f"#{int(index):03d}" if str(index).isdigit() else r.data.tags.get(tracking.TAG_TRIAL_ID)
                    e.best = {"value": v, "trial": name, "run_id": r.info.run_id}


def list_executions(root: str | Path, study: str | None = None, *, mlflow: bool = True,
                    tracking_uri: str | None = None) -> list[Execution]:
    """The executions under ``root`` (oldest first), their status decided, counts filled in."""
    host = socket.gethostname()
    out = [from_state(exec_dir, state, host) for exec_dir, state in scan(root, study)]
    if mlflow:
        fill_from_mlflow(out, tracking_uri)
    out.sort(key=lambda e: (e.started or "", e.study, e.execution))
    return out


TRIALS_HEADER = "trials done/failed/running"


def trials_text(e: Execution) -> str:
    """``3/1/2 of 8``: done (incl. stopped early) / failed / running (incl. pending), of the
    study's size; ``?`` when not known (no summary and MLflow not read)."""
    t = e.trials
    if e.counts_from == "none":
        return "?" + (f" of {e.total}" if e.total else "")
    done = t.get("done", 0) + t.get("stopped", 0)
    text = f"{done}/{t.get('failed', 0)}/{t.get('running', 0) + t.get('pending', 0)}"
    return text + (f" of {e.total}" if e.total else "")


def table_rows(executions: Iterable[Execution]) -> tuple[list[str], list[list[str]]]:
    """Columns and rows of ``sweeper ls`` (numbers by :func:`sweeper.numbers.fmt_num`)."""
    from .numbers import fmt_num

    cols = ["study", "execution", "status", TRIALS_HEADER, "best", "started", "parent run"]
    rows = []
    for e in executions:
        best = ""
        if e.best and e.best.get("value") is not None:
            best = f"{fmt_num(float(e.best['value']))}" + (f" ({e.best['trial']})" if e.best.get("trial") else "")
        rows.append([e.study, e.execution, e.status, trials_text(e), best,
                     (e.started or "").replace("T", " "), e.parent_run_id or ""])
    return cols, rows
