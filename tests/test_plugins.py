"""Plug-ins (issue 16, item 6) and F1 (a killed worker with ``max_failures: 0``).

A user's module outside the package (written to ``tmp_path``) registers two losses; a
3-trial study names it in ``plugins:``. Two trials train with ``lab_contrastive`` in Ray
workers (which import the module themselves: the marker file lists their pids); the third
uses ``lab_die``, whose forward SIGKILLs its own worker process: with ``max_failures: 0``
its MLflow run is FAILED with the real reason (F1), not Ray's ``ip: ...`` detail line.
"""

from __future__ import annotations

import os
import textwrap

import pytest
from rich.console import Console

from conftest import write_study
from sweeper import tracking
from sweeper.cli import main

PLUGIN = '''
"""my_lab.losses: a user's own losses (test plug-in)."""
import os
import signal

import torch

from dmlcore.registry import register

with open({marker!r}, "a") as fh:  # who imported me
    fh.write(f"{{os.getpid()}} {{__file__}}\\n")


class _Contrastive(torch.nn.Module):
    def __init__(self, margin):
        super().__init__()
        self.margin = margin

    def forward(self, emb, labels, indices_tuple=None):
        d = torch.cdist(emb, emb)
        same = (labels[:, None] == labels[None, :]).float()
        eye = torch.eye(len(labels), device=emb.device)
        pos = ((same - eye).clamp(min=0) * d.pow(2)).sum() / (same - eye).clamp(min=0).sum().clamp(min=1)
        neg = ((1 - same) * (self.margin - d).clamp(min=0).pow(2)).sum() / (1 - same).sum().clamp(min=1)
        return pos + neg


@register("loss", "lab_contrastive", context=("num_classes", "embed_dim"))
def lab_contrastive(margin: float = 0.5):
    """A plain contrastive loss from the lab's own module."""
    return _Contrastive(margin)


class _Die(torch.nn.Module):
    def forward(self, emb, labels, indices_tuple=None):
        os.kill(os.getpid(), signal.SIGKILL)


@register("loss", "lab_die", context=("num_classes", "embed_dim"))
def lab_die():
    """Kills its own process (fault injection)."""
    return _Die()
'''


@pytest.fixture
def lab(tmp_path, monkeypatch):
    pkg = tmp_path / "lab_src" / "my_lab"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    marker = tmp_path / "imports.txt"
    (pkg / "losses.py").write_text(textwrap.dedent(PLUGIN.format(marker=str(marker))))
    monkeypatch.syspath_prepend(str(pkg.parent))
    return {"root": pkg.parent, "marker": marker}


def test_plugin_loss_trains_on_ray_workers_and_killed_worker_is_recorded(ray_session, lab, tmp_path, mlflow_uri):
    from sweeper.study import load_study
    from sweeper.tune import run_study

    path = write_study(
        tmp_path, "lab", plugins=["my_lab.losses"], max_failures=0, max_concurrent=2,
        zip=[{"loss.name": ["lab_contrastive", "lab_contrastive", "lab_die"], "train.seed": [0, 1, 2]}],
    )
    outcome = run_study(load_study(path), storage=tmp_path / "runs", tracking_uri=mlflow_uri,
                        console=Console(file=open(os.devnull, "w"), width=200), live=False)
    assert [t.status for t in outcome.trials] == ["done", "done", "failed"], outcome.trials
    tracker = tracking.Tracker(mlflow_uri)
    runs = {int(r.data.tags["trial_index"]): r for r in tracker.children(outcome.experiment_id, outcome.parent_run_id)}
    for i in (0, 1):
        assert runs[i].info.status == "FINISHED" and runs[i].data.params["loss.name"] == "lab_contrastive"
        assert "test/recall_at_1" in runs[i].data.metrics
    # the workers imported the plug-in themselves
    pids = {int(line.split()[0]) for line in lab["marker"].read_text().splitlines()}
    assert pids - {os.getpid()}, pids
    # F1: the killed trial's reason, with the worker's pid, not "ip: 192.0.2.2"
    dead = runs[2]
    assert dead.info.status == "FAILED"
    err = dead.data.tags["error"]
    assert err.startswith("WorkerDied: the trial's worker process (pid ") and "died or was killed" in err, err
    assert f"pid {dead.data.tags['pid']}" in err and not err.startswith("ip:"), err
    assert "exit type" in err, err


def test_list_shows_plugin_entries_with_their_module(lab, capsys, monkeypatch):
    monkeypatch.delenv("DML_PLUGINS", raising=False)
    assert main(["list", "losses", "--plugin", "my_lab.losses"]) == 0
    out = capsys.readouterr().out
    line = next(ln for ln in out.splitlines() if "lab_contrastive" in ln)
    assert "plugin my_lab.losses" in line and "margin=0.5" in line, out


def test_plugin_that_fails_to_import_is_one_line(tmp_path, capfd, monkeypatch):
    (tmp_path / "broken_lab.py").write_text("import torch\nraise RuntimeError('the lab forgot a file')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    capfd.readouterr()
    assert main(["list", "losses", "--plugin", "broken_lab"]) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert "--plugin: plugin module 'broken_lab' could not be imported: RuntimeError: the lab forgot a file" in err[0]
    study = write_study(tmp_path, "s", plugins=["no_such_lab.losses"])
    assert main(["show", str(study)]) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "plugins: plugin module 'no_such_lab.losses' could not be imported" in err[0], err
