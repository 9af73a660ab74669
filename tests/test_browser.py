"""A quick study seen in a real browser: ``report.html`` and the MLflow run pages of the parent and
of one child run, in headless Chromium (Debian's ``chromium`` driven by Playwright through its
``executable_path``; no browser download).

Asserted: every ``<img>`` loads (``naturalWidth > 0``) and is not blank (its screenshot has more
than one colour), the report's leaderboard table is there, the run pages render the run name and
metrics, and a PNG artifact of the parent run is shown by MLflow's artifact viewer. Screenshots go
to ``test-artifacts/browser/`` in the repository root (git-ignored; CI keeps the folder).

Without chromium or Playwright the test skips and says why, except under ``CI=true``, where
``.ci/run`` installs both and their absence is an error.
"""

from __future__ import annotations

import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from rich.console import Console

from conftest import write_study

ROOT = Path(__file__).resolve().parents[1]
SHOTS = ROOT / "test-artifacts" / "browser"
pytestmark = pytest.mark.slow


def _missing(reason: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason}; CI=true: .ci/run installs chromium and playwright, so the browser test must run")
    pytest.skip(reason)


def chromium_binary() -> str | None:
    for name in ("chromium", "chromium-headless-shell", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    for path in ("/usr/lib/chromium/chromium", "/usr/lib/chromium/chromium-headless-shell"):
        if os.access(path, os.X_OK):
            return path
    return None


@pytest.fixture(scope="module")
def browser():
    exe = chromium_binary()
    if exe is None:
        _missing("no chromium binary (Debian: apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _missing("playwright is not installed (pip install playwright; never `playwright install`)")
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=exe, args=["--no-sandbox", "--disable-gpu"])  # root in CI: no sandbox
        yield b
        b.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sweeper() -> list[str]:
    exe = Path(sys.executable).with_name("sweeper")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "sweeper.cli"]


def _wait_http(url: str, proc: subprocess.Popen, log: Path, timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the MLflow UI exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    pytest.fail(f"the MLflow UI did not answer {url} within {timeout:.0f} s:\n{log.read_text()[-3000:]}")


def _not_blank(png: bytes) -> bool:
    from PIL import Image

    img = Image.open(io.BytesIO(png)).convert("RGB")
    return len(img.getcolors(maxcolors=1 << 20) or [None, None]) > 1  # None: more colours than that


def _check_images(page, where: str, at_least: int) -> int:
    """Every <img> of ``page`` loaded (naturalWidth > 0) and its screenshot is not of one colour."""
    page.wait_for_function("() => [...document.images].every(i => i.complete)", timeout=30_000)
    imgs = page.locator("img")
    n = imgs.count()
    assert n >= at_least, f"{where}: {n} images, expected at least {at_least}"
    for i in range(n):
        img = imgs.nth(i)
        width = img.evaluate("i => i.naturalWidth")
        assert width > 0, f"{where}: image {i} ({img.get_attribute('alt') or img.get_attribute('src')[:60]}) is broken"
        if img.is_visible():
            img.scroll_into_view_if_needed()
            assert _not_blank(img.screenshot()), f"{where}: image {i} is blank (one colour)"
    return n


def test_report_and_mlflow_run_pages_in_chromium(browser, ray_session, tmp_path, mlflow_uri, monkeypatch):
    from sweeper.study import load_study
    from sweeper.tune import run_study

    SHOTS.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    phase = lambda what: print(f"[browser test] {what}: {time.time() - t0:.1f} s", flush=True)  # noqa: E731 (shown on failure, or with -s)
    monkeypatch.chdir(tmp_path)  # MLflow's artifact root (./mlartifacts) lands in tmp_path
    # the UI first: it starts while the study trains (`sweeper ui`, one worker to start fast)
    port = _free_port()
    log = tmp_path / "ui.log"
    env = {**os.environ, "MLFLOW_WORKERS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    with open(log, "w") as fh:
        ui = subprocess.Popen([*_sweeper(), "ui", "--tracking-uri", mlflow_uri, "--host", "127.0.0.1", "--port", str(port)],
                              cwd=tmp_path, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        study = load_study(write_study(tmp_path, "browser", seeds=[0], analyses=["aggregate", "report"]))
        out = io.StringIO()
        outcome = run_study(study, storage=tmp_path / "runs", tracking_uri=mlflow_uri,
                            console=Console(file=out, width=200), live=False)
        assert [t.status for t in outcome.trials] == ["done"], out.getvalue()
        phase("study done")
        report = outcome.exec_dir / "analysis" / "report.html"
        assert report.is_file(), out.getvalue()
        page = browser.new_page(viewport={"width": 1400, "height": 1000})

        # report.html, opened from disk
        page.goto(report.as_uri())
        assert page.locator("table").count() >= 1
        headers = page.locator("table").first.locator("th").all_inner_texts()
        assert "R@1" in headers and "vs best (R@1)" in headers, headers
        assert _check_images(page, "report.html", at_least=1) >= 1
        page.screenshot(path=str(SHOTS / "report.png"), full_page=True)
        phase("report checked")

        # the MLflow UI: parent run page, its PNG artifact in the viewer, one child run page
        base = f"http://127.0.0.1:{port}"
        _wait_http(f"{base}/health", ui, log, timeout=180)
        phase("MLflow UI answers")
        exp, parent = outcome.experiment_id, outcome.parent_run_id
        from mlflow.tracking import MlflowClient

        parent_name = MlflowClient(mlflow_uri).get_run(parent).info.run_name
        page.goto(f"{base}/#/experiments/{exp}/runs/{parent}")
        page.get_by_text(parent_name, exact=True).first.wait_for(timeout=60_000)
        page.get_by_text("browser-000").first.wait_for(timeout=30_000)  # the child runs are listed
        _check_images(page, "parent run page", at_least=0)
        page.screenshot(path=str(SHOTS / "mlflow_parent_run.png"), full_page=True)

        page.goto(f"{base}/#/experiments/{exp}/runs/{parent}/artifacts")
        page.get_by_text("analysis", exact=True).first.click(timeout=60_000)
        page.get_by_text("aggregate_seeds.png", exact=True).first.click(timeout=30_000)
        page.wait_for_function("() => [...document.images].some(i => i.src.startsWith('blob:') && i.naturalWidth > 0)",
                               timeout=30_000)
        assert _check_images(page, "artifact viewer", at_least=1) >= 1
        page.screenshot(path=str(SHOTS / "mlflow_parent_artifact_png.png"), full_page=True)
        phase("parent run pages checked")

        child = next(t for t in outcome.trials if t.run_id)
        child_run = MlflowClient(mlflow_uri).get_run(child.run_id)
        page.goto(f"{base}/#/experiments/{exp}/runs/{child.run_id}")
        page.get_by_text(child_run.info.run_name, exact=True).first.wait_for(timeout=60_000)
        metric = page.get_by_text("test/recall_at_1", exact=True).first
        metric.wait_for(timeout=30_000)  # the metrics table
        metric.scroll_into_view_if_needed()
        assert "best/test/recall_at_1" in page.inner_text("body")
        _check_images(page, "child run page", at_least=0)
        page.screenshot(path=str(SHOTS / "mlflow_child_run.png"), full_page=True)
        page.close()
        phase("child run page checked")
    finally:
        if ui.poll() is None:
            os.killpg(ui.pid, signal.SIGTERM)  # the UI and its uvicorn worker: its own process group
            try:
                ui.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(ui.pid, signal.SIGKILL)
                ui.wait()
