"""load_runs against a real (temporary, SQLite) MLflow store."""

from __future__ import annotations

import pandas as pd
import pytest

pytest.importorskip("mlflow")

from mlflow.entities import Metric, Param, RunTag  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

from sweeper.analysis import run_analyses  # noqa: E402
from sweeper.analysis import runs as runs_mod  # noqa: E402
from sweeper.analysis.runs import load_runs, parse_param  # noqa: E402

PARAMS = {  # as the sweeper logs them: str() of the RunConfig's flat values
    "loss.name": "margin",
    "model.embed_dim": "128",
    "optim.lr": "1e-05",
    "model.normalize": "True",
    "loss.lr": "None",
    "eval.recall_k": "[1, 2, 4, 8]",
    "eval.select_on": "val",
}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("studies")
    ids = {}
    for execution in range(2):  # two executions of the study: the later one is "the study"
        parent = client.create_run(exp, start_time=1_000_000 * (execution + 1), tags={"study": "revisiting"})
        pid = parent.info.run_id
        ids[execution] = {"parent": pid, "children": []}
        for i in range(3):
            child = client.create_run(
                exp,
                start_time=1_000_000 * (execution + 1) + i + 1,
                tags={"mlflow.parentRunId": pid, "study": "revisiting", "trial_id": f"{i:05d}"},
            )
            rid = child.info.run_id
            params = dict(PARAMS, **{"train.seed": str(i), "model.embed_dim": ["64", "128", "128"][i]})
            metrics = [Metric("test/recall_at_1", 0.1 * s, 0, s) for s in range(3)]  # latest value: 0.2
            metrics.append(Metric("best/test/recall_at_1", 0.5 + 0.1 * i + execution, 0, 2))
            tags = [RunTag("error", "ValueError: boom")] if i == 2 else []
            client.log_batch(rid, metrics=metrics, params=[Param(k, v) for k, v in params.items()], tags=tags)
            client.set_terminated(rid, "FAILED" if i == 2 else "FINISHED")
            ids[execution]["children"].append(rid)
        client.set_terminated(pid, "FINISHED")
    return uri, ids


def test_parse_param():
    assert parse_param("128") == 128 and isinstance(parse_param("128"), int)
    assert parse_param("1e-05") == 1e-05 and parse_param("0.5") == 0.5
    assert parse_param("True") is True and parse_param("false") is False
    assert parse_param("None") is None and parse_param("null") is None
    assert parse_param("margin") == "margin" and parse_param("[1, 2]") == "[1, 2]"
    assert parse_param("1_000") == "1_000"


def test_load_runs_by_parent_id(store, monkeypatch):
    uri, ids = store
    monkeypatch.setattr(runs_mod, "_PAGE", 2)  # three children: two pages
    df = load_runs(uri, ids[0]["parent"])
    assert list(df["run_id"]) == ids[0]["children"]  # ordered by start time, the other execution left out
    assert df.attrs["parent_run_id"] == ids[0]["parent"] and df.attrs["study"] == "revisiting"
    assert list(df["status"]) == ["FINISHED", "FINISHED", "FAILED"]
    assert list(df["params.model.embed_dim"]) == [64, 128, 128]
    assert pd.api.types.is_integer_dtype(df["params.model.embed_dim"])
    assert list(df["params.train.seed"]) == [0, 1, 2]
    assert (df["params.optim.lr"] == 1e-05).all() and (df["params.model.normalize"] == True).all()  # noqa: E712
    assert df["params.loss.lr"].isna().all()
    assert (df["params.eval.recall_k"] == "[1, 2, 4, 8]").all() and (df["params.loss.name"] == "margin").all()
    assert list(df["metrics.best/test/recall_at_1"]) == pytest.approx([0.5, 0.6, 0.7])
    assert list(df["metrics.test/recall_at_1"]) == pytest.approx([0.2, 0.2, 0.2])  # the latest step's value
    assert list(df["tags.trial_id"]) == ["00000", "00001", "00002"]
    assert df.loc[2, "tags.error"] == "ValueError: boom"


def test_load_runs_by_study_name_takes_latest_execution(store, tmp_path):
    uri, ids = store
    df = load_runs(uri, "revisiting")
    assert df.attrs["parent_run_id"] == ids[1]["parent"]
    assert list(df["run_id"]) == ids[1]["children"]
    assert list(df["metrics.best/test/recall_at_1"]) == pytest.approx([1.5, 1.6, 1.7])
    assert load_runs(uri, study="revisiting").attrs["parent_run_id"] == ids[1]["parent"]
    with pytest.raises(ValueError, match="no MLflow run is tagged study='nope'"):
        load_runs(uri, "nope")
    # the frame feeds the analyses as is
    files = run_analyses("revisiting", ["aggregate", "report"], df, tmp_path, strict=True)
    md = (tmp_path / "report.md").read_text()
    assert "| 64 | 1 | 0 | 1.5000 (n=1) |" in md and "| 128 | 1 | 1 | **1.6000 (n=1)** |" in md
    assert "## Factor effects" not in md  # only the analyses that were asked for
    assert "ValueError: boom" in md and f"`{ids[1]['parent']}`" in md
    assert tmp_path / "report.html" in files
