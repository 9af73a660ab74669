"""Guided DML as the authors (dmlcore/guided): routing, triplets, master loss, targets,
regression loss, closed-set metrics and split, plateau / clip-by-value, bad input, the quick study.
References are computed independently inside the tests (formulas written out, brute force)."""

import io
import itertools
import pickle

import numpy as np
import pytest
import torch

from dmlcore.config import ConfigError, load_config
from dmlcore.guided.losses import GDMLRegression, regression_loss
from dmlcore.guided.master import ClassBranchMaster, embed_by_label, master_loss
from dmlcore.guided.relational import similarity_distillation
from dmlcore.guided.triplets import class_pair_triplets
from dmlcore.metrics.closed_set import closed_set_metrics

QUICK = {
    "data.dataset": "digits", "data.image_size": 16, "data.augmentation": "none", "data.split": "closed",
    "model.backbone": "resnet_cifar", "model.backbone_params": {"depth": 10, "width": 8}, "model.embed_dim": 2,
    "model.normalize": False, "loss.name": "gdml_regression",
    "guided.master.channels": [4, 8], "guided.master.hidden": 16, "guided.master.triplets_per_pair": 2,
    "guided.master.epochs": 1, "batch.size": 64, "batch.samples_per_class": 0, "batch.iterations_per_epoch": 2,
    "optim.name": "sgd", "optim.lr": 0.1, "optim.momentum": 0.0, "optim.clip_value": 0.1,
    "train.epochs": 1, "train.device": "cpu", "eval.protocol": "closed_set", "eval.distance": "euclidean",
    "eval.recall_k": [1], "eval.embedding_metrics": False,
}  # fmt: skip


def test_routing_sends_gradients_only_to_branch_y_and_the_shared_head():
    torch.manual_seed(0)
    m = ClassBranchMaster(4, 16, out_dim=2, channels=(3, 5), hidden=8)
    x = torch.randn(3, 3, 16, 16)
    g, local = m(x, torch.tensor([2, 2, 2]))
    g.sum().backward()
    for c, b in enumerate(m.branches):
        has = any(p.grad is not None and p.grad.abs().sum() > 0 for p in b.parameters())
        assert has == (c == 2), c
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.head.parameters())
    # mixed labels: each sample equals its own branch + head alone
    y = torch.tensor([1, 3, 1])
    g, local = m(x, y)
    for k in range(3):
        ref_local = m.branches[int(y[k])](x[k : k + 1]).flatten(1)
        assert torch.allclose(local[k], ref_local[0], atol=1e-6)
        assert torch.allclose(g[k], m.head(ref_local)[0], atol=1e-6)


def test_triplet_set_is_90T_triplets_one_pair_per_batch_and_seeded():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(10), rng.integers(9, 20, size=10))
    counts = np.bincount(labels)
    ts = class_pair_triplets(labels, max_per_pair=64, seed=3)
    t = min(64, counts.min() // 2)
    assert ts.per_pair == t and len(ts) == 90 * t
    assert sorted(ts.pairs) == sorted(itertools.permutations(range(10), 2))
    for a, p, n, i, j in ts.batches():
        assert len(a) == t and (labels[a] == i).all() and (labels[p] == i).all() and (labels[n] == j).all() and i != j
        assert len(set(a) | set(p)) == 2 * t and len(set(n)) == t  # distinct anchors/positives, no a == p
    same = class_pair_triplets(labels, 64, seed=3)
    other = class_pair_triplets(labels, 64, seed=4)
    assert (same.anchor == ts.anchor).all() and same.pairs == ts.pairs
    assert not (other.anchor == ts.anchor).all()
    assert class_pair_triplets(labels, 2, seed=0).per_pair == 2


@pytest.mark.parametrize("beta", [0.0, 1.0, 0.3])
def test_master_loss_equals_the_formula(beta):
    g = torch.randn(3, 5, 2)
    la, lp = torch.randn(5, 7), torch.randn(5, 7)
    d_ap = torch.sqrt(((g[0] - g[1]) ** 2).sum(1))
    d_an = torch.sqrt(((g[0] - g[2]) ** 2).sum(1))
    trip = torch.clamp(d_ap - d_an + 3.0, min=0).mean()
    local = torch.sqrt(((la - lp) ** 2).sum(1)).mean()
    ref = (1 - beta) * trip + beta * local
    assert float(master_loss(g[0], g[1], g[2], la, lp, 3.0, beta)) == pytest.approx(float(ref), rel=1e-5)


def test_regression_loss_is_mean_l2_not_squared_and_zero_at_the_target():
    t = torch.randn(4, 2)
    assert float(regression_loss(t.clone(), t)) == 0.0
    s = (t + torch.tensor([3.0, 4.0])).requires_grad_(True)
    assert float(regression_loss(s, t)) == pytest.approx(5.0)  # ||(3,4)|| = 5, squared would be 25
    loss = GDMLRegression()
    loss.set_targets(t)
    assert not list(loss.parameters()) and not loss.targets.requires_grad
    out = loss(s, None, None, sample_ids=torch.tensor([0, 1, 2, 3]))
    out.backward()
    assert s.grad is not None and float(out) == pytest.approx(5.0)
    z = t.clone().requires_grad_(True)
    loss(z, None, None, sample_ids=torch.arange(4)).backward()
    assert torch.isfinite(z.grad).all()  # no NaN gradient at the target


def test_targets_depend_on_the_label_are_frozen_and_cached(tmp_path):
    from dmlcore.train import Trainer

    cfg = load_config(None, {**QUICK, "guided.cache_dir": str(tmp_path)})
    tr = Trainer(cfg, progress=False).build()
    assert tr.guided_stage["cached"] is False and tr.guided_stage["triplets"] == 90 * 2
    targets = tr.criterion.loss.targets.clone()
    n = len(tr.data.train)
    assert targets.shape == (n, 2) and not targets.requires_grad
    # the targets are the stored master through each image's own branch; another label gives another value
    state = torch.load(next(tmp_path.glob("master-*.pt")), weights_only=True)
    m = ClassBranchMaster(10, 16, 2, (4, 8), 16)
    m.load_state_dict(state["model"])
    imgs = tr.data.train.in_memory_images()[:20]
    y = torch.as_tensor(tr.data.train.labels[:20])
    own = embed_by_label(m, imgs, y, lambda x: x.float())
    assert torch.allclose(own, targets[:20], atol=1e-5)
    assert not torch.allclose(embed_by_label(m, imgs, (y + 1) % 10, lambda x: x.float()), own, atol=1e-4)
    tr.fit()
    assert torch.equal(tr.criterion.loss.targets, targets)  # training never moves them
    again = Trainer(cfg, progress=False).build()
    assert again.guided_stage["cached"] is True and torch.equal(again.criterion.loss.targets, targets)


def _brute_closed_set(q, ql, r, rl):
    d = np.sqrt(((q[:, None, :] - r[None, :, :]) ** 2).sum(-1))
    order = np.argsort(d, axis=1, kind="stable")
    p1, rp, mapr, pred = [], [], [], []
    for i in range(len(q)):
        rel = rl[order[i]] == ql[i]
        R = int((rl == ql[i]).sum())
        pred.append(rl[order[i, 0]])
        p1.append(float(rel[0]))
        rp.append(rel[:R].mean())
        prec = np.cumsum(rel[:R]) / np.arange(1, R + 1)
        mapr.append((prec * rel[:R]).sum() / R)
    return np.mean(p1), np.mean(rp), np.mean(mapr), np.array(pred)


def test_closed_set_metrics_equal_brute_force_on_random_2d_data():
    rng = np.random.default_rng(1)
    rl = rng.integers(0, 4, 60)
    r = rng.normal(size=(60, 2)) + rl[:, None]
    ql = rng.integers(0, 4, 25)
    q = rng.normal(size=(25, 2)) + ql[:, None]
    out = closed_set_metrics(q, ql, r, rl, recall_k=[1, 2], distance="euclidean", seed=0)
    p1, rp, mapr, pred = _brute_closed_set(q, ql, r, rl)
    assert out["precision_at_1"] == pytest.approx(p1) and out["recall_at_1"] == pytest.approx(p1)
    assert out["r_precision"] == pytest.approx(rp) and out["map_at_r"] == pytest.approx(mapr)
    assert out["knn_accuracy"] == pytest.approx(np.mean(pred == ql))
    precs, recs, f1s = [], [], []
    for c in range(4):
        tp = np.sum((pred == c) & (ql == c))
        p = tp / max(np.sum(pred == c), 1)
        rc = tp / max(np.sum(ql == c), 1)
        precs.append(p), recs.append(rc), f1s.append(2 * p * rc / (p + rc) if p + rc else 0.0)
    assert out["knn_precision"] == pytest.approx(np.mean(precs))
    assert out["knn_recall"] == pytest.approx(np.mean(recs)) and out["knn_f1"] == pytest.approx(np.mean(f1s))
    assert 0.0 <= out["nmi"] <= 1.0


def test_cifar_closed_split_is_50000_10000_with_every_class_on_both_sides(tmp_path):
    from dmlcore.config import load_config as lc
    from dmlcore.data.base import build_data

    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()
    files = [f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]
    for f in files:
        labels = [k % 10 for k in range(10000)]
        data = np.zeros((10000, 3072), dtype=np.uint8)
        with open(d / f, "wb") as fh:
            pickle.dump({b"data": data, b"labels": labels}, fh)
    with open(d / "batches.meta", "wb") as fh:
        pickle.dump({b"label_names": [f"c{k}".encode() for k in range(10)]}, fh)
    cfg = lc(None, {"data.dataset": "cifar10", "data.root": str(tmp_path), "data.split": "closed",
                    "eval.protocol": "closed_set", "data.augmentation": "none"})
    b = build_data(cfg)
    assert len(b.train) == 50000 and len(b.test) == 10000 and len(b.train_eval) == 50000
    assert set(b.train.labels) == set(b.test.labels) == set(range(10))
    assert not set(b.train.indices) & set(b.test.indices) and b.test.indices.min() == 50000


def test_plateau_scheduler_steps_on_the_mean_train_loss_and_clip_by_value():
    from dmlcore.train import _clip, build_scheduler

    cfg = load_config(None, {"optim.scheduler": "plateau", "optim.scheduler_params": {"factor": 0.5, "patience": 1}})
    p = torch.nn.Parameter(torch.zeros(3))
    opt = torch.optim.SGD([p], lr=1.0)
    sched = build_scheduler(cfg, opt)
    lrs = []
    for loss in [1.0, 1.0, 1.0, 0.5, 0.5, 0.5]:
        sched.step(loss)
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs == [1.0, 1.0, 0.5, 0.5, 0.5, 0.25]
    p.grad = torch.tensor([0.5, -0.05, -3.0])
    _clip([p], None, 0.1)
    assert torch.equal(p.grad, torch.tensor([0.1, -0.05, -0.1]))


@pytest.mark.parametrize("over, needle", [
    ({"eval.protocol": "closed_set", "data.split": "standard"}, "eval.protocol=closed_set needs data.split=closed"),
    ({"eval.protocol": "zero_shot"}, "data.split=closed needs eval.protocol=closed_set"),
    ({"data.augmentation": "standard"}, "data.augmentation='standard'"),
])  # fmt: skip
def test_bad_config_is_one_line(over, needle):
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace(".", r"\.")) as err:
        load_config(None, {**QUICK, **over})
    assert "\n" not in str(err.value)


def test_bad_input_through_the_cli_exit_2(tmp_path, capsys):
    from sweeper.cli import main

    sets = lambda over: [x for k, v in {**QUICK, **over}.items() for x in ("--set", f"{k}={v}")]  # noqa: E731
    cases = [
        ({"guided.master.branches": 5, "guided.cache_dir": str(tmp_path)}, "guided.master.branches=5"),
        ({"data.dataset": "mnist", "data.root": str(tmp_path), "data.image_size": 28}, "train-images-idx3-ubyte"),
        ({"data.split": "standard"}, "eval.protocol=closed_set needs data.split=closed"),
    ]
    for over, needle in cases:
        rc = main(["train", *sets(over), "--no-mlflow"])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and needle in err and len(err.splitlines()) == 1, err


def test_relational_distillation_stays_an_option():
    from dmlcore import registry

    assert "relational_distillation" in registry.names("regularizer") and "guided" not in registry.names("regularizer")
    e = torch.randn(8, 16)
    assert float(similarity_distillation(e, e, 0.1, "kl")) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.slow
def test_quick_study_runs_both_arms_end_to_end(ray_session, tmp_path, mlflow_uri):
    from rich.console import Console

    from sweeper.study import load_study
    from sweeper.tune import run_study

    study = load_study("studies/guided_dml.yaml", {"guided.cache_dir": str(tmp_path / "cache")}, quick=True)
    assert {t.config.loss.name for t in study.trials} == {"gdml_regression", "triplet"}
    out = io.StringIO()
    outcome = run_study(study, storage=tmp_path / "runs", tracking_uri=mlflow_uri, console=Console(file=out, width=200), live=False)
    assert [t.status for t in outcome.trials] == ["done", "done"], out.getvalue()
    assert len(list((tmp_path / "cache").glob("master-*.pt"))) == 1  # only the G-DML arm trains a master
    import pandas as pd

    agg = pd.read_csv(outcome.exec_dir / "analysis" / "aggregate.csv")
    assert set(agg["loss.name"]) == {"gdml_regression", "triplet"}
    r1 = dict(zip(agg["loss.name"], agg["best/test/precision_at_1:mean"]))
    assert r1["gdml_regression"] > 0.5 and r1["triplet"] > 0.5, r1
    report = (outcome.exec_dir / "analysis" / "report.md").read_text()
    assert "gdml_regression" in report and "triplet" in report and "Factor effects" in report
