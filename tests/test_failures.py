"""Reliability failures F1-F11 of issue 16, one test (or more) each.

F4-F7 live with the driver preflight (another module); F11 in ``tests/test_cluster.py``
(every listening socket of the test cluster is on 127.0.0.1).
"""

from __future__ import annotations

import importlib
import inspect
import pickle
import pkgutil
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import dmlcore
from sweeper import tracking


# ----------------------------------------------------------------------------- F3
def _dmlcore_exception_classes() -> list[type[BaseException]]:
    classes = {}
    for info in pkgutil.walk_packages(dmlcore.__path__, "dmlcore."):
        mod = importlib.import_module(info.name)
        for _, obj in inspect.getmembers(mod, inspect.isclass):
            if issubclass(obj, BaseException) and obj.__module__.startswith("dmlcore"):
                classes[f"{obj.__module__}.{obj.__qualname__}"] = obj
    return [classes[k] for k in sorted(classes)]


def _example(cls: type[BaseException]) -> BaseException:
    """An instance built the way the code builds it (the constructor's own parameters)."""
    params = [p for p in inspect.signature(cls.__init__).parameters.values()
              if p.name != "self" and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
              and p.default is p.empty]
    if not params:
        return cls("one line for the user")
    return cls(*[f"/data/img_{p.name}.jpg" for p in params])


def test_every_dmlcore_exception_survives_pickle():
    """F3: an exception raised in a Ray worker or a DataLoader worker is pickled; it must come
    back as the same class with the same one-line message (``CorruptImageError(path, reason)``
    used to fail with ``TypeError: missing 1 required positional argument``)."""
    classes = _dmlcore_exception_classes()
    names = {c.__name__ for c in classes}
    assert {"CorruptImageError", "DataError", "ConfigError", "TrainingDiverged"} <= names, names
    for cls in classes:
        err = _example(cls)
        back = pickle.loads(pickle.dumps(err))
        assert type(back) is cls and str(back) == str(err), cls
        assert vars(back) == vars(err), cls


def test_corrupt_image_error_crosses_ray(ray_session):
    """F3 through Ray itself: the driver gets the worker's CorruptImageError, message intact."""
    import ray

    from dmlcore.data.base import CorruptImageError

    @ray.remote(num_cpus=0)
    def bad():
        raise CorruptImageError("/data/cub/001.jpg", "cannot identify image file")

    with pytest.raises(CorruptImageError) as info:
        ray.get(bad.remote(), timeout=120)
    assert info.value.path == "/data/cub/001.jpg"
    assert "unreadable image /data/cub/001.jpg: cannot identify image file" in str(info.value)


# ----------------------------------------------------------------------------- F8
def _outcome(statuses: list[str], total: int, pid: str):
    from sweeper.tune import StudyOutcome, TrialOutcome

    o = StudyOutcome(study="s", execution="e", exec_dir=Path("."), metric="val/recall_at_1", mode="max",
                     keys=[], total=total, parent_run_id=pid)
    o.trials = [TrialOutcome(str(i), i, {}, st, 0.5 if st == "done" else None) for i, st in enumerate(statuses)]
    return o


def test_parent_tags_after_resume_are_current_and_have_no_spaces(mlflow_uri):
    """F8: the parent run's ``trials_<status>`` tags after a resume describe the resumed
    execution (no count left over from the interrupted one) and no tag key has a space."""
    from sweeper.tune import _finish_parent

    tracker = tracking.Tracker(mlflow_uri)
    exp = tracker.experiment_id("s")
    pid = tracker.create_run(exp, "s/e", {"role": "study"})
    first = _outcome(["done", "interrupted", "failed"], total=5, pid=pid)  # 2 never started
    first.interrupted = True
    _finish_parent(tracker, first)
    tags = tracker.get_run(pid).data.tags
    assert tags["trials_not_started"] == "2" and tags["trials_interrupted"] == "1"
    _finish_parent(tracker, _outcome(["done"] * 5, total=5, pid=pid))  # the resume finished them all
    run = tracker.get_run(pid)
    counts = {k: v for k, v in run.data.tags.items() if k.startswith("trials_")}
    assert not [k for k in run.data.tags if " " in k], run.data.tags
    assert counts["trials_done"] == "5", counts
    assert all(v == "0" for k, v in counts.items() if k != "trials_done"), counts
    assert run.info.status == "FINISHED"


# ----------------------------------------------------------------------------- F9
def _folder(root: Path, classes: dict[str, int]) -> Path:
    for n, (c, k) in enumerate(classes.items()):
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(k):
            rng = np.random.default_rng(10 * n + i)
            Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    return root


@pytest.mark.parametrize("params", [{}, {"test_classes": ["eel"]}], ids=["dropped", "named"])
def test_empty_class_folder_is_one_clear_line(tmp_path, params):
    """F9: a class folder without images was dropped silently (the class count changed
    under the user's feet) or, named in ``test_classes``, reported as "not under ROOT"."""
    from dmlcore import registry
    from dmlcore.data.base import DataError

    root = _folder(tmp_path, {"ant": 2, "bee": 2, "cat": 2, "eel": 0})
    (root / "eel" / "README.txt").write_text("images to come")
    with pytest.raises(DataError) as info:
        registry.build("dataset", "imagefolder", params, root=str(root), image_size=16, seed=0, on_corrupt="error")
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith("imagefolder: ")
    assert f"class folder {root / 'eel'} has no images" in msg, msg


# ----------------------------------------------------------------------------- F10
class _Cfg:
    """Stands in for a RunConfig whose free-form params carry a secret (a plug-in dataset's
    ``password``, a backbone's ``api_token``)."""

    def __init__(self, flat):
        self.flat = flat

    def to_flat(self):
        return dict(self.flat)

    def to_yaml(self):
        import yaml

        return yaml.safe_dump({"data": {"params": {"password": self.flat["data.params.password"]}},
                               "model": {"backbone_params": {"api_token": self.flat["model.backbone_params.api_token"]}}})


def test_passwords_in_config_values_are_never_stored(tmp_path, mlflow_uri):
    """F10: secrets in config *values* (not in URIs) reach neither params, tags, artifacts
    nor error lines; the store's bytes and its artifact files are searched."""
    pw, tok = "hunter2-" + "x" * 8, "tok-" + "y" * 12
    tracker = tracking.Tracker(mlflow_uri)
    exp = tracker.experiment_id("secrets")
    cfg = _Cfg({"data.params.password": pw, "model.backbone_params.api_token": tok, "optim.lr": 0.1,
                "train.token_count": 7})
    logger, _ = tracking.open_run(tracker, exp, "r", cfg, {"note": f"db_password={pw}", "api_secret": tok})
    logger.fail(RuntimeError(f"could not connect with password: {pw}"))
    run = tracker.get_run(logger.run_id)
    assert run.data.params["data.params.password"] == "***"
    assert run.data.params["optim.lr"] == "0.1" and run.data.params["train.token_count"] == "7"  # not secrets
    assert run.data.tags["api_secret"] == "***" and run.data.tags["note"] == "db_password=***"
    assert run.data.tags["error"] == "RuntimeError: could not connect with password: ***"
    db = tracking.sqlite_path(mlflow_uri)
    blobs = [db.read_bytes()] + [p.read_bytes() for p in (db.parent / "mlartifacts").rglob("*") if p.is_file()]
    assert len(blobs) >= 3  # config.yaml and error.txt are there
    for b in blobs:
        assert pw.encode() not in b and tok.encode() not in b
    with sqlite3.connect(db) as con:
        assert con.execute("SELECT COUNT(*) FROM params WHERE value = '***'").fetchone()[0] == 2


# ----------------------------------------------------------------------------- honest HPO defaults
def test_search_on_a_test_metric_warns_once(tmp_path, capfd):
    """Item 8: a search (or ASHA) on ``test/...`` warns once that it tunes on the test classes;
    the shipped quickstart ranks on ``val/recall_at_1`` with held-out train classes."""
    from conftest import write_study
    from sweeper.cli import main
    from sweeper.study import load_study

    space = {"optim.lr": {"type": "float", "low": 1e-4, "high": 1e-3, "log": True}}
    bad = write_study(tmp_path, "tuned", search={"samples": 2, "space": space}, metric="test/recall_at_1")
    capfd.readouterr()
    assert main(["run", str(bad), "--dry-run"]) == 0
    err = capfd.readouterr().err
    assert err.count("warning:") == 1 and "zero-shot test classes" in err and "val/recall_at_1" in err, err
    ok = write_study(tmp_path, "honest", search={"samples": 2, "space": space}, metric="val/recall_at_1",
                     base={**__import__("conftest").TINY_BASE, "data": {"dataset": "digits", "image_size": 16,
                           "augmentation": "none", "val_classes": 0.4},
                           "batch": {"size": 24, "samples_per_class": 8, "iterations_per_epoch": 3}})  # 3 train classes x 8
    assert main(["run", str(ok), "--dry-run"]) == 0
    assert "warning" not in capfd.readouterr().err
    q = load_study(Path(__file__).resolve().parents[1] / "studies" / "quickstart.yaml")
    assert q.spec.metric == "val/recall_at_1" and q.base.data.val_classes > 0 and q.base.eval.select_on == "val"


# ----------------------------------------------------------------------------- F2
def test_two_drivers_on_a_fresh_store(tmp_path):
    """F2: two processes open the same fresh SQLite store at once (two ``sweeper run``s in
    one folder); both get a working store (no alembic race traceback) and both runs are there."""
    import subprocess
    import sys

    db = tmp_path / "mlflow.db"
    code = (
        "import sys; from sweeper import tracking; t = tracking.Tracker(sys.argv[1]); "
        "e = t.experiment_id('race'); t.create_run(e, sys.argv[2], {'role': 'study'})"
    )
    env = {**__import__("os").environ, "MLFLOW_LOGGING_LEVEL": "WARNING"}
    procs = [subprocess.Popen([sys.executable, "-c", code, f"sqlite:///{db}", f"driver{i}"], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = [p.communicate(timeout=240) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0 and "Traceback" not in err, err[-3000:]
    t = tracking.Tracker(f"sqlite:///{db}")
    names = sorted(r.info.run_name for r in t.search([t.experiment_id("race")], ""))
    assert names == ["driver0", "driver1"], names
