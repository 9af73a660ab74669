"""Per-epoch metric histories from MLflow and the "as published" values built from them.

The platform's ``best/<split>/<metric>`` values are all taken at ONE epoch, the one selected
on the validation split (``eval.select_on``). The tables of Roth et al. 2020 were made
differently: for every test metric separately, the best value over all training epochs
(``np.nanmax`` over the epochs of the logged test metric, R: Result_Evaluations.py:35-67),
so Recall@1 and NMI of one run may come from different epochs, both chosen on the test set.
:func:`as_published_frame` rebuilds the ``best/...`` columns that way. It is optimistic by
construction (a per-metric oracle on the test set) and is only ever shown next to the
selected values, labelled as such.

Histories are read with one query per metric key for all runs at once where the store
allows it (``SqlAlchemyStore.get_metric_history_bulk``), else once per run and key.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from .base import metric_col, strip_prefix

# The metric whose test argmax places the non-test metrics (train embedding-space metrics):
# the reference checkpoints and reads them at its storage metric, e_recall@1 (R: parameters.py:40).
ANCHOR = "test/recall_at_1"
_CHUNK = 500  # run ids per bulk query (keeps the SQL IN list small)
_MAX_RESULTS = 10_000_000

History = dict[str, dict[str, dict[int, float]]]  # run_id -> key -> step -> value


def history_key(metric: str) -> str | None:
    """The per-epoch key behind a ``best/`` metric (``best/test/nmi`` -> ``test/nmi``); None otherwise."""
    m = strip_prefix(metric)
    return m[len("best/"):] if m.startswith("best/") else None


def _store(client) -> Any:
    tc = getattr(client, "_tracking_client", None)
    return getattr(tc, "store", None)


def metric_histories(tracking_uri: str | None, run_ids: Sequence[str], keys: Sequence[str]) -> History:
    """``run_id -> key -> step -> value`` for ``keys`` of ``run_ids`` (last value logged per step)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    store = _store(client)
    out: History = {r: {} for r in run_ids}
    bulk = getattr(store, "get_metric_history_bulk", None)
    for key in dict.fromkeys(keys):
        if bulk is not None:
            for i in range(0, len(run_ids), _CHUNK):
                for item in bulk(list(run_ids[i : i + _CHUNK]), key, _MAX_RESULTS):
                    # MetricWithRunId (mlflow.entities.metric): a Metric with its run_id
                    out.setdefault(item.run_id, {}).setdefault(key, {})[int(item.step)] = float(item.value)
        else:
            for r in run_ids:
                for m in client.get_metric_history(r, key):
                    out[r].setdefault(key, {})[int(m.step)] = float(m.value)
    return out


def _best_step(series: Mapping[int, float], lower: bool) -> int | None:
    steps = [s for s, v in series.items() if math.isfinite(v)]
    if not steps:
        return None
    pick = min if lower else max
    target = pick(series[s] for s in steps)
    return min(s for s in steps if series[s] == target)  # the first epoch reaching it


def as_published_values(history: Mapping[str, Mapping[int, float]], metrics: Sequence[str], lower_is_better: Sequence[str] = ()) -> dict[str, float]:
    """One run's as-published values: ``best/test/*`` = best over epochs per metric (max, or min
    for ``lower_is_better``); other ``best/*`` (train embedding metrics) = at the epoch of the
    best ``test/recall_at_1``, as the reference reads them. Missing history: NaN."""
    lower = {strip_prefix(m) for m in lower_is_better}
    anchor = _best_step(history.get(ANCHOR, {}), lower=False)
    out: dict[str, float] = {}
    for m in metrics:
        key = history_key(m)
        series = history.get(key, {}) if key else {}
        if key is None:
            continue
        if key.startswith("test/"):
            step = _best_step(series, strip_prefix(m) in lower)
        else:
            step = anchor if anchor in series else None
        out[m] = series[step] if step is not None else math.nan
    return out


def as_published_frame(runs: pd.DataFrame, metrics: Sequence[str], lower_is_better: Sequence[str] = (), history: History | None = None) -> pd.DataFrame:
    """A copy of ``runs`` whose ``metrics.best/...`` columns hold the as-published values.

    ``history`` defaults to reading the runs' histories from ``runs.attrs['tracking_uri']``
    (set by :func:`~sweeper.analysis.runs.load_runs`); a ValueError says when there is none.
    """
    keys = [k for k in (history_key(m) for m in metrics) if k]
    if not keys:
        return runs.copy()
    if history is None:
        if "tracking_uri" not in runs.attrs or "run_id" not in runs.columns:
            raise ValueError("the runs were not loaded from MLflow (no tracking URI): no per-epoch history to read")
        ids = [str(r) for r in runs["run_id"]]
        history = metric_histories(runs.attrs["tracking_uri"], ids, [*keys, ANCHOR])
    out = runs.copy()
    for m in metrics:
        if history_key(m) is None:
            continue
        out[metric_col(m)] = np.nan
    for idx, rid in out["run_id"].items():
        vals = as_published_values(history.get(str(rid), {}), metrics, lower_is_better)
        for m, v in vals.items():
            out.at[idx, metric_col(m)] = v
    return out
