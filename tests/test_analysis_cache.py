"""The analysis cache of an execution's runs: re-used while nothing changes, invalidated when a run is
added, deleted or still running (tiny SQLite store, a few runs)."""

from __future__ import annotations

import time

import pytest

pytest.importorskip("mlflow")
from mlflow.tracking import MlflowClient  # noqa: E402

from sweeper.analysis import load_runs, load_runs_cached  # noqa: E402
from sweeper.analysis.cache import CACHE_FILE  # noqa: E402


def _child(client, exp, pid, i, finish=True):
    r = client.create_run(exp, tags={"mlflow.parentRunId": pid, "study": "cached"}, run_name=f"t{i}")
    rid = r.info.run_id
    client.log_param(rid, "loss.name", "margin" if i % 2 else "triplet")
    client.log_metric(rid, "best/test/recall_at_1", 0.1 * i, step=0)
    if finish:
        client.set_terminated(rid)
    return rid


@pytest.fixture()
def store(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("cached", artifact_location=(tmp_path / "art").as_uri())
    pid = client.create_run(exp, tags={"study": "cached"}, run_name="cached").info.run_id
    ids = [_child(client, exp, pid, i) for i in range(3)]
    return uri, client, exp, pid, ids, tmp_path / "analysis"


def test_cache_reused_then_invalidated_when_a_run_is_added(store):
    uri, client, exp, pid, ids, out = store
    a = load_runs_cached(uri, pid, out)
    assert a.attrs["cache"] == "miss" and (out / CACHE_FILE).is_file()
    assert sorted(a["run_id"]) == sorted(ids)
    b = load_runs_cached(uri, pid, out)
    assert b.attrs["cache"] == "hit"
    assert b.equals(a) and b.attrs["parent_run_id"] == pid and b.attrs["study"] == "cached"
    time.sleep(0.01)
    new = _child(client, exp, pid, 3)
    c = load_runs_cached(uri, pid, out)
    assert c.attrs["cache"] == "miss" and new in set(c["run_id"]) and len(c) == 4
    fresh = load_runs(uri, pid)
    assert sorted(c["run_id"]) == sorted(fresh["run_id"])
    assert load_runs_cached(uri, pid, out).attrs["cache"] == "hit"


def test_cache_invalidated_by_delete_and_by_a_running_run(store):
    uri, client, exp, pid, ids, out = store
    assert load_runs_cached(uri, pid, out).attrs["cache"] == "miss"
    client.delete_run(ids[0])
    d = load_runs_cached(uri, pid, out)
    assert d.attrs["cache"] == "miss" and ids[0] not in set(d["run_id"])
    assert load_runs_cached(uri, pid, out).attrs["cache"] == "hit"
    running = _child(client, exp, pid, 4, finish=False)
    for _ in range(2):  # a frame with an unfinished run is never re-used
        r = load_runs_cached(uri, pid, out)
        assert r.attrs["cache"] == "miss" and running in set(r["run_id"])
    client.set_terminated(running)
    assert load_runs_cached(uri, pid, out).attrs["cache"] == "miss"
    assert load_runs_cached(uri, pid, out).attrs["cache"] == "hit"
    assert load_runs_cached(uri, pid, out, cache=False).attrs["cache"] == "miss"


def test_unreadable_cache_is_a_miss(store):
    uri, _, _, pid, ids, out = store
    out.mkdir(parents=True)
    (out / CACHE_FILE).write_bytes(b"not a pickle")
    r = load_runs_cached(uri, pid, out)
    assert r.attrs["cache"] == "miss" and sorted(r["run_id"]) == sorted(ids)
    assert load_runs_cached(uri, pid, out).attrs["cache"] == "hit"
