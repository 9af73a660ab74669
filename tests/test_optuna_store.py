"""The search's Optuna study is persisted (sweeper/optuna_store.py): Ctrl-C, ``--resume``,
every trial in the storage once, no point proposed twice; ``sweeper dashboard`` on it."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import pytest

from conftest import TINY_BASE, drive_until
from sweeper import tracking
from sweeper.study import load_study

SEARCH = {
    "samples": 4,
    "sampler": "random",
    "seed": 3,
    "space": {"optim.lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True}},
}
ONE_EPOCH = {**TINY_BASE, "train": {**TINY_BASE["train"], "epochs": 1}}


def _children(uri: str, study: str) -> list:
    try:
        t = tracking.Tracker(uri)
        exp = t.client.get_experiment_by_name(study)
        if exp is None:
            return []
        return [r for r in t.search([exp.experiment_id], "") if tracking.TAG_PARENT in r.data.tags]
    except Exception:  # the store is being created
        return []


def _optuna_trials(exec_dir, name):
    import optuna

    storage = optuna.storages.RDBStorage(f"sqlite:///{exec_dir / 'optuna.db'}")
    return optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False)


def _complete(root) -> int:
    """COMPLETE trials in the (only) execution's Optuna storage, 0 while there is none."""
    import sqlite3

    dbs = list(root.glob("*/optuna.db"))
    if not dbs:
        return 0
    try:
        with sqlite3.connect(f"file:{dbs[0]}?mode=ro", uri=True, timeout=5) as con:
            return con.execute("SELECT COUNT(*) FROM trials WHERE state = 'COMPLETE'").fetchone()[0]
    except sqlite3.Error:  # the tables are being created
        return 0


@pytest.mark.slow
def test_ctrl_c_then_resume_keeps_every_trial_once_and_proposes_no_point_twice(
        ray_session, study_file, tmp_path, mlflow_uri, monkeypatch, capsys):
    path = study_file("persisted", base=ONE_EPOCH, search=SEARCH, max_concurrent=1)
    cmd = [sys.executable, "-m", "sweeper.cli", "run", str(path), "--address", ray_session,
           "--storage", str(tmp_path / "runs"), "--tracking-uri", mlflow_uri, "--no-live"]
    log_path = tmp_path / "driver.log"
    drive_until(cmd, cwd=tmp_path, log_path=log_path, sig=signal.SIGINT, wait=60, poll=0.2,
                until=lambda: _complete(tmp_path / "runs") >= 1, what="Ctrl-C (once a trial has finished)")
    (state_file,) = (tmp_path / "runs").glob("*/sweeper.json")
    exec_dir = state_file.parent
    state = json.loads(state_file.read_text())
    assert state["optuna_study"] == f"persisted/{exec_dir.name}", state
    assert state["optuna_storage"] == f"sqlite:///{exec_dir.resolve() / 'optuna.db'}"
    before = _optuna_trials(exec_dir, state["optuna_study"])
    finished_before = [t for t in before if t.state.name == "COMPLETE"]
    assert 1 <= len(finished_before) < 4, (before, log_path.read_text())

    from sweeper.cli import main  # `sweeper run STUDY --resume`, in this process (Ray is up)

    monkeypatch.chdir(tmp_path)
    assert main(["run", str(path), "--resume", "--address", ray_session, "--storage", str(tmp_path / "runs"),
                 "--tracking-uri", mlflow_uri, "--no-live"]) == 0, capsys.readouterr()
    parent = tracking.Tracker(mlflow_uri).get_run(state["parent_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.tags["trials_done"] == "4", parent.data.tags

    trials = _optuna_trials(exec_dir, state["optuna_study"])
    # every trial once: 4 samples, 4 Optuna trials, all complete, numbered 0..3
    assert sorted(t.number for t in trials) == [0, 1, 2, 3], trials
    assert all(t.state.name == "COMPLETE" for t in trials), [t.state for t in trials]
    # the trials finished before the Ctrl-C are the same ones, not added again; the one
    # running at the Ctrl-C was handed out again with its number and parameters
    after = {t.number: t for t in trials}
    for t in finished_before:
        assert after[t.number].params == t.params and after[t.number].value == t.value
    for t in before:
        assert after[t.number].params == t.params
    # no point proposed twice (a continuous space: only a replayed proposal repeats)
    points = [t.params["optim.lr"] for t in trials]
    assert len(set(points)) == 4, points
    # MLflow agrees: one FINISHED run per Optuna trial, linked both ways
    runs = [r for r in _children(mlflow_uri, "persisted") if r.info.status == "FINISHED"]
    assert len(runs) == 4
    assert sorted(int(r.data.tags["optuna_trial"]) for r in runs) == [0, 1, 2, 3]
    by_key = {r.data.tags["trial_key"]: r for r in runs}
    for t in trials:
        run = by_key[t.user_attrs["trial_key"]]
        assert int(run.data.tags["optuna_trial"]) == t.number
        assert float(run.data.params["optim.lr"]) == pytest.approx(t.params["optim.lr"], rel=1e-12)
    assert len({r.data.params["optim.lr"] for r in runs}) == 4


# ----------------------------------------------------------------------------- without Ray
def _space():
    import optuna

    return {"optim.lr": optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True)}


def test_prepare_reconciles_running_trials_with_mlflow(tmp_path):
    """A trial RUNNING at the interruption whose MLflow run FINISHED is told COMPLETE with
    the run's metric; one whose run did not finish goes back to WAITING and is the next
    one Optuna hands out (same number, same parameters); the budget counts COMPLETE and
    PRUNED trials only."""
    import optuna
    from optuna.trial import TrialState

    from sweeper.optuna_store import OptunaStore

    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(storage=url, study_name="s/e", direction="maximize")
    keys = []
    for i, state in enumerate(["done", "finished-in-mlflow", "killed", "failed", "pruned"]):
        trial = study.ask(_space())
        trial.set_user_attr("trial_key", f"e/t{i}")
        keys.append((trial, state))
    for trial, state in keys:
        if state == "done":
            study.tell(trial, 0.5)
        elif state == "failed":
            study.tell(trial, state=TrialState.FAIL)
        elif state == "pruned":
            study.tell(trial, state=TrialState.PRUNED)
    store = OptunaStore(url, "s/e", "e")
    store.prepare("maximize", _space(), {"e/t0": 0.5, "e/t1": 0.75}, evaluated=[])
    got = {t.user_attrs["trial_key"]: t for t in optuna.load_study(study_name="s/e", storage=url).trials}
    assert got["e/t1"].state == TrialState.COMPLETE and got["e/t1"].value == 0.75
    assert got["e/t2"].state == TrialState.WAITING
    assert (store.counted, store.requeued, store.seeded) == (3, 1, 0)  # t0, t1, t4; t2 again
    again = optuna.load_study(study_name="s/e", storage=url).ask(_space())
    assert again.number == got["e/t2"].number and again.params == got["e/t2"].params
    assert len(optuna.load_study(study_name="s/e", storage=url).trials) == 5  # nothing added


def test_an_execution_without_a_study_gets_the_mlflow_points_once(tmp_path):
    """An execution from before the storage: its MLflow-finished points seed the new
    study once; the next resume finds the study and adds nothing."""
    import optuna

    from sweeper.optuna_store import OptunaStore

    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    for _ in range(2):
        store = OptunaStore(url, "s/e", "e")
        store.prepare("minimize", _space(), {}, evaluated=[({"optim.lr": 1e-3}, 0.2), ({"optim.lr": 2e-3}, 0.1)])
    trials = optuna.load_study(study_name="s/e", storage=url).trials
    assert [(t.params["optim.lr"], t.value) for t in trials] == [(1e-3, 0.2), (2e-3, 0.1)]
    assert (store.counted, store.seeded) == (2, 0)


def test_storage_urls(tmp_path, study_file):
    from dmlcore.config import ConfigError
    from sweeper import optuna_store, preflight

    exec_dir = tmp_path / "runs" / "20260101-000000"
    assert optuna_store.resolve_url(None, exec_dir) == f"sqlite:///{exec_dir.resolve() / 'optuna.db'}"
    pg = "postgresql://me:secret@db.example:5432/optuna"
    assert optuna_store.resolve_url(pg, exec_dir) == pg
    stored = {optuna_store.STATE_URL: "postgresql://me:***@db.example:5432/optuna"}
    assert optuna_store.resolve_url(pg, exec_dir, stored) == pg  # the password comes back from the study
    with pytest.raises(ConfigError, match="needs its password"):
        optuna_store.resolve_url(None, exec_dir, stored)
    assert optuna_store.state_entries(optuna_store.OptunaStore(pg, "s/e"))[optuna_store.STATE_URL].count("***") == 1
    # a study key, checked: not a URL -> one line at load time
    with pytest.raises(ConfigError, match="search.storage.*SQLAlchemy URL"):
        load_study(study_file("bad", search={**SEARCH, "storage": "not a url"}))
    # a URL whose database cannot be opened: the preflight says so, without the password
    study = load_study(study_file("pg", search={**SEARCH, "storage": "mysql+nosuchdriver://me:secret@127.0.0.1:1/x"}))
    (problem,) = preflight.run_checks(preflight.Context(study, tmp_path, "sqlite://"), ["optuna"])
    assert problem.startswith("search.storage: cannot open the Optuna storage") and "secret" not in problem
    # the configured storage is where the study goes: a custom SQLite file
    custom = tmp_path / "elsewhere" / "shared.db"
    custom.parent.mkdir()
    study = load_study(study_file("custom", search={**SEARCH, "storage": f"sqlite:///{custom}"}))
    store = optuna_store.for_execution(study, "e1", exec_dir)
    assert store.url == f"sqlite:///{custom}" and store.name == "custom/e1"
    # changing where the study is kept does not change what the trials run
    assert study.fingerprint() == load_study(study_file("custom", search=SEARCH)).fingerprint()


# ----------------------------------------------------------------------------- sweeper dashboard
def _execution(root, name="20260101-000000", study="dash", optuna_study=True):
    """An execution folder as ``sweeper run`` leaves it (sweeper.json + optuna.db)."""
    import optuna

    exec_dir = root / study / name
    exec_dir.mkdir(parents=True)
    state = {"study": study, "execution": name, "experiment_id": "1", "parent_run_id": "p", "tracking_uri": "sqlite://"}
    if optuna_study:
        url = f"sqlite:///{exec_dir / 'optuna.db'}"
        s = optuna.create_study(storage=url, study_name=f"{study}/{name}")
        s.add_trial(optuna.trial.create_trial(params={"optim.lr": 1e-3}, distributions=_space(), value=0.5))
        state.update(optuna_storage=url, optuna_study=f"{study}/{name}")
    (exec_dir / "sweeper.json").write_text(json.dumps(state))
    return exec_dir


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_dashboard_serves_the_study_on_localhost(tmp_path):
    import os
    import urllib.request

    exec_dir = _execution(tmp_path / "runs")
    port = _free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "sweeper.cli", "dashboard", str(exec_dir), "--port", str(port)],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        line = proc.stdout.readline()  # printed once it listens
        assert f"http://127.0.0.1:{port}/dashboard/studies/" in line, line + (proc.stdout.read() if proc.poll() else "")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=30) as r:
            assert r.status == 200 and b"<html" in r.read().lower()
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=30) as r:
            studies = json.loads(r.read())["study_summaries"]
        assert [s["study_name"] for s in studies] == ["dash/20260101-000000"]
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0


def test_dashboard_finds_a_study_by_name_and_refuses_a_grid(tmp_path, monkeypatch, capsys):
    from sweeper import dashboard
    from sweeper.cli import main

    monkeypatch.chdir(tmp_path)
    _execution(tmp_path / "runs", "20260101-000000")
    newer = _execution(tmp_path / "runs", "20260102-000000")
    url, name, found = dashboard.resolve("dash")  # no file: the study's executions under ./runs
    assert found == newer.resolve() and name == "dash/20260102-000000" and url.endswith("20260102-000000/optuna.db")
    grid = _execution(tmp_path / "runs", "20260103-000000", study="grid", optuna_study=False)
    assert main(["dashboard", str(grid)]) == 2
    err = capsys.readouterr().err
    assert "has no Optuna study: it is a grid" in err and len(err.strip().splitlines()) == 1


@pytest.mark.slow
def test_a_postgresql_storage_keeps_executions_apart_and_resumes_without_its_password_on_disk(tmp_path, study_file):
    """``search.storage: postgresql+psycopg2://...`` (a throwaway cluster, as the tracking
    server tests use): the preflight reaches it, each execution is its own study in the
    one database, sweeper.json keeps the URL without the password, and a resume (the
    password from the study) hands the interrupted trial out again."""
    import optuna
    import secrets

    pytest.importorskip("psycopg2", reason="psycopg2-binary is in the 'test' extra")
    from test_tracking_server import Postgres

    from sweeper import optuna_store, preflight

    pg = Postgres()
    try:
        pg.start()
        password = "pw-" + secrets.token_urlsafe(8)
        url = pg.create_db("optuna", "opt", password)
        study = load_study(study_file("pgsearch", search={**SEARCH, "storage": url}))
        assert preflight.run_checks(preflight.Context(study, tmp_path, "sqlite://"), ["optuna"]) == []
        stores = {}
        for execution in ("e1", "e2"):
            store = optuna_store.for_execution(study, execution, tmp_path / execution)
            store.prepare("maximize", _space(), {}, evaluated=[])
            ot = optuna.load_study(study_name=store.name, storage=store.storage)
            trial = ot.ask(_space())  # proposed, then the driver is interrupted
            trial.set_user_attr("trial_key", f"{execution}/t0")
            stores[execution] = (store, trial)
        assert sorted(s.study_name for s in optuna.get_all_study_summaries(url)) == ["pgsearch/e1", "pgsearch/e2"]
        state = optuna_store.state_entries(stores["e1"][0])
        assert password not in json.dumps(state) and state["optuna_storage"].count("***") == 1
        # --resume of e1: the URL from sweeper.json, its password from the study's search.storage
        again = optuna_store.for_execution(study, "e1", tmp_path / "e1", state)
        assert again.url == url and again.name == "pgsearch/e1"
        again.prepare("maximize", _space(), {}, evaluated=[])
        assert (again.counted, again.requeued) == (0, 1)
        first = stores["e1"][1]
        handed = optuna.load_study(study_name=again.name, storage=again.storage).ask(_space())
        assert (handed.number, handed.params) == (first.number, first.params)
    finally:
        pg.stop()
