"""Few-shot DML: seeded episodes, t-intervals, a real improvement over zero-shot, the split honoured."""

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from dmlcore.config import load_config
from dmlcore.oodml.fewshot import few_shot_eval, make_episode, mean_ci95, run_after_training

TINY = {
    "data.dataset": "digits",
    "data.image_size": 16,
    "data.augmentation": "none",
    "model.backbone": "small_cnn",
    "model.backbone_params": {"width": 16, "depth": 2},
    "model.embed_dim": 16,
    "batch.size": 40,
    "batch.samples_per_class": 8,
    "optim.lr": 1e-3,
    "train.device": "cpu",
    "eval.recall_k": [1],
    "eval.clustering": False,
    "eval.embedding_metrics": False,
}


def test_episodes_are_seeded_disjoint_and_keep_a_query_per_class():
    labels = np.repeat(np.arange(4), [6, 6, 3, 1])
    ep = make_episode(labels, 5, seed=0, episode=0)
    assert not set(ep.support) & set(ep.query)
    assert sorted(np.concatenate([ep.support, ep.query]).tolist()) == list(range(len(labels)))
    counts = np.bincount(labels[ep.support], minlength=4)
    assert counts.tolist() == [5, 5, 2, 0]  # at most n_c - 1: every class keeps a query
    again = make_episode(labels, 5, seed=0, episode=0)
    assert np.array_equal(ep.support, again.support)
    assert not np.array_equal(ep.support, make_episode(labels, 5, seed=0, episode=1).support)


def test_mean_ci95_is_the_student_t_interval():
    mean, half = mean_ci95([1.0, 2.0, 3.0])
    assert mean == pytest.approx(2.0)
    assert half == pytest.approx(4.302652729911275 * 1.0 / math.sqrt(3))
    assert math.isnan(mean_ci95([0.5])[1])


def test_few_shot_adaptation_beats_zero_shot_and_leaves_the_model_alone():
    from dmlcore.data.base import build_data
    from dmlcore.models.embedding import build_model

    cfg = load_config(None, TINY)
    data = build_data(cfg)
    torch.manual_seed(0)
    model = build_model(cfg.model)  # untrained: a head fitted on 5 shots per class must help
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = few_shot_eval(model, data.test, cfg, shots=(5,), episodes=2, steps=40)
    for key in ("recall_at_1", "zero_shot_recall_at_1", "gain_recall_at_1"):
        assert f"fewshot/5shot/{key}" in out and f"fewshot/5shot/{key}_ci95" in out
        assert math.isfinite(out[f"fewshot/5shot/{key}_ci95"])
    assert out["fewshot/5shot/episodes"] == 2 and out["fewshot/num_classes"] == 5
    assert out["fewshot/5shot/recall_at_1"] > out["fewshot/5shot/zero_shot_recall_at_1"] + 0.01, out
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_the_configured_split_is_honoured_and_the_hook(tmp_path):
    from dmlcore.data.base import ClassSplit, save_split_file
    from dmlcore.train import Trainer

    path = save_split_file(tmp_path / "s.json", "digits", [ClassSplit((1, 2, 4, 5, 6, 8), (0, 3, 7, 9), "hard")])
    cfg = load_config(None, {**TINY, "data.split": f"{path}#0", "batch.size": 48})
    trainer = Trainer(cfg, progress=False).build()
    assert trainer.data.test.class_ids.tolist() == [0, 3, 7, 9]
    ep = make_episode(trainer.data.test.labels, 2, seed=0, episode=0)
    support_ids = trainer.data.test.class_ids[trainer.data.test.labels[ep.support]]
    assert sorted(set(support_ids.tolist())) == [0, 3, 7, 9]
    assert np.bincount(trainer.data.test.labels[ep.support]).tolist() == [2, 2, 2, 2]

    assert run_after_training(trainer, None) == {}  # no eval.few_shot: nothing to do
    fs_cfg = cfg.with_overrides({"eval.few_shot": {"shots": [2], "episodes": 2, "steps": 2}})
    fs_trainer = Trainer(fs_cfg, progress=False).build()
    out = run_after_training(fs_trainer, SimpleNamespace(model=trainer.model))
    assert out["fewshot/num_classes"] == 4 and out["fewshot/2shot/episodes"] == 2
    assert "fewshot/2shot/recall_at_1_ci95" in out and "fewshot/1shot/recall_at_1" not in out
