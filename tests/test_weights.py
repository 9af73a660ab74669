"""ImageNet weights (model.pretrained: imagenet), frozen BN statistics, the pre-launch weights check.

Nothing here downloads: stand-in state dicts with the published file names, keys and shapes
are written into a temporary TORCH_HOME.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
import torchvision
import yaml
from torch import nn

from dmlcore import registry
from dmlcore.config import ConfigError, load_config
from dmlcore.models import weights as W
from dmlcore.models.pretrained import PretrainedError
from dmlcore.train import Trainer
from sweeper import weights as SW
from sweeper.cli import main as cli_main
from sweeper.study import load_study

ROOT = Path(__file__).resolve().parents[1]
ROTH_STUDIES = ("fair_benchmark", "factors_of_variation", "batch_composition", "rho_regularization",
                "embedding_correlation", "crt")


@pytest.fixture
def torch_home(tmp_path, monkeypatch) -> Path:
    """An empty TORCH_HOME; returns its hub checkpoints folder (not created)."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    return tmp_path / "torch_home" / "hub" / "checkpoints"


def _fake_resnet18(directory: Path, name: str = "resnet18-f37072fd.pth") -> dict[str, torch.Tensor]:
    net = torchvision.models.resnet18(weights=None)
    torch.manual_seed(1)
    for t in net.state_dict().values():
        if t.is_floating_point():
            t.normal_()  # distinct from any fresh init
    state = net.state_dict()
    directory.mkdir(parents=True, exist_ok=True)
    torch.save(state, directory / name)
    return state


def test_imagenet_is_found_in_torch_home_and_loaded(torch_home):
    assert torch.hub.get_dir() == str(torch_home.parent)  # TORCH_HOME/hub, as torchvision looks
    state = _fake_resnet18(torch_home)
    trunk, dim = registry.build("backbone", "resnet18", {}, pretrained="imagenet")
    assert dim == 512
    own = trunk.state_dict()
    assert set(own) == {k for k in state if not k.startswith("fc.")}
    for k, v in own.items():
        assert torch.equal(v, state[k]), k
    # the legacy file name (the one pretrainedmodels downloads) is accepted too
    (torch_home / "resnet18-f37072fd.pth").rename(torch_home / "resnet18-5c106cde.pth")
    assert W.find("resnet18") == torch_home / "resnet18-5c106cde.pth"
    # a local file path keeps working
    trunk2, _ = registry.build("backbone", "resnet18", {}, pretrained=str(torch_home / "resnet18-5c106cde.pth"))
    assert torch.equal(trunk2.conv1.weight, state["conv1.weight"])


def test_checksum_and_first_mismatching_tensor_name_the_file(torch_home, monkeypatch):
    _fake_resnet18(torch_home)
    path = torch_home / "resnet18-f37072fd.pth"
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    with pytest.raises(PretrainedError) as err:
        W.verify("resnet18", path, checksum=True)
    msg = str(err.value)
    assert "\n" not in msg and str(path) in msg and digest[:12] in msg and "f37072fd" in msg
    assert "sweeper weights fetch resnet18" in msg
    W.verify("resnet18", path, checksum=False)  # right keys and shapes
    # a tensor of the wrong shape: named first, with both shapes
    state = torch.load(path, weights_only=True)
    state["layer1.0.conv1.weight"] = torch.zeros(64, 64, 1, 1)
    torch.save(state, path)
    with pytest.raises(PretrainedError) as err:
        W.verify("resnet18", path, checksum=False)
    msg = str(err.value)
    assert "\n" not in msg and str(path) in msg
    assert "first mismatching tensor 'layer1.0.conv1.weight' (file [64, 64, 1, 1] vs model [64, 64, 3, 3])" in msg
    # a missing tensor (model order: bn1.* comes right after conv1.weight)
    del state["layer1.0.conv1.weight"], state["bn1.running_var"]
    torch.save(state, path)
    with pytest.raises(PretrainedError, match=r"first mismatching tensor 'bn1.running_var' \(missing from the file\)"):
        W.verify("resnet18", path, checksum=False)
    # a truncated file
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(PretrainedError, match="cannot read pretrained weights"):
        W.verify("resnet18", path, checksum=False)


def test_missing_weights_is_one_line_with_the_fix(torch_home):
    with pytest.raises(W.WeightsMissing) as err:
        registry.build("backbone", "resnet50", {}, pretrained="imagenet")
    msg = str(err.value)
    assert "\n" not in msg and "'resnet50'" in msg and str(torch_home) in msg
    assert "resnet50-0676ba61.pth" in msg and "resnet50-19c8e357.pth" in msg  # V1 only: never V2 (11ad3fa6)
    assert "sweeper weights fetch resnet50" in msg and "11ad3fa6" not in msg
    with pytest.raises(PretrainedError, match="no ImageNet weights are known for backbone 'small_cnn'"):
        registry.build("backbone", "small_cnn", {}, pretrained="imagenet")


def test_frozen_bn_one_training_step_moves_gamma_beta_not_the_statistics(tmp_path):
    src, _ = registry.build("backbone", "small_cnn", {"width": 8, "depth": 2})
    with torch.no_grad():
        for m in src.modules():
            if isinstance(m, nn.BatchNorm2d):  # "pretrained" statistics, not the 0/1 of a fresh init
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
    weights = tmp_path / "pre.pth"
    torch.save(src.state_dict(), weights)
    cfg = load_config(None, {
        "data.dataset": "digits", "data.image_size": 16, "data.augmentation": "none",
        "model.backbone": "small_cnn", "model.backbone_params": {"width": 8, "depth": 2}, "model.embed_dim": 16,
        "model.pretrained": str(weights), "model.freeze_bn": True,
        "batch.size": 32, "batch.samples_per_class": 8, "batch.iterations_per_epoch": 1,
        "optim.lr": 1e-2, "train.epochs": 1, "train.device": "cpu",
        "eval.clustering": False, "eval.embedding_metrics": False, "eval.recall_k": [1],
    })
    tr = Trainer(cfg, progress=False).build()
    bns = [m for m in tr.model.backbone.modules() if isinstance(m, nn.BatchNorm2d)]
    before = {k: v.clone() for k, v in tr.model.backbone.state_dict().items()}
    for k in ("features.1.running_mean", "features.1.running_var"):
        assert torch.equal(before[k], src.state_dict()[k])  # the file's statistics were loaded
    tr.fit()
    after = tr.model.backbone.state_dict()
    for i, b in enumerate(bns):
        name = f"features.{3 * i + 1}"
        assert torch.equal(after[f"{name}.running_mean"], before[f"{name}.running_mean"])
        assert torch.equal(after[f"{name}.running_var"], before[f"{name}.running_var"])
        assert int(after[f"{name}.num_batches_tracked"]) == int(before[f"{name}.num_batches_tracked"])
        assert not torch.equal(after[f"{name}.weight"], before[f"{name}.weight"])  # gamma trained
        assert not torch.equal(after[f"{name}.bias"], before[f"{name}.bias"])  # beta trained


def test_freeze_bn_without_pretrained_is_refused(capsys):
    with pytest.raises(ConfigError, match="freeze_bn: true needs model.pretrained"):
        load_config(None, {"model.freeze_bn": True})
    rc = cli_main(["train", "--no-mlflow", "--set", "model.freeze_bn=true"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "freeze_bn" in err and "model.pretrained" in err


def test_missing_weights_stop_sweeper_run_before_ray_starts(torch_home, tmp_path, monkeypatch, capsys):
    import sweeper.tune as tune_mod

    def no_ray(*a, **k):
        raise AssertionError("Ray must not start")

    monkeypatch.setattr(tune_mod, "_init_ray", no_ray)
    study = tmp_path / "w.yaml"
    study.write_text(yaml.safe_dump({
        "name": "w",
        "base": {"data": {"dataset": "digits", "image_size": 32}, "train": {"epochs": 1, "device": "cpu"},
                 "batch": {"size": 20, "samples_per_class": 4},  # 5 train classes x 4: only the weights are missing
                 "model": {"backbone": "resnet18", "pretrained": "imagenet", "freeze_bn": True}},
        "axes": {"model.embed_dim": [8, 16]},
    }))
    rc = cli_main(["run", str(study), "--storage", str(tmp_path / "runs"), "--no-live"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert "'resnet18'" in err and str(torch_home) in err and "sweeper weights fetch resnet18" in err
    # with the file there (a stand-in: no checksum), the check passes and Ray would start
    _fake_resnet18(torch_home)
    monkeypatch.setenv("DMLCORE_WEIGHTS_CHECKSUM", "0")
    SW.check_study(load_study(study))


def test_node_check_names_the_nodes_without_the_file(ray_session, torch_home):
    env = {"env_vars": {"TORCH_HOME": str(torch_home.parents[1]), "DMLCORE_WEIGHTS_CHECKSUM": "0"}}
    problems = SW.node_problems(["resnet18"], cpu=1, runtime_env=env)
    assert len(problems) == 1 and problems[0].startswith("node ") and "sweeper weights fetch resnet18" in problems[0]
    assert str(torch_home) in problems[0]  # the node's own hub folder
    _fake_resnet18(torch_home)
    assert SW.node_problems(["resnet18"], cpu=1, checksum=False, runtime_env=env) == []
    assert "no alive Ray node" in SW.node_problems(["resnet18"], cpu=1, gpu=64, runtime_env=env)[0]


def test_roth_studies_at_full_size_use_imagenet_and_pass_the_weights_check(torch_home, monkeypatch):
    studies = {name: load_study(ROOT / "studies" / f"{name}.yaml") for name in ROTH_STUDIES}
    needed_all: set[str] = set()
    for name, study in studies.items():
        assert study.base.model.pretrained == "imagenet" and study.base.model.freeze_bn, name
        assert not study.base.train.amp and study.base.eval.every == 1, name
        assert all(t.config.model.pretrained == "imagenet" for t in study.trials), name
        needed = SW.needed_backbones(SW.study_configs(study))
        assert "resnet50" in needed and set(needed) <= set(W.CATALOGUE), name
        needed_all |= set(needed)
        with pytest.raises(PretrainedError, match="sweeper weights fetch"):
            SW.check_study(study)
        # the quick variant needs no weights at all (CPU, no download)
        quick = load_study(ROOT / "studies" / f"{name}.yaml", quick=True)
        assert SW.needed_backbones(SW.study_configs(quick)) == [], name
    monkeypatch.setenv("DMLCORE_WEIGHTS_CHECKSUM", "0")
    for b in sorted(needed_all):
        W.write_stand_in(b, torch_home)
    for name, study in studies.items():
        SW.check_study(study)


def test_weights_fetch_and_list_without_network(torch_home, monkeypatch, capsys):
    """`sweeper weights fetch` calls torch's downloader once (progress bar, sha256 prefix); never the network here."""
    import urllib.error

    calls = []

    def unreachable(url, dst, hash_prefix=None, progress=True):
        calls.append((url, dst, hash_prefix, progress))
        raise urllib.error.URLError("no route to host")

    monkeypatch.setattr(torch.hub, "download_url_to_file", unreachable)
    rc = cli_main(["weights", "fetch", "resnet18"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "https://download.pytorch.org/models/resnet18-f37072fd.pth" in err
    assert calls == [("https://download.pytorch.org/models/resnet18-f37072fd.pth",
                      str(torch_home / "resnet18-f37072fd.pth"), "f37072fd", True)]

    def stand_in(url, dst, hash_prefix=None, progress=True):
        _fake_resnet18(Path(dst).parent, Path(dst).name)

    monkeypatch.setattr(torch.hub, "download_url_to_file", stand_in)
    monkeypatch.setenv("DMLCORE_WEIGHTS_CHECKSUM", "0")
    assert cli_main(["weights", "fetch", "resnet18"]) == 0
    assert "downloaded to" in capsys.readouterr().out
    monkeypatch.setattr(torch.hub, "download_url_to_file", unreachable)
    assert cli_main(["weights", "fetch", "resnet18"]) == 0  # present: nothing downloaded again
    assert "already present" in capsys.readouterr().out and len(calls) == 1
    assert cli_main(["weights", "list"]) == 0
    out = capsys.readouterr().out
    assert "resnet18" in out and "ok" in out and "missing" in out  # resnet50 / googlenet are not there
