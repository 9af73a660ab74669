"""Batch miners: ``miner(embeddings, labels)`` gives a PML indices tuple.

Triplet miners return ``(anchors, positives, negatives)``; pair miners
(``multi_similarity``) return ``(a1, p, a2, n)``. ``none`` builds no miner at all
(``None``): the loss then uses every tuple of the batch.

The samplers written here (``random_triplet``, ``distance_weighted``,
``rho_distance``) draw from a ``torch.Generator`` they own: seeded by the ``seed``
param (default: the run's ``train.seed``) and re-seeded by ``set_epoch(epoch)``
(called by the trainer), so a run and a resumed run mine the same tuples. Distances
are Euclidean between L2-normalised embeddings; sampling happens on the CPU (the
batch distance matrix is small), so results do not depend on the device.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..lazy import defer_pml_imports

defer_pml_imports()  # scipy.stats and scipy.special: PML imports them, a trial never calls them
from pytorch_metric_learning import miners as M  # noqa: E402

from ..registry import register  # noqa: E402

SEEDED = ("embed_dim", "train_seed")


def _mix(seed: int, epoch: int) -> int:
    """A generator seed for (seed, epoch): distinct streams per epoch, stable across runs."""
    return (int(seed) * 1_000_003 + int(epoch) * 7_919 + 0x5EED) % (2**63 - 1)


def _prob(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{name}={value!r}: expected a probability in [0, 1]")
    return float(value)


def _cutoffs(cutoff: Any, nonzero_loss_cutoff: Any) -> tuple[float, float | None]:
    if isinstance(cutoff, bool) or not isinstance(cutoff, (int, float)) or not 0.0 <= float(cutoff) < 2.0:
        raise ValueError(f"cutoff={cutoff!r}: expected a distance in [0, 2)")
    if nonzero_loss_cutoff is not None:
        if isinstance(nonzero_loss_cutoff, bool) or not isinstance(nonzero_loss_cutoff, (int, float)):
            raise ValueError(f"nonzero_loss_cutoff={nonzero_loss_cutoff!r}: expected a distance or null")
        if float(nonzero_loss_cutoff) <= float(cutoff):
            raise ValueError(f"nonzero_loss_cutoff={nonzero_loss_cutoff!r} must be larger than cutoff={cutoff!r}")
        nonzero_loss_cutoff = float(nonzero_loss_cutoff)
    return float(cutoff), nonzero_loss_cutoff


def inverse_sphere_log_density(dist: Tensor, dim: int, cutoff: float = 0.5) -> Tensor:
    """log q(d)^-1 (up to a constant) for points uniform on the unit sphere in R^dim.

    q(d) is proportional to d^(dim-2) (1 - d^2/4)^((dim-3)/2) (Wu et al. 2017, Sec. 4);
    distances are clamped below at ``cutoff`` (and just under 2 above). Float64.
    """
    d = dist.double().clamp(min=cutoff, max=2.0 - 1e-6)
    return (2.0 - dim) * torch.log(d) - 0.5 * (dim - 3.0) * torch.log1p(-0.25 * d * d)


def distance_weighted_probs(
    dist: Tensor,
    neg_mask: Tensor,
    dim: int,
    cutoff: float = 0.5,
    nonzero_loss_cutoff: float | None = None,
) -> tuple[Tensor, Tensor]:
    """Rows that can draw a negative and their negative-sampling distributions.

    Negative j of anchor i gets probability proportional to q(d_ij)^-1, restricted to
    ``d_ij < nonzero_loss_cutoff`` (Wu et al.); an anchor whose negatives all lie beyond
    that cutoff samples from all its negatives instead (the reference code of Roth et
    al. 2020 applies no upper cutoff at all: ``nonzero_loss_cutoff=None``).
    Returns ``(rows: bool[n], probs: float64[rows.sum(), m])``.
    """
    allowed = neg_mask.bool()
    if nonzero_loss_cutoff is not None:
        near = allowed & (dist < nonzero_loss_cutoff)
        allowed = torch.where(near.any(dim=1, keepdim=True), near, allowed)
    rows = allowed.any(dim=1)
    logw = inverse_sphere_log_density(dist, dim, cutoff).masked_fill(~allowed, float("-inf"))
    return rows, torch.softmax(logw[rows], dim=1)  # row-wise max subtraction: no underflow


def _empty(device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    e = torch.empty(0, dtype=torch.long, device=device)
    return e, e.clone(), e.clone()


def _draw(mask: Tensor, generator: torch.Generator, k: int = 1) -> Tensor:
    """One (or k, with replacement) uniformly drawn column index per row of a bool mask."""
    return torch.multinomial(mask.double(), k, replacement=k > 1, generator=generator)


class SeededMiner(M.BaseMiner):
    """A PML miner that samples with its own seeded CPU generator."""

    def __init__(self, seed: int = 0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.seed = int(seed)
        self.generator = torch.Generator(device="cpu")
        self.generator.manual_seed(_mix(self.seed, 0))

    def set_epoch(self, epoch: int) -> None:
        self.generator.manual_seed(_mix(self.seed, epoch))

    def _prepare(self, embeddings: Tensor, labels: Tensor, ref_emb: Tensor, ref_labels: Tensor):
        dist = self.distance(embeddings, ref_emb).detach().float().cpu()
        same = labels.cpu().view(-1, 1) == ref_labels.cpu().view(1, -1)
        pos = same.clone()
        if ref_emb is embeddings:
            pos.fill_diagonal_(False)
        return dist, pos, ~same

    def stats(self) -> dict[str, float]:
        return {}


class RandomTripletMiner(SeededMiner):
    """``triplets_per_anchor`` uniformly random (positive, negative) pairs per anchor."""

    def __init__(self, triplets_per_anchor: int = 1, seed: int = 0, **kwargs: Any) -> None:
        super().__init__(seed=seed, **kwargs)
        self.triplets_per_anchor = int(triplets_per_anchor)

    def mine(self, embeddings, labels, ref_emb, ref_labels):
        _, pos, neg = self._prepare(embeddings, labels, ref_emb, ref_labels)
        rows = pos.any(1) & neg.any(1)
        if not rows.any():
            return _empty(embeddings.device)
        t = self.triplets_per_anchor
        a = torch.nonzero(rows).squeeze(1).repeat_interleave(t)
        p = _draw(pos[rows], self.generator, t).reshape(-1)
        n = _draw(neg[rows], self.generator, t).reshape(-1)
        dev = embeddings.device
        return a.to(dev), p.to(dev), n.to(dev)


class DistanceWeightedTripletMiner(SeededMiner):
    """One triplet per anchor: random positive, negative drawn with probability ~ q(d)^-1."""

    def __init__(self, cutoff: float = 0.5, nonzero_loss_cutoff: float | None = None, seed: int = 0, **kwargs: Any) -> None:
        super().__init__(seed=seed, **kwargs)
        self.cutoff, self.nonzero_loss_cutoff = _cutoffs(cutoff, nonzero_loss_cutoff)

    def _regular(self, anchors: Tensor, dist: Tensor, pos: Tensor, neg: Tensor, dim: int):
        """(anchor, random positive, distance-weighted negative) for ``anchors`` that have both."""
        keep = anchors[neg[anchors].any(1)]
        if len(keep) == 0:
            return keep, keep.clone(), keep.clone()
        p = _draw(pos[keep], self.generator).squeeze(1)
        rows, probs = distance_weighted_probs(dist[keep], neg[keep], dim, self.cutoff, self.nonzero_loss_cutoff)
        n = torch.multinomial(probs, 1, generator=self.generator).squeeze(1)
        return keep[rows], p[rows], n

    def mine(self, embeddings, labels, ref_emb, ref_labels):
        dist, pos, neg = self._prepare(embeddings, labels, ref_emb, ref_labels)
        anchors = torch.nonzero(pos.any(1)).squeeze(1)
        a, p, n = self._regular(anchors, dist, pos, neg, embeddings.shape[1])
        dev = embeddings.device
        return a.to(dev), p.to(dev), n.to(dev)


class RhoDistanceMiner(DistanceWeightedTripletMiner):
    """Roth et al. 2020's rho-regularising miner (``rho_distance`` in their code).

    For each anchor i with another sample of its class in the batch: with probability
    ``p`` the triplet is (i, i, j), j a random *other sample of i's class* in the
    negative slot (the loss then pushes same-class samples apart, which spreads the
    embedding over more directions: lower spectral decay rho); otherwise
    (i, random positive, distance-weighted negative).
    """

    def __init__(
        self,
        p: float = 0.2,
        cutoff: float = 0.5,
        nonzero_loss_cutoff: float | None = None,
        seed: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(cutoff=cutoff, nonzero_loss_cutoff=nonzero_loss_cutoff, seed=seed, **kwargs)
        self.p = _prob("p", p)
        self.num_push = 0

    def mine(self, embeddings, labels, ref_emb, ref_labels):
        if ref_emb is not embeddings:
            raise ValueError("rho_distance mines within one batch (no separate reference set)")
        dist, pos, neg = self._prepare(embeddings, labels, ref_emb, ref_labels)
        coin = torch.rand(len(pos), generator=self.generator) < self.p
        has_pos = pos.any(1)
        push = torch.nonzero(has_pos & coin).squeeze(1)
        j = _draw(pos[push], self.generator).squeeze(1) if len(push) else push.clone()
        a, p, n = self._regular(torch.nonzero(has_pos & ~coin).squeeze(1), dist, pos, neg, embeddings.shape[1])
        a, p, n = torch.cat([push, a]), torch.cat([push, p]), torch.cat([j, n])
        order = torch.argsort(a, stable=True)
        self.num_push = len(push)
        dev = embeddings.device
        return a[order].to(dev), p[order].to(dev), n[order].to(dev)

    def stats(self) -> dict[str, float]:
        return {"miner_push_triplets": float(self.num_push)}


def _seed(seed: Any, train_seed: Any) -> int:
    value = train_seed if seed is None else seed
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"seed={value!r}: expected an integer")
    return int(value)


# ---- registry ---------------------------------------------------------------------


@register("miner", "none", context=("embed_dim",))
def no_miner(embed_dim: int | None = None) -> None:
    """No mining: the loss uses every tuple of the batch."""
    return None


@register("miner", "random_triplet", context=SEEDED)
def random_triplet(triplets_per_anchor: int = 1, seed: int | None = None, embed_dim=None, train_seed=None):
    """Uniformly random triplets, ``triplets_per_anchor`` per anchor (seeded; default seed train.seed)."""
    if isinstance(triplets_per_anchor, bool) or not isinstance(triplets_per_anchor, int) or triplets_per_anchor < 1:
        raise ValueError(f"triplets_per_anchor={triplets_per_anchor!r}: expected a positive integer")
    return RandomTripletMiner(triplets_per_anchor, seed=_seed(seed, train_seed))


@register("miner", "semihard", context=("embed_dim",))
def semihard(margin: float = 0.2, embed_dim=None):
    """Semi-hard triplets (PML TripletMarginMiner): d_ap < d_an <= d_ap + margin."""
    return M.TripletMarginMiner(margin=float(margin), type_of_triplets="semihard")


@register("miner", "hard", context=("embed_dim",))
def hard(margin: float = 0.2, embed_dim=None):
    """Hard triplets (PML TripletMarginMiner): d_an <= d_ap."""
    return M.TripletMarginMiner(margin=float(margin), type_of_triplets="hard")


@register("miner", "batch_hard", context=("embed_dim",))
def batch_hard(embed_dim=None):
    """Batch-hard (Hermans et al. 2017, PML BatchHardMiner): hardest positive and negative per anchor."""
    return M.BatchHardMiner()


@register("miner", "multi_similarity", context=("embed_dim",))
def multi_similarity(epsilon: float = 0.1, embed_dim=None):
    """Multi-Similarity pair mining (Wang et al. 2019, PML MultiSimilarityMiner); returns pairs."""
    return M.MultiSimilarityMiner(epsilon=float(epsilon))


@register("miner", "distance_weighted", context=SEEDED)
def distance_weighted(
    cutoff: float = 0.5,
    nonzero_loss_cutoff: float | None = None,
    seed: int | None = None,
    embed_dim=None,
    train_seed=None,
):
    """Distance-weighted sampling (Wu et al. 2017): one triplet per anchor, negative ~ q(d)^-1.

    ``nonzero_loss_cutoff=null`` reproduces Roth et al.'s code (no upper cutoff).
    """
    return DistanceWeightedTripletMiner(cutoff, nonzero_loss_cutoff, seed=_seed(seed, train_seed))


@register("miner", "rho_distance", context=SEEDED)
def rho_distance(
    p: float = 0.2,
    cutoff: float = 0.5,
    nonzero_loss_cutoff: float | None = None,
    seed: int | None = None,
    embed_dim=None,
    train_seed=None,
):
    """rho-regularisation (Roth et al. 2020): with probability p a same-class sample is the negative."""
    return RhoDistanceMiner(p, cutoff, nonzero_loss_cutoff, seed=_seed(seed, train_seed))


__all__ = [
    "DistanceWeightedTripletMiner",
    "RandomTripletMiner",
    "RhoDistanceMiner",
    "SeededMiner",
    "distance_weighted_probs",
    "inverse_sphere_log_density",
]
