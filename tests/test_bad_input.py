"""Bad input through the ``sweeper`` CLI: one line naming the problem, exit status 2, no traceback.

Table-driven; the cases already covered elsewhere are not repeated here:
``tests/test_cli.py`` (unknown key via ``--set``, unknown loss via ``show``/``train``, a
missing config file, unknown registry kind, ``--resume`` without an execution, ``sweeper
ui`` binding 127.0.0.1), ``tests/test_study.py`` (every study-file error at the
``load_study`` level) and ``tests/test_data_real.py`` (dataset layouts, ``on_corrupt``
at the data level). Also here: the security checks (``weights_only=True`` everywhere,
YAML only through ``safe_load``).
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import TINY_BASE
from sweeper.cli import main

ROOT = Path(__file__).resolve().parents[1]

# `sweeper train` of a tiny digits run, as --set arguments
TINY_TRAIN = [
    "data.dataset=digits", "data.image_size=16", "data.augmentation=none",
    "model.backbone_params={width: 8, depth: 2}", "model.embed_dim=8",
    "batch.size=8", "batch.samples_per_class=2", "batch.iterations_per_epoch=2",
    "optim.lr=1e-3", "train.epochs=1", "train.device=cpu",
    "eval.recall_k=[1]", "eval.clustering=false", "eval.embedding_metrics=false",
]


def sets(items: list[str]) -> list[str]:
    out: list[str] = []
    for s in items:
        out += ["--set", s]
    return out


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def study_yaml(tmp: Path, name: str = "s", **fields) -> Path:
    return write(tmp / f"{name}.yaml", yaml.safe_dump({"name": name, "base": TINY_BASE, **fields}, sort_keys=False))


def image_tree(root: Path, corrupt: bool = True) -> Path:
    """ROOT/CLASS/*.jpg: 4 classes x 6 small JPEGs, one of them not a JPEG at all."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in range(4):
        d = root / f"class{c}"
        d.mkdir(parents=True, exist_ok=True)
        for i in range(6):
            Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(d / f"{i}.jpg")
    if corrupt:
        (root / "class0" / "3.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated, not really a JPEG")
    return root


def imagefolder_sets(root: Path, *extra: str) -> list[str]:
    return sets([
        *TINY_TRAIN, "data.dataset=imagefolder", f"data.root={root}", "batch.size=4",
        "batch.samples_per_class=2", *extra,
    ])


def checkpoint_of(tmp: Path, embed_dim: int) -> Path:
    """A real trainer checkpoint (untrained) of the tiny config with ``embed_dim``."""
    from dmlcore.config import load_config, parse_overrides
    from dmlcore.train import Trainer, save_checkpoint

    cfg = load_config(None, parse_overrides([*TINY_TRAIN, f"model.embed_dim={embed_dim}"]))
    tr = Trainer(cfg, progress=False).build()
    return save_checkpoint(tr.state_dict(0, [], {}, 0), tmp / f"ckpt{embed_dim}.pt")


class _Evil:
    """Unpickling this runs a shell command: what a poisoned checkpoint would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _changed_study(tmp: Path) -> list[str]:
    """A study whose earlier execution ran with another version of the file."""
    ex = tmp / "runs" / "20250101-000000"
    ex.mkdir(parents=True)
    state = {"study": "s", "execution": ex.name, "fingerprint": "0" * 16, "quick": False, "overrides": {},
             "tracking_uri": "sqlite:///unused.db", "experiment_id": "1", "parent_run_id": "x"}
    (ex / "sweeper.json").write_text(__import__("json").dumps(state))
    return ["run", str(study_yaml(tmp)), "--storage", str(tmp / "runs"), "--resume"]


def _evil_checkpoint(tmp: Path) -> Path:
    import torch

    path = tmp / "evil.pt"
    torch.save({"format": 1, "model": _Evil(tmp / "pwned")}, path)
    return path


# id -> (setup(tmp) -> argv, substrings the one line must contain)
CASES = {
    "malformed config YAML": (
        lambda t: ["train", str(write(t / "c.yaml", "model: {embed_dim: 8\ntrain: [1,\n"))],
        ["c.yaml", "line ", "malformed YAML"],
    ),
    "malformed study YAML": (
        lambda t: ["run", str(write(t / "s.yaml", "name: s\naxes:\n  loss.name: [margin\n"))],
        ["s.yaml", "line ", "malformed YAML"],
    ),
    "unknown key in a config file": (
        lambda t: ["train", str(write(t / "c.yaml", "model:\n  embdim: 8\n"))],
        ["c.yaml", "unknown key 'model.embdim'", "did you mean 'model.embed_dim'"],
    ),
    "unknown key in a study's base": (
        lambda t: ["run", str(study_yaml(t, base={**TINY_BASE, "optim": {"learning_rate": 0.1}}))],
        ["s.yaml", "base", "unknown key 'optim.learning_rate'"],
    ),
    "wrong type in a config file": (
        lambda t: ["train", str(write(t / "c.yaml", "train:\n  epochs: many\n"))],
        ["c.yaml", "'train.epochs'", "valid integer", "'many'"],
    ),
    "wrong type with --set": (
        lambda t: ["train", "--set", "batch.size=big"],
        ["'batch.size'", "valid integer", "'big'"],
    ),
    "wrong type in a study": (
        lambda t: ["run", str(study_yaml(t, max_concurrent="lots"))],
        ["s.yaml", "max_concurrent", "valid integer"],
    ),
    "unknown dataset (did you mean)": (
        lambda t: ["train", *sets(["data.dataset=digitz"])],
        ["data.dataset", "unknown dataset 'digitz'", "did you mean 'digits'"],
    ),
    "unknown backbone in a study axis (did you mean)": (
        lambda t: ["run", str(study_yaml(t, axes={"model.backbone": ["small_cnm"]}))],
        ["s.yaml", "model.backbone", "did you mean 'small_cnn'"],
    ),
    "unknown sampler parameter (did you mean)": (
        lambda t: ["train", *sets(["batch.sampler_params={small_clases: replace}"])],
        ["batch.sampler_params", "small_clases", "did you mean 'small_classes'"],
    ),
    "empty axis": (
        lambda t: ["run", str(study_yaml(t, axes={"model.embed_dim": []}))],
        ["s.yaml", "axes.model.embed_dim", "empty axis"],
    ),
    "missing dataset directory": (
        lambda t: ["train", *sets([*TINY_TRAIN, "data.dataset=cub200", f"data.root={t / 'nowhere'}"])],
        ["cub200", "CUB_200_2011/images.txt", "nowhere"],
    ),
    "corrupt image (on_corrupt=error, DataLoader workers)": (
        lambda t: ["train", *imagefolder_sets(image_tree(t / "imgs"), "data.num_workers=1")],
        ["unreadable image", str(Path("imgs") / "class0" / "3.jpg")],
    ),
    "corrupt image (on_corrupt=error, in process)": (
        lambda t: ["train", *imagefolder_sets(image_tree(t / "imgs"), "data.num_workers=0")],
        ["unreadable image", str(Path("imgs") / "class0" / "3.jpg")],
    ),
    "--resume after the study file changed": (
        _changed_study,
        ["s.yaml", "changed since execution '20250101-000000'", "without --resume"],
    ),
    "checkpoint of another config": (
        lambda t: ["train", *sets([*TINY_TRAIN, "model.embed_dim=16"]), "--resume", str(checkpoint_of(t, 8))],
        ["checkpoint was written by another config", "refusing to resume"],
    ),
    "not a checkpoint": (
        lambda t: ["train", *sets(TINY_TRAIN), "--resume", str(write(t / "junk.pt", "not a checkpoint"))],
        ["junk.pt", "not a readable checkpoint"],
    ),
    "poisoned checkpoint (weights_only=True)": (
        lambda t: ["train", *sets(TINY_TRAIN), "--resume", str(_evil_checkpoint(t))],
        ["evil.pt", "not a readable checkpoint"],
    ),
    "python object tag in a config (safe_load)": (
        lambda t: ["train", str(write(t / "c.yaml", f"name: !!python/object/apply:os.system ['touch {t / 'pwned'}']\n"))],
        ["c.yaml", "malformed YAML", "python/object/apply:os.system"],
    ),
    "tracking server unreachable (password in the URI)": (
        lambda t: ["train", *sets(TINY_TRAIN), "--tracking-uri", "http://admin:pa55-w0rd@127.0.0.1:9"],
        ["MLflow", "API request to http://admin:***@127.0.0.1:9/", "failed"],
    ),
    "python object tag in a study (safe_load)": (
        lambda t: ["run", str(write(t / "s.yaml", f"name: s\nbase: !!python/object/apply:os.system ['touch {t / 'pwned'}']\n")),
                   ],
        ["s.yaml", "malformed YAML", "python/object/apply:os.system"],
    ),
}


# Cases refused before any MLflow run is opened (config, study and registry checks).
REFUSED_BEFORE_TRACKING = {
    "malformed config YAML", "malformed study YAML", "unknown key in a config file", "unknown key in a study's base",
    "wrong type in a config file", "wrong type with --set", "wrong type in a study", "unknown dataset (did you mean)",
    "unknown backbone in a study axis (did you mean)", "unknown sampler parameter (did you mean)", "empty axis",
    "--resume after the study file changed", "python object tag in a config (safe_load)",
    "python object tag in a study (safe_load)",
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_exit_2(case, tmp_path, monkeypatch, capfd, mlflow_uri):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_uri)  # the commands log here (none has --no-mlflow)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # an unreachable server fails at once
    setup, expected = CASES[case]
    argv = setup(tmp_path)
    capfd.readouterr()
    rc = main(argv)
    out, err = capfd.readouterr()
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2, (case, rc, out, err)
    assert "Traceback" not in out + err, (case, out, err)
    assert len(lines) == 1 and lines[0].startswith("error: "), (case, err)
    for s in expected:
        assert s in lines[0], (case, s, lines[0])
    assert "pa55-w0rd" not in out + err, case  # a password is never shown
    assert not (tmp_path / "pwned").exists(), case  # nothing a file said was executed
    # What could have happened: a run left RUNNING (the error came after the run was opened),
    # or a run opened for input that was refused before anything started.
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert not [r for r in runs if r.info.status == "RUNNING"], (case, runs)
    for r in runs:  # a run that got as far as MLflow ended FAILED with the same one line
        assert r.info.status == "FAILED" and r.data.tags.get("error"), (case, r)
    if case in REFUSED_BEFORE_TRACKING:
        assert not runs, (case, runs)


def test_bad_input_from_the_shell_is_one_line(tmp_path):
    """The same, end to end through the installed entry point (exit status, streams)."""
    exe = Path(sys.executable).with_name("sweeper")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "sweeper.cli"]
    bad = study_yaml(tmp_path, axes={"model.embed_dim": []})
    r = subprocess.run([*cmd, "run", str(bad)], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stdout == "", (r.stdout, r.stderr)
    assert r.stderr.count("\n") == 1 and "empty axis" in r.stderr and "Traceback" not in r.stderr


def test_corrupt_image_skipped_with_on_corrupt_skip(tmp_path, monkeypatch, capsys, caplog):
    """``data.on_corrupt=skip``: the run goes on (a class-mate stands in) and warns once,
    naming the file it skipped."""
    import logging

    monkeypatch.chdir(tmp_path)
    root = image_tree(tmp_path / "imgs")
    with caplog.at_level(logging.WARNING, logger="dmlcore.data"):
        rc = main(["train", *imagefolder_sets(root, "data.on_corrupt=skip", "data.num_workers=0"), "--no-mlflow"])
    out, err = capsys.readouterr()
    assert rc == 0, out + err
    assert "Traceback" not in out + err and "best (epoch 1)" in out
    warned = [r.getMessage() for r in caplog.records if "unreadable image" in r.getMessage()]
    assert len(warned) == 1, warned
    assert str(root / "class0" / "3.jpg") in warned[0] and "on_corrupt=skip" in warned[0]


# ----------------------------------------------------------------------------- security: the code itself
def _python_files() -> list[Path]:
    skip = {".venv", "venv", "build", "dist", "node_modules", "runs", "mlruns", "mlartifacts"}
    return [
        p for p in ROOT.rglob("*.py")
        if not any(part in skip or part.startswith(".") for part in p.relative_to(ROOT).parts)
    ]


def _calls(tree: ast.AST) -> list[tuple[str, ast.Call]]:
    """(dotted name of the callee, call) for every call spelled ``a.b(...)`` or ``b(...)``."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            parts = []
            while isinstance(f, ast.Attribute):
                parts.append(f.attr)
                f = f.value
            if isinstance(f, ast.Name):
                parts.append(f.id)
                out.append((".".join(reversed(parts)), node))
    return out


# Unpickling a data file is only acceptable where a dataset's published format is a pickle.
PICKLE_ALLOWED = {"dmlcore/data/cifar.py"}  # CIFAR-10/100 "python version" batches


def test_every_torch_load_uses_weights_only_and_yaml_is_safe_loaded():
    files = _python_files()
    assert any(p.name == "train.py" for p in files)
    problems = []
    for path in files:
        rel = path.relative_to(ROOT).as_posix()
        tree = ast.parse(path.read_text(), filename=rel)
        torch_load_names = {"torch.load"} | {
            a.asname or a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module == "torch"
            for a in n.names if a.name == "load"
        }
        for name, call in _calls(tree):
            where = f"{rel}:{call.lineno}"
            if name in torch_load_names:
                kw = {k.arg: k.value for k in call.keywords}
                ok = isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True
                if not ok:
                    problems.append(f"{where}: {name}(...) without weights_only=True")
            elif name in ("yaml.load", "yaml.unsafe_load", "yaml.full_load", "yaml.load_all", "yaml.unsafe_load_all"):
                problems.append(f"{where}: {name}(...) (use yaml.safe_load)")
            elif (name in ("pickle.load", "pickle.loads", "cPickle.load", "dill.load")
                  and not rel.startswith("tests/") and rel not in PICKLE_ALLOWED):
                problems.append(f"{where}: {name}(...) unpickles data")
    assert not problems, "\n".join(problems)
