"""Live view of a running study (rich) and the final leaderboard.

Ray Tune pickles its ``RunConfig`` (callbacks included) into the experiment folder so
that a study can be restored. The callback given to Tune is therefore a stateless
proxy, :class:`LiveCallback`, that forwards every event to the :class:`LiveView`
registered in the current driver process (:func:`attach`). A restored study gets a
fresh view without unpickling any console or thread.

On a terminal the view is a ``rich.live.Live`` table refreshed a few times a second;
elsewhere (CI logs, pytest) it prints one line per trial state change.

The view's cost per event and per refresh does not grow with the trials done (issue 20):
the status counts and the best trial are tallied as rows change (:meth:`Row.__setattr__`
tells the view), and a refresh draws the active rows, the latest failures and the best
finished trials, never a sort of every row.
"""

from __future__ import annotations

import json
import math
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from rich.console import Console, Group
from rich.live import Live
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from .numbers import fmt_num

try:  # the proxy must subclass Tune's Callback; keep the module importable without Ray
    from ray.tune import Callback as _TuneCallback
except Exception:  # pragma: no cover
    _TuneCallback = object  # type: ignore[assignment,misc]

STATUS_STYLE = {
    "pending": "dim",
    "running": "cyan",
    "done": "green",
    "stopped": "yellow",
    "interrupted": "yellow",
    "failed": "bold red",
    "retrying": "magenta",
    "paused": "yellow",
}


def trial_point(config: dict) -> tuple[int | None, dict[str, Any]]:
    """(grid index or None, the dotted overrides) of a Tune trial config."""
    point = config.get("point") if isinstance(config, dict) else None
    if isinstance(point, dict):
        return point.get("index"), dict(point.get("overrides") or {})
    return None, {k: v for k, v in (config or {}).items() if k != "point"}


def short(v: Any, n: int = 28) -> str:
    if isinstance(v, float):
        s = fmt_num(v)
    elif isinstance(v, (dict, list)):
        s = json.dumps(v, separators=(",", ":"), default=str)
    else:
        s = str(v)
    return s if len(s) <= n else s[: n - 1] + "…"


def fmt_metric(v: float | None) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "—"
    return fmt_num(v)


def error_from_file(path: str | None) -> str | None:
    """The one-line error of a Tune trial from its error file (last 'Type: message' line)."""
    if not path:
        return None
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return None
    return error_line_of_traceback(text)


def error_line_of_traceback(text: str) -> str:
    from .tracking import redact

    lines = [ln.rstrip() for ln in text.splitlines() if ln.strip()]
    if not lines:
        return "error"
    from .errors import worker_death_line

    died = worker_death_line(text)  # the worker process died: not its "ip: ..." detail line
    if died is not None:
        return redact(died)
    # Ray prefixes/wraps; the original exception is the last line shaped "Name: message"
    for ln in reversed(lines):
        s = ln.strip()
        head = s.split(":", 1)[0]
        if ":" in s and head and " " not in head and not s.startswith(("File ", "ray::")):
            # "dmlcore.data.base.DataError: ..." -> "DataError: ..." (as in the MLflow tag)
            name, rest = s.split("\x1b")[0].split(":", 1)
            return redact(f"{name.rsplit('.', 1)[-1]}:{rest}")
    return redact(lines[-1].strip())


@dataclass
class Row:
    trial_id: str
    index: int | None
    overrides: dict[str, Any]
    status: str = "pending"
    epoch: int | None = None
    value: float | None = None
    best: float | None = None
    error: str | None = None
    last_result: dict[str, Any] = field(default_factory=dict)
    path: str | None = None
    view: "LiveView | None" = field(default=None, repr=False, compare=False)
    """The view tallying this row: told of every change of ``status`` and ``best``."""

    def __setattr__(self, name: str, value: Any) -> None:
        view = self.__dict__.get("view")
        if view is None or name not in ("status", "best"):
            object.__setattr__(self, name, value)
            return
        old = self.__dict__.get(name)
        object.__setattr__(self, name, value)
        if old != value:
            view._changed(self, name, old)

    @property
    def name(self) -> str:
        return f"#{self.index:03d}" if self.index is not None else self.trial_id


class LiveView:
    """The driver-side state of a study run: one :class:`Row` per Tune trial."""

    def __init__(
        self,
        metric: str,
        mode: str,
        keys: list[str],
        total: int,
        console: Console | None = None,
        live: bool | None = None,
        title: str = "",
        max_rows: int = 25,
        request: dict[str, float] | None = None,
    ):
        self.metric, self.mode, self.keys, self.total = metric, mode, list(keys), total
        self.console = console or Console()
        self.live_enabled = self.console.is_terminal if live is None else live
        self.title = title
        self.max_rows = max_rows
        self.rows: dict[str, Row] = {}
        self.lock = threading.Lock()
        self._live: Live | None = None
        self._last_draw = 0.0
        self.start_time = time.time()
        self.ended = False
        self.request = dict(request or {})
        """What each trial asks Ray for (``{"CPU": 1, "GPU": 0.25}``): named when trials wait."""
        self._pending_since: float | None = None
        self._pending_said = False
        # tallies kept as rows change (Row.__setattr__ -> _changed): O(1) per event
        self._tally: dict[str, int] = {}
        self._active: dict[str, Row] = {}
        """Rows not finished (pending, running, retrying, paused): drawn every refresh."""
        self._failed: dict[str, Row] = {}
        """Failed rows in the order they failed (the latest are drawn)."""
        self._top: list[Row] = []
        """The best finished rows (at most ``max_rows``), best first."""
        self._best: Row | None = None

    # --- lifecycle
    def __enter__(self) -> "LiveView":
        attach(self)
        if self.live_enabled:
            self._live = Live(self.render(), console=self.console, refresh_per_second=4, transient=False)
            self._live.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        detach(self)
        if self._live is not None:
            self._live.update(self.render())
            self._live.__exit__(*exc)
            self._live = None

    # --- metric helpers
    def better(self, a: float | None, b: float | None) -> bool:
        if a is None or not math.isfinite(a):
            return False
        if b is None or not math.isfinite(b):
            return True
        return a > b if self.mode == "max" else a < b

    def row_for(self, trial: Any) -> Row:
        tid = str(trial.trial_id)
        row = self.rows.get(tid)
        if row is None:
            index, over = trial_point(getattr(trial, "config", {}) or {})
            row = Row(tid, index, over)
            self.rows[tid] = row
            self._tally[row.status] = self._tally.get(row.status, 0) + 1
            self._active[tid] = row
            row.view = self
        return row

    _FINISHED = ("done", "stopped")

    def _changed(self, row: Row, name: str, old: Any) -> None:
        """``row.status`` or ``row.best`` changed from ``old``: update the tallies."""
        if name == "status":
            self._tally[old] = self._tally.get(old, 0) - 1
            self._tally[row.status] = self._tally.get(row.status, 0) + 1
            if row.status in self._FINISHED or row.status == "failed":
                self._active.pop(row.trial_id, None)
            else:
                self._active[row.trial_id] = row
            if row.status == "failed":
                self._failed.pop(row.trial_id, None)
                self._failed[row.trial_id] = row
            elif old == "failed":
                self._failed.pop(row.trial_id, None)
        if any(r is row for r in self._top):
            if row.status not in self._FINISHED or name == "best":
                self._rebuild_top()  # a drawn finished row changed (a retry): rare, O(rows)
        elif row.status in self._FINISHED and row.best is not None:
            self._insert_top(row)
        if name == "best":
            if self.better(row.best, self._best.best if self._best is not None else None):
                self._best = row
            elif row is self._best:  # its best got worse (a trial that started over): rare
                self._best = None
                for r in self.rows.values():
                    if r.best is not None and (self._best is None or self.better(r.best, self._best.best)):
                        self._best = r

    def _rebuild_top(self) -> None:
        self._top = []
        for r in self.rows.values():
            if r.status in self._FINISHED and r.best is not None:
                self._insert_top(r)

    def _insert_top(self, row: Row) -> None:
        at = len(self._top)
        for i, r in enumerate(self._top):
            if self.better(row.best, r.best):
                at = i
                break
        if at < self.max_rows:
            self._top.insert(at, row)
            del self._top[self.max_rows:]

    # --- events (from LiveCallback)
    def sync(self, trials: Iterable[Any]) -> None:
        with self.lock:
            for t in trials:
                st = str(getattr(t, "status", "PENDING"))
                known = self.rows.get(str(t.trial_id))
                if known is not None and st in ("TERMINATED", "ERROR") and known.status in ("done", "stopped", "failed") \
                        and known.last_result:
                    continue  # finished and recorded: nothing to update
                row = self.row_for(t)
                if row.path is None:
                    row.path = getattr(t, "path", None) or getattr(t, "local_path", None)
                if st == "PENDING" and row.status in ("failed", "retrying"):
                    continue
                if st in ("RUNNING",) and row.status != "running":
                    row.status = "running"
                elif st == "PENDING" and row.status not in ("pending",):
                    row.status = "pending"
                elif st == "PAUSED":
                    row.status = "paused"
                elif st == "TERMINATED" and row.status not in ("done", "stopped"):
                    self._complete(row, t)
                elif st == "ERROR" and row.status != "failed":
                    self._fail(row, t)
                if not row.last_result:
                    lr = getattr(t, "last_result", None) or {}
                    if lr:
                        self._result(row, lr)
        self.draw()

    def on_start(self, trial: Any) -> None:
        with self.lock:
            row = self.row_for(trial)
            row.status = "running"
            row.error = None
        self.log(row, "started")
        self.draw()

    def on_result(self, trial: Any, result: dict) -> None:
        with self.lock:
            row = self.row_for(trial)
            row.status = "running"
            self._result(row, result)
        self.draw()

    def on_complete(self, trial: Any) -> None:
        with self.lock:
            row = self.row_for(trial)
            self._complete(row, trial)
        self.log(row, row.status)
        self.draw(force=True)

    def on_error(self, trial: Any) -> None:
        with self.lock:
            row = self.row_for(trial)
            self._fail(row, trial)
        self.log(row, "failed")
        self.draw(force=True)

    def on_recover(self, trial: Any) -> None:
        with self.lock:
            row = self.row_for(trial)
            row.status = "retrying"
            row.error = error_from_file(getattr(trial, "error_file", None))
        self.log(row, "retrying")
        self.draw(force=True)

    def on_end(self, trials: Iterable[Any]) -> None:
        self.sync(trials)
        self.ended = True

    # --- internals
    def _result(self, row: Row, result: dict) -> None:
        row.last_result = dict(result)
        ep = result.get("epoch")
        if isinstance(ep, (int, float)):
            row.epoch = int(ep)
        v = result.get(self.metric)
        if isinstance(v, (int, float)) and math.isfinite(v):
            row.value = float(v)
            if self.better(row.value, row.best):
                row.best = row.value
        b = result.get(f"best/{self.metric}")
        if isinstance(b, (int, float)) and math.isfinite(b):
            row.best = float(b)

    def _complete(self, row: Row, trial: Any) -> None:
        lr = getattr(trial, "last_result", None) or {}
        if lr:
            self._result(row, lr)
        # the trainer's last report carries best_epoch; a trial stopped early (ASHA) lacks it
        row.status = "done" if (not lr or "best_epoch" in lr) else "stopped"

    def _fail(self, row: Row, trial: Any) -> None:
        row.status = "failed"
        row.error = error_from_file(getattr(trial, "error_file", None)) or row.error or "error"

    def counts(self) -> dict[str, int]:
        out = {k: 0 for k in ("pending", "running", "done", "stopped", "failed")}
        for status, n in self._tally.items():
            key = "running" if status in ("retrying", "paused") else status
            out[key] = out.get(key, 0) + n
        out["pending"] += max(0, self.total - len(self.rows))
        return out

    def best_row(self) -> Row | None:
        return self._best

    # --- trials that do not start
    def watch_pending(self, trials: Iterable[Any], now: float | None = None) -> str | None:
        """Once trials have all stayed PENDING for :data:`PENDING_WARN_S` (none running),
        print why (what each asks, what Ray has free) once; returns that line."""
        statuses = [getattr(t, "status", "") for t in trials]
        if self._pending_said or "PENDING" not in statuses or "RUNNING" in statuses:
            self._pending_since = None
            return None
        now = time.time() if now is None else now
        if self._pending_since is None:
            self._pending_since = now
            return None
        if now - self._pending_since < PENDING_WARN_S:
            return None
        self._pending_said = True
        line = pending_reason(self.request, *_ray_resources(), waited=now - self._pending_since)
        self.console.print(f"[yellow]waiting:[/] {escape(line)}", highlight=False, soft_wrap=True)
        return line

    # --- output
    def log(self, row: Row, what: str) -> None:
        if self.live_enabled:
            return
        c = self.counts()
        done = c["done"] + c["stopped"] + c["failed"]
        style = STATUS_STYLE.get(row.status, "")
        extra = ""
        if what in ("done", "stopped") and row.best is not None:
            extra = f"  {self.metric}={fmt_metric(row.best)}"
        if what in ("failed", "retrying") and row.error:
            extra = f"  {row.error}"
        label = ", ".join(f"{k}={short(v)}" for k, v in row.overrides.items())
        self.console.print(
            f"[{done}/{self.total}] [{style}]{what:8s}[/] {row.name} {escape(label)}{escape(extra)}",
            highlight=False,
            soft_wrap=True,
        )

    def draw(self, force: bool = False) -> None:
        if self._live is None:
            return
        now = time.time()
        if not force and now - self._last_draw < 0.2:
            return
        self._last_draw = now
        self._live.update(self.render())

    def render(self) -> Any:
        # what is drawn: the active rows, the latest failures, the best finished rows, so a
        # refresh costs O(active + max_rows) whatever the number of trials done
        with self.lock:
            active = list(self._active.values())
            failed = list(self._failed.values())[-self.max_rows:]
            top = list(self._top)
        order = {"running": 0, "retrying": 0, "paused": 1, "pending": 4}
        active.sort(key=lambda r: (order.get(r.status, 5), r.index if r.index is not None else 0, r.trial_id))
        now = [r for r in active if r.status != "pending"]
        waiting = [r for r in active if r.status == "pending"]
        shown = (now + failed + top + waiting)[: self.max_rows]
        table = Table(title=self.title or None, expand=False, show_lines=False)
        table.add_column("trial", no_wrap=True)
        for k in self.keys:
            table.add_column(k, overflow="fold")
        table.add_column("status", no_wrap=True)
        table.add_column("epoch", justify="right")
        table.add_column(self.metric, justify="right")
        table.add_column("best", justify="right")
        if any(r.error for r in shown):
            table.add_column("error", style="red", overflow="ellipsis", no_wrap=True, max_width=60)
        for r in shown:
            st = Text(r.status, style=STATUS_STYLE.get(r.status, ""))
            cells = [r.name] + [short(r.overrides.get(k, "")) for k in self.keys]
            cells += [st, "" if r.epoch is None else str(r.epoch), fmt_metric(r.value), fmt_metric(r.best)]
            if any(x.error for x in shown):
                cells.append(r.error or "")
            table.add_row(*cells)
        c = self.counts()
        best = self.best_row()
        elapsed = time.time() - self.start_time
        summary = Text.assemble(
            (f"{self.total} trials  ", "bold"),
            (f"pending {c['pending']}  ", STATUS_STYLE["pending"]),
            (f"running {c['running']}  ", STATUS_STYLE["running"]),
            (f"done {c['done']}  ", STATUS_STYLE["done"]),
            (f"stopped {c['stopped']}  ", STATUS_STYLE["stopped"]) if c["stopped"] else ("", ""),
            (f"failed {c['failed']}  ", STATUS_STYLE["failed"]),
            (f"best {self.metric} {fmt_metric(best.best)} ({best.name})  " if best else "", "bold green"),
            (f"{elapsed:.0f}s", "dim"),
        )
        more = len(self.rows) - len(shown)
        parts: list[Any] = [table, summary]
        if more > 0:
            parts.insert(1, Text(f"… {more} more trials", style="dim"))
        return Group(*parts)


# ----------------------------------------------------------------------------- pending trials
PENDING_WARN_S = 60.0
"""Trials all PENDING this long (none running) get a line saying why."""


def _ray_resources() -> tuple[dict[str, float], dict[str, float]]:
    """(available, total) resources of the Ray cluster this driver uses ({} without Ray)."""
    import sys

    ray = sys.modules.get("ray")
    try:
        if ray is not None and ray.is_initialized():
            return dict(ray.available_resources()), dict(ray.cluster_resources())
    except Exception:
        pass
    return {}, {}


def pending_reason(request: dict[str, float], available: dict[str, float], total: dict[str, float],
                   waited: float) -> str:
    """Why no trial starts: what each asks against what Ray has free (Tune's own
    "insufficient resources" warning, which the sweeper keeps quiet, said in one line)."""
    def fmt(d: dict[str, float], k: str) -> str:
        return f"{d.get(k, 0):g}"

    asks = ", ".join(f"{k}={v:g}" for k, v in request.items() if v) or "nothing"
    short_of = [k for k, v in request.items() if v and available.get(k, 0) < v]
    have = ", ".join(f"{k} {fmt(available, k)} free of {fmt(total, k)}" for k in (request or {"CPU": 0}))
    why = (f"not enough {' and '.join(short_of)} free" if short_of
           else "Ray has not placed them yet (other jobs or placement groups may hold the resources)")
    return f"no trial has started for {waited:.0f} s: each asks {asks}; Ray has {have}; {why}"


# ----------------------------------------------------------------------------- proxy
_CURRENT: list[LiveView] = []


def attach(view: LiveView) -> None:
    _CURRENT.append(view)


def detach(view: LiveView) -> None:
    if view in _CURRENT:
        _CURRENT.remove(view)


def current() -> LiveView | None:
    return _CURRENT[-1] if _CURRENT else None


class LiveCallback(_TuneCallback):  # type: ignore[misc,valid-type]
    """Stateless Tune callback forwarding events to the attached :class:`LiveView`."""

    def _view(self) -> LiveView | None:
        return current()

    def setup(self, stop=None, num_samples=None, total_num_samples=None, **info):
        v = self._view()
        if v is not None and total_num_samples and total_num_samples > 0:
            v.total = max(v.total, int(total_num_samples))

    SYNC_S = 1.0
    """Seconds between two sweeps of every trial (a safety net: the events keep the rows
    current); each sweep is O(trials), so it is paced by time, not run every step."""

    def on_step_end(self, iteration, trials, **info):
        v = self._view()
        if v is None:
            return
        now = time.monotonic()
        if now - getattr(v, "_last_sweep", 0.0) < (self.SYNC_S if v._live is not None else 10 * self.SYNC_S):
            return
        v._last_sweep = now
        v.sync(trials)
        v.watch_pending(trials)

    def on_trial_start(self, iteration, trials, trial, **info):
        if (v := self._view()) is not None:
            v.on_start(trial)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if (v := self._view()) is not None:
            v.on_result(trial, result)

    def on_trial_complete(self, iteration, trials, trial, **info):
        if (v := self._view()) is not None:
            v.on_complete(trial)

    def on_trial_error(self, iteration, trials, trial, **info):
        if (v := self._view()) is not None:
            v.on_error(trial)

    def on_trial_recover(self, iteration, trials, trial, **info):
        if (v := self._view()) is not None:
            v.on_recover(trial)

    def on_experiment_end(self, trials, **info):
        if (v := self._view()) is not None:
            v.on_end(trials)


# ----------------------------------------------------------------------------- leaderboard
def leaderboard_table(outcome: Any, limit: int = 50) -> Table:
    """Finished trials sorted by the study metric (best first)."""
    metric = outcome.metric
    rows = outcome.ranked()
    keys = outcome.keys
    table = Table(title=f"Leaderboard: {outcome.study} ({outcome.execution})", title_justify="left")
    table.add_column("rank", justify="right")
    table.add_column("trial", no_wrap=True)
    for k in keys:
        table.add_column(k, overflow="fold")
    table.add_column(metric, justify="right", style="bold", no_wrap=True)
    table.add_column("best epoch", justify="right")
    table.add_column("status")
    for i, t in enumerate(rows[:limit], 1):
        table.add_row(
            str(i), t.name, *[short(t.overrides.get(k, "")) for k in keys],
            fmt_metric(t.value), "" if t.best_epoch is None else str(t.best_epoch),
            Text(t.status, style=STATUS_STYLE.get(t.status, "")),
        )
    return table


def failures_table(outcome: Any) -> Table | None:
    failed = [t for t in outcome.trials if t.status == "failed"]
    if not failed:
        return None
    table = Table(title=f"Failed trials ({len(failed)})", title_justify="left", title_style="bold red")
    table.add_column("trial", no_wrap=True)
    table.add_column("config", overflow="fold")
    table.add_column("error", overflow="fold", style="red")
    for t in failed:
        label = ", ".join(f"{k}={short(v)}" for k, v in t.overrides.items())
        table.add_row(t.name, label, t.error or "error")
    return table
