"""The aggregate's "as published" mode (each test metric at its own best epoch, as Roth et al.'s
tables, R: Result_Evaluations.py:35-67) next to the default validation-selected values, on a tiny
synthetic MLflow store; expected values computed here from the logged lists."""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
import pytest
from rich.console import Console

from sweeper.analysis import run_analyses
from sweeper.analysis import history as hist
from sweeper.analysis.runs import load_runs

# per run (seed): per-epoch values of epochs 1, 2, 3
RUNS = {
    0: {"val/recall_at_1": [0.9, 0.2, 0.3], "test/recall_at_1": [0.50, 0.70, 0.60],
        "test/nmi": [0.40, 0.45, 0.55], "train/rho_spectrum": [0.30, 0.20, 0.10]},
    1: {"val/recall_at_1": [0.1, 0.5, 0.2], "test/recall_at_1": [0.60, 0.80, 0.70],
        "test/nmi": [0.50, 0.52, 0.60], "train/rho_spectrum": [0.40, 0.35, 0.25]},
}
METRICS = ["best/test/recall_at_1", "best/test/nmi", "best/train/rho_spectrum"]


def _log_study(uri: str) -> None:
    """A parent run and one child per seed, logged as the platform logs them (step = epoch; the
    ``best/`` values at the val-selected epoch on the last step)."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    c = MlflowClient(tracking_uri=uri)
    exp = c.create_experiment("toy")
    parent = c.create_run(exp, tags={"study": "toy"}).info.run_id
    for seed, series in RUNS.items():
        rid = c.create_run(exp, tags={"study": "toy", "mlflow.parentRunId": parent, "role": "trial"}).info.run_id
        for k, v in {"loss.name": "roth_margin", "train.seed": seed, "eval.select_on": "val"}.items():
            c.log_param(rid, k, str(v))
        sel = int(np.argmax(series["val/recall_at_1"]))
        for e in range(3):
            ms = [Metric(k, vals[e], 0, e + 1) for k, vals in series.items()]
            if e == 2:
                ms += [Metric(f"best/{k}", vals[sel], 0, e + 1) for k, vals in series.items()]
            c.log_batch(rid, metrics=ms)
        c.set_terminated(rid)
    c.set_terminated(parent)


def _expected(mode: str) -> dict[str, float]:
    """Mean over the two seeds, written out: selected = every metric at the val argmax;
    as_published = test metrics at their own max, train metrics at the test R@1 argmax."""
    per_run = []
    for s in RUNS.values():
        if mode == "selected":
            e = int(np.argmax(s["val/recall_at_1"]))
            per_run.append({m: s[m[5:]][e] for m in METRICS})
        else:
            e = int(np.argmax(s["test/recall_at_1"]))
            per_run.append({"best/test/recall_at_1": max(s["test/recall_at_1"]), "best/test/nmi": max(s["test/nmi"]),
                            "best/train/rho_spectrum": s["train/rho_spectrum"][e]})
    return {m: float(np.mean([r[m] for r in per_run])) for m in METRICS}


def test_as_published_next_to_selected(mlflow_uri, tmp_path):
    _log_study(mlflow_uri)
    runs = load_runs(mlflow_uri, study="toy")
    assert len(runs) == 2
    spec = [{"aggregate": {"group_by": ["loss.name"], "metrics": METRICS, "modes": ["selected", "as_published"],
                           "lower_is_better": ["best/train/rho_spectrum"]}}, "report"]
    run_analyses("toy", spec, runs, tmp_path, Console(file=io.StringIO()), strict=True)
    sel = pd.read_csv(tmp_path / "aggregate.csv").iloc[0]
    pub = pd.read_csv(tmp_path / "aggregate_as_published.csv").iloc[0]
    for m, v in _expected("selected").items():
        assert sel[f"{m}:mean"] == pytest.approx(v), m
    for m, v in _expected("as_published").items():
        assert pub[f"{m}:mean"] == pytest.approx(v), m
    # seed 0: R@1 from epoch 2, NMI from epoch 3 (different epochs); selected: both from epoch 1
    one = hist.as_published_frame(runs, METRICS).set_index("params.train.seed")
    assert one.loc[0, "metrics.best/test/recall_at_1"] == pytest.approx(0.70)
    assert one.loc[0, "metrics.best/test/nmi"] == pytest.approx(0.55)
    assert runs.set_index("params.train.seed").loc[0, "metrics.best/test/nmi"] == pytest.approx(0.40)
    md = (tmp_path / "report.md").read_text()
    assert "as published (optimistic)" in md and "validation-selected epoch" in md
    assert md.index("validation-selected epoch") < md.index("Aggregate over seeds, as published (optimistic)")
    assert md.index("judge methods by the latter") < md.index("Aggregate over seeds (validation-selected epoch)")  # protocol note
    assert "optimistic" in (tmp_path / "aggregate_as_published.md").read_text()


def test_history_reads_bulk_and_per_run_alike(mlflow_uri, monkeypatch):
    _log_study(mlflow_uri)
    runs = load_runs(mlflow_uri, study="toy")
    ids, keys = list(runs["run_id"]), ["test/nmi", "test/recall_at_1"]
    bulk = hist.metric_histories(mlflow_uri, ids, keys)
    monkeypatch.setattr(hist, "_store", lambda client: None)  # a store without the bulk query
    assert hist.metric_histories(mlflow_uri, ids, keys) == bulk
    seed0 = runs.loc[runs["params.train.seed"] == 0, "run_id"].item()
    assert bulk[seed0]["test/nmi"] == {1: 0.40, 2: 0.45, 3: 0.55}


def test_modes_bad_input_and_no_history(tmp_path):
    runs = pd.DataFrame([{"run_id": "a", "status": "FINISHED", "params.train.seed": 0, "metrics.best/test/recall_at_1": 0.5}])
    with pytest.raises(ValueError, match="aggregate.modes: unknown mode 'published'"):
        run_analyses("x", [{"aggregate": {"modes": ["published"]}}], runs, tmp_path, strict=True)
    # a frame that did not come from MLflow: the selected table, and a note instead of the other
    run_analyses("x", [{"aggregate": {"modes": ["selected", "as_published"]}}, "report"], runs, tmp_path, strict=True)
    assert (tmp_path / "aggregate.csv").is_file() and not (tmp_path / "aggregate_as_published.csv").exists()
    assert "as-published table not computed" in (tmp_path / "report.md").read_text()
