"""Shared fixtures: one small Ray instance for the whole session, tiny study files."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import pytest
import yaml

# A run that trains in about a second on a CPU (digits is embedded: no download).
TINY_BASE: dict[str, Any] = {
    "data": {"dataset": "digits", "image_size": 16, "augmentation": "none"},
    "model": {"backbone": "small_cnn", "backbone_params": {"width": 8, "depth": 2}, "embed_dim": 16},
    "batch": {"size": 32, "samples_per_class": 8, "iterations_per_epoch": 3},
    "optim": {"lr": 1.0e-3},
    "train": {"epochs": 2, "device": "cpu"},
    "eval": {"recall_k": [1, 2], "clustering": False, "embedding_metrics": False,
             "pictures": False},  # on in tests/test_pictures.py (and the docs' runs); off here keeps the suite's time
}


def write_study(directory: Path, name: str = "tiny", **fields: Any) -> Path:
    """Write ``<directory>/<name>.yaml`` with the tiny base and ``fields``."""
    body = {"name": name, "base": TINY_BASE, **fields}
    path = Path(directory) / f"{name}.yaml"
    path.write_text(yaml.safe_dump(body, sort_keys=False))
    return path


@pytest.fixture
def study_file(tmp_path):
    def make(name: str = "tiny", **fields: Any) -> Path:
        return write_study(tmp_path, name, **fields)

    return make


@pytest.fixture(scope="session")
def _mlflow_template_db(tmp_path_factory) -> Path:
    """An empty MLflow SQLite store, created once (its schema migrations take seconds)."""
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    from mlflow import MlflowClient

    db = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{db}").search_experiments()
    return db


@pytest.fixture
def mlflow_uri(tmp_path, _mlflow_template_db) -> str:
    """A fresh, empty MLflow store in this test's tmp_path (a copy of the template)."""
    db = tmp_path / "mlflow.db"
    shutil.copyfile(_mlflow_template_db, db)
    return f"sqlite:///{db}"


@pytest.fixture(scope="session")
def ray_session():
    """``ray.init(num_cpus=2, num_gpus=1)`` once for every test that needs Ray; yields the GCS address."""
    ray = pytest.importorskip("ray")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    from sweeper.multi_worker import ray_init_kwargs

    started = False
    if not ray.is_initialized():
        ray.init(
            num_cpus=2,
            # one GPU as a logical resource only (none is used: trials train on the CPU), so
            # that fractional-GPU packing is exercised on machines without one
            num_gpus=1,
            # what the sweeper's own ray.init gives a multi-worker study (sweeper/multi_worker.py):
            # the drivers' custom resource, and the dashboard Train's placement-group cleaner needs
            **ray_init_kwargs(workers=2),
            log_to_driver=False,
            logging_level=logging.WARNING,
        )
        started = True
    yield ray.get_runtime_context().gcs_address
    if started:
        ray.shutdown()


HANG_GUARD_S = 600.0
"""How long :func:`drive_until` waits for its condition: a guard against a hang, never a
timing (a loaded 2-core machine can take minutes to start Ray workers)."""


def drive_until(cmd: list[str], *, cwd: Path, log_path: Path, until: Callable[[], bool], sig: int,
                what: str, env: Mapping[str, str] | None = None, timeout: float = HANG_GUARD_S,
                poll: float = 0.5, wait: float = 90.0) -> int:
    """Start the driver ``cmd`` (its output in ``log_path``), wait until ``until()`` holds,
    send it ``sig`` and return its exit status once it has ended. Fails, with the end of
    the driver's log, when the driver ends before ``what`` happened or ``until()`` never
    holds within ``timeout`` seconds. The driver is never left running."""
    def tail() -> str:
        return log_path.read_text(errors="replace")[-4000:]

    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=log, stderr=subprocess.STDOUT,
                                env=dict(env) if env is not None else None)
        try:
            deadline, reached = time.time() + timeout, False
            while time.time() < deadline and proc.poll() is None:
                if until():
                    reached = True
                    break
                time.sleep(poll)
            assert proc.poll() is None, f"the driver ended before {what}:\n" + tail()
            assert reached, f"not reached in {timeout:.0f} s: {what}\n" + tail()
            proc.send_signal(sig)
            return proc.wait(timeout=wait)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)
