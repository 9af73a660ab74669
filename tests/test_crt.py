"""Coded Residual Transform head: every switch on small tensors against values worked out
by hand, the consistency forms, diversity, stop-gradient, the auxiliary CRT's metric loss
reaching the criterion, and a short training run."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dmlcore import registry
from dmlcore.config import ConfigError, load_config
from dmlcore.losses.criterion import Criterion, build_criterion
from dmlcore.models.crt import CodedResidualTransform, CRTHead, prototype_diversity, similarity_consistency
from dmlcore.models.pretrained import ModelError


def _head(**kw):
    return registry.build("head", "crt", {"prototypes": 5, "aux_prototypes": 3, **kw}, in_dim=12, embed_dim=10)


def _crt(prototypes, dim=2, **kw):
    """One CRT whose prototypes are set to the given rows."""
    p = torch.tensor(prototypes, dtype=torch.float32)
    t = CodedResidualTransform(dim, p.shape[0], 3, **kw)
    with torch.no_grad():
        t.prototypes.copy_(p)
    return t


def _fmap(*positions):
    """``1 x C x 1 x N`` feature map whose positions are the given feature vectors."""
    return torch.tensor(positions, dtype=torch.float32).t().reshape(1, len(positions[0]), 1, len(positions))


def test_shapes_and_extra_loss_only_in_training():
    head = _head()
    x = torch.randn(6, 12, 3, 4)
    assert head(x).shape == (6, 10)
    extra = head.extra_loss()
    assert extra is not None and extra.dim() == 0 and torch.isfinite(extra)
    assert head.extra_loss() is None  # consumed
    head.eval()
    assert head(x).shape == (6, 10) and head.extra_loss() is None and head.extra_embeddings() == {}
    assert _head(reduce_dim=4, aux_dim=7)(x).shape == (6, 10)
    with pytest.raises(registry.RegistryError, match="no parameter"):
        registry.build("head", "crt", {"protoypes": 3}, in_dim=12, embed_dim=10)


@pytest.mark.parametrize(
    "key, value, match",
    [("residual", "vlad", "residual must be one of orth, proto, proj"),
     ("weights", "l2", "weights must be one of pearson, cosine, dot"),
     ("softmax_over", "channels", "softmax_over must be one of prototypes, positions, none"),
     ("aggregate", "max", "aggregate must be one of mean, sum"),
     ("consistency", "js", "consistency must be one of mse, kl, l1"),
     ("stop_grad", "both", "stop_grad must be one of none, aux, main"),
     ("test_embedding", "aux", "test_embedding must be one of main, concat"),
     ("temperature", 0.0, "temperature must be > 0")],
)  # fmt: skip
def test_bad_switch_values_are_one_clear_error(key, value, match):
    with pytest.raises(ModelError, match=match):
        _head(**{key: value})


def test_orthogonal_residual_by_hand():
    # x = (3, 4), p = (1, 0): x - (x . p^) p^ = (0, 4). One position, one prototype: a = 1.
    t = _crt([[1.0, 0.0]], residual="orth")
    assert torch.allclose(t.coded_residuals(_fmap([3.0, 4.0])), torch.tensor([[[0.0, 4.0]]]))
    # the prototype's length does not matter for this reading
    t = _crt([[5.0, 0.0]], residual="orth")
    assert torch.allclose(t.coded_residuals(_fmap([3.0, 4.0])), torch.tensor([[[0.0, 4.0]]]))


def test_coded_residuals_are_orthogonal_to_their_prototype():
    head = _head()
    x = torch.randn(4, 12, 3, 3)
    v = head.main.coded_residuals(x)  # B x K x C
    p_hat = F.normalize(head.main.prototypes, dim=1)
    assert v.shape == (4, 5, 12)
    assert torch.allclose((v * p_hat).sum(-1), torch.zeros(4, 5), atol=1e-5)


def test_residual_to_the_prototype_and_to_its_learned_projection_by_hand():
    # reading A: one position, one prototype: c = x - p = (3, 4) - (1, 0) = (2, 4)
    t = _crt([[1.0, 0.0]], residual="proto")
    assert torch.allclose(t.coded_residuals(_fmap([3.0, 4.0])), torch.tensor([[[2.0, 4.0]]]))
    # learned projection W p: initialised to the identity (= reading A); with W = 2 I, c = x - 2p = (1, 4)
    t = _crt([[1.0, 0.0]], residual="proj")
    assert torch.allclose(t.coded_residuals(_fmap([3.0, 4.0])), torch.tensor([[[2.0, 4.0]]]))
    with torch.no_grad():
        t.proj.weight.copy_(2 * torch.eye(2))
    assert torch.allclose(t.coded_residuals(_fmap([3.0, 4.0])), torch.tensor([[[1.0, 4.0]]]))
    assert _crt([[1.0, 0.0]], residual="orth").proj is None


def test_equal_weights_and_zero_prototype_give_global_average_pooling():
    x = ([1.0, 2.0], [3.0, 6.0], [5.0, 1.0])  # mean (3, 3)
    gap = torch.tensor([[[3.0, 3.0]]])
    # one prototype, softmax over prototypes: every a_j = 1; weighted mean of x_j - 0
    t = _crt([[0.0, 0.0]], residual="proto", aggregate="mean")
    assert torch.allclose(t.coded_residuals(_fmap(*x)), gap)
    # p = 0: its Pearson correlation with every x_j is 0, softmax over 3 positions: a_j = 1/3, summed
    t = _crt([[0.0, 0.0]], residual="proto", softmax_over="positions", aggregate="sum")
    assert torch.allclose(t.correlation_weights(_fmap(*x).flatten(2).transpose(1, 2)), torch.full((1, 3, 1), 1 / 3))
    assert torch.allclose(t.coded_residuals(_fmap(*x)), gap)


def test_correlation_weights_by_hand():
    x = _fmap([1.0, 2.0, 3.0]).flatten(2).transpose(1, 2)  # 1 x 1 x 3
    protos = [[2.0, 4.0, 6.0], [3.0, 2.0, 1.0]]
    # Pearson((1,2,3), (2,4,6)) = 1, Pearson((1,2,3), (3,2,1)) = -1
    raw = _crt(protos, dim=3, weights="pearson", softmax_over="none").correlation_weights(x)
    assert torch.allclose(raw, torch.tensor([[[1.0, -1.0]]]), atol=1e-6)
    # softmax over the two prototypes at tau 0.1: (1, e^-20) / (1 + e^-20) (float64: 1 - 2e-9 is below float32's resolution)
    a = _crt(protos, dim=3, weights="pearson", temperature=0.1).double().correlation_weights(x.double())
    assert a[0, 0, 0].item() == pytest.approx(0.9999999979, abs=1e-9)
    assert a[0, 0, 1].item() == pytest.approx(2.06e-9, rel=1e-2)
    # cosine (1,2,3).(3,2,1) / 14 = 10/14; (1,2,3).(2,4,6) / (sqrt(14) sqrt(56)) = 1; dot: 28 and 10
    cos = _crt(protos, dim=3, weights="cosine", softmax_over="none").correlation_weights(x)
    assert torch.allclose(cos, torch.tensor([[[1.0, 10 / 14]]]), atol=1e-6)
    dot = _crt(protos, dim=3, weights="dot", softmax_over="none").correlation_weights(x)
    assert torch.allclose(dot, torch.tensor([[[28.0, 10.0]]]))
    # softmax over positions: x_1 = (1,0), x_2 = (0,1), p = (1,0), dot, tau 1: (e, 1) / (e + 1)
    pos = _crt([[1.0, 0.0]], weights="dot", softmax_over="positions", temperature=1.0)
    a = pos.correlation_weights(_fmap([1.0, 0.0], [0.0, 1.0]).flatten(2).transpose(1, 2))
    e = math.e
    assert torch.allclose(a, torch.tensor([[[e / (e + 1)], [1 / (e + 1)]]]))


def test_mean_and_sum_aggregation_and_intra_normalisation_by_hand():
    # raw dot weights, x_1 = (2,0), x_2 = (0,1), p = (1,0): w = (2, 0) -> residuals to p: (1,0), (-1,1)
    x = _fmap([2.0, 0.0], [0.0, 1.0])
    s = _crt([[1.0, 0.0]], residual="proto", weights="dot", softmax_over="none", aggregate="sum")
    assert torch.allclose(s.coded_residuals(x), torch.tensor([[[2.0, 0.0]]]))  # 2 (1,0) + 0 (-1,1)
    m = _crt([[1.0, 0.0]], residual="proto", weights="dot", softmax_over="none", aggregate="mean")
    assert torch.allclose(m.coded_residuals(x), torch.tensor([[[1.0, 0.0]]]))  # / (|2| + |0|)
    # signed (raw) weights: w = (2, -1) for x_1 = (2,0), x_2 = (-1,0); residuals (1,0), (-2,0);
    # sum 2 (1,0) - (-2,0) = (4,0); mean divides by the weight mass |2| + |-1| = 3
    y = _fmap([2.0, 0.0], [-1.0, 0.0])
    assert torch.allclose(s.coded_residuals(y), torch.tensor([[[4.0, 0.0]]]))
    assert torch.allclose(m.coded_residuals(y), torch.tensor([[[4 / 3, 0.0]]]))
    # intra-norm: the encoder sees c_k / |c_k|; off: c_k itself
    for t, code in ((s, torch.tensor([1.0, 0.0])), (_crt([[1.0, 0.0]], residual="proto", weights="dot",
                                                          softmax_over="none", aggregate="sum", intra_norm=False),
                                                     torch.tensor([2.0, 0.0]))):  # fmt: skip
        assert torch.allclose(t(x), t.encode(code.unsqueeze(0)))


def test_a_prototype_with_vanishing_weight_stays_finite():
    # p_2 = -x: softmax over prototypes at tau 0.01 gives it weight exp(-2e2 * ...) = 0 in float32
    t = CodedResidualTransform(2, 2, 3, temperature=0.01, weights="dot")
    with torch.no_grad():
        t.prototypes.copy_(torch.tensor([[3.0, 4.0], [-3.0, -4.0]]))
    x = _fmap([3.0, 4.0], [3.0, 4.0]).requires_grad_(True)
    a = t.correlation_weights(x.flatten(2).transpose(1, 2))
    assert float(a[..., 1].sum().detach()) == 0.0  # the weight really vanishes
    c = t.coded_residuals(x)
    assert torch.isfinite(c).all() and torch.allclose(c[0, 1], torch.zeros(2))
    out = t(x)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(x.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in t.parameters() if p.grad is not None)


def test_global_branch_is_off_by_default():
    head = _head()
    assert head.main.glob is None and head.aux.glob is None
    assert not any("glob" in n for n, _ in head.named_parameters())
    x = torch.randn(3, 12, 2, 2)
    head.eval()
    code = F.normalize(head.main.coded_residuals(x), dim=-1).flatten(1)
    assert torch.allclose(head(x), head.main.encode(code), atol=1e-6)  # the CRT code alone
    on = _head(glob_branch=True).eval()
    code = F.normalize(on.main.coded_residuals(x), dim=-1).flatten(1)
    assert torch.allclose(on(x), on.main.encode(code) + on.main.glob(x.mean(dim=(2, 3))), atol=1e-6)


def test_test_embedding_concat_joins_both_normalised_embeddings():
    head = _head(test_embedding="concat", aux_dim=7).eval()
    x = torch.randn(3, 12, 2, 2)
    out = head(x)
    assert out.shape == (3, 17)
    assert torch.allclose(out, torch.cat([F.normalize(head.main(x), dim=1), F.normalize(head.aux(x), dim=1)], 1))
    assert _head().eval()(x).shape == (3, 10)
    with pytest.raises(ModelError, match="concat needs the auxiliary CRT"):
        _head(aux_prototypes=0, test_embedding="concat")


def test_consistency_forms_by_hand():
    a = torch.eye(3)
    b = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    # S_a off-diagonal all 0; S_b: s01 = s10 = 1, the other 4 are 0 -> 2 of 6 differ by 1
    assert float(similarity_consistency(a, b, "mse")) == pytest.approx(1 / 3)
    assert float(similarity_consistency(a, b, "l1")) == pytest.approx(1 / 3)
    # 60 degrees apart: s01 = 1/2, s02 = 0, s12 = sqrt(3)/2
    c = torch.tensor([[1.0, 0.0], [0.5, math.sqrt(3) / 2], [0.0, 1.0]])
    assert float(similarity_consistency(a, c, "l1")) == pytest.approx((0.5 + math.sqrt(3) / 2) / 3)
    assert float(similarity_consistency(a, c, "mse")) == pytest.approx((0.25 + 0.75) / 3)
    # KL at tau 1: P_a rows uniform (1/2, 1/2); P_b rows 0, 1: (s, 1-s), s = e/(e+1); row 2 uniform
    s = math.e / (math.e + 1)
    kl_b_a = 2 / 3 * (s * math.log(2 * s) + (1 - s) * math.log(2 * (1 - s)))
    kl_a_b = 2 / 3 * (0.5 * math.log(0.5 / s) + 0.5 * math.log(0.5 / (1 - s)))
    assert float(similarity_consistency(a, b, "kl", temperature=1.0)) == pytest.approx(0.5 * (kl_b_a + kl_a_b), rel=1e-5)
    for mode in ("mse", "kl", "l1"):  # scale-free, and 0 for the same structure
        r = torch.randn(8, 10)
        assert float(similarity_consistency(r, 2 * r, mode)) == pytest.approx(0.0, abs=1e-6)
        assert float(similarity_consistency(r, torch.randn(8, 5), mode)) > 0


def test_diversity_by_hand():
    assert float(prototype_diversity(torch.eye(4))) == pytest.approx(0.0)
    assert float(prototype_diversity(torch.tensor([[1.0, 2.0], [1.0, 2.0]]))) == pytest.approx(1.0)
    sixty = torch.tensor([[1.0, 0.0], [0.5, math.sqrt(3) / 2]])  # cos 60 = 1/2 -> 1/4
    assert float(prototype_diversity(sixty)) == pytest.approx(0.25)


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


def _grad_total(module):
    return sum(float(p.grad.abs().sum()) for p in module.parameters() if p.grad is not None)


@pytest.mark.parametrize("stop_grad, main_trained, aux_trained", [("none", True, True), ("aux", True, False), ("main", False, True)])
def test_stop_gradient_blocks_the_named_branch_in_the_consistency_term(stop_grad, main_trained, aux_trained):
    torch.manual_seed(0)
    head = _head(stop_grad=stop_grad, diversity_weight=0.0, aux_metric_weight=0.0)
    x = torch.randn(6, 12, 2, 2, requires_grad=True)
    head(x)
    head.extra_loss().backward()
    assert (_grad_total(head.main) > 0) == main_trained
    assert (_grad_total(head.aux) > 0) == aux_trained
    assert float(x.grad.abs().sum()) > 0  # the shared input (backbone) is trained through the other branch


class _SumLoss(nn.Module):
    """A stand-in loss whose value is known by hand: the sum of the embedding's entries."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, emb, labels, indices=None):
        self.seen.append((emb, labels))
        return emb.sum()


def test_criterion_scores_extra_embeddings_with_the_labels():
    loss = _SumLoss()
    crit = Criterion(loss)
    main, aux, y = torch.ones(4, 3), torch.full((4, 2), 2.0), torch.tensor([0, 0, 1, 1])
    total, logs = crit(main, y, extra_embeddings={"crt_aux": (aux, 0.5)})
    assert float(total) == pytest.approx(12.0 + 0.5 * 16.0)
    assert logs["loss_main"] == pytest.approx(12.0) and logs["loss_crt_aux"] == pytest.approx(16.0)
    assert loss.seen[1][0] is not None and torch.equal(loss.seen[1][1], y)


def test_a_loss_with_embedding_sized_parameters_refuses_an_extra_embedding_of_another_width():
    base = {"model.embed_dim": 16, "train.device": "cpu"}
    proxy = build_criterion(load_config(None, {**base, "loss.name": "normalized_softmax"}), 10)
    with pytest.raises(ConfigError, match=r"crt_aux \(8-d\).*aux_metric_weight: 0"):
        proxy.check_extra_embeddings({"crt_aux": 8})
    proxy.check_extra_embeddings({"crt_aux": 16})  # same width: the proxies are shared
    build_criterion(load_config(None, {**base, "loss.name": "margin"}), 10).check_extra_embeddings({"crt_aux": 8})


def test_trainer_sends_both_crt_embeddings_to_the_criterion(monkeypatch):
    from dmlcore.train import Trainer

    calls = []
    forward = Criterion.forward

    def spy(self, embeddings, labels, extra_embeddings=None, **ctx):
        calls.append((embeddings.detach(), labels.clone(), {k: (e.detach(), w) for k, (e, w) in (extra_embeddings or {}).items()}))
        return forward(self, embeddings, labels, extra_embeddings, **ctx)

    monkeypatch.setattr(Criterion, "forward", spy)
    cfg = load_config(None, {
        "data.dataset": "digits", "data.image_size": 16, "data.augmentation": "none",
        "model.backbone": "small_cnn", "model.backbone_params": {"width": 8, "depth": 2},
        "model.head": "crt", "model.head_params": {"prototypes": 4, "aux_prototypes": 3, "aux_dim": 6, "aux_metric_weight": 0.5},
        "model.embed_dim": 16, "loss.name": "multi_similarity", "batch.size": 40, "batch.samples_per_class": 8,
        "batch.iterations_per_epoch": 2, "optim.lr": 1e-3, "train.epochs": 1, "train.device": "cpu",
        "eval.recall_k": [1], "eval.clustering": False, "eval.embedding_metrics": False,
    })  # fmt: skip
    res = Trainer(cfg, progress=False).fit()
    assert len(calls) == 2
    for emb, labels, extras in calls:
        assert set(extras) == {"crt_aux"}
        aux, weight = extras["crt_aux"]
        assert emb.shape == (40, 16) and aux.shape == (40, 6) and weight == 0.5
        assert torch.allclose(aux.norm(dim=1), torch.ones(40), atol=1e-5)  # normalised like the main output
        assert labels.shape == (40,) and len(set(labels.tolist())) == 5  # the batch labels: 5 classes x 8
    assert math.isfinite(res.final["train/loss"]) and 0 < res.final["test/recall_at_1"] <= 1
    assert res.final["train/loss_crt_aux"] > 0
    assert res.final["train/loss"] >= res.final["train/loss_main"]  # aux loss and the head's extra loss added


def test_trainer_runs_with_consistency_only_and_no_extra_embedding():
    from dmlcore.train import Trainer

    cfg = load_config(None, {
        "data.dataset": "digits", "data.image_size": 16, "data.augmentation": "none",
        "model.backbone": "small_cnn", "model.backbone_params": {"width": 8, "depth": 2},
        "model.head": "crt", "model.head_params": {"prototypes": 4, "aux_prototypes": 3, "aux_metric_weight": 0.0},
        "model.embed_dim": 16, "batch.size": 40, "batch.samples_per_class": 8, "batch.iterations_per_epoch": 1,
        "optim.lr": 1e-3, "train.epochs": 1, "train.device": "cpu",
        "eval.recall_k": [1], "eval.clustering": False, "eval.embedding_metrics": False,
    })  # fmt: skip
    res = Trainer(cfg, progress=False).fit()
    assert "train/loss_crt_aux" not in res.final and math.isfinite(res.final["train/loss"])


def test_crt_study_is_the_fair_pipeline_with_the_paper_arms_and_a_cpu_quick_variant():
    from pathlib import Path

    from sweeper.study import load_study

    path = Path(__file__).resolve().parents[1] / "studies" / "crt.yaml"
    full, quick = load_study(path), load_study(path, quick=True)
    assert (full.size, quick.size) == (6 * 3 * 5, 5)
    b = full.base
    assert (b.model.backbone, b.model.pretrained, b.model.freeze_bn, b.model.embed_dim) == ("resnet50", "imagenet", True, 128)
    assert (b.loss.name, b.loss.params, b.miner.name) == ("multi_similarity", {"alpha": 2.0, "beta": 40.0, "base": 0.5}, "multi_similarity")
    assert (b.optim.name, b.optim.lr, b.optim.weight_decay, b.optim.scheduler) == ("adam", 1e-5, 4e-4, "none")
    assert b.train.amp is False and b.eval.every == 1 and b.eval.embedding_metrics
    assert b.data.augmentation == "base" and b.eval.select_on == "val"  # RandomResizedCrop(224), scale 0.08-1
    assert {t.config.data.dataset for t in full.trials} == {"cub200", "cars196", "sop"}
    arms = {(t.config.model.head, str(sorted(t.config.model.head_params.items()))) for t in full.trials}
    assert len(arms) == 6
    ks = sorted(t.config.model.head_params.get("prototypes") for t in full.trials
                if t.config.model.head_params.get("aux_prototypes") and t.config.train.seed == 0 and t.config.data.dataset == "sop")  # fmt: skip
    assert ks == [8, 16, 32, 64]  # CRT + consistency and its K sweep
    for t in quick.trials:  # CPU minutes, no weights
        c = t.config
        assert c.data.dataset == "digits" and c.model.pretrained is None and not c.model.freeze_bn
        assert c.train.epochs <= 2 and quick.spec.resources.gpu == 0
    heads = {(c.model.head, str(sorted(c.model.head_params.items()))): c for c in (t.config for t in [*quick.trials, *full.trials])}
    assert len(heads) == 6 + 5 - 1  # the linear arm is the same in both
    for c in heads.values():  # every arm's head builds with its parameters
        registry.build("head", c.model.head, c.model.head_params, in_dim=16, embed_dim=c.model.embed_dim)


def test_residuals_differ_from_attention_pooling_unless_the_anchor_is_zero():
    # x_1 = (1,0), x_2 = (0,1), p = (1,0), dot weights, softmax over positions at tau 1: a = (e, 1)/(e+1).
    # Attention pooling (original values, sum_j a_j x_j) = (e, 1)/(e+1); the residual to p subtracts p.
    e = math.e
    x = _fmap([1.0, 0.0], [0.0, 1.0])
    t = _crt([[1.0, 0.0]], residual="proj", weights="dot", softmax_over="positions", temperature=1.0, aggregate="sum")
    assert torch.allclose(t.coded_residuals(x), torch.tensor([[[-1 / (e + 1), 1 / (e + 1)]]]))  # W = I: x_j - p
    with torch.no_grad():
        t.proj.weight.zero_()  # anchor W p = 0: CRT degenerates to attention pooling
    assert torch.allclose(t.coded_residuals(x), torch.tensor([[[e / (e + 1), 1 / (e + 1)]]]))
