"""The batch miners of Roth et al. 2020's reference code (``R: batchminer/*.py``).

``miner(embeddings, labels)`` returns the tuple form the ``roth_*`` criteria read (see
:mod:`dmlcore.losses.roth_criteria`): triplets ``(a, p, n)``; ``roth_npair`` gives
``(a, p, neg_mask)``, ``roth_lifted`` ``(a, pos_mask, neg_mask)``. Distances are plain
Euclidean distances of the embeddings as given (the reference's ``pdist``), computed
in float64 on the CPU. The reference draws from numpy's global RNG; here each miner owns
a ``torch.Generator`` seeded by ``seed`` (default ``train.seed``) and re-seeded per
epoch by ``set_epoch`` (same distribution, reproducible streams).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..registry import register
from .miners import SEEDED, _mix, _prob, _seed


def _pdist(x: Tensor) -> Tensor:
    prod = x @ x.T
    norm = prod.diag().unsqueeze(1)
    return (norm + norm.T - 2 * prod).clamp(min=0).sqrt()


def _draw(mask: Tensor, gen: torch.Generator) -> Tensor:
    """One uniformly drawn True column per row."""
    return torch.multinomial(mask.double(), 1, generator=gen).squeeze(1)


def _log_q_inv(d: Tensor, dim: int, lower: float) -> Tensor:
    """log q(d)^-1 on the unit sphere in R^dim, d clamped below at ``lower``
    (R: batchminer/distance.py:18,52); clamped just under 2 above (R: -inf/NaN at d >= 2)."""
    d = d.clamp(min=lower, max=2.0 - 1e-6)
    return (2.0 - dim) * torch.log(d) - ((dim - 3) / 2) * torch.log(1.0 - 0.25 * d.pow(2))


def _dw_negatives(d: Tensor, neg: Tensor, rows: Tensor, dim: int, lower: float, upper: float | None, gen) -> Tensor:
    """A negative per row of ``rows`` drawn with probability ~ q(d)^-1 over ``neg``
    (softmax of the log weights over the negatives = R's exp(log - max), zeroed, normalised)."""
    allowed = neg[rows]
    if upper is not None:  # R's commented-out line (distance.py:60): off by default
        near = allowed & (d[rows] <= upper)
        allowed = torch.where(near.any(1, keepdim=True), near, allowed)
    logw = _log_q_inv(d[rows], dim, lower).masked_fill(~allowed, float("-inf"))
    return torch.multinomial(torch.softmax(logw, dim=1), 1, generator=gen).squeeze(1)


class RothMiner(nn.Module):
    reference = ""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        self.seed = int(seed)
        self.generator = torch.Generator(device="cpu")
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        self.generator.manual_seed(_mix(self.seed, epoch))

    def forward(self, embeddings: Tensor, labels: Tensor) -> tuple[Tensor, ...]:
        x = embeddings.detach().cpu().double()
        y = labels.detach().cpu().long()
        return tuple(t.to(embeddings.device) for t in self.mine(x, y))

    def masks(self, y: Tensor) -> tuple[Tensor, Tensor]:
        same = y.view(-1, 1) == y.view(1, -1)
        return same & ~torch.eye(len(y), dtype=torch.bool), ~same

    def stats(self) -> dict[str, float]:
        return {}


class Random(RothMiner):
    """bs triplets drawn without replacement from all (a, p != a, n) (R: batchminer/random.py:10-24).
    Fewer than bs triplets in the batch: all of them (R: ValueError)."""

    reference = "random"

    def mine(self, x, y):
        pos, neg = self.masks(y)
        idx = torch.nonzero(pos[:, :, None] & neg[:, None, :])
        pick = torch.randperm(len(idx), generator=self.generator)[: len(y)]
        t = idx[pick]
        return t[:, 0], t[:, 1], t[:, 2]


class Semihard(RothMiner):
    """Per anchor: a random positive, a random negative with d_ap < d_an < d_ap + margin,
    else a random negative (R: batchminer/semihard.py:18-33). Anchors without a class mate
    or a negative are skipped (R crashes)."""

    reference = "semihard"

    def __init__(self, margin: float, seed: int = 0) -> None:
        super().__init__(seed)
        self.margin = margin

    def mine(self, x, y):
        pos, neg = self.masks(y)
        d = _pdist(x)
        a = torch.nonzero(pos.any(1) & neg.any(1)).squeeze(1)
        if len(a) == 0:
            return a, a.clone(), a.clone()
        p = _draw(pos[a], self.generator)
        dap = d[a, p].unsqueeze(1)
        band = neg[a] & (d[a] > dap) & (d[a] < dap + self.margin)
        n = _draw(torch.where(band.any(1, keepdim=True), band, neg[a]), self.generator)
        return a, p, n


class Softhard(RothMiner):
    """Anchors with a mate: positive random among {d_ap > min d_an}, negative random among
    {d_an < max d_ap}; an empty set falls back to all positives / negatives (R: batchminer/softhard.py:17-40)."""

    reference = "softhard"

    def mine(self, x, y):
        pos, neg = self.masks(y)
        d = _pdist(x)
        a = torch.nonzero(pos.any(1) & neg.any(1)).squeeze(1)
        if len(a) == 0:
            return a, a.clone(), a.clone()
        da, pa, na = d[a], pos[a], neg[a]
        max_p = da.masked_fill(~pa, float("-inf")).max(1, keepdim=True).values
        min_n = da.masked_fill(~na, float("inf")).min(1, keepdim=True).values
        hp, hn = pa & (da > min_n), na & (da < max_p)
        p = _draw(torch.where(hp.any(1, keepdim=True), hp, pa), self.generator)
        n = _draw(torch.where(hn.any(1, keepdim=True), hn, na), self.generator)
        return a, p, n


class Distance(RothMiner):
    """Distance-weighted sampling (R: batchminer/distance.py:13-63): one negative ~ q(d)^-1
    for *every* anchor; the positive is a random class mate, or the anchor itself when it
    has none (``distance.py:34-37``). No upper cutoff by default (``distance.py:58-60``)."""

    reference = "distance"

    def __init__(self, lower_cutoff: float, upper_cutoff: float | None, seed: int = 0) -> None:
        super().__init__(seed)
        self.lower, self.upper = lower_cutoff, upper_cutoff

    def mine(self, x, y):
        pos, neg = self.masks(y)
        d = _pdist(x)
        a = torch.nonzero(neg.any(1)).squeeze(1)  # R: an anchor without negatives crashes
        if len(a) == 0:
            return a, a.clone(), a.clone()
        has = pos[a].any(1)
        p = a.clone()
        if has.any():
            p[has] = _draw(pos[a[has]], self.generator)
        n = _dw_negatives(d, neg, a, x.shape[1], self.lower, self.upper, self.generator)
        return a, p, n


class RhoDistance(Distance):
    """rho-regularising miner (R: batchminer/rho_distance.py:13-47): a coin with P(1) = cp
    per sample; anchors with a class mate: coin 1 -> (i, i, random mate), else (i, random
    mate, distance-weighted negative). Anchors without a mate are skipped."""

    reference = "rho_distance"

    def __init__(self, cp: float, lower_cutoff: float, upper_cutoff: float | None, seed: int = 0) -> None:
        super().__init__(lower_cutoff, upper_cutoff, seed)
        self.cp = cp
        self.num_push = 0

    def mine(self, x, y):
        pos, neg = self.masks(y)
        d = _pdist(x)
        coin = torch.rand(len(y), generator=self.generator) < self.cp
        a = torch.nonzero(pos.any(1)).squeeze(1)
        push = coin[a] | ~neg[a].any(1)
        p = torch.empty_like(a)
        n = torch.empty_like(a)
        if push.any():
            p[push] = a[push]
            n[push] = _draw(pos[a[push]], self.generator)
        reg = ~push
        if reg.any():
            p[reg] = _draw(pos[a[reg]], self.generator)
            n[reg] = _dw_negatives(d, neg, a[reg], x.shape[1], self.lower, self.upper, self.generator)
        self.num_push = int(push.sum())
        return a, p, n

    def stats(self) -> dict[str, float]:
        return {"miner_push_triplets": float(self.num_push)}


class RandomDistance(Distance):
    """The label-permuted control (R: batchminer/random_distance.py:11-35): labels randomly
    permuted, then anchors with a mate under the permuted labels get a random mate and a
    distance-weighted negative. Its reference name is 'distance'."""

    reference = "random_distance"

    def mine(self, x, y):
        y = y[torch.randperm(len(y), generator=self.generator)]
        pos, neg = self.masks(y)
        d = _pdist(x)
        a = torch.nonzero(pos.any(1) & neg.any(1)).squeeze(1)
        if len(a) == 0:
            return a, a.clone(), a.clone()
        p = _draw(pos[a], self.generator)
        n = _dw_negatives(d, neg, a, x.shape[1], self.lower, self.upper, self.generator)
        return a, p, n


class IntraRandom(RothMiner):
    """bs triplets, each (a, p, n) drawn with replacement from ONE random class of the batch
    (R: batchminer/intra_random.py:10-21; its reference name is 'random')."""

    reference = "intra_random"

    def mine(self, x, y):
        classes = torch.unique(y)
        c = classes[torch.randint(len(classes), (len(y),), generator=self.generator)]
        members = (y.view(1, -1) == c.view(-1, 1)).double()
        t = torch.multinomial(members, 3, replacement=True, generator=self.generator)
        return t[:, 0], t[:, 1], t[:, 2]


class NPairMiner(RothMiner):
    """Anchors with a class mate: one random positive; negatives = every other-class sample
    (R: batchminer/npair.py:7-31). Returns ``(a, p, neg_mask[A, B])``."""

    reference = "npair"

    def mine(self, x, y):
        pos, neg = self.masks(y)
        a = torch.nonzero(pos.any(1)).squeeze(1)
        p = _draw(pos[a], self.generator) if len(a) else a.clone()
        return a, p, neg[a]


class LiftedMiner(RothMiner):
    """Anchors with a class mate: all mates and all other-class samples
    (R: batchminer/lifted.py:8-33). Returns ``(a, pos_mask[A, B], neg_mask[A, B])``."""

    reference = "lifted"

    def mine(self, x, y):
        pos, neg = self.masks(y)
        a = torch.nonzero(pos.any(1)).squeeze(1)
        return a, pos[a], neg[a]


def _cut(name: str, value: Any, allow_none: bool = False) -> float | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise ValueError(f"{name}={value!r}: expected a non-negative distance{' or null' if allow_none else ''}")
    return float(value)


@register("miner", "roth_random", context=SEEDED, tuples="triplets", reference="batchminer/random.py")
def roth_random(seed: int | None = None, embed_dim=None, train_seed=None):
    """bs random triplets of the batch, without replacement (R: batchminer/random.py)."""
    return Random(_seed(seed, train_seed))


@register("miner", "roth_semihard", context=SEEDED, tuples="triplets", reference="batchminer/semihard.py")
def roth_semihard(margin: float = 0.2, seed: int | None = None, embed_dim=None, train_seed=None):
    """Per anchor a random positive and a negative in d_ap < d_an < d_ap + margin, else random (R: batchminer/semihard.py)."""
    return Semihard(_cut("margin", margin), _seed(seed, train_seed))


@register("miner", "roth_softhard", context=SEEDED, tuples="triplets", reference="batchminer/softhard.py")
def roth_softhard(seed: int | None = None, embed_dim=None, train_seed=None):
    """Random hard positive (d_ap > min d_an) and hard negative (d_an < max d_ap) per anchor (R: batchminer/softhard.py)."""
    return Softhard(_seed(seed, train_seed))


@register("miner", "roth_distance", context=SEEDED, tuples="triplets", reference="batchminer/distance.py")
def roth_distance(lower_cutoff: float = 0.5, upper_cutoff: float | None = None, seed: int | None = None, embed_dim=None, train_seed=None):
    """Distance-weighted sampling for every anchor, self as positive without a mate, no upper cutoff (R: batchminer/distance.py)."""
    return Distance(_cut("lower_cutoff", lower_cutoff), _cut("upper_cutoff", upper_cutoff, True), _seed(seed, train_seed))


@register("miner", "roth_rho_distance", context=SEEDED, tuples="triplets", reference="batchminer/rho_distance.py")
def roth_rho_distance(
    cp: float = 0.2, lower_cutoff: float = 0.5, upper_cutoff: float | None = None,
    seed: int | None = None, embed_dim=None, train_seed=None,
):  # fmt: skip
    """rho-regularised distance sampling: with probability cp the negative is a class mate (R: batchminer/rho_distance.py)."""
    return RhoDistance(_prob("cp", cp), _cut("lower_cutoff", lower_cutoff), _cut("upper_cutoff", upper_cutoff, True), _seed(seed, train_seed))


@register("miner", "roth_random_distance", context=SEEDED, tuples="triplets", reference="batchminer/random_distance.py")
def roth_random_distance(lower_cutoff: float = 0.5, upper_cutoff: float | None = None, seed: int | None = None, embed_dim=None, train_seed=None):
    """Distance-weighted sampling on randomly permuted labels (a control) (R: batchminer/random_distance.py)."""
    return RandomDistance(_cut("lower_cutoff", lower_cutoff), _cut("upper_cutoff", upper_cutoff, True), _seed(seed, train_seed))


@register("miner", "roth_intra_random", context=SEEDED, tuples="triplets", reference="batchminer/intra_random.py")
def roth_intra_random(seed: int | None = None, embed_dim=None, train_seed=None):
    """bs triplets whose anchor, positive and negative all come from one random class (R: batchminer/intra_random.py)."""
    return IntraRandom(_seed(seed, train_seed))


@register("miner", "roth_npair", context=SEEDED, tuples="npair", reference="batchminer/npair.py")
def roth_npair(seed: int | None = None, embed_dim=None, train_seed=None):
    """(anchor, one random positive, all other-class negatives) for roth_npair / roth_angular (R: batchminer/npair.py)."""
    return NPairMiner(_seed(seed, train_seed))


@register("miner", "roth_lifted", context=SEEDED, tuples="lifted", reference="batchminer/lifted.py")
def roth_lifted(seed: int | None = None, embed_dim=None, train_seed=None):
    """(anchor, all class mates, all other-class samples) for roth_lifted (R: batchminer/lifted.py)."""
    return LiftedMiner(_seed(seed, train_seed))
