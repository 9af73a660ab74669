"""A search's optimisation history and parameter importances, from a hand-made runs frame."""

from __future__ import annotations

import json

import matplotlib.image as mpimg
import numpy as np
import pandas as pd
import pytest

from sweeper.analysis import run_analyses

pytest.importorskip("optuna")

OBJ = "best/val/recall_at_1"
LRS = [1e-4, 3e-3, 5e-4, 8e-3, 2e-4, 1e-3, 6e-3, 4e-4, 2e-3, 9e-4]
DIMS = [16, 32, 16, 32, 32, 16, 32, 16, 16, 32]


def search_runs() -> pd.DataFrame:
    """10 trials whose objective is driven by log10(lr) alone (the embedding size adds nothing)."""
    rows = []
    for i, (lr, dim) in enumerate(zip(LRS, DIMS)):
        rows.append({"run_id": f"r{i}", "status": "FINISHED", "params.optim.lr": lr, "params.model.embed_dim": dim,
                     "params.train.seed": 0, f"metrics.{OBJ}": 0.9 + 0.1 * np.log10(lr)})
    rows.append({"run_id": "dead", "status": "FAILED", "params.optim.lr": 1e-2, "params.model.embed_dim": 16})
    df = pd.DataFrame(rows)
    # as the sweeper logs them on the parent run (tracking.stringify: dicts as JSON)
    df.attrs["parent_params"] = {
        "study.metric": "val/recall_at_1", "study.mode": "max", "search.samples": "10", "search.sampler": "tpe",
        "search.optim.lr": json.dumps({"type": "float", "low": 1e-4, "high": 1e-2, "log": True}, sort_keys=True),
        "search.model.embed_dim": json.dumps({"type": "categorical", "values": [16, 32]}, sort_keys=True),
    }
    return df


def test_history_and_importances_of_a_search(tmp_path):
    # the study lists only aggregate and report: the search analysis is added for a search
    files = run_analyses("tuned", ["aggregate", "report"], search_runs(), tmp_path, strict=True)
    names = {p.name for p in files}
    assert {"search.csv", "search.md", "search_history.png", "search_importance.csv", "search_importance.png"} <= names
    hist = pd.read_csv(tmp_path / "search.csv")
    values = [0.9 + 0.1 * np.log10(lr) for lr in LRS]
    running = [max(values[: i + 1]) for i in range(len(values))]  # best so far, by hand
    assert list(hist["run_id"]) == [f"r{i}" for i in range(10)]  # the failed trial is left out
    assert hist["value"].tolist() == pytest.approx(values) and hist["best_so_far"].tolist() == pytest.approx(running)
    imp = pd.read_csv(tmp_path / "search_importance.csv").set_index("param")["importance"]
    assert imp.sum() == pytest.approx(1.0) and imp["optim.lr"] > imp["model.embed_dim"]
    md = (tmp_path / "report.md").read_text()
    assert "## Search: optimisation history and parameter importances" in md
    assert "search_history.png" in md and "search_importance.png" in md and "| optim.lr |" in md
    assert f"Best: {max(values):.4f} (trial 3)" in md
    img = mpimg.imread(tmp_path / "search_history.png")
    assert img.shape[0] > 100 and img[..., :3].std() > 0.01


def test_min_mode_and_a_grid_is_not_a_search(tmp_path):
    runs = search_runs()
    res = run_analyses("tuned", [{"search": {"mode": "min"}}], runs, tmp_path / "min", strict=True)
    hist = pd.read_csv(tmp_path / "min" / "search.csv")
    assert hist["best_so_far"].iloc[-1] == pytest.approx(min(0.9 + 0.1 * np.log10(lr) for lr in LRS))
    assert res
    grid = search_runs()
    grid.attrs = {}
    files = run_analyses("grid", ["aggregate"], grid, tmp_path / "grid", strict=True)
    assert not any(p.name.startswith("search") for p in files)
    few = search_runs().iloc[:3]
    few.attrs = search_runs().attrs
    run_analyses("few", ["search", "report"], few, tmp_path / "few", strict=True)
    assert "Parameter importances not computed: too few finished trials (3 < 4)." in (tmp_path / "few" / "report.md").read_text()
