"""Coded Residual Transform head: shapes, residual geometry, diversity, consistency, training."""

import math

import pytest
import torch
import torch.nn.functional as F

from dmlcore import registry
from dmlcore.config import load_config
from dmlcore.models.crt import CRTHead, prototype_diversity, similarity_consistency


def _head(**kw):
    return registry.build("head", "crt", {"prototypes": 5, "aux_prototypes": 3, **kw}, in_dim=12, embed_dim=10)


def test_shapes_and_extra_loss_only_in_training():
    head = _head()
    x = torch.randn(6, 12, 3, 4)
    assert head(x).shape == (6, 10)
    extra = head.extra_loss()
    assert extra is not None and extra.dim() == 0 and torch.isfinite(extra)
    assert head.extra_loss() is None  # consumed
    head.eval()
    assert head(x).shape == (6, 10) and head.extra_loss() is None
    assert _head(reduce_dim=4, aux_dim=7)(x).shape == (6, 10)
    with pytest.raises(registry.RegistryError, match="no parameter"):
        registry.build("head", "crt", {"protoypes": 3}, in_dim=12, embed_dim=10)


def test_coded_residuals_are_orthogonal_to_their_prototype():
    head = _head()
    x = torch.randn(4, 12, 3, 3)
    v = head.main.coded_residuals(x)  # B x M x C
    p_hat = F.normalize(head.main.prototypes, dim=1)
    assert v.shape == (4, 5, 12)
    assert torch.allclose((v * p_hat).sum(-1), torch.zeros(4, 5), atol=1e-5)


def test_consistency_loss_is_finite_differentiable_and_zero_for_equal_structure():
    a = torch.randn(8, 10)
    for mode in ("mse", "kl"):
        assert float(similarity_consistency(a, 2 * a, mode)) == pytest.approx(0.0, abs=1e-6)
        assert float(similarity_consistency(a, torch.randn(8, 5), mode)) > 0
    head = _head(consistency_weight=1.0, diversity_weight=0.0)
    head(torch.randn(6, 12, 2, 2))
    loss = head.extra_loss()
    loss.backward()
    for part in (head.main, head.aux):  # both CRTs receive gradient from the consistency term
        assert part.prototypes.grad is not None and part.prototypes.grad.abs().sum() > 0
        assert part.encode.weight.grad.abs().sum() > 0


def test_diversity_regulariser_spreads_prototypes():
    head = CRTHead(16, 8, prototypes=6, aux_prototypes=0)
    with torch.no_grad():  # start collapsed: all prototypes nearly equal
        head.main.prototypes.copy_(torch.ones(6, 16) + 0.01 * torch.randn(6, 16))
    start = float(prototype_diversity(head.main.prototypes).detach())
    opt = torch.optim.Adam([head.main.prototypes], lr=0.05)
    for _ in range(150):
        opt.zero_grad()
        prototype_diversity(head.main.prototypes).backward()
        opt.step()
    end = float(prototype_diversity(head.main.prototypes).detach())
    assert start > 0.9 and end < 0.05
    assert float(prototype_diversity(torch.eye(4))) == pytest.approx(0.0)


def test_trainer_runs_end_to_end_with_the_crt_head():
    from dmlcore.train import Trainer

    cfg = load_config(None, {
        "data.dataset": "digits", "data.image_size": 16, "data.augmentation": "none",
        "model.backbone": "small_cnn", "model.backbone_params": {"width": 8, "depth": 2},
        "model.head": "crt", "model.head_params": {"prototypes": 4, "aux_prototypes": 3},
        "model.embed_dim": 16, "batch.size": 40, "batch.samples_per_class": 8, "batch.iterations_per_epoch": 2,
        "optim.lr": 1e-3, "train.epochs": 1, "train.device": "cpu",
        "eval.recall_k": [1], "eval.clustering": False, "eval.embedding_metrics": False,
    })  # fmt: skip
    res = Trainer(cfg, progress=False).fit()
    assert math.isfinite(res.final["train/loss"]) and 0 < res.final["test/recall_at_1"] <= 1
    assert res.final["train/loss"] >= res.final["train/loss_main"]  # the head's extra loss was added
