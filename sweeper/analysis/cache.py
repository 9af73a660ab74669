"""A cache of an execution's run frame, beside its analysis outputs, checked with cheap probes.

``sweeper analyze`` of a 2,000-run study spends most of its MLflow time in the one paged
``search_runs`` that lists the children with their params, metrics and tags
(:func:`sweeper.analysis.runs.load_runs`). The frame is kept in ``<out>/.runs_cache.json``
(column by column with its dtype, so that it comes back equal; no pickle)
together with a *stamp* of the runs it came from: the parent run id, the tracking URI,
the sorted ``(run id, status, end time)`` triples (hashed), the latest start and end
times and the ids of the deleted children. A later call re-uses the frame only when
every probe below comes back empty, each a ``search_runs`` with ``max_results=1`` (or
over the few deleted runs) that the store answers from its indices:

* the children that started at or after the latest cached start are not exactly the
  cached ones that started then (a run was added, e.g. by ``--resume``);
* the same for the latest end time (a run finished, or was re-run and terminated again);
* a child whose status is ``RUNNING`` or ``SCHEDULED`` (still logging);
* the set of deleted children differs (a run was deleted or restored).

A frame that held an unfinished run is never re-used. Anything unreadable (another
version's file, a truncated file) is treated as a miss and overwritten. What the probes
cannot see: values logged into an already-ended run *without* terminating it again (MLflow
sets ``end_time`` at ``set_terminated``); delete the cache file (or pass ``cache=False``)
after such surgery.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

import pandas as pd

from .runs import _client, _search_all, children_filter, execution_attrs, resolve_execution, runs_to_frame

CACHE_FILE = ".runs_cache.json"
CACHE_VERSION = 1
_OPEN = ("RUNNING", "SCHEDULED")


def _ms(ts: Any) -> int | None:
    if ts is None or (isinstance(ts, float) and ts != ts) or ts is pd.NaT:
        return None
    return int(pd.Timestamp(ts).value // 1_000_000)


def _deleted_ids(client, exp: str, pid: str) -> list[str]:
    from mlflow.entities import ViewType

    runs = []
    token = None
    while True:
        page = client.search_runs([exp], filter_string=children_filter(pid), run_view_type=ViewType.DELETED_ONLY,
                                  max_results=1000, page_token=token)
        runs += [r.info.run_id for r in page]
        token = page.token
        if not token:
            return sorted(runs)


def stamp_of(df: pd.DataFrame, deleted: list[str]) -> dict[str, Any]:
    """What the cached frame was built from (module docstring)."""
    ids = [str(r) for r in df["run_id"]]
    starts = [_ms(t) for t in df["start_time"]]
    ends = [_ms(t) for t in df["end_time"]]
    triples = sorted(zip(ids, df["status"].astype(str), ends))
    max_start = max((t for t in starts if t is not None), default=0)
    max_end = max((t for t in ends if t is not None), default=0)
    return {
        "n": len(df),
        "runs": hashlib.sha256(repr(triples).encode()).hexdigest(),
        "max_start": max_start,
        "at_max_start": sorted(i for i, t in zip(ids, starts) if t == max_start),
        "max_end": max_end,
        "at_max_end": sorted(i for i, t in zip(ids, ends) if t == max_end),
        "open": bool(df["status"].isin(_OPEN).any()) if len(df) else False,
        "deleted": deleted,
    }


def _any(client, exp: str, filter_string: str) -> bool:
    return len(client.search_runs([exp], filter_string=filter_string, max_results=1)) > 0


def _same_at(client, exp: str, filter_string: str, ids: list[str]) -> bool:
    """The runs matching ``filter_string`` (a ``>=`` probe at the cached maximum) are exactly ``ids``."""
    found = client.search_runs([exp], filter_string=filter_string, max_results=len(ids) + 1)
    return sorted(r.info.run_id for r in found) == sorted(ids)


def unchanged(client, exp: str, pid: str, stamp: dict[str, Any]) -> bool:
    """True when no probe (module docstring) sees a change since ``stamp``."""
    if stamp.get("open"):
        return False
    base = children_filter(pid)
    if not _same_at(client, exp, f"{base} and attributes.start_time >= {int(stamp['max_start'])}",
                    stamp["at_max_start"] if stamp["n"] else []):
        return False
    if not _same_at(client, exp, f"{base} and attributes.end_time >= {int(stamp['max_end'])}",
                    stamp["at_max_end"] if stamp["n"] else []):
        return False
    for status in _OPEN:
        if _any(client, exp, f"{base} and attributes.status = '{status}'"):
            return False
    return _deleted_ids(client, exp, pid) == list(stamp.get("deleted", []))


def _plain(v: Any) -> Any:
    """A JSON value for one cell (numpy scalars to Python; NaN stays NaN, which ``json`` writes)."""
    if hasattr(v, "item") and not isinstance(v, (str, bytes)):
        return v.item()
    return v


def frame_to_json(df: pd.DataFrame) -> dict[str, Any]:
    """The frame column by column with its dtype; timestamps as epoch milliseconds."""
    cols = []
    for c in df.columns:
        col = df[c]
        dtype = str(col.dtype)
        if dtype.startswith("datetime64"):
            values = [None if pd.isna(t) else _ms(t) for t in col]
        else:
            values = [_plain(v) for v in col.tolist()]
        cols.append({"name": c, "dtype": dtype, "values": values})
    return {"columns": cols, "n": len(df)}


def frame_from_json(data: dict[str, Any]) -> pd.DataFrame:
    out = {}
    for col in data["columns"]:
        dtype, values = col["dtype"], col["values"]
        if dtype.startswith("datetime64"):
            out[col["name"]] = pd.to_datetime(pd.Series(values, dtype="float64"), unit="ms", utc=True)
        elif dtype == "object":
            out[col["name"]] = pd.Series(values, dtype=object)
        else:
            out[col["name"]] = pd.Series([math.nan if v is None else v for v in values]
                                         if dtype.startswith("float") else values, dtype=dtype)
    return pd.DataFrame(out, index=pd.RangeIndex(int(data["n"])))


def _probe(client, exp: str, pid: str, stamp: dict[str, Any]) -> bool:
    """:func:`unchanged`, a store that cannot answer a probe (or a malformed stamp) counting as changed."""
    try:
        return unchanged(client, exp, pid, stamp)
    except Exception:
        return False


def _read(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) and data.get("version") == CACHE_VERSION else None
    except Exception:  # missing, truncated, another version: a miss
        return None


def load_runs_cached(tracking_uri: str | None, ref: str, cache_dir: str | Path | None = None, *,
                     cache: bool = True) -> pd.DataFrame:
    """:func:`sweeper.analysis.runs.load_runs` of ``ref``, served from ``<cache_dir>/.runs_cache.json`` when unchanged.

    ``cache_dir`` defaults to ``runs/<study>/analysis`` (where ``sweeper analyze`` writes).
    ``df.attrs["cache"]`` says ``"hit"`` or ``"miss"``.
    """
    client = _client(tracking_uri)
    parent, study = resolve_execution(client, tracking_uri, ref)
    pid, exp = parent.info.run_id, parent.info.experiment_id
    attrs = execution_attrs(parent, study, tracking_uri)
    folder = Path(cache_dir) if cache_dir is not None else Path("runs") / str(attrs["study"] or pid) / "analysis"
    path = folder / CACHE_FILE
    if cache:
        data = _read(path)
        if (data is not None and data.get("parent_run_id") == pid and data.get("tracking_uri") == tracking_uri
                and _probe(client, exp, pid, data["stamp"])):
            try:
                df = frame_from_json(data["frame"])
            except Exception:  # a file this version cannot read back: a miss
                df = None
            if df is not None:
                df.attrs.update(attrs, cache="hit")
                return df
    df = runs_to_frame(_search_all(client, [exp], children_filter(pid)))
    df.attrs.update(attrs, cache="miss")
    if cache:
        folder.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"version": CACHE_VERSION, "parent_run_id": pid, "tracking_uri": tracking_uri,
                                   "stamp": stamp_of(df, _deleted_ids(client, exp, pid)),
                                   "frame": frame_to_json(df)}))
        tmp.replace(path)
    return df
