"""`sweeper analyze` logs to the execution's parent run (a folder per call); the report keeps every
instance of an analysis a study runs twice."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

pytest.importorskip("mlflow")

from mlflow.entities import Metric, Param  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

from sweeper.analysis import run_analyses  # noqa: E402
from sweeper.cli import main  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
R1 = "best/test/recall_at_1"


def _execution(uri: str, search: bool = False) -> tuple[str, list[str]]:
    """A parent run with 6 finished children: 2 losses x 3 seeds (``search``: with the params
    the sweeper logs on a search's parent run)."""
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("seeded")
    pid = client.create_run(exp, tags={"study": "seeded"}).info.run_id
    if search:
        client.log_batch(pid, params=[Param("study.metric", "test/recall_at_1"), Param("study.mode", "max"),
                                      Param("search.samples", "6"),
                                      Param("search.loss.name", '{"type": "categorical", "values": ["margin", "triplet"]}')])
    kids = []
    for i, (loss, seed) in enumerate((l, s) for l in ("margin", "triplet") for s in range(3)):
        rid = client.create_run(exp, tags={"mlflow.parentRunId": pid, "study": "seeded", "trial_id": f"{i:05d}"}).info.run_id
        client.log_batch(rid, metrics=[Metric(R1, 0.6 + 0.05 * (loss == "margin") + 0.01 * seed, 0, 1)],
                         params=[Param("loss.name", loss), Param("train.seed", str(seed))])
        client.set_terminated(rid, "FINISHED")
        kids.append(rid)
    client.set_terminated(pid, "FINISHED")
    return pid, kids


def _artifacts(client, run_id, path):
    return {Path(f.path).name: f for f in client.list_artifacts(run_id, path)}


def test_analyze_logs_to_the_parent_run_in_a_folder_per_call(mlflow_uri, tmp_path, capsys):
    pid, _ = _execution(mlflow_uri)
    client = MlflowClient(tracking_uri=mlflow_uri)
    for _ in range(2):
        assert main(["analyze", pid, "--tracking-uri", mlflow_uri, "--out", str(tmp_path / "an")]) == 0
    out = capsys.readouterr().out
    assert out.count(f"logged to parent run {pid}: analysis/") == 2
    folders = _artifacts(client, pid, "analysis")
    assert len(folders) == 2 and all(f.is_dir for f in folders.values())  # two calls, nothing overwritten
    for name in folders:
        logged = set(_artifacts(client, pid, f"analysis/{name}"))
        assert {"aggregate.csv", "aggregate.md", "aggregate_seeds.png", "report.md", "report.html"} <= logged
        assert ".runs_cache.json" not in logged
    a, b = sorted(folders)
    assert a < b  # UTC time stamps: the later call sorts last
    local = client.download_artifacts(pid, f"analysis/{b}/report.md", str(tmp_path / "dl"))
    assert "## Aggregate over seeds" in Path(local).read_text() and "vs best (R@1)" in Path(local).read_text()


def test_same_stamp_gets_a_suffix(mlflow_uri, tmp_path):
    from sweeper.analysis.artifacts import log_to_parent

    pid, _ = _execution(mlflow_uri)
    f = tmp_path / "x.txt"
    f.write_text("x")
    assert log_to_parent(mlflow_uri, pid, [f], tmp_path, folder="t0") == "analysis/t0"
    assert log_to_parent(mlflow_uri, pid, [f], tmp_path, folder="t0") == "analysis/t0-2"


def _correlation_runs() -> pd.DataFrame:
    """Runs carrying every metric studies/embedding_correlation.yaml's analyses name."""
    rng = np.random.default_rng(0)
    rows = []
    i = 0
    for loss in ("roth_margin", "roth_multisimilarity"):
        for dim in (16, 32):
            for spc in (2, 4):
                for seed in (0, 1):
                    rho = rng.uniform(0.1, 0.9)
                    row = {"run_id": f"r{i}", "status": "FINISHED", "params.loss.name": loss, "params.loss.params.beta": 1.2 if loss == "roth_margin" else None,
                           "params.miner.name": "roth_distance", "params.model.embed_dim": dim, "params.batch.samples_per_class": spc, "params.train.seed": seed,
                           f"metrics.{R1}": 0.7 - 0.3 * rho + rng.normal(0, 0.01), "metrics.best/test/map_at_r": rng.uniform(0.2, 0.4)}
                    for m in ("pi_intra", "pi_inter", "pi_ratio", "rho_spectrum", "rho_spectrum_at_1", "uniformity"):
                        row[f"metrics.best/train/{m}"] = rho if m == "rho_spectrum" else rng.uniform()
                    rows.append(row)
                    i += 1
    return pd.DataFrame(rows)


def test_a_study_running_an_analysis_twice_reports_both_instances(tmp_path):
    analyses = yaml.safe_load((ROOT / "studies" / "embedding_correlation.yaml").read_text())["analyses"]
    assert [next(iter(a)) for a in analyses].count("correlation") == 2
    files = run_analyses("revisiting_embedding_correlation", analyses, _correlation_runs(), tmp_path, strict=True)
    names = {p.name for p in files}
    assert {"correlation_scatter.png", "correlation_runs_scatter.png", "correlation.csv", "correlation_runs.csv"} <= names
    md = (tmp_path / "report.md").read_text()
    assert "## Embedding-space metrics vs test performance (`correlation`)" in md
    assert "## Embedding-space metrics vs test performance (`correlation_runs`)" in md
    assert "correlation_scatter.png" in md and "correlation_runs_scatter.png" in md
    # the first instance's table: 6 embedding metrics x 2 test metrics = 12 rows, the second's 2 x 1 = 2
    rows = [line for line in md.splitlines() if line.startswith("| train ")]
    assert len(rows) == 12 + 2
    assert md.index("(`correlation`)") < md.index("(`correlation_runs`)")  # in the study's order


def test_analyze_of_a_search_execution_adds_history_and_importances(mlflow_uri, tmp_path):
    pid, _ = _execution(mlflow_uri, search=True)
    assert main(["analyze", pid, "--tracking-uri", mlflow_uri, "--out", str(tmp_path / "an")]) == 0
    client = MlflowClient(tracking_uri=mlflow_uri)
    (folder,) = _artifacts(client, pid, "analysis")
    logged = set(_artifacts(client, pid, f"analysis/{folder}"))
    assert {"search.csv", "search_history.png", "search_importance.png"} <= logged
    hist = pd.read_csv(tmp_path / "an" / "search.csv")
    assert hist["best_so_far"].iloc[-1] == pytest.approx(0.67)  # margin, seed 2: 0.6 + 0.05 + 0.02
    assert "## Search: optimisation history" in (tmp_path / "an" / "report.md").read_text()
