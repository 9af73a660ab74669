"""Losses, miners (incl. rho_distance) and the Criterion."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dmlcore import registry
from dmlcore.config import ConfigError, RunConfig
from dmlcore.losses.criterion import Criterion, build_criterion, loss_lr
from dmlcore.losses.miners import DistanceWeightedTripletMiner, RhoDistanceMiner, distance_weighted_probs
from dmlcore.registry import Entry, RegistryError

# gdml_regression regresses stored master targets (needs its prepare stage): tests/test_guided.py
LOSSES = [n for n in registry.names("loss") if not n.startswith("roth_") and n != "gdml_regression"]  # roth_*: tests/test_roth_criteria.py
MINERS = [n for n in registry.names("miner") if not n.startswith("roth_")]  # roth_*: tests/test_roth_miners.py
# Losses that own parameters (proxies / class weights / learned per-class margin beta).
WITH_PARAMS = {"proxy_nca", "proxy_anchor", "arcface", "softtriple", "normalized_softmax", "margin"}


@pytest.fixture(autouse=True)
def _seed_and_one_thread():
    # tiny tensors: one intra-op thread is faster than many on a shared CPU
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)


def _batch(n_classes=4, per_class=4, dim=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n_classes).repeat_interleave(per_class)
    emb = torch.randn(len(labels), dim, generator=g)
    return emb, labels


def _loss(name, num_classes=4, embed_dim=8, **params):
    return registry.build("loss", name, params, num_classes=num_classes, embed_dim=embed_dim)


def test_expected_entries_are_registered():
    assert {
        "contrastive", "triplet", "margin", "multi_similarity", "lifted_structure", "npair", "proxy_nca",
        "proxy_anchor", "arcface", "softtriple", "normalized_softmax", "snr", "circle", "ntxent",
    } <= set(LOSSES)  # fmt: skip
    assert {"none", "random_triplet", "semihard", "hard", "distance_weighted", "multi_similarity", "batch_hard", "rho_distance"} <= set(MINERS)


# ---- losses ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", LOSSES)
def test_loss_is_finite_scalar_with_gradient(name):
    emb, labels = _batch()
    emb.requires_grad_()
    loss_fn = _loss(name)
    meta = registry.get("loss", name).meta
    indices = None
    if meta.get("requires_miner"):  # roth_* tuple criteria: mined by the first miner their reference allows
        indices = registry.build("miner", meta["miners"][0], {}, embed_dim=8, train_seed=0)(emb, labels)
    loss = loss_fn(emb, labels, indices)
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    assert emb.grad is not None and torch.isfinite(emb.grad).all() and emb.grad.abs().sum() > 0


@pytest.mark.parametrize("name", sorted(WITH_PARAMS))
def test_loss_parameters_are_exposed_and_trained(name):
    cfg = RunConfig().with_overrides({"loss.name": name, "model.embed_dim": 8})
    crit = build_criterion(cfg, num_classes=4)
    params = list(crit.parameters())
    assert params and all(p.requires_grad for p in params)
    assert {id(p) for p in crit.loss.parameters()} == {id(p) for p in params}
    before = [p.detach().clone() for p in params]
    opt = torch.optim.SGD(params, lr=0.5)
    emb, labels = _batch()
    loss, _ = crit(emb, labels)
    loss.backward()
    opt.step()
    assert any(not torch.equal(b, p.detach()) for b, p in zip(before, params))
    # the parameters travel with the criterion's state dict (checkpoints)
    clone = build_criterion(cfg, num_classes=4)
    clone.load_state_dict(crit.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(clone.parameters(), crit.parameters()))


def test_parameter_free_losses_have_no_parameters():
    for name in set(LOSSES) - WITH_PARAMS:
        assert list(_loss(name).parameters()) == [], name
    assert list(_loss("margin", learn_beta=False).parameters()) == []
    margin = _loss("margin", num_classes=7)
    assert [tuple(p.shape) for p in margin.parameters()] == [(7,)]
    assert [tuple(p.shape) for p in _loss("margin", per_class_beta=False).parameters()] == [(1,)]


def _clusters():
    centers = torch.tensor([[3.0, 3.0], [-3.0, 3.0], [-3.0, -3.0], [3.0, -3.0]])
    labels = torch.arange(4).repeat_interleave(8)
    x = centers[labels] + 0.5 * torch.randn(len(labels), 2, generator=torch.Generator().manual_seed(0))
    return x, labels


@pytest.mark.parametrize("name", LOSSES)
def test_training_reduces_loss(name):
    # Fair check: same fixed batch, same seed, no miner; the loss after 30 Adam steps on
    # (linear model + the loss's own parameters) is at least 5% below the loss at init.
    x, labels = _clusters()
    model = nn.Linear(2, 8)
    loss_fn = _loss(name, num_classes=4, embed_dim=8)
    opt = torch.optim.Adam([*model.parameters(), *loss_fn.parameters()], lr=0.05)

    def value():
        return loss_fn(F.normalize(model(x), dim=1), labels)

    with torch.no_grad():
        start = float(value())
    for _ in range(30):
        opt.zero_grad()
        value().backward()
        opt.step()
    with torch.no_grad():
        end = float(value())
    assert math.isfinite(end) and end < 0.95 * start, (start, end)


@pytest.mark.parametrize("name", ["contrastive", "snr"])
def test_pair_losses_accept_triplet_tuples(name):
    emb, labels = _batch()
    a = torch.tensor([0, 4, 8])
    p = torch.tensor([1, 5, 9])
    n = torch.tensor([4, 8, 12])
    loss_fn = _loss(name, regularizer_weight=0.0) if name == "snr" else _loss(name)
    from_triplets = loss_fn(emb, labels, (a, p, n))
    from_pairs = loss_fn(emb, labels, (a, p, a, n))
    assert torch.isfinite(from_triplets) and from_triplets > 0
    assert torch.allclose(from_triplets, from_pairs)
    assert not torch.allclose(from_triplets, loss_fn(emb, labels))  # the tuple is really used


@pytest.mark.parametrize("name", ["triplet", "margin", "contrastive", "snr"])
def test_rho_regularised_losses_have_finite_gradients(name):
    # (i, i, j) triplets put a zero distance in the positive slot; 40 > 25 samples makes
    # torch.cdist use its matrix-multiplication path.
    labels = torch.arange(20).repeat_interleave(2)
    emb = (torch.randn(1, 8) + 0.05 * torch.randn(40, 8)).requires_grad_()
    loss_fn = _loss(name, num_classes=20)
    triplets = RhoDistanceMiner(p=1.0)(emb, labels)
    loss = loss_fn(emb, labels, triplets)
    loss.backward()
    assert torch.isfinite(loss) and loss > 0
    assert torch.isfinite(emb.grad).all() and emb.grad.abs().sum() > 0


def test_bad_loss_params():
    with pytest.raises(RegistryError) as err:
        build_criterion(RunConfig().with_overrides({"loss.name": "margin", "loss.params.margn": 0.1}), 4)
    msg = str(err.value)
    assert msg.startswith("loss.params.margn:") and "did you mean 'margin'" in msg
    with pytest.raises(RegistryError) as err:
        build_criterion(RunConfig().with_overrides({"loss.name": "trplet"}), 4)
    assert str(err.value).startswith("loss.name:") and "did you mean 'triplet'" in str(err.value)
    with pytest.raises(ConfigError) as err:
        build_criterion(RunConfig().with_overrides({"loss.name": "triplet", "loss.params.margin": "wide"}), 4)
    assert str(err.value).startswith("loss.params:") and "margin" in str(err.value)
    with pytest.raises(RegistryError) as err:
        build_criterion(RunConfig().with_overrides({"miner.name": "rho_distance", "miner.params.pp": 0.3}), 4)
    assert str(err.value).startswith("miner.params.pp:") and "did you mean 'p'" in str(err.value)
    with pytest.raises(ConfigError, match="miner.params"):
        build_criterion(RunConfig().with_overrides({"miner.name": "rho_distance", "miner.params.p": 1.5}), 4)


# ---- miners ---------------------------------------------------------------------------


def _check_tuple(out, labels, allow_same_class_negative=False):
    lab = labels.tolist()
    if len(out) == 3:
        a, p, n = (t.tolist() for t in out)
        assert len(a) == len(p) == len(n) > 0
        for i, j, k in zip(a, p, n):
            assert lab[i] == lab[j]
            if allow_same_class_negative and i == j:
                assert k != i and lab[k] == lab[i]  # a regularising (i, i, j) triplet
            else:
                assert i != j and lab[i] != lab[k]
    else:
        a1, p, a2, n = (t.tolist() for t in out)
        assert len(a1) == len(p) and len(a2) == len(n) and len(a1) + len(a2) > 0
        assert all(lab[i] == lab[j] and i != j for i, j in zip(a1, p))
        assert all(lab[i] != lab[k] for i, k in zip(a2, n))


@pytest.mark.parametrize("name", MINERS)
def test_miner_returns_valid_tuples(name):
    miner = registry.build("miner", name, {}, embed_dim=8, train_seed=0)
    if name == "none":
        assert miner is None
        return
    emb, labels = _batch(n_classes=5, per_class=3)
    emb = F.normalize(emb, dim=1)
    out = miner(emb, labels)
    assert all(t.dtype == torch.long for t in out)
    _check_tuple(out, labels, allow_same_class_negative=name == "rho_distance")
    if name in ("random_triplet", "distance_weighted", "rho_distance", "batch_hard"):
        assert sorted(set(out[0].tolist())) == list(range(len(labels)))  # one triplet for every anchor


def test_rho_p0_never_and_p1_always_pushes():
    labels = torch.tensor([0, 0, 1, 1, 1, 2, 3, 3])  # class 2 has a single sample
    emb = F.normalize(torch.randn(len(labels), 8), dim=1)
    lab = labels.tolist()
    for seed in range(5):
        a, p, n = (t.tolist() for t in RhoDistanceMiner(p=0.0, seed=seed)(emb, labels))
        assert a and all(lab[i] != lab[k] and i != j for i, j, k in zip(a, p, n))
        a, p, n = (t.tolist() for t in RhoDistanceMiner(p=1.0, seed=seed)(emb, labels))
        assert a == [0, 1, 2, 3, 4, 6, 7]  # every anchor with a class mate, nothing for the singleton
        assert all(j == i and k != i and lab[k] == lab[i] for i, j, k in zip(a, p, n))


def test_rho_push_fraction_follows_p():
    labels = torch.arange(100).repeat_interleave(2)
    emb = F.normalize(torch.randn(200, 8), dim=1)
    miner = RhoDistanceMiner(p=0.3, seed=1)
    a, p, n = miner(emb, labels)
    frac = float((labels[a] == labels[n]).float().mean())
    assert 0.2 < frac < 0.4 and miner.stats()["miner_push_triplets"] == int((labels[a] == labels[n]).sum())


@pytest.mark.parametrize("name", ["random_triplet", "distance_weighted", "rho_distance"])
def test_seeded_miners_are_deterministic(name):
    emb, labels = _batch(n_classes=6, per_class=4)

    def mine(seed, epoch=None, calls=1):
        m = registry.build("miner", name, {"seed": seed}, embed_dim=8, train_seed=123)
        if epoch is not None:
            m.set_epoch(epoch)
        outs = [torch.stack(m(emb, labels)) for _ in range(calls)]
        return outs[-1]

    assert torch.equal(mine(3), mine(3))
    assert torch.equal(mine(3, epoch=2), mine(3, epoch=2))
    assert not torch.equal(mine(3, calls=1), mine(3, calls=2))  # the stream advances per batch
    assert not all(torch.equal(mine(3), mine(s)) for s in (4, 5, 6))
    # set_epoch restarts the stream: a resumed run mines what the original did
    m = registry.build("miner", name, {"seed": 3}, embed_dim=8)
    m.set_epoch(5)
    first = torch.stack(m(emb, labels))
    m(emb, labels)
    m.set_epoch(5)
    assert torch.equal(first, torch.stack(m(emb, labels)))


def test_miner_seed_defaults_to_train_seed():
    emb, labels = _batch(n_classes=6, per_class=4)

    def triplets(overrides):
        crit = build_criterion(RunConfig().with_overrides({"miner.name": "rho_distance", **overrides}), 6)
        return torch.stack(crit.miner(emb, labels))

    assert torch.equal(triplets({"train.seed": 1}), triplets({"train.seed": 1}))
    assert not all(torch.equal(triplets({"train.seed": 1}), triplets({"train.seed": s})) for s in (2, 3, 4))
    fixed = {"miner.params.seed": 7}
    assert torch.equal(triplets({**fixed, "train.seed": 1}), triplets({**fixed, "train.seed": 2}))


def test_distance_weighted_probabilities_follow_inverse_sphere_density():
    dim = 16
    emb = F.normalize(torch.randn(12, dim), dim=1)
    labels = torch.arange(6).repeat_interleave(2)
    dist = torch.cdist(emb, emb)
    neg = labels[:, None] != labels[None, :]
    rows, probs = distance_weighted_probs(dist, neg, dim, cutoff=0.5, nonzero_loss_cutoff=None)
    assert rows.all()
    # independent numpy reference: w ~ 1 / q(d), q(d) ~ d^(n-2) (1 - d^2/4)^((n-3)/2), d >= 0.5
    d = np.clip(dist.double().numpy(), 0.5, None)
    q = d ** (dim - 2) * (1 - d**2 / 4) ** ((dim - 3) / 2)
    w = np.where(neg.numpy(), 1.0 / q, 0.0)
    ref = w / w.sum(1, keepdims=True)
    assert np.allclose(probs.numpy(), ref, rtol=1e-6, atol=1e-12)
    # upper cutoff: negatives at d >= 1.4 are excluded while an anchor has a closer one
    rows, cut = distance_weighted_probs(dist, neg, dim, 0.5, 1.4)
    has_near = (neg & (dist < 1.4)).any(1)
    assert torch.all(cut[has_near][(dist >= 1.4)[has_near]] == 0)
    assert torch.allclose(cut[~has_near[rows]], probs[~has_near], atol=1e-12)
    # the miner samples from exactly these probabilities
    miner = DistanceWeightedTripletMiner(nonzero_loss_cutoff=None, seed=0)
    counts = np.zeros(12)
    for _ in range(300):
        a, _, n = miner(emb, labels)
        counts[n[a == 0].item()] += 1
    assert np.abs(counts / 300 - ref[0]).max() < 0.1


def test_distance_weighted_far_negatives_fall_back():
    # every negative lies beyond the upper cutoff: the anchor still gets a triplet
    emb = torch.tensor([[1.0, 0.0], [1.0, 0.01], [-1.0, 0.0], [-1.0, 0.01]])
    labels = torch.tensor([0, 0, 1, 1])
    a, p, n = DistanceWeightedTripletMiner(seed=0)(emb, labels)
    assert a.tolist() == [0, 1, 2, 3] and (labels[a] != labels[n]).all()


# ---- criterion ------------------------------------------------------------------------


def test_criterion_logs_and_lr():
    cfg = RunConfig().with_overrides({"loss.name": "margin", "miner.name": "rho_distance", "model.embed_dim": 8})
    crit = build_criterion(cfg, num_classes=4)
    assert isinstance(crit, Criterion) and crit.lr == pytest.approx(cfg.optim.lr * cfg.optim.loss_lr_mult)
    emb, labels = _batch()
    emb.requires_grad_()
    loss, logs = crit(emb, labels)
    loss.backward()
    assert torch.isfinite(loss) and emb.grad.abs().sum() > 0
    assert logs["miner_triplets"] == 16 and logs["loss_main"] == pytest.approx(float(loss.detach()))
    assert "miner_push_triplets" in logs and logs["margin_beta"] == pytest.approx(1.2)
    assert all(isinstance(v, float) for v in logs.values())
    assert loss_lr(cfg.with_overrides({"loss.lr": 0.01})) == 0.01
    pairs = build_criterion(cfg.with_overrides({"miner.name": "multi_similarity", "loss.name": "multi_similarity"}), 4)
    _, logs = pairs(emb, labels)
    assert {"miner_pos_pairs", "miner_neg_pairs"} <= logs.keys()
    _, logs = build_criterion(cfg.with_overrides({"miner.name": "none"}), 4)(emb, labels)
    assert not any(k.startswith("miner_") for k in logs)


class _CenterPull(nn.Module):
    def __init__(self, scale: float):
        super().__init__()
        self.scale = scale
        self.frozen = nn.Linear(2, 2).requires_grad_(False)  # e.g. a teacher: not optimised

    def forward(self, embeddings, labels, **batch_context):
        self.seen = batch_context
        return self.scale * embeddings.mean(0).pow(2).sum()


def test_criterion_weighted_regularizers(monkeypatch):
    def center_pull(scale: float = 1.0, num_classes=None, embed_dim=None):
        return _CenterPull(scale)

    monkeypatch.setitem(
        registry._REGISTRIES["regularizer"],
        "center_pull",
        Entry("regularizer", "center_pull", center_pull, ("num_classes", "embed_dim")),
    )
    base = RunConfig().with_overrides({"loss.name": "triplet", "model.embed_dim": 8})
    cfg = base.with_overrides({"loss.regularizers": {"center_pull": {"weight": 0.5, "scale": 2.0}}})
    crit = build_criterion(cfg, 4)
    emb, labels = _batch()
    loss, logs = crit(emb, labels, images="x")
    expected = build_criterion(base, 4)(emb, labels)[0] + 0.5 * 2.0 * emb.mean(0).pow(2).sum()
    assert torch.allclose(loss, expected)
    assert logs["reg_center_pull"] == pytest.approx(2.0 * float(emb.mean(0).pow(2).sum()))
    assert crit.reg_center_pull.seen == {"images": "x"}
    assert list(crit.parameters()) == []  # the frozen module is left out
    with pytest.raises(RegistryError, match=r"loss\.regularizers\.center_pull\.scal:"):
        build_criterion(base.with_overrides({"loss.regularizers": {"center_pull": {"scal": 1.0}}}), 4)
    with pytest.raises(RegistryError, match=r"loss\.regularizers: unknown regularizer 'center_pul'.*did you mean 'center_pull'"):
        build_criterion(base.with_overrides({"loss.regularizers": {"center_pul": {"weight": 1.0}}}), 4)
