"""CLI habits (issue 19, item 6): ``--version``, ``sweeper ls``, ``--json`` on show/run/list/ls,
study keys in ``--set``, an example in every subcommand's help, rounded numbers."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import socket
import subprocess
from importlib import metadata
from pathlib import Path

import pytest

from conftest import TINY_BASE, write_study
from sweeper.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[1]
LR = 0.005495716186411619


# ----------------------------------------------------------------------------- numbers
@pytest.mark.parametrize("x, text", [
    (0.005495716186411619, "5.496e-3"), (0.8123456, "0.8123"), (0.05, "0.05"), (0.01, "0.01"),
    (0.0099996, "0.01"), (123.456, "123.5"), (2048.0, "2048"), (9999.6, "1e4"), (12345.6, "1.235e4"),
    (1e-4, "1e-4"), (2.5e-5, "2.5e-5"), (-3.14159, "-3.142"), (1.0, "1"), (0.0, "0"), (100000, "100000"),
    (float("nan"), "nan"), (float("-inf"), "-inf"), (True, "True"), ("adam", "adam"),
])
def test_fmt_num_four_significant_digits(x, text):
    from sweeper.numbers import fmt_num

    assert fmt_num(x) == text


def test_fmt_value_rounds_inside_lists_and_mappings():
    from sweeper.numbers import fmt_value

    assert fmt_value({"margin": 0.2, "lr": [1e-3, LR]}) == "{margin: 0.2, lr: [1e-3, 5.496e-3]}"


def test_show_table_prints_rounded_values(study_file, capsys):
    path = study_file(axes={"optim.lr": [LR, 1e-3]})
    assert main(["show", str(path)]) == 0
    out = capsys.readouterr().out
    assert "5.496e-3" in out and "1e-3" in out and "0.0054957" not in out


def test_live_and_leaderboard_cells_use_the_same_rule():
    from sweeper import live

    assert live.short(LR) == "5.496e-3" and live.fmt_metric(0.66852678) == "0.6685" and live.fmt_metric(None) == "—"


# ----------------------------------------------------------------------------- --version
def test_version_prints_package_version_and_checkout_commit(capsys):
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(["--version"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out.strip()
    assert out.startswith(f"sweeper {metadata.version('dml-platform')} (dml-platform")
    top = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=ROOT, capture_output=True, text=True)
    if top.returncode == 0 and Path(top.stdout.strip()).resolve() == ROOT:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        assert f"git {head[:12]}" in out
    else:
        assert "git" not in out
    assert len(out.splitlines()) == 1


# ----------------------------------------------------------------------------- --set of study keys
def _show_json(capsys, *argv) -> dict:
    assert main(["show", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_set_seeds_and_other_study_keys(study_file, capsys):
    path = study_file(axes={"model.embed_dim": [8, 16]}, seeds=[0, 1, 2], max_concurrent=2,
                      quick={"train.epochs": 1, "seeds": [5]})
    doc = _show_json(capsys, str(path))
    assert doc["schema"] == "sweeper.show/1" and doc["size"] == 6 and doc["seeds"] == [0, 1, 2]
    doc = _show_json(capsys, str(path), "--set", "seeds=[0]", "--set", "max_concurrent=4",
                     "--set", "resources.gpu=0.5", "--set", "metric=test/recall_at_2", "--set", "train.epochs=1")
    assert doc["seeds"] == [0] and doc["size"] == 2 and [t["overrides"]["train.seed"] for t in doc["trials"]] == [0, 0]
    assert doc["max_concurrent"] == 4 and doc["resources"]["gpu"] == 0.5 and doc["metric"] == "test/recall_at_2"
    assert doc["base"]["train"]["epochs"] == 1
    assert doc["overrides"] == {"seeds": [0], "max_concurrent": 4, "resources.gpu": 0.5,
                                "metric": "test/recall_at_2", "train.epochs": 1}
    # the command line wins over the quick block
    assert _show_json(capsys, str(path), "--quick")["seeds"] == [5]
    assert _show_json(capsys, str(path), "--quick", "--set", "seeds=[0,1]")["seeds"] == [0, 1]
    # new values for an existing axis
    assert [t["overrides"]["model.embed_dim"] for t in
            _show_json(capsys, str(path), "--set", "axes.model.embed_dim=[32]", "--set", "seeds=[0]")["trials"]] == [32]


def test_set_search_samples(study_file, capsys):
    path = study_file(search={"samples": 4, "space": {"optim.lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True}}},
                      metric="val/recall_at_1", base={**TINY_BASE, "data": {**TINY_BASE["data"], "val_classes": 0.4}})
    assert _show_json(capsys, str(path))["size"] == 4
    doc = _show_json(capsys, str(path), "--set", "search.samples=50", "--set", "search.sampler=random")
    assert doc["size"] == 50 and doc["search"]["samples"] == 50 and doc["search"]["sampler"] == "random"
    assert main(["show", str(path), "--set", "search.samples=50"]) == 0
    out = capsys.readouterr().out
    assert "50 samples" in out and "[1e-4, 0.01] log" in out  # the range rounded by the same rule


@pytest.mark.parametrize("setting, words", [
    ("search.sampels=3", ["unknown study key 'search.sampels'", "did you mean 'search.samples'"]),
    ("seedz=[0]", ["unknown key 'seedz'", "did you mean 'seeds'"]),
    ("seeds=5", ["'seeds'", "valid list"]),
    ("seeds=[]", ["'seeds'", "empty list"]),
    ("mode=maximum", ["'mode'"]),
    ("search.samples=5", ["search.samples", "the study has no 'search'"]),
    ("axes.loss.name=[margin]", ["no axis 'loss.name'"]),
    ("plugins=[x]", ["cannot be set from the command line", "--plugin"]),
    ("model.embdim=3", ["unknown key 'model.embdim'", "did you mean 'model.embed_dim'"]),
])
def test_bad_study_key_is_one_line_naming_it(study_file, capsys, setting, words):
    path = study_file(axes={"model.embed_dim": [8, 16]}, seeds=[0, 1])
    for cmd in (["show", str(path)], ["run", str(path), "--dry-run"]):
        assert main([*cmd, "--set", setting]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "Traceback" not in err, err
        for w in words:
            assert w in err, (w, err)


def test_run_dry_run_takes_study_keys(study_file, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = study_file(axes={"model.embed_dim": [8, 16]}, seeds=[0, 1, 2])
    assert main(["run", str(path), "--dry-run", "--set", "seeds=[0]", "--json"]) == 0
    cap = capsys.readouterr()
    doc = json.loads(cap.out)  # the document alone on stdout; the plan went to stderr
    assert doc["size"] == 2 and doc["seeds"] == [0] and "preflight passed" in cap.err


# ----------------------------------------------------------------------------- list --json
def test_list_json_matches_the_registry(capsys):
    from dmlcore import registry

    assert main(["list", "losses", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["schema"] == "sweeper.list/1" and list(doc["registries"]) == ["loss"]
    entries = doc["registries"]["loss"]
    assert [e["name"] for e in entries] == [name for name, _, _ in registry.describe("loss")]
    margin = next(e for e in entries if e["name"] == "margin")
    assert "margin" in margin["parameters"] and margin["module"].startswith("dmlcore.")
    assert main(["list", "--json"]) == 0
    assert set(json.loads(capsys.readouterr().out)["registries"]) == set(registry.KINDS)


# ----------------------------------------------------------------------------- ls
def _state(root: Path, study: str, execution: str, **fields) -> Path:
    d = root / study / execution
    d.mkdir(parents=True)
    state = {"study": study, "execution": execution, "tracking_uri": "sqlite:////nonexistent/m.db",
             "experiment_id": "1", "parent_run_id": f"parent-{execution}", "created": f"2026-01-0{execution[-1]}T10:00:00",
             **fields}
    (d / "sweeper.json").write_text(json.dumps(state))
    return d


def _dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def test_ls_decides_status_honestly(tmp_path, capsys):
    me = {"pid": os.getpid(), "host": socket.gethostname()}
    summary = {"trials": {"done": 3, "failed": 1}, "total": 4, "metric": "test/recall_at_1", "mode": "max",
               "best": {"value": 0.812345678, "trial": "#002", "run_id": "r2"}, "ended": "2026-01-01T11:00:00"}
    _state(tmp_path, "a", "e1", status="finished", started_at="2026-01-01T10:00:00", summary=summary,
           driver={"pid": _dead_pid(), "host": me["host"]}, total=4)
    _state(tmp_path, "a", "e2", status="running", started_at="2026-01-02T10:00:00", driver=me, total=4)
    _state(tmp_path, "b", "e3", status="running", started_at="2026-01-03T10:00:00",
           driver={"pid": _dead_pid(), "host": me["host"]}, total=2)
    _state(tmp_path, "b", "e4", status="running", driver={"pid": 1, "host": "elsewhere.example"})
    _state(tmp_path, "b", "e5")  # written before statuses were recorded
    # a resumed execution that is running again: its old summary is stale
    _state(tmp_path, "b", "e6", status="running", started_at="2026-01-06T10:00:00", summary=summary, driver=me)
    (tmp_path / "b" / "junk").mkdir()
    (tmp_path / "b" / "junk" / "sweeper.json").write_text("{not json")

    assert main(["ls", "--storage", str(tmp_path), "--json", "--no-mlflow"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["schema"] == "sweeper.ls/1" and doc["root"] == str(tmp_path.resolve())
    by = {e["execution"]: e for e in doc["executions"]}
    assert [e["execution"] for e in doc["executions"]] == ["e1", "e2", "e3", "e4", "e5", "e6"]
    assert by["e1"]["status"] == "finished" and by["e1"]["trials"] == {"done": 3, "failed": 1}
    assert by["e1"]["best"]["value"] == 0.812345678 and by["e1"]["parent_run_id"] == "parent-e1"
    assert by["e2"]["status"] == "running" and by["e2"]["counts_from"] == "none"
    assert by["e3"]["status"] == "interrupted" and "gone" in by["e3"]["status_detail"]
    assert by["e4"]["status"] == "running?" and "elsewhere.example" in by["e4"]["status_detail"]
    assert by["e5"]["status"] == "unknown"
    assert by["e6"]["status"] == "running" and by["e6"]["trials"] == {} and by["e6"]["best"] is None

    assert main(["ls", "a", "--storage", str(tmp_path), "--no-mlflow"]) == 0  # piped: plain lines
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split("\t") == ["study", "execution", "status", "trials done/failed/running", "best",
                                    "started", "parent run"]
    assert lines[1].split("\t") == ["a", "e1", "finished", "3/1/0 of 4", "0.8123 (#002)", "2026-01-01 10:00:00",
                                    "parent-e1"]
    assert lines[2].split("\t")[:4] == ["a", "e2", "running", "? of 4"] and len(lines) == 3


def test_ls_reads_mlflow_once_per_store_for_executions_without_summary(tmp_path, mlflow_uri, capsys, monkeypatch):
    from sweeper import tracking

    t = tracking.Tracker(mlflow_uri)
    exp = t.experiment_id("s")
    parents = []
    for name, children in (("e1", ["FINISHED", "FAILED", "RUNNING"]), ("e2", ["FINISHED", "FINISHED"])):
        pid = t.create_run(exp, f"s/{name}", {tracking.TAG_ROLE: "study"})
        parents.append(pid)
        for i, status in enumerate(children):
            rid = t.create_run(exp, f"s-{i}", {tracking.TAG_ROLE: "trial", tracking.TAG_PARENT: pid,
                                                tracking.TAG_TRIAL_INDEX: i})
            if status == "FINISHED":
                t.log_metrics(rid, {"best/test/recall_at_1": 0.5 + 0.1 * i}, step=0)
            if status != "RUNNING":
                t.set_status(rid, status)
        _state(tmp_path, "s", name, tracking_uri=mlflow_uri, experiment_id=exp, parent_run_id=pid,
               status="running", driver={"pid": _dead_pid(), "host": socket.gethostname()},
               metric="test/recall_at_1", mode="max", total=3)
    calls = []
    search = tracking.Tracker.search
    monkeypatch.setattr(tracking.Tracker, "search", lambda self, *a, **k: calls.append(a) or search(self, *a, **k))
    assert main(["ls", "--storage", str(tmp_path), "--json"]) == 0
    by = {e["execution"]: e for e in json.loads(capsys.readouterr().out)["executions"]}
    assert len(calls) == 1  # one batched search for both executions
    assert by["e1"]["status"] == "interrupted" and by["e1"]["counts_from"] == "mlflow"
    assert by["e1"]["trials"] == {"done": 1, "failed": 1, "running": 1}
    assert by["e1"]["best"]["value"] == pytest.approx(0.5) and by["e1"]["best"]["trial"] == "#000"
    assert by["e2"]["trials"] == {"done": 2} and by["e2"]["best"]["value"] == pytest.approx(0.6)
    assert by["e2"]["best"]["trial"] == "#001" and by["e2"]["parent_run_id"] == parents[1]


# ----------------------------------------------------------------------------- help examples
def _parsers(parser: argparse.ArgumentParser, path=()):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield (*path, name), sub
                yield from _parsers(sub, (*path, name))


def test_every_subcommand_help_has_an_example_that_works(tmp_path, monkeypatch, capsys):
    from sweeper.cli_help import examples_of

    parser = build_parser()
    found = list(_parsers(parser))
    assert {"train", "show", "run", "ls", "list"} <= {p[0] for p, _ in found}
    for path, sub in found:
        examples = examples_of(sub)
        assert examples, f"sweeper {' '.join(path)} --help has no example"
        text = sub.format_help()
        assert "examples:" in text
        for e in examples:
            assert e.command in text
            argv = shlex.split(e.command)[1:]
            assert argv[:len(path)] == list(path), e.command
            build_parser().parse_args(argv)  # every example parses (SystemExit fails the test)
    for name in ("studies", "configs"):
        shutil.copytree(ROOT / name, tmp_path / name)
    monkeypatch.chdir(tmp_path)
    ran = 0
    for path, sub in found:
        for e in examples_of(sub):
            if e.runs:
                assert main(shlex.split(e.command)[1:]) == 0, (e.command, capsys.readouterr().err)
                ran += 1
    capsys.readouterr()
    assert ran >= 8


# ----------------------------------------------------------------------------- run --json, then ls
@pytest.mark.slow
def test_run_json_then_ls(ray_session, tmp_path, mlflow_uri, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = write_study(tmp_path, "habits", axes={"optim.lr": [LR]}, seeds=[0, 1, 2])
    storage = tmp_path / "runs" / "habits"
    rc = main(["run", str(path), "--storage", str(storage), "--tracking-uri", mlflow_uri, "--no-live",
               "--json", "--set", "seeds=[0]", "--set", "train.epochs=1"])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    doc = json.loads(cap.out)  # stdout holds the document only
    assert doc["schema"] == "sweeper.run/1" and doc["status"] == "finished" and doc["counts"] == {"done": 1}
    assert [t["overrides"] for t in doc["trials"]] == [{"optim.lr": LR, "train.seed": 0}]  # --set seeds=[0]
    assert doc["best"]["value"] == max(t["value"] for t in doc["trials"]) and doc["best"]["run_id"]
    assert "Leaderboard" in cap.err and "5.496e-3" in cap.err and "0.00549" not in cap.err  # progress, rounded

    from sweeper import tracking

    children = tracking.Tracker(mlflow_uri).children(doc["experiment_id"], doc["parent_run_id"])
    assert len(children) == 1

    assert main(["ls", "--json"]) == 0  # the default root ./runs
    (ex,) = json.loads(capsys.readouterr().out)["executions"]
    assert ex["status"] == "finished" and ex["counts_from"] == "state" and ex["trials"] == {"done": 1}
    assert ex["total"] == 1 and ex["parent_run_id"] == doc["parent_run_id"] and ex["execution"] == doc["execution"]
    assert ex["best"]["value"] == doc["best"]["value"] and ex["best"]["trial"] == doc["best"]["name"]


def test_the_driver_records_status_and_summary(tmp_path):
    from sweeper.executions import decide_status, running_fields, summary_fields
    from sweeper.tune import StudyOutcome, TrialOutcome

    def outcome(statuses, interrupted=False):
        trials = [TrialOutcome(str(i), i, {}, st, 0.5 + i / 10 if st == "done" else None) for i, st in enumerate(statuses)]
        return StudyOutcome("s", "e", tmp_path, "test/recall_at_1", "max", [], trials=trials, total=4,
                            interrupted=interrupted)

    state = running_fields("test/recall_at_1", "max", 4)
    assert state["status"] == "running" and state["driver"]["pid"] == os.getpid() and state["total"] == 4
    assert decide_status(state) == ("running", f"driver pid {os.getpid()}")
    done = summary_fields(outcome(["done", "failed", "done", "done"]))
    assert done["status"] == "finished" and done["summary"]["trials"] == {"done": 3, "failed": 1}
    assert done["summary"]["best"]["trial"] == "#003" and done["summary"]["best"]["value"] == pytest.approx(0.8)
    assert summary_fields(outcome(["failed"] * 4))["status"] == "failed"
    cut = summary_fields(outcome(["done", "interrupted"], interrupted=True))
    assert cut["status"] == "interrupted" and cut["summary"]["trials"] == {"done": 1, "interrupted": 1, "not started": 2}
