"""The 14 training criteria of Roth et al. 2020's reference code, exact to its forward pass.

Reference: Confusezius/Revisiting_Deep_Metric_Learning_PyTorch, ``criteria/<name>.py``
(cited below as ``R: criteria/...:line``), defaults from ``R: parameters.py:75-136``.
Each entry ``roth_<name>`` takes the reference's ``--loss_<name>_<param>`` flags as
parameters, with the reference's defaults, and is called like every loss here::

    loss(embeddings, labels, indices_tuple)

``indices_tuple`` comes from the miner (``dmlcore/losses/roth_miners.py``):

* triplet criteria (triplet, contrastive, margin, snr, quadruplet): ``(a, p, n)``,
  three ``long[T]`` index tensors (one row per mined triplet);
* ``roth_npair`` / ``roth_angular`` (miner ``roth_npair``): ``(a, p, neg)`` with
  ``a, p: long[A]`` (anchor and its one positive) and ``neg: bool[A, B]`` (the anchor's
  negative set: every other-class sample of the batch);
* ``roth_lifted`` (miner ``roth_lifted``): ``(a, pos, neg)`` with ``a: long[A]`` and
  ``pos, neg: bool[A, B]`` (all class mates / all other-class samples of the anchor);
* batch- and proxy-based criteria (histogram, softtriplet, proxynca, arcface, softmax,
  multisimilarity) take ``indices_tuple=None`` (the reference passes them no miner).

The reference loops over tuples in Python; here every forward is vectorised and has the
same value and gradient. Where the reference produces NaN or crashes (no tuple at all,
``0/0``), the criterion returns 0 (connected to the graph, so ``backward`` works): the
docs list each case. Which miners each criterion accepts (the reference's
``ALLOWED_MINING_OPS``) is the ``miners`` entry of its registry metadata; see
:mod:`dmlcore.losses.compat`.

Own tensors (margin betas, proxies, class maps, centroids) are optimised in their own
parameter group with the reference's learning rate and weight decay 0
(``R: criteria/__init__.py:49-53``, ``R: main.py:164``): :meth:`optimizer_group`.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..registry import register
from .pml_losses import _num

# Miners the reference allows for the triplet-style criteria (``ALLOWED_MINING_OPS =
# list(BATCHMINING_METHODS)``, R: batchminer/__init__.py:4-13), less the three that cannot
# feed a triplet criterion: npair and lifted return set tuples (the reference crashes on
# them) and parametric needs undefined flags (not provided here).
TRIPLET_MINERS = (
    "roth_random",
    "roth_semihard",
    "roth_softhard",
    "roth_distance",
    "roth_rho_distance",
    "roth_random_distance",
    "roth_intra_random",
)
# Miners whose reference ``name`` is 'distance' (R: batchminer/distance.py:11,
# random_distance.py:9): the SNR criterion turns its regulariser off for them (R: criteria/snr.py:18).
DISTANCE_NAMED = ("roth_distance", "roth_random_distance")
# Pairwise distance epsilon of torch.nn.PairwiseDistance (used by contrastive and lifted).
PAIRWISE_EPS = 1e-6

CTX = ("num_classes", "embed_dim")


def _zero(x: Tensor) -> Tensor:
    """0, connected to the graph of ``x`` (the value where the reference has no tuple)."""
    return x.sum() * 0.0


def _mean(values: Tensor, ref: Tensor) -> Tensor:
    return values.mean() if values.numel() else _zero(ref)


def _pairwise(x1: Tensor, x2: Tensor) -> Tensor:
    """torch.nn.PairwiseDistance(p=2): ``||x1 - x2 + eps||`` over the last dim."""
    return (x1 - x2 + PAIRWISE_EPS).norm(dim=-1)


def _log1p_sum_exp(z: Tensor, mask: Tensor) -> Tensor:
    """``log(1 + sum_{mask} exp(z))`` per row, computed stably (logsumexp with a 0 term)."""
    z = z.masked_fill(~mask, float("-inf"))
    zero = torch.zeros(z.shape[0], 1, dtype=z.dtype, device=z.device)
    return torch.logsumexp(torch.cat([zero, z], dim=1), dim=1)


def _triplets(indices: Any, loss: str) -> tuple[Tensor, Tensor, Tensor]:
    if indices is None or len(indices) != 3:
        raise ValueError(f"{loss} needs (anchors, positives, negatives) from a miner; got {type(indices).__name__}")
    a, p, n = (torch.as_tensor(t).long() for t in indices)
    return a, p, n


class RothCriterion(nn.Module):
    """Common part: the reference name, the tuple form it reads and its optimizer group."""

    reference: str = ""
    lr: float | None = None

    def optimizer_group(self) -> dict[str, Any]:
        """``lr`` and ``weight_decay`` of this criterion's own tensors (R: criteria/__init__.py:49-53)."""
        return {"lr": self.lr, "weight_decay": 0.0}


# ---- triplet criteria ----------------------------------------------------------------


class Triplet(RothCriterion):
    """relu(||a-p||^2 - ||a-n||^2 + margin), squared distances, mean over all triplets (R: triplet.py:24-32)."""

    reference = "triplet"

    def __init__(self, margin: float) -> None:
        super().__init__()
        self.margin = margin

    def forward(self, embeddings: Tensor, labels: Tensor, indices_tuple: Any = None) -> Tensor:
        a, p, n = _triplets(indices_tuple, "roth_triplet")
        x = embeddings
        d_ap = (x[a] - x[p]).pow(2).sum(1)
        d_an = (x[a] - x[n]).pow(2).sum(1)
        return _mean(F.relu(d_ap - d_an + self.margin), x)


class Contrastive(RothCriterion):
    """mean relu(d_ap - pos_margin) + mean relu(neg_margin - d_an), plain distances (R: contrastive.py:27-39)."""

    reference = "contrastive"

    def __init__(self, pos_margin: float, neg_margin: float) -> None:
        super().__init__()
        self.pos_margin, self.neg_margin = pos_margin, neg_margin

    def forward(self, embeddings: Tensor, labels: Tensor, indices_tuple: Any = None) -> Tensor:
        a, p, n = _triplets(indices_tuple, "roth_contrastive")
        x = embeddings
        pos = _mean(F.relu(_pairwise(x[a], x[p]) - self.pos_margin), x)
        neg = _mean(F.relu(self.neg_margin - _pairwise(x[a], x[n])), x)
        return pos + neg


class Margin(RothCriterion):
    """Margin loss with a learned beta per class (R: margin.py:39-75).

    d = sqrt(||.||^2 + 1e-8); sum(relu(d_ap - beta + m) + relu(beta - d_an + m)) divided by
    the number of triplets with at least one active term (the reference adds two bool
    tensors, a logical OR: ``margin.py:62``), or by 1 when none is active.
    """

    reference = "margin"

    def __init__(self, margin: float, beta: float, beta_lr: float, nu: float, beta_constant: bool, num_classes: int) -> None:
        super().__init__()
        self.margin, self.nu, self.beta_constant = margin, nu, beta_constant
        self.lr = beta_lr
        if beta_constant:
            self.beta_value = beta
        else:
            self.beta = nn.Parameter(torch.ones(num_classes) * beta)

    def forward(self, embeddings: Tensor, labels: Tensor, indices_tuple: Any = None) -> Tensor:
        a, p, n = _triplets(indices_tuple, "roth_margin")
        x = embeddings
        if len(a) == 0:
            return _zero(x)
        d_ap = ((x[a] - x[p]).pow(2).sum(1) + 1e-8).sqrt()
        d_an = ((x[a] - x[n]).pow(2).sum(1) + 1e-8).sqrt()
        if self.beta_constant:
            beta: Any = self.beta_value
        else:
            beta = self.beta[labels.long()[a].to(self.beta.device)].to(d_ap.dtype)
        pos = F.relu(d_ap - beta + self.margin)
        neg = F.relu(beta - d_an + self.margin)
        count = ((pos > 0) | (neg > 0)).sum()
        loss = (pos + neg).sum() / count.clamp(min=1).to(x.dtype)
        if self.nu:
            # R: margin.py:69-71 reads the misspelt `beta_regularisation_loss` (NameError for
            # nu != 0); this is the intended nu * sum(beta) over the triplets.
            loss = loss + self.nu * (beta.sum() if torch.is_tensor(beta) else beta * len(a))
        return loss


class SNR(RothCriterion):
    """SNR triplet loss (R: snr.py:29-45).

    snr(a, b) = var(a - b) / var(a) over the embedding dims (unbiased var); hinge
    relu(snr_ap - snr_an + margin) averaged over the *active* triplets, plus
    reg_lambda * mean |sum_d a| (0 for miners named 'distance': R: snr.py:18).
    """

    reference = "snr"

    def __init__(self, margin: float, reg_lambda: float) -> None:
        super().__init__()
        self.margin, self.reg_lambda = margin, reg_lambda

    def forward(self, embeddings: Tensor, labels: Tensor, indices_tuple: Any = None) -> Tensor:
        a, p, n = _triplets(indices_tuple, "roth_snr")
        x = embeddings
        if len(a) == 0:
            return _zero(x)
        va = torch.var(x[a], dim=1)
        pos = torch.var(x[a] - x[p], dim=1) / va
        neg = torch.var(x[a] - x[n], dim=1) / va
        hinge = F.relu(pos - neg + self.margin)
        active = (hinge > 0).sum()
        # R divides by the active count even when it is 0 (NaN); here 0/1 = 0.
        loss = hinge.sum() / active.clamp(min=1).to(x.dtype)
        reg = torch.abs(x[a].sum(dim=1)).mean()
        return loss + self.reg_lambda * reg


class Quadruplet(RothCriterion):
    """Quadruplet loss (R: quadruplet.py:27-46), plain norms, means over all triplets.

    The fourth sample of triplet i is batch *sample* k, k drawn uniformly among the
    triplet positions whose negative index differs from triplet i's (labels ignored,
    ``quadruplet.py:40-41``); this needs as many triplets as batch samples, as the
    reference does. When every triplet shares i's negative, k is drawn among all other
    positions (the reference crashes there).
    """

    reference = "quadruplet"

    def __init__(self, margin_alpha_1: float, margin_alpha_2: float, seed: int) -> None:
        super().__init__()
        self.alpha_1, self.alpha_2 = margin_alpha_1, margin_alpha_2
        self.seed = int(seed)
        self.generator = torch.Generator(device="cpu")
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        from .miners import _mix

        self.generator.manual_seed(_mix(self.seed + 17, epoch))

    def forward(self, embeddings: Tensor, labels: Tensor, indices_tuple: Any = None) -> Tensor:
        a, p, n = _triplets(indices_tuple, "roth_quadruplet")
        x = embeddings
        t = len(a)
        if t == 0:
            return _zero(x)
        if t != len(x):
            raise ValueError(
                f"roth_quadruplet needs one triplet per batch sample (the reference indexes samples by "
                f"triplet position, R: criteria/quadruplet.py:41); got {t} triplets for a batch of {len(x)}"
            )
        nc = n.cpu()
        cand = nc.view(-1, 1) != nc.view(1, -1)
        none = ~cand.any(1)
        if none.any():
            cand[none] = ~torch.eye(t, dtype=torch.bool)[none]
        if t == 1:
            cand = torch.ones(1, 1, dtype=torch.bool)
        k = torch.multinomial(cand.double(), 1, generator=self.generator).squeeze(1).to(x.device)
        d_ap = (x[a] - x[p]).norm(dim=-1)
        trip = F.relu(d_ap - (x[a] - x[n]).norm(dim=-1) + self.alpha_1)
        quad = F.relu(d_ap - (x[n] - x[k]).norm(dim=-1) + self.alpha_2)
        return trip.mean() + quad.mean()


# ---- set-tuple criteria (npair / lifted miners) ----------------------------------------


def _npair_tuple(indices: Any, loss: str) -> tuple[Tensor, Tensor, Tensor]:
    if indices is None or len(indices) != 3 or torch.as_tensor(indices[2]).dim() != 2:
        raise ValueError(f"{loss} needs the (anchors, positives, negative mask) of the roth_npair miner")
    return torch.as_tensor(indices[0]).long(), torch.as_tensor(indices[1]).long(), torch.as_tensor(indices[2]).bool()


class NPair(RothCriterion):
    """N-pair loss on raw embeddings (R: npair.py:29-45).

    mean over anchors of log(1 + sum_{n in N_a} exp(a.n - a.p)) plus l2 * mean_i ||x_i||
    over the whole batch (the reference adds l2 * mean||x|| / A once per anchor).
    """

    reference = "npair"

    def __init__(self, l2: float) -> None:
        super().__init__()
        self.l2 = l2

    def forward(self, embeddings: Tensor, labels: Tensor, indices_tuple: Any = None) -> Tensor:
        a, p, neg = _npair_tuple(indices_tuple, "roth_npair")
        x = embeddings
        if len(a) == 0:
            return _zero(x)  # R: loss stays the int 0
        z = x[a] @ x.T - (x[a] * x[p]).sum(1, keepdim=True)
        return _log1p_sum_exp(z, neg.to(x.device)).mean() + self.l2 * x.norm(dim=1).mean()


class Angular(RothCriterion):
    """Angular loss + N-pair loss + L2 penalty (R: angular.py:29-49).

    Angular term on L2-normalised a, p, n: log(1 + sum_n exp(4 tan^2(alpha) (a+p).n -
    2 (1 + tan^2(alpha)) a.p)); N-pair term on the raw embeddings with the logits clamped
    to [-50, 50]; loss = npair + npair_ang_weight * angular + npair_l2 * mean ||x||.
    """

    reference = "angular"

    def __init__(self, alpha: float, npair_ang_weight: float, npair_l2: float) -> None:
        super().__init__()
        self.tan2 = float(np.tan(np.pi / 180 * alpha)) ** 2
        self.lam, self.l2 = npair_ang_weight, npair_l2

    def forward(self, embeddings: Tensor, labels: Tensor, indices_tuple: Any = None) -> Tensor:
        a, p, neg = _npair_tuple(indices_tuple, "roth_angular")
        x = embeddings
        if len(a) == 0:
            return _zero(x)
        neg = neg.to(x.device)
        xn = F.normalize(x, dim=1)
        na, np_ = xn[a], xn[p]
        z_ang = 4 * self.tan2 * (na + np_) @ xn.T - 2 * (1 + self.tan2) * (na * np_).sum(1, keepdim=True)
        angular = _log1p_sum_exp(z_ang, neg).mean()
        z_np = (x[a] @ x.T - (x[a] * x[p]).sum(1, keepdim=True)).clamp(min=-50, max=50)
        npair = _log1p_sum_exp(z_np, neg).mean()
        return npair + self.lam * angular + self.l2 * x.norm(dim=1).mean()


class Lifted(RothCriterion):
    """Roth's "generalised" lifted structure loss (R: lifted.py:28-39).

    Intended (``reference_bug=false``): mean over anchors of relu(LSE_p d_ap +
    LSE_n (neg_margin - d_an)) + l2 * mean ||x||, d = ||a - b + 1e-6||.
    As run (``reference_bug=true``, the default: the published numbers went through it):
    ``nn.PairwiseDistance`` gets ``a[:, :, None]`` and ``set.permute(0, 2, 1)`` and reduces
    over the *set* axis, so for each embedding dim k it takes
    sqrt(sum_{j in set} (a_k - x_jk + 1e-6)^2), and the log-sum-exp runs over the dims.
    """

    reference = "lifted"

    def __init__(self, neg_margin: float, l2: float, reference_bug: bool) -> None:
        super().__init__()
        self.margin, self.l2, self.reference_bug = neg_margin, l2, bool(reference_bug)

    def forward(self, embeddings: Tensor, labels: Tensor, indices_tuple: Any = None) -> Tensor:
        if indices_tuple is None or len(indices_tuple) != 3 or torch.as_tensor(indices_tuple[1]).dim() != 2:
            raise ValueError("roth_lifted needs the (anchors, positive mask, negative mask) of the roth_lifted miner")
        a = torch.as_tensor(indices_tuple[0]).long()
        x = embeddings
        if len(a) == 0:
            return _zero(x)  # R: torch.stack([]) raises
        pos = torch.as_tensor(indices_tuple[1]).bool().to(x.device)
        neg = torch.as_tensor(indices_tuple[2]).bool().to(x.device)
        diff = x[a][:, None, :] - x[None, :, :] + PAIRWISE_EPS  # (A, B, D)
        if self.reference_bug:
            sq = diff.pow(2)
            d_pos = (sq * pos[:, :, None]).sum(1).sqrt()  # (A, D): one "distance" per dim
            d_neg = (sq * neg[:, :, None]).sum(1).sqrt()
            pos_term = torch.logsumexp(d_pos, dim=1)
            neg_term = torch.logsumexp(self.margin - d_neg, dim=1)
        else:
            d = diff.norm(dim=2)  # (A, B)
            pos_term = torch.logsumexp(d.masked_fill(~pos, float("-inf")), dim=1)
            neg_term = torch.logsumexp((self.margin - d).masked_fill(~neg, float("-inf")), dim=1)
        return F.relu(pos_term + neg_term).mean() + self.l2 * x.norm(dim=1).mean()


# ---- batch-based criteria ---------------------------------------------------------------


class Histogram(RothCriterion):
    """Histogram loss (R: histogram.py:36-102; Ustinova & Lempitsky 2016).

    Dot similarities of the upper-triangle pairs; a triangular soft histogram over
    ``nbins`` nodes in [-1, 1] for the positive and the negative pairs, each divided by its
    pair count; loss = sum_r h_neg[r] * CDF_pos[r]. Bin assignment reproduces the
    reference's float comparisons (``histogram.py:64,94-95``): a similarity s goes to bin
    j = trunc((s + 1) / width) (float32) and counts for node r when j*width - 1 equals
    node r (float64), or node r minus width. No positive or no negative pair: 0 (R: NaN).
    """

    reference = "histogram"

    def __init__(self, nbins: int) -> None:
        super().__init__()
        self.nbins = nbins
        self.width = 2 / (nbins - 1)
        support = np.linspace(-1, 1, nbins)
        assigned = np.arange(nbins + 2) * self.width - 1  # value of bin index j (numpy float64)
        # match_b[j, r]: bin j is node r; match_a[j, r]: bin j is node r minus one width
        self.register_buffer("match_b", torch.tensor(assigned[:, None] == support[None, :]), persistent=False)
        self.register_buffer(
            "match_a", torch.tensor(assigned[:, None] == (support - self.width)[None, :]), persistent=False
        )
        self.register_buffer("support", torch.linspace(-1, 1, nbins), persistent=False)

    def _hist(self, s: Tensor, j: Tensor, sel: Tensor, count: Tensor) -> Tensor:
        jj = j.clamp(0, self.nbins + 1)
        ok = (j >= 0) & (j <= self.nbins + 1) & sel
        ind_a = self.match_a[jj].T & ok  # (nbins, P)
        ind_b = self.match_b[jj].T & ok
        t = self.support.to(s.dtype)[:, None]
        w_a = (s[None, :] - t + self.width) / self.width
        w_b = (-s[None, :] + t + self.width) / self.width
        h = torch.where(ind_a, w_a, torch.zeros_like(w_a)) + torch.where(ind_b, w_b, torch.zeros_like(w_b))
        return h.sum(1) / count

    def forward(self, embeddings: Tensor, labels: Tensor, indices_tuple: Any = None) -> Tensor:
        x = embeddings
        sim = x @ x.T
        bs = len(x)
        labels = labels.to(x.device)
        upper = torch.triu(torch.ones(bs, bs, dtype=torch.bool, device=x.device), 1)
        same = (labels.view(1, -1) == labels.view(-1, 1))[upper]
        s = sim[upper]
        n_pos, n_neg = same.sum(), (~same).sum()
        if n_pos == 0 or n_neg == 0:
            return _zero(x)
        j = torch.trunc((s.detach().float() + 1) / self.width).long()
        h_pos = self._hist(s, j, same, n_pos)
        h_neg = self._hist(s, j, ~same, n_neg)
        return (h_neg * torch.cumsum(h_pos, 0)).sum()


class MultiSimilarity(RothCriterion):
    """Multi-similarity loss with its pair mining (R: multisimilarity.py:28-54).

    Dot similarities. Per anchor: negatives with s + margin > min s_ap, positives with
    s - margin < max s_an; the anchor is skipped unless both sets are non-empty (and, here,
    unless it has a positive and a negative at all: R crashes there). Loss =
    (1/pos_weight) log(1 + sum exp(-pos_weight (s - thresh))) + (1/neg_weight)
    log(1 + sum exp(neg_weight (s - thresh))), mean over the kept anchors (0 when none is:
    R crashes).
    """

    reference = "multisimilarity"

    def __init__(self, pos_weight: float, neg_weight: float, margin: float, thresh: float) -> None:
        super().__init__()
        self.pw, self.nw, self.margin, self.thresh = pos_weight, neg_weight, margin, thresh

    def forward(self, embeddings: Tensor, labels: Tensor, indices_tuple: Any = None) -> Tensor:
        x = embeddings
        s = x @ x.T
        labels = labels.to(x.device)
        same = labels.view(-1, 1) == labels.view(1, -1)
        eye = torch.eye(len(x), dtype=torch.bool, device=x.device)
        pos, neg = same & ~eye, ~same
        sd = s.detach()
        min_pos = sd.masked_fill(~pos, float("inf")).min(1, keepdim=True).values
        max_neg = sd.masked_fill(~neg, float("-inf")).max(1, keepdim=True).values
        keep_n = neg & (sd + self.margin > min_pos)
        keep_p = pos & (sd - self.margin < max_neg)
        rows = keep_n.any(1) & keep_p.any(1) & pos.any(1) & neg.any(1)
        if not rows.any():
            return _zero(x)
        s, keep_p, keep_n = s[rows], keep_p[rows], keep_n[rows]
        pos_term = _log1p_sum_exp(-self.pw * (s - self.thresh), keep_p) / self.pw
        neg_term = _log1p_sum_exp(self.nw * (s - self.thresh), keep_n) / self.nw
        return (pos_term + neg_term).mean()


# ---- proxy / classification criteria ------------------------------------------------------


class ProxyNCA(RothCriterion):
    """ProxyNCA (R: proxynca.py:39-54): x and proxies L2-normalised and scaled by 3;
    mean(||x - p_y||^2 + LSE_{z != y} -||x - p_z||^2); the positive proxy is *not* in the
    log-sum-exp. Proxies init randn / 8; lr = optim.lr * lrmulti (R: proxynca.py:29)."""

    reference = "proxynca"

    def __init__(self, num_classes: int, embed_dim: int, lrmulti: float, base_lr: float) -> None:
        super().__init__()
        self.proxies = nn.Parameter(torch.randn(num_classes, embed_dim) / 8)
        self.lr = base_lr * lrmulti

    def forward(self, embeddings: Tensor, labels: Tensor, indices_tuple: Any = None) -> Tensor:
        x = 3 * F.normalize(embeddings, dim=1)
        px = 3 * F.normalize(self.proxies, dim=1)
        d = (x[:, None, :] - px[None, :, :]).pow(2).sum(-1)  # (B, C) squared distances
        y = labels.long().to(x.device)
        onehot = F.one_hot(y, px.shape[0]).bool()
        d_pos = d[onehot]
        lse = torch.logsumexp((-d).masked_fill(onehot, float("-inf")), dim=1)
        return (d_pos + lse).mean()


class ArcFace(RothCriterion):
    """ArcFace (R: arcface.py:36-54): cos = x . normalize(W)^T clamped to [1e-10, 1 - 1e-10]
    (negative cosines become constant, gradient-free logits), target cos(theta + m), scale s,
    cross-entropy mean. W (C x D) init U(+-1/sqrt(D)); lr 5e-4 (R: parameters.py:133)."""

    reference = "arcface"

    def __init__(self, num_classes: int, embed_dim: int, angular_margin: float, feature_scale: float, lr: float) -> None:
        super().__init__()
        self.class_map = nn.Parameter(torch.empty(num_classes, embed_dim).uniform_(-1 / math.sqrt(embed_dim), 1 / math.sqrt(embed_dim)))
        self.m, self.s, self.lr = angular_margin, feature_scale, lr

    def forward(self, embeddings: Tensor, labels: Tensor, indices_tuple: Any = None) -> Tensor:
        y = labels.long().to(embeddings.device)
        cos = (embeddings @ F.normalize(self.class_map, dim=1).T).clamp(min=1e-10, max=1 - 1e-10)
        pick = F.one_hot(y, cos.shape[1]).bool()
        target = cos[pick]
        marginal = torch.cos(torch.acos(target) + self.m)
        logits = self.s * (cos + pick * (marginal - target).unsqueeze(1))
        return F.cross_entropy(logits, y)


class Softmax(RothCriterion):
    """Normalised softmax (R: softmax.py:33-38): CE(x . normalize(W)^T / temperature);
    W init U(+-1/sqrt(D)); lr 1e-5 (R: parameters.py:123; SOP runs use 0.002)."""

    reference = "softmax"

    def __init__(self, num_classes: int, embed_dim: int, temperature: float, lr: float) -> None:
        super().__init__()
        self.class_map = nn.Parameter(torch.empty(num_classes, embed_dim).uniform_(-1 / math.sqrt(embed_dim), 1 / math.sqrt(embed_dim)))
        self.temperature, self.lr = temperature, lr

    def forward(self, embeddings: Tensor, labels: Tensor, indices_tuple: Any = None) -> Tensor:
        logits = F.linear(embeddings, F.normalize(self.class_map, dim=1)) / self.temperature
        return F.cross_entropy(logits, labels.long().to(embeddings.device))


class SoftTriplet(RothCriterion):
    """SoftTriple as the reference writes it (R: softtriplet.py:50-67).

    Centroids D x (C K), init U(+-1/sqrt(C K)), normalised along dim 1 (each embedding
    dimension across all centroids, not each centroid); softmax(gamma * sim) over the
    *class* axis; per-class similarity sum_k w s; CE(lambda (sim - delta 1[y])) +
    reg_weight * sum_{same class, i<j} sqrt(2.00001 - 2 c_i.c_j) / (C K (K-1)).
    ``original=true`` gives Qian et al.'s form (per-centroid normalisation, softmax over
    the centroids of a class). The reference reads the undefined flag
    ``loss_softtriplet_lr`` (``softtriplet.py:42``, AttributeError); the lr here is
    ``optim.lr * lrmulti``, the flag that exists (``--loss_softtriplet_lrmulti``, default 1).
    """

    reference = "softtriplet"

    def __init__(
        self, num_classes: int, embed_dim: int, n_centroids: int, margin_delta: float, gamma: float,
        lam: float, reg_weight: float, lrmulti: float, base_lr: float, original: bool,
    ) -> None:  # fmt: skip
        super().__init__()
        self.c, self.k = num_classes, n_centroids
        self.delta, self.gamma, self.lam, self.reg_weight = margin_delta, gamma, lam, reg_weight
        self.original = bool(original)
        stdv = 1.0 / math.sqrt(num_classes * n_centroids)
        self.intra_class_centroids = nn.Parameter(torch.empty(embed_dim, num_classes * n_centroids).uniform_(-stdv, stdv))
        block = torch.block_diag(*[torch.ones(n_centroids, n_centroids, dtype=torch.bool)] * num_classes)
        self.register_buffer("reg_pairs", torch.triu(block, 1), persistent=False)
        self.lr = base_lr * lrmulti

    def forward(self, embeddings: Tensor, labels: Tensor, indices_tuple: Any = None) -> Tensor:
        w = F.normalize(self.intra_class_centroids, dim=0 if self.original else 1)
        sim = (embeddings @ w).reshape(-1, self.c, self.k)
        weights = torch.softmax(self.gamma * sim, dim=2 if self.original else 1)
        per_class = (weights * sim).sum(2)
        y = labels.long().to(embeddings.device)
        delta = self.delta * F.one_hot(y, self.c).to(per_class.dtype)
        loss = F.cross_entropy(self.lam * (per_class - delta), y)
        if self.k > 1:  # R: reg_norm = 0 for one centroid (0/0)
            inter = w.T @ w
            reg = torch.sqrt((2.00001 - 2 * inter[self.reg_pairs]).clamp(min=1e-12)).sum() / (self.c * self.k * (self.k - 1))  # R: NaN below 0
            loss = loss + self.reg_weight * reg
        return loss


# ---- registry -------------------------------------------------------------------------------


def _classes(num_classes: Any, embed_dim: Any, loss: str) -> tuple[int, int]:
    if not num_classes or not embed_dim:
        raise ValueError(f"{loss} needs num_classes and embed_dim (the platform supplies them)")
    return int(num_classes), int(embed_dim)


def _lr(name: str, value: Any) -> float:
    return _num(name, value, low=0, strict=True)


def _base_lr(optim_lr: Any) -> float:
    return 1e-5 if optim_lr is None else float(optim_lr)  # R: parameters.py:16 (--lr 1e-5)


TRIPLET_META = {"miners": TRIPLET_MINERS, "requires_miner": True}
NO_MINER = {"miners": (), "requires_miner": False}


@register("loss", "roth_triplet", context=CTX, reference="criteria/triplet.py", **TRIPLET_META)
def roth_triplet(margin: float = 0.2, num_classes=None, embed_dim=None) -> nn.Module:
    """Roth et al.'s triplet loss: squared distances, mean over all mined triplets (R: criteria/triplet.py)."""
    return Triplet(_num("margin", margin))


@register("loss", "roth_contrastive", context=CTX, reference="criteria/contrastive.py", **TRIPLET_META)
def roth_contrastive(pos_margin: float = 0.0, neg_margin: float = 1.0, num_classes=None, embed_dim=None) -> nn.Module:
    """Roth et al.'s contrastive loss on the pairs of mined triplets, plain means (R: criteria/contrastive.py)."""
    return Contrastive(_num("pos_margin", pos_margin), _num("neg_margin", neg_margin))


@register("loss", "roth_margin", context=CTX, reference="criteria/margin.py", **TRIPLET_META)
def roth_margin(
    margin: float = 0.2,
    beta: float = 1.2,
    beta_lr: float = 5e-4,
    nu: float = 0.0,
    beta_constant: bool = False,
    num_classes=None,
    embed_dim=None,
) -> nn.Module:
    """Roth et al.'s margin loss: learned beta per class (lr beta_lr, weight decay 0) (R: criteria/margin.py)."""
    if not beta_constant and not num_classes:
        raise ValueError("roth_margin needs num_classes for its per-class beta (the platform supplies it)")
    return Margin(
        _num("margin", margin), _num("beta", beta), _lr("beta_lr", beta_lr), _num("nu", nu, low=0),
        bool(beta_constant), int(num_classes or 0),
    )  # fmt: skip


@register("loss", "roth_snr", context=CTX + ("miner_name",), reference="criteria/snr.py", **TRIPLET_META)
def roth_snr(margin: float = 0.2, reg_lambda: float = 0.005, num_classes=None, embed_dim=None, miner_name=None) -> nn.Module:
    """Roth et al.'s SNR triplet loss; its regulariser is off with the 'distance'-named miners (R: criteria/snr.py:18)."""
    lam = _num("reg_lambda", reg_lambda, low=0)
    if miner_name in DISTANCE_NAMED:
        lam = 0.0
    return SNR(_num("margin", margin), lam)


@register("loss", "roth_quadruplet", context=CTX + ("train_seed",), reference="criteria/quadruplet.py", **TRIPLET_META)
def roth_quadruplet(
    margin_alpha_1: float = 0.2, margin_alpha_2: float = 0.2, seed: int | None = None,
    num_classes=None, embed_dim=None, train_seed=None,
) -> nn.Module:  # fmt: skip
    """Quadruplet loss (Chen et al. 2017) as in Roth et al.'s code; the fourth sample is drawn seeded (R: criteria/quadruplet.py)."""
    from .miners import _seed

    return Quadruplet(_num("margin_alpha_1", margin_alpha_1), _num("margin_alpha_2", margin_alpha_2), _seed(seed, train_seed))


@register("loss", "roth_npair", context=CTX, reference="criteria/npair.py", miners=("roth_npair",), requires_miner=True)
def roth_npair(l2: float = 0.005, num_classes=None, embed_dim=None) -> nn.Module:
    """Roth et al.'s N-pair loss on raw embeddings, all other-class negatives, L2 penalty l2 (R: criteria/npair.py)."""
    return NPair(_num("l2", l2, low=0))


@register("loss", "roth_angular", context=CTX, reference="criteria/angular.py", miners=("roth_npair",), requires_miner=True)
def roth_angular(alpha: float = 45.0, npair_ang_weight: float = 2.0, npair_l2: float = 0.005, num_classes=None, embed_dim=None) -> nn.Module:
    """Angular loss (Wang et al. 2017) + N-pair + L2 penalty as in Roth et al.'s code (R: criteria/angular.py)."""
    alpha = _num("alpha", alpha)
    if not 0 < alpha < 90:
        raise ValueError(f"alpha={alpha!r}: expected an angle in degrees in (0, 90)")
    return Angular(alpha, _num("npair_ang_weight", npair_ang_weight, low=0), _num("npair_l2", npair_l2, low=0))


@register("loss", "roth_lifted", context=CTX, reference="criteria/lifted.py", miners=("roth_lifted",), requires_miner=True)
def roth_lifted(neg_margin: float = 1.0, l2: float = 0.005, reference_bug: bool = True, num_classes=None, embed_dim=None) -> nn.Module:
    """Roth et al.'s generalised lifted loss; reference_bug=true reproduces its per-dimension distances (R: criteria/lifted.py:34-35)."""
    if not isinstance(reference_bug, bool):
        raise ValueError(f"reference_bug={reference_bug!r}: expected true or false")
    return Lifted(_num("neg_margin", neg_margin), _num("l2", l2, low=0), reference_bug)


@register("loss", "roth_histogram", context=CTX, reference="criteria/histogram.py", **NO_MINER)
def roth_histogram(nbins: int = 65, num_classes=None, embed_dim=None) -> nn.Module:
    """Histogram loss (Ustinova & Lempitsky 2016) as in Roth et al.'s code, nbins nodes in [-1, 1] (R: criteria/histogram.py)."""
    return Histogram(_num("nbins", nbins, low=2, integer=True))


@register("loss", "roth_multisimilarity", context=CTX, reference="criteria/multisimilarity.py", **NO_MINER)
def roth_multisimilarity(
    pos_weight: float = 2.0, neg_weight: float = 40.0, margin: float = 0.1, thresh: float = 0.5,
    num_classes=None, embed_dim=None,
) -> nn.Module:  # fmt: skip
    """Multi-similarity loss with its built-in pair mining, mean over kept anchors (R: criteria/multisimilarity.py)."""
    return MultiSimilarity(
        _num("pos_weight", pos_weight, low=0, strict=True), _num("neg_weight", neg_weight, low=0, strict=True),
        _num("margin", margin), _num("thresh", thresh),
    )  # fmt: skip


@register("loss", "roth_proxynca", context=CTX + ("optim_lr",), reference="criteria/proxynca.py", **NO_MINER)
def roth_proxynca(lrmulti: float = 50.0, num_classes=None, embed_dim=None, optim_lr=None) -> nn.Module:
    """ProxyNCA as in Roth et al.'s code (scale 3, positive left out of the LSE); proxy lr = optim.lr * lrmulti (R: criteria/proxynca.py)."""
    c, d = _classes(num_classes, embed_dim, "roth_proxynca")
    return ProxyNCA(c, d, _lr("lrmulti", lrmulti), _base_lr(optim_lr))


@register("loss", "roth_arcface", context=CTX, reference="criteria/arcface.py", **NO_MINER)
def roth_arcface(angular_margin: float = 0.5, feature_scale: float = 16.0, lr: float = 5e-4, num_classes=None, embed_dim=None) -> nn.Module:
    """ArcFace as in Roth et al.'s code (margin in radians, cosines clamped to [1e-10, 1-1e-10]) (R: criteria/arcface.py)."""
    c, d = _classes(num_classes, embed_dim, "roth_arcface")
    return ArcFace(c, d, _num("angular_margin", angular_margin, low=0), _num("feature_scale", feature_scale, low=0, strict=True), _lr("lr", lr))


@register("loss", "roth_softmax", context=CTX, reference="criteria/softmax.py", **NO_MINER)
def roth_softmax(temperature: float = 0.05, lr: float = 1e-5, num_classes=None, embed_dim=None) -> nn.Module:
    """Normalised softmax as in Roth et al.'s code; class-map lr ``lr`` (R: criteria/softmax.py)."""
    c, d = _classes(num_classes, embed_dim, "roth_softmax")
    return Softmax(c, d, _num("temperature", temperature, low=0, strict=True), _lr("lr", lr))


@register("loss", "roth_softtriplet", context=CTX + ("optim_lr",), reference="criteria/softtriplet.py", **NO_MINER)
def roth_softtriplet(
    n_centroids: int = 2,
    margin_delta: float = 0.01,
    gamma: float = 0.1,
    lam: float = 8.0,
    reg_weight: float = 0.2,
    lrmulti: float = 1.0,
    original: bool = False,
    num_classes=None,
    embed_dim=None,
    optim_lr=None,
) -> nn.Module:
    """SoftTriple as in Roth et al.'s code (``lam`` = --loss_softtriplet_lambda); original=true: Qian et al.'s form (R: criteria/softtriplet.py)."""
    c, d = _classes(num_classes, embed_dim, "roth_softtriplet")
    if not isinstance(original, bool):
        raise ValueError(f"original={original!r}: expected true or false")
    return SoftTriplet(
        c, d, _num("n_centroids", n_centroids, low=1, integer=True), _num("margin_delta", margin_delta),
        _num("gamma", gamma, low=0, strict=True), _num("lam", lam, low=0, strict=True),
        _num("reg_weight", reg_weight, low=0), _lr("lrmulti", lrmulti), _base_lr(optim_lr), original,
    )  # fmt: skip


ROTH_LOSSES = (
    "roth_triplet", "roth_contrastive", "roth_margin", "roth_snr", "roth_npair", "roth_lifted", "roth_angular",
    "roth_histogram", "roth_quadruplet", "roth_softtriplet", "roth_proxynca", "roth_arcface", "roth_softmax",
    "roth_multisimilarity",
)  # fmt: skip

__all__ = ["ROTH_LOSSES", "RothCriterion", "TRIPLET_MINERS"]
