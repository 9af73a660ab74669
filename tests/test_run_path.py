"""``sweeper run`` end to end: resume that remembers its flags and unpickles nothing (F7),
studies named by file stem, SIGTERM doing what Ctrl-C does, output outside a terminal
and ``sweeper ui`` becoming the MLflow server (issue 16)."""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from conftest import TINY_BASE, drive_until
from sweeper import tracking
from sweeper.cli import main


def _sweeper() -> list[str]:
    exe = Path(sys.executable).with_name("sweeper")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "sweeper.cli"]


def _runs(uri: str, experiment: str):
    t = tracking.Tracker(uri)
    exp = t.client.get_experiment_by_name(experiment)
    if exp is None:
        return t, [], []
    runs = t.search([exp.experiment_id], "")
    return t, [r for r in runs if tracking.TAG_PARENT not in r.data.tags], [r for r in runs if tracking.TAG_PARENT in r.data.tags]


class _Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.slow
def test_resume_alone_continues_with_the_quick_flags_and_unpickles_nothing(ray_session, tmp_path, mlflow_uri,
                                                                           monkeypatch, capsys):
    """``sweeper run X.yaml --quick``, then ``sweeper run X.yaml --resume`` (no other flag)
    continues the execution with --quick: the failed trial runs again in its MLflow run
    with the quick epochs, the finished one is not trained again, nothing is duplicated.
    F7: pickles planted in the storage folder (``tuner.pkl`` and every other ``*.pkl``)
    are never loaded. A changed flag on resume is refused with commands that work, and
    ``sweeper analyze STEM`` finds the study by its file's stem."""
    monkeypatch.chdir(tmp_path)
    weights = tmp_path / "weights.pt"
    body = {
        "name": "remembering_study",  # not the file's stem
        "base": TINY_BASE,
        "axes": {"model.pretrained": [None, str(weights)]},
        "max_concurrent": 1,
        "analyses": ["aggregate"],
        "quick": {"train.epochs": 1},
    }
    path = tmp_path / "remember.yaml"
    path.write_text(yaml.safe_dump(body, sort_keys=False))
    common = ["--storage", str(tmp_path / "runs"), "--tracking-uri", mlflow_uri, "--no-live"]

    assert main(["run", "remember.yaml", "--quick", *common]) == 0  # one trial fails: missing weights
    capsys.readouterr()
    tracker, parents, children = _runs(mlflow_uri, "remembering_study")
    by_index = {c.data.tags["trial_index"]: c for c in children}
    assert by_index["0"].info.status == "FINISHED" and by_index["1"].info.status == "FAILED"
    (exec_dir,) = [p for p in (tmp_path / "runs").iterdir() if (p / "sweeper.json").is_file()]

    marker = tmp_path / "pwned"
    planted = [exec_dir / "tuner.pkl", *exec_dir.rglob("*.pkl")]
    for p in planted:
        p.write_bytes(pickle.dumps(_Evil(marker)))
    import torch

    from dmlcore import registry

    net, _ = registry.build("backbone", "small_cnn", {"width": 8, "depth": 2}, pretrained=None)
    torch.save(net.state_dict(), weights)

    # a changed flag is refused, naming the command that continues and the one that starts anew
    assert main(["run", "remember.yaml", "--resume", "--set", "train.epochs=3", *common]) == 2
    err = capsys.readouterr().err
    assert f"sweeper run remember.yaml --resume {exec_dir.name} --storage {tmp_path / 'runs'}" in err
    assert "sweeper run remember.yaml --set train.epochs=3" in err and "--quick" in err

    assert main(["run", "remember.yaml", "--resume", *common]) == 0
    out = capsys.readouterr().out
    assert not marker.exists(), "resume unpickled a file of the storage folder"
    tracker, parents, after = _runs(mlflow_uri, "remembering_study")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    keys = [c.data.tags["trial_key"] for c in after]
    assert len(keys) == 2 and len(set(keys)) == 2, keys
    again = {c.data.tags["trial_index"]: c for c in after}
    assert again["1"].info.run_id == by_index["1"].info.run_id and again["1"].info.status == "FINISHED"
    assert again["0"].info.run_id == by_index["0"].info.run_id
    for c in again.values():  # --quick's train.epochs=1 was remembered (the base has 2)
        steps = [m.step for m in tracker.client.get_metric_history(c.info.run_id, "train/loss")]
        assert steps == [1], (c.data.tags["trial_index"], steps)
    assert "remembering_study" in out

    # by the file's stem, though the study inside is named otherwise
    assert main(["analyze", "remember", "--tracking-uri", mlflow_uri, "--out", str(tmp_path / "an")]) == 0
    assert "wrote" in capsys.readouterr().out
    assert main(["analyze", "remembr", "--tracking-uri", mlflow_uri]) == 2
    assert "did you mean 'remember'" in capsys.readouterr().err


def _ray_processes(temp_dir: str) -> list[str]:
    """Processes whose command line names ``temp_dir`` (the Ray instance the driver started)."""
    out = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            cmd = (p / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if temp_dir in cmd:
            out.append(f"{p.name}: {cmd[:120]}")
    return out


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="needs /proc to find the Ray processes")
def test_sigterm_does_what_ctrl_c_does(tmp_path, mlflow_uri):
    """``timeout -s TERM ... sweeper run``: the parent and child runs end KILLED (none left
    RUNNING), the driver's own Ray is shut down (no Ray process left after 10 s), and the
    hint is a real command."""
    base = {**TINY_BASE, "train": {**TINY_BASE["train"], "epochs": 200}}
    path = tmp_path / "long.yaml"
    path.write_text(yaml.safe_dump({"name": "long", "base": base, "seeds": [0, 1]}, sort_keys=False))
    ray_tmp = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # short: Ray's socket paths must stay short
    env = {**os.environ, "RAY_TMPDIR": ray_tmp, "PYTHONPATH": os.pathsep.join(sys.path)}
    env.pop("RAY_ADDRESS", None)
    cmd = [*_sweeper(), "run", str(path), "--num-cpus", "2", "--storage", str(tmp_path / "runs"),
           "--tracking-uri", mlflow_uri, "--no-live"]
    log = tmp_path / "driver.log"

    def training() -> bool:
        _, _, children = _runs(mlflow_uri, "long")
        if not any(c.info.status == "RUNNING" and c.data.metrics for c in children):
            return False
        assert _ray_processes(ray_tmp), "the driver's Ray is not running"
        return True

    rc = drive_until(cmd, cwd=tmp_path, log_path=log, until=training, sig=signal.SIGTERM, env=env,
                     what="a trial was training")
    text = log.read_text()
    assert rc == 1, text  # interrupted, like Ctrl-C
    _, parents, children = _runs(mlflow_uri, "long")
    assert [p.info.status for p in parents] == ["KILLED"], text
    assert children and all(c.info.status == "KILLED" for c in children), [c.info.status for c in children]
    exec_name = parents[0].data.tags["execution"]
    assert f"continue with  sweeper run {path} --resume {exec_name} --storage {tmp_path / 'runs'}" in text
    deadline = time.time() + 10
    while _ray_processes(ray_tmp) and time.time() < deadline:
        time.sleep(0.5)
    assert not _ray_processes(ray_tmp), _ray_processes(ray_tmp)


def test_list_and_leaderboard_outside_a_terminal_are_not_cut_at_80(tmp_path, monkeypatch, capsys):
    """``sweeper list losses | cat``, and the leaderboard in a log file (nohup, Slurm)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    env.pop("COLUMNS", None)
    r = subprocess.run([*_sweeper(), "list", "losses"], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert max(len(ln) for ln in lines) > 80
    from dmlcore import registry

    for name, _, doc in registry.describe("loss"):  # every description whole on its row
        if not registry.entry_module("loss", name).startswith("dmlcore"):
            continue  # a plug-in registered in this process by another test: not in the subprocess
        row = next(ln for ln in lines if ln.startswith(f"│ {name} "))
        assert " ".join(doc.split()) in row, (name, doc)

    from sweeper.cli import print_outcome
    from sweeper.tune import StudyOutcome, TrialOutcome

    monkeypatch.delenv("COLUMNS", raising=False)
    long_dir = tmp_path / ("a_rather_long_folder_name_" * 4) / "runs" / "20260101-000000"
    keys = ["loss.params.margin", "model.embed_dim", "optim.weight_decay", "batch.samples_per_class"]
    outcome = StudyOutcome(
        "leaderboard_study", "20260101-000000", long_dir, "test/recall_at_1", "max", keys,
        trials=[TrialOutcome(str(i), i, {k: 0.123456 + i for k in keys}, "done", 0.987654321 - i / 10, 3)
                for i in range(3)],
        tracking_uri=f"sqlite:///{long_dir}/mlflow.db", parent_run_id="f" * 32,
    )
    print_outcome(outcome, __import__("sweeper.cli", fromlist=["_console"])._console())
    out = capsys.readouterr().out
    assert f"storage  {long_dir}" in out  # the path is never broken
    header = next(ln for ln in out.splitlines() if "rank" in ln)
    assert len(header) > 80 and all(k in header for k in keys) and "test/recall_at_1" in header
    assert "0.9877" in out and "1.123" in out


def test_ui_becomes_the_mlflow_server(tmp_path, monkeypatch):
    """``sweeper ui`` replaces itself with the server (os.execvp): SIGTERM reaches it."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    calls = []

    def fake_exec(file, argv):
        calls.append((file, list(argv)))

    monkeypatch.setattr(os, "execvp", fake_exec)
    assert main(["ui", "--port", "5077"]) == 0
    ((file, argv),) = calls
    assert file == sys.executable and argv[:4] == [sys.executable, "-m", "mlflow", "ui"]
    assert "--host" in argv and "127.0.0.1" in argv and "5077" in argv
