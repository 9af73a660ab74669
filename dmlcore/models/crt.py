"""Coded Residual Transform head (Kan et al., "Coded Residual Transform for Generalizable
Deep Metric Learning", NeurIPS 2022, arXiv:2210.04180).

What the paper's abstract states (confirmed): learn a set of *diversified prototypes*,
project the feature map onto each prototype, encode the features by their *projection
residuals weighted by their correlation coefficients* with each prototype; two CRTs with
different prototype counts and embedding dimensions are tied by a *consistency loss
between their feature similarity matrices*.

The exact equations could not be read offline; this implementation (documented in
``docs/methods.md``) is:

* features ``x_j`` (``j`` over the ``h*w`` positions, optionally reduced by a 1x1 conv
  to ``reduce_dim`` channels), prototypes ``p_m`` (``m = 1..M``), ``p^_m = p_m/|p_m|``;
* projection ``proj_m(x) = (x . p^_m) p^_m``, residual ``r_m(x) = x - proj_m(x)``;
* correlation coefficient ``rho_m(x)`` = Pearson correlation between ``x`` and ``p_m``
  (cosine of the channel-centred vectors); weights ``a_m(x) = softmax_m(rho_m(x)/tau)``;
* coded residual per prototype ``v_m = sum_j a_m(x_j) r_m(x_j) / sum_j a_m(x_j)``,
  L2-normalised, concatenated over ``m`` and linearly encoded; the code is added to a
  linear embedding of the globally pooled feature map;
* diversity: mean squared off-diagonal cosine similarity between prototypes;
* consistency: MSE (or row-softmax KL) between the cosine-similarity matrices of the
  batch under the main CRT (``M`` prototypes, ``embed_dim``) and an auxiliary CRT
  (``aux_prototypes``, ``aux_dim``). The head outputs the main CRT's embedding;
  ``extra_loss()`` = ``consistency_weight * L_cons + diversity_weight * L_div``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..losses.similarity import similarity_discrepancy
from ..registry import register
from .heads import Head, _check_pool, global_pool
from .pretrained import ModelError


def prototype_diversity(prototypes: Tensor) -> Tensor:
    """Mean squared off-diagonal cosine similarity of the rows of ``prototypes`` (0 = orthogonal)."""
    p = F.normalize(prototypes, dim=1)
    g = p @ p.t()
    m = g.shape[0]
    if m < 2:
        return g.new_zeros(())
    off = g - torch.diag_embed(torch.diagonal(g))
    return (off**2).sum() / (m * (m - 1))


def similarity_consistency(a: Tensor, b: Tensor, mode: str = "mse", temperature: float = 0.1) -> Tensor:
    """Discrepancy between the batch cosine-similarity matrices of embeddings ``a`` and ``b``.

    ``mse``: mean squared difference of the off-diagonal similarities; ``kl``: symmetric KL
    between the row-softmaxed similarities (diagonal excluded) at ``temperature``.
    """
    if mode not in ("mse", "kl"):
        raise ModelError(f"consistency must be 'mse' or 'kl', got {mode!r}")
    return similarity_discrepancy(a, b, mode, temperature, symmetric=True)


class CodedResidualTransform(nn.Module):
    """One CRT: feature map ``B x C x h x w`` to ``B x out_dim``."""

    def __init__(self, dim: int, prototypes: int, out_dim: int, temperature: float = 0.1, pool: str = "avg") -> None:
        super().__init__()
        if prototypes < 1:
            raise ModelError(f"prototypes must be >= 1, got {prototypes}")
        self.temperature = float(temperature)
        self.pool = _check_pool(pool)
        # Orthogonal initialisation: prototypes start diverse (rows orthonormal when M <= C).
        p = torch.empty(prototypes, dim)
        nn.init.orthogonal_(p)
        self.prototypes = nn.Parameter(p)
        self.encode = nn.Linear(prototypes * dim, out_dim)
        self.glob = nn.Linear(dim, out_dim)

    def coded_residuals(self, fmap: Tensor) -> Tensor:
        """``B x M x C``: correlation-weighted mean projection residual per prototype."""
        x = fmap.flatten(2).transpose(1, 2)  # B x N x C
        p_hat = F.normalize(self.prototypes, dim=1)  # M x C
        # Pearson correlation between each feature and each prototype (over channels).
        xc = F.normalize(x - x.mean(-1, keepdim=True), dim=-1)
        pc = F.normalize(self.prototypes - self.prototypes.mean(-1, keepdim=True), dim=-1)
        rho = xc @ pc.t()  # B x N x M
        a = torch.softmax(rho / self.temperature, dim=-1)  # B x N x M
        dots = x @ p_hat.t()  # B x N x M  (x . p^_m)
        mass = a.sum(1).clamp_min(1e-6)  # B x M
        # sum_j a_jm (x_j - (x_j.p^_m) p^_m) without materialising B x N x M x C
        wx = torch.einsum("bnm,bnc->bmc", a, x)
        wproj = (a * dots).sum(1)  # B x M
        v = (wx - wproj.unsqueeze(-1) * p_hat.unsqueeze(0)) / mass.unsqueeze(-1)
        return v

    def forward(self, fmap: Tensor) -> Tensor:
        v = F.normalize(self.coded_residuals(fmap), dim=-1)
        return self.encode(v.flatten(1)) + self.glob(global_pool(fmap, self.pool))

    def diversity(self) -> Tensor:
        return prototype_diversity(self.prototypes)


class CRTHead(Head):
    """Main CRT (``prototypes``, ``embed_dim``) + auxiliary CRT for the consistency loss."""

    def __init__(
        self,
        in_dim: int,
        embed_dim: int,
        prototypes: int = 16,
        aux_prototypes: int = 8,
        aux_dim: int | None = None,
        reduce_dim: int | None = None,
        temperature: float = 0.1,
        consistency: str = "mse",
        consistency_weight: float = 1.0,
        diversity_weight: float = 0.1,
        pool: str = "avg",
    ) -> None:
        super().__init__()
        if consistency not in ("mse", "kl"):
            raise ModelError(f"consistency must be 'mse' or 'kl', got {consistency!r}")
        dim = int(reduce_dim or in_dim)
        self.reduce = nn.Conv2d(in_dim, dim, 1) if reduce_dim else nn.Identity()
        self.main = CodedResidualTransform(dim, int(prototypes), embed_dim, temperature, pool)
        self.aux = None
        if aux_prototypes:
            self.aux = CodedResidualTransform(dim, int(aux_prototypes), int(aux_dim or max(embed_dim // 2, 1)), temperature, pool)
        self.consistency = consistency
        self.consistency_weight = float(consistency_weight)
        self.diversity_weight = float(diversity_weight)
        self._extra: Tensor | None = None
        self.last_terms: dict[str, Tensor] = {}
        """The last training forward's unweighted terms (detached device tensors: no host sync)."""

    def forward(self, fmap: Tensor) -> Tensor:
        if fmap.dim() != 4:
            raise ModelError(f"the crt head needs a B x C x h x w feature map, got shape {tuple(fmap.shape)}")
        fmap = self.reduce(fmap)
        emb = self.main(fmap)
        self._extra = None
        if self.training and torch.is_grad_enabled():
            div = self.main.diversity()
            cons = emb.new_zeros(())
            if self.aux is not None:
                aux = self.aux(fmap)
                cons = similarity_consistency(emb.float(), aux.float(), self.consistency)
                div = div + self.aux.diversity()
            self._extra = self.consistency_weight * cons + self.diversity_weight * div
            self.last_terms = {"crt_consistency": cons.detach(), "crt_diversity": div.detach()}
        return emb

    def extra_loss(self) -> Tensor | None:
        """Weighted consistency + diversity terms of the last training forward (then cleared)."""
        out, self._extra = self._extra, None
        return out


@register("head", "crt", context=("in_dim", "embed_dim"))
def crt(
    prototypes: int = 16,
    aux_prototypes: int = 8,
    aux_dim: int | None = None,
    reduce_dim: int | None = None,
    temperature: float = 0.1,
    consistency: str = "mse",
    consistency_weight: float = 1.0,
    diversity_weight: float = 0.1,
    pool: str = "avg",
    in_dim: int = 0,
    embed_dim: int = 128,
) -> nn.Module:
    """Coded Residual Transform (Kan et al. 2022): residuals to diversified prototypes, two CRTs tied by a similarity-consistency loss.

    ``aux_prototypes=0`` disables the auxiliary CRT (no consistency term); ``aux_dim``
    defaults to embed_dim // 2; ``reduce_dim`` adds a 1x1 conv before the transform.
    """
    return CRTHead(
        in_dim, embed_dim, prototypes, aux_prototypes, aux_dim, reduce_dim, temperature,
        consistency, consistency_weight, diversity_weight, pool,
    )
