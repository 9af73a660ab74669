"""Few-shot DML as the paper: the selected checkpoint, head-only, published episodes, t-intervals;
the published study at full size and its quick variant."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats

from dmlcore.config import load_config
from dmlcore.oodml import fewshot
from dmlcore.train import ListReporter, Trainer

ROOT = Path(__file__).resolve().parents[1]
TINY = {
    "data.dataset": "digits", "data.image_size": 16, "data.augmentation": "none", "data.val_classes": 0.4,
    "model.backbone": "small_cnn", "model.backbone_params": {"width": 8, "depth": 2}, "model.embed_dim": 8,
    "batch.size": 12, "batch.samples_per_class": 4, "batch.iterations_per_epoch": 3, "optim.lr": 1e-2,
    "train.device": "cpu", "train.epochs": 3, "eval.recall_k": [1], "eval.clustering": False,
    "eval.embedding_metrics": False, "eval.select_on": "val",
}  # fmt: skip


def test_paper_defaults():
    fs = load_config(None, {"eval.few_shot": {}}).eval.few_shot
    assert fs.shots == [2, 5] and fs.steps_for(2) == 1000 and fs.steps_for(5) == 1500  # OOD-Study_FewShot.sh
    assert fs.lr_mult == 10 and not fs.whole_net and fs.episodes == 10 and fs.episode_source == "auto"
    with pytest.raises(Exception, match="no iteration count for \\[3\\] shots"):
        load_config(None, {"eval.few_shot": {"shots": [3]}})


def test_the_adapted_model_is_the_selected_checkpoint_not_the_last_epoch(monkeypatch):
    cfg = load_config(None, {**TINY, "eval.few_shot": {"shots": [2], "episodes": 1, "steps": 1}})
    real_evaluate = Trainer.evaluate
    vals = iter([0.2, 0.9, 0.1])  # epoch 2 is the best on validation

    def evaluate(self):
        out = real_evaluate(self)
        out["val/recall_at_1"] = next(vals)
        return out

    seen = {}

    def capture(model, *a, **kw):
        seen["state"] = {k: v.clone() for k, v in model.state_dict().items()}
        return {}

    monkeypatch.setattr(Trainer, "evaluate", evaluate)
    monkeypatch.setattr(fewshot, "few_shot_eval", capture)
    rep = ListReporter()
    result = Trainer(cfg, rep, progress=False).fit()
    last = rep.reports[-1][1]
    assert result.best_epoch == 2 and last["best_epoch"] == 2 and last["fewshot/selected_epoch"] == 2
    ckpt = dict(rep.checkpoints)
    sel, fin = ckpt[2]["model"], ckpt[3]["model"]
    assert all(torch.equal(seen["state"][k], sel[k]) for k in sel)
    assert any(not torch.equal(seen["state"][k], fin[k]) for k in fin)  # not the last epoch's weights
    assert all(torch.equal(result.model.state_dict()[k], fin[k]) for k in fin)  # the run's own model untouched


def test_only_the_heads_parameters_change():
    from dmlcore import registry
    from dmlcore.data.base import build_data
    from dmlcore.models.embedding import build_model

    cfg = load_config(None, TINY)
    data = build_data(cfg)
    torch.manual_seed(0)
    model = build_model(cfg.model)
    before = copy.deepcopy(model.state_dict())
    loss = registry.build("loss", "margin", {"learn_beta": False}, key="l", num_classes=10, embed_dim=8)
    miner = registry.build("miner", "distance_weighted", None, key="m", embed_dim=8, train_seed=0)
    support = fewshot.make_episode(data.test.labels, 2, 0, 0).support
    fewshot._finetune(model, data.test, support, 2, 5, 1e-2, False, None, loss, miner, 12, torch.device("cpu"), 0)
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("head.") for k in changed), changed  # backbone incl. BN statistics unchanged
    assert {k for k in before if k.startswith("head.") and before[k].dtype.is_floating_point} <= changed


def test_published_episodes_are_used_and_the_interval_is_the_t_interval(monkeypatch):
    from dmlcore import metrics
    from dmlcore.data.base import build_data
    from dmlcore.models.embedding import build_model

    cfg = load_config(None, TINY)
    data = build_data(cfg)
    torch.manual_seed(0)
    model = build_model(cfg.model)
    labels = np.asarray(data.test.labels)
    published = {2: [np.sort(np.concatenate([np.flatnonzero(labels == c)[[e, e + 1]] for c in np.unique(labels)])) for e in range(3)]}
    values = iter([0.10, 0.30, 0.20, 0.55, 0.30, 0.70])  # zero-shot, adapted per episode
    queries = []

    def fake(emb, y, **kw):
        queries.append(len(y))
        return {"recall_at_1": next(values)}

    monkeypatch.setattr(metrics, "evaluate_embeddings", fake)
    out = fewshot.few_shot_eval(model, data.test, cfg, shots=(2,), steps=1, published=published)
    n_query = [len(labels) - len(s) for s in published[2] for _ in (0, 1)]
    assert queries == n_query and out["fewshot/2shot/episodes"] == 3 and out["fewshot/2shot/published_episodes"] == 1
    adapted = np.array([0.30, 0.55, 0.70])
    half = stats.t.ppf(0.975, 2) * adapted.std(ddof=1) / math.sqrt(3)  # the 95% Student-t half-width
    assert out["fewshot/2shot/recall_at_1"] == pytest.approx(adapted.mean())
    assert out["fewshot/2shot/recall_at_1_ci95"] == pytest.approx(half)
    zero = np.array([0.10, 0.20, 0.30])
    assert out["fewshot/2shot/zero_shot_recall_at_1_ci95"] == pytest.approx(stats.t.ppf(0.975, 2) * zero.std(ddof=1) / math.sqrt(3))
    # without published episodes: seeded random ones, and the run says so
    values = iter([0.1] * 4)
    monkeypatch.setattr(metrics, "evaluate_embeddings", lambda emb, y, **kw: {"recall_at_1": next(values)})
    out = fewshot.few_shot_eval(model, data.test, cfg, shots=(2,), episodes=2, steps=1)
    assert out["fewshot/2shot/published_episodes"] == 0 and out["fewshot/2shot/episodes"] == 2
    with pytest.raises(ValueError, match="no published 2-shot episodes"):
        fewshot.few_shot_eval(model, data.test, cfg, shots=(2,), steps=1, episode_source="published")


def test_full_study_lists_the_published_splits_times_methods(capsys, monkeypatch):
    from sweeper.cli import main
    from sweeper.study import load_study

    monkeypatch.chdir(ROOT)
    study = load_study(ROOT / "studies/oodml.yaml")
    splits = {t.config.data.split for t in study.trials}
    methods = {(t.config.loss.name, t.config.loss.params.get("beta"), t.config.miner.name) for t in study.trials}
    assert len(splits) == 9 + 8 + 8 and len(methods) == 5 and len(study.trials) == 25 * 5 * 2
    assert {s.rsplit("#", 1)[1] for s in splits if "cars196" in s} == {str(i) for i in range(1, 9)}
    c = study.trials[0].config
    assert (c.model.embed_dim, c.batch.size, c.optim.lr, c.train.epochs, c.model.pretrained) == (512, 112, 1e-5, 200, "imagenet")
    assert {t.config.train.epochs for t in study.trials if t.config.data.dataset == "sop"} == {150}
    assert c.eval.few_shot is not None and c.eval.few_shot.steps_for(5) == 1500
    assert main(["show", str(ROOT / "studies/oodml.yaml")]) == 0
    assert "250 trials" in capsys.readouterr().out


def test_quick_variant_trains_a_glyph_split_with_few_shot_on_a_cpu(monkeypatch):
    from sweeper.study import load_study

    monkeypatch.chdir(ROOT)
    study = load_study(ROOT / "studies/oodml.yaml", quick=True)
    assert len(study.trials) == 12 and all(t.config.eval.few_shot is not None for t in study.trials)
    cfg = study.trials[-1].config.with_overrides({"train.epochs": 1, "train.device": "cpu"})
    rep = ListReporter()
    Trainer(cfg, rep, progress=False).fit()
    last = rep.reports[-1][1]
    for k in (2, 5):
        assert 0.0 <= last[f"fewshot/{k}shot/recall_at_1"] <= 1.0 and last[f"fewshot/{k}shot/published_episodes"] == 0
    assert "data/fid" in last and last["data/fid_published"] == 0.0
