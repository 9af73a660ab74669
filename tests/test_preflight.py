"""The driver-side preflight (``sweeper.preflight``): one line per problem, exit 2, in
seconds, before Ray starts a trial; nothing written (no storage folder, no MLflow run).
Also the failures F4 (impossible resources hang), F5 (unwritable storage / tracking
paths), F6 (an unreachable tracking server) of issue 16."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import TINY_BASE
from sweeper import preflight
from sweeper.cli import main


def _sweeper() -> list[str]:
    exe = Path(sys.executable).with_name("sweeper")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "sweeper.cli"]


def _error_lines(err: str) -> list[str]:
    return [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("warning:")]  # errors only


def _nothing_written(tmp_path: Path) -> None:
    assert not (tmp_path / "runs").exists()  # no empty runs/<study> (F6)
    assert not (tmp_path / "mlflow.db").exists()  # no MLflow run, RUNNING or otherwise


def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    return port


def test_gpu_request_on_a_cpu_only_machine_exits_2_before_ray_starts(study_file, tmp_path):
    """F4: ``gpu: 1`` without a GPU used to hang without a line. The CLI runs in its own
    process (the test session's Ray declares a logical GPU) with no CUDA device visible."""
    path = study_file("wants_gpu", resources={"cpu": 1, "gpu": 1})
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": os.pathsep.join(sys.path)}
    t0 = time.time()
    r = subprocess.run([*_sweeper(), "run", str(path), "--no-live"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=120)
    elapsed = time.time() - t0
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = _error_lines(r.stderr)
    assert len(lines) == 1 and lines[0].startswith("error: resources.gpu:"), r.stderr
    assert "1 GPU" in lines[0] and "no GPU" in lines[0] and "Traceback" not in r.stderr
    assert elapsed < 30, elapsed
    _nothing_written(tmp_path)
    assert not list(tmp_path.glob("**/session_*"))  # Ray never started


@pytest.mark.parametrize("fields, key, words", [
    ({"resources": {"cpu": 64}}, "resources.cpu", ["64 CPUs"]),
    ({"base": {**TINY_BASE, "data": {"dataset": "cub200", "root": "nowhere"}}}, "data.root",
     ["CUB_200_2011/images.txt", "nowhere"]),
    ({"base": {**TINY_BASE, "data": {"dataset": "cub200"}}}, "data.root", ["not set"]),
    ({"metric": "test/recal_at_1"}, "metric", ["did you mean 'test/recall_at_1'"]),
    ({"metric": "val/recall_at_1"}, "metric", ["data.val_classes > 0"]),
    ({"scheduler": {"metric": "test/map_at_k"}}, "scheduler.metric", ["did you mean 'test/map_at_r'"]),
    # digits trains on 5 classes; holding out 40 % leaves 3, and 32 = 4 classes x 8 cannot be filled
    ({"base": {**TINY_BASE, "data": {**TINY_BASE["data"], "val_classes": 0.4}}}, "batch",
     ["needs 4 classes per batch", "only 3 classes"]),
])
def test_impossible_study_is_one_line_naming_the_key(fields, key, words, study_file, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    path = study_file("impossible", **fields)
    t0 = time.time()
    assert main(["run", str(path), "--no-live"]) == 2
    assert time.time() - t0 < 30
    lines = _error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and lines[0].startswith(f"error: {key}:"), lines
    for w in words:
        assert w in lines[0], (w, lines[0])
    _nothing_written(tmp_path)


def test_dry_run_runs_the_preflight(study_file, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["run", str(study_file("typo", metric="test/recall_at_4")), "--dry-run"]) == 2
    assert "did you mean 'test/recall_at_2'" in capsys.readouterr().err  # the tiny base has recall_k [1, 2]
    # clustering is off in the tiny base: no NMI is reported
    assert main(["run", str(study_file("typo", metric="test/nmi")), "--dry-run"]) == 2
    capsys.readouterr()
    assert main(["run", str(study_file("fine")), "--dry-run"]) == 0
    assert "preflight passed" in capsys.readouterr().out
    _nothing_written(tmp_path)


def test_several_problems_are_one_line_each(study_file, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    path = study_file("many", resources={"cpu": 64}, metric="test/recal_at_1")
    rc = main(["run", str(path), "--storage", str(blocker / "runs"), "--tracking-uri", f"sqlite:///{blocker}/m.db"])
    lines = _error_lines(capsys.readouterr().err)
    assert rc == 2
    assert [ln.split(":", 2)[1].strip() for ln in lines] == ["resources.cpu", "--storage", "tracking", "metric"], lines


def test_unwritable_storage_and_tracking_folders_are_one_line(study_file, tmp_path, monkeypatch, capsys):
    """F5: a storage path or tracking folder that cannot be written gave raw tracebacks."""
    monkeypatch.chdir(tmp_path)
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("")
    path = study_file("paths")
    for argv, key in [
        (["--storage", str(blocker / "runs")], "--storage"),
        (["--tracking-uri", f"sqlite:///{blocker}/mlflow.db"], "tracking"),
        (["--tracking-uri", str(blocker / "mlruns")], "tracking"),
    ]:
        assert main(["run", str(path), *argv]) == 2, argv
        lines = _error_lines(capsys.readouterr().err)
        assert len(lines) == 1 and lines[0].startswith(f"error: {key}:") and "not a folder" in lines[0], lines
    _nothing_written(tmp_path)
    # the probe writes a real file: a folder root could "access" but not write is refused too
    ro = tmp_path / "ro"
    ro.mkdir()
    monkeypatch.setattr(preflight.tempfile, "mkstemp", lambda **kw: (_ for _ in ()).throw(OSError(30, "Read-only file system")))
    why = preflight.path_problem(ro / "runs", "--storage", "the Tune storage folder")
    assert why is not None and "not writable (Read-only file system" in why


def test_unreachable_tracking_server_exits_2_in_seconds(study_file, tmp_path, monkeypatch, capsys):
    """F6: an unreachable tracking server gave ~250 s of silence after Ray had started
    and left an empty runs/<study>."""
    monkeypatch.chdir(tmp_path)
    uri = f"http://admin:s3cr3t@127.0.0.1:{_closed_port()}"
    t0 = time.time()
    assert main(["run", str(study_file("offline")), "--tracking-uri", uri]) == 2
    assert time.time() - t0 < 15
    err = capsys.readouterr().err
    lines = _error_lines(err)
    assert len(lines) == 1 and lines[0].startswith("error: tracking:") and "did not answer" in lines[0], lines
    assert "s3cr3t" not in err and "admin:***@" in err
    _nothing_written(tmp_path)


def test_a_listening_tracking_server_passes(tmp_path):
    """Any HTTP answer within the limit passes (MLflow's /health, or a proxy's 404)."""
    import http.server
    import threading

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200 if self.path == "/health" else 404)
            self.end_headers()
            self.wfile.write(b"OK")

        def log_message(self, *a):
            pass

    srv = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        ctx = preflight.Context(None, tmp_path, f"http://127.0.0.1:{srv.server_address[1]}")
        assert preflight.check_tracking(ctx) == []
    finally:
        srv.shutdown()


def test_resources_against_the_clusters_nodes():
    nodes = [{"CPU": 8, "GPU": 0}, {"CPU": 4, "GPU": 2}]
    fits = preflight.resource_problems
    assert fits(4, 1, nodes, "the Ray cluster") == []
    assert fits(8, 0, nodes, "the Ray cluster") == []
    (line,) = fits(8, 1, nodes, "the Ray cluster")  # each alone fits somewhere, together nowhere
    assert line.startswith("resources:") and "fits on no node" in line and "8 CPU/0 GPU, 4 CPU/2 GPU" in line
    (line,) = fits(1, 3, nodes, "the Ray cluster")
    assert line.startswith("resources.gpu:") and "has 2" in line
    (line,) = fits(16, 0, nodes, "the Ray cluster")
    assert line.startswith("resources.cpu:") and "16 CPUs" in line and "has 8" in line
    (line,) = fits(1, 0.25, [{"CPU": 2}], "this machine")
    assert line.startswith("resources.gpu:") and "0.25 GPU" in line and "no GPU" in line


def test_checks_are_a_registry_other_modules_extend(study_file, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    seen = []

    @preflight.check("weights-test")
    def fake_weights(ctx):
        seen.append([c.model.backbone for c in ctx.configs()])
        return ["model.pretrained: /w/resnet50.pth is missing on this machine"]

    try:
        assert main(["run", str(study_file("ext", axes={"model.embed_dim": [8, 16]})), "--dry-run"]) == 2
        assert "error: model.pretrained: /w/resnet50.pth is missing" in capsys.readouterr().err
        assert seen == [["small_cnn", "small_cnn"]]  # every trial's config
        monkeypatch.setenv(preflight.SKIP_ENV, "weights-test")
        assert main(["run", str(study_file("ext")), "--dry-run"]) == 0
    finally:
        preflight.CHECKS.pop("weights-test")


def test_pending_trials_say_why_after_a_minute(monkeypatch):
    """Tune's "insufficient resources" warning is kept quiet; trials that stay PENDING
    for a minute get one line naming what they ask and what Ray has free."""
    import io

    from rich.console import Console

    from sweeper import live

    out = io.StringIO()
    view = live.LiveView("m", "max", [], 2, console=Console(file=out, width=300), live=False,
                         request={"CPU": 1.0, "GPU": 1.0})
    monkeypatch.setattr(live, "_ray_resources", lambda: ({"CPU": 2.0}, {"CPU": 2.0}))

    class T:
        def __init__(self, status):
            self.status = status

    pending = [T("PENDING"), T("PENDING")]
    assert view.watch_pending(pending, now=100.0) is None
    assert view.watch_pending(pending, now=130.0) is None
    assert view.watch_pending([T("RUNNING"), T("PENDING")], now=150.0) is None  # one runs: the clock restarts
    assert view.watch_pending(pending, now=160.0) is None
    line = view.watch_pending(pending, now=160.0 + live.PENDING_WARN_S)
    assert line is not None and "each asks CPU=1, GPU=1" in line and "not enough GPU free" in line
    assert "GPU 0 free of 0" in line and "waiting:" in out.getvalue()
    assert view.watch_pending(pending, now=1000.0) is None  # said once
