"""Load the trials of one study execution from MLflow into a DataFrame.

One row per child run of the execution's parent run, columns::

    run_id, run_name, status, experiment_id, start_time, end_time,
    params.<dotted key>   (typed back from MLflow's strings: int, float, bool, None; else str)
    metrics.<name>        (the latest logged value; ``best/...`` are the selected-epoch values)
    tags.<name>

Rows are ordered by start time. ``df.attrs`` holds ``parent_run_id``, ``study``, ``parent_params`` (the parent run's ``study.*`` and ``search.*`` params),
``experiment_id`` and ``tracking_uri``.
"""

from __future__ import annotations

import math
import re
from typing import Any

import pandas as pd

_HEX32 = re.compile(r"[0-9a-f]{32}")
_INT = re.compile(r"[+-]?\d+")
_PAGE = 1000


def parse_param(text: Any) -> Any:
    """MLflow stores params as strings; give back ints, floats, bools and None.

    ``"128"`` -> 128, ``"1e-05"`` -> 1e-05, ``"True"``/``"true"`` -> True,
    ``"None"``/``"null"`` -> None; anything else (``"margin"``, ``"[1, 2, 4, 8]"``)
    stays a string (lists stay strings so that they remain hashable group keys).
    """
    if not isinstance(text, str):
        return text
    s = text.strip()
    if s in ("None", "null", "~"):
        return None
    if s in ("True", "true"):
        return True
    if s in ("False", "false"):
        return False
    if "_" in s:  # float("1_000") parses, but such a param is a name
        return text
    if _INT.fullmatch(s):
        return int(s)
    try:
        f = float(s)
    except ValueError:
        return text
    # "nan"/"inf" spelled as words are more likely names than numbers, except the usual spellings
    if not math.isfinite(f) and s.lower().lstrip("+-") not in ("nan", "inf", "infinity"):
        return text
    return f


def _client(tracking_uri: str | None):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri)


def _quote(value: str) -> str:
    if "'" not in value:
        return f"'{value}'"
    if '"' not in value:
        return f'"{value}"'
    raise ValueError(f"cannot search for a value containing both quote characters: {value!r}")


def _search_all(client, experiment_ids: list[str], filter_string: str, order_by: list[str] | None = None) -> list:
    """Every run matching ``filter_string`` (follows MLflow's page tokens)."""
    runs: list = []
    token = None
    while True:
        page = client.search_runs(
            experiment_ids, filter_string=filter_string, max_results=_PAGE, order_by=order_by, page_token=token
        )
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def _experiment_ids(client) -> list[str]:
    ids: list[str] = []
    token = None
    while True:
        page = client.search_experiments(max_results=1000, page_token=token)
        ids.extend(e.experiment_id for e in page)
        token = page.token
        if not token:
            return ids


def find_parent_run(tracking_uri: str | None, study: str, experiment_ids: list[str] | None = None) -> str:
    """Run id of the latest execution (parent run) of ``study``.

    A parent run is a run tagged ``study=<name>`` without an ``mlflow.parentRunId`` tag;
    if only children carry the tag, the parent of the most recent child is taken.
    """
    client = _client(tracking_uri)
    ids = experiment_ids or _experiment_ids(client)
    runs = []
    for i in range(0, len(ids), 100):  # keep each query's experiment list small
        runs += _search_all(client, ids[i : i + 100], f"tags.study = {_quote(study)}")
    if not runs:
        raise ValueError(f"no MLflow run is tagged study={study!r} at {tracking_uri or 'the default tracking URI'}")
    runs.sort(key=lambda r: r.info.start_time or 0, reverse=True)
    for r in runs:
        if "mlflow.parentRunId" not in r.data.tags:
            return r.info.run_id
    return runs[0].data.tags["mlflow.parentRunId"]


def runs_to_frame(runs: list) -> pd.DataFrame:
    """MLflow ``Run`` objects to the analysis DataFrame (see the module docstring)."""
    rows = []
    for r in runs:
        info, data = r.info, r.data
        row: dict[str, Any] = {
            "run_id": info.run_id,
            "run_name": getattr(info, "run_name", None) or data.tags.get("mlflow.runName"),
            "status": info.status,
            "experiment_id": info.experiment_id,
            "start_time": info.start_time,
            "end_time": info.end_time,
        }
        row.update({f"params.{k}": parse_param(v) for k, v in data.params.items()})
        row.update({f"metrics.{k}": float(v) for k, v in data.metrics.items()})
        row.update({f"tags.{k}": v for k, v in data.tags.items()})
        rows.append(row)
    fixed = ["run_id", "run_name", "status", "experiment_id", "start_time", "end_time"]
    if not rows:
        return pd.DataFrame(columns=fixed)
    df = pd.DataFrame(rows)
    for c in ("start_time", "end_time"):
        df[c] = pd.to_datetime(df[c], unit="ms", utc=True)
    df = df.sort_values("start_time", kind="stable", na_position="last").reset_index(drop=True)
    groups = [sorted(c for c in df.columns if c.startswith(p)) for p in ("params.", "metrics.", "tags.")]
    return df[fixed + [c for g in groups for c in g]]


def load_runs(
    tracking_uri: str | None,
    ref: str | None = None,
    *,
    parent_run_id: str | None = None,
    study: str | None = None,
    experiment_ids: list[str] | None = None,
) -> pd.DataFrame:
    """The child runs (trials) of one study execution, one row each.

    ``ref`` is a parent run id (32 hex digits that name an existing run) or a study name
    (its latest execution is taken, see :func:`find_parent_run`); ``parent_run_id=`` and
    ``study=`` say which explicitly. ``experiment_ids`` narrows the study-name search.
    """
    client = _client(tracking_uri)
    parent, study = resolve_execution(client, tracking_uri, ref, parent_run_id=parent_run_id, study=study,
                                      experiment_ids=experiment_ids)
    parent_run_id, exp = parent.info.run_id, parent.info.experiment_id
    children = _search_all(client, [exp], children_filter(parent_run_id))
    df = runs_to_frame(children)
    df.attrs.update(execution_attrs(parent, study, tracking_uri))
    return df


def children_filter(parent_run_id: str) -> str:
    """The ``search_runs`` filter of an execution's child runs."""
    return f"tags.mlflow.parentRunId = {_quote(parent_run_id)}"


def execution_attrs(parent, study: str | None, tracking_uri: str | None) -> dict[str, Any]:
    """``df.attrs`` of the frame of an execution (module docstring)."""
    # the study's metric/mode and a search's space, as the sweeper logged them on the parent run
    keep = {k: v for k, v in parent.data.params.items() if k.startswith(("study.", "search."))}
    return dict(parent_run_id=parent.info.run_id, study=study or parent.data.tags.get("study"),
                experiment_id=parent.info.experiment_id, tracking_uri=tracking_uri, parent_params=keep)


def resolve_execution(client, tracking_uri: str | None, ref: str | None = None, *, parent_run_id: str | None = None,
                      study: str | None = None, experiment_ids: list[str] | None = None):
    """``(parent Run, study name or None)`` of the execution ``ref`` (or ``parent_run_id=`` / ``study=``) names.

    See :func:`load_runs` for how ``ref`` is read.
    """
    if sum(x is not None for x in (ref, parent_run_id, study)) != 1:
        raise ValueError("load_runs: give exactly one of a parent run id or a study name")
    if ref is not None:
        if _HEX32.fullmatch(ref):
            try:
                client.get_run(ref)
                parent_run_id = ref
            except Exception:  # not a run id after all: a study named like one
                study = ref
        else:
            study = ref
    if parent_run_id is None:
        parent_run_id = find_parent_run(tracking_uri, study, experiment_ids)
    try:
        return client.get_run(parent_run_id), study
    except Exception as err:
        raise ValueError(f"no parent run {parent_run_id!r} at {tracking_uri}: {type(err).__name__}") from None
