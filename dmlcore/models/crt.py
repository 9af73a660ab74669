"""Coded Residual Transform head (Kan et al., "Coded Residual Transform for Generalizable
Deep Metric Learning", NeurIPS 2022, arXiv:2210.04180).

What the paper's abstract states: learn a set of *diversified prototypes*, project the
feature map onto each prototype, encode the features by their *projection residuals
weighted by their correlation coefficients* with each prototype; two CRTs with different
prototype counts and embedding dimensions are tied by a *consistency loss between their
feature similarity matrices*. The method section (the equations) could not be read here,
so every reading the abstract leaves open is a parameter of the ``crt`` head (a switch);
``docs/methods.md`` says for each what the paper does or does not say and why the
default was chosen. Notation: features ``x_j`` (``j`` over the ``h*w`` positions,
optionally reduced by a 1x1 conv to ``reduce_dim`` channels), prototypes ``p_k``
(``k = 1..K``), ``p^_k = p_k/|p_k|``.

* ``residual``: ``orth`` ``r_jk = x_j - (x_j . p^_k) p^_k`` (the component of ``x_j``
  orthogonal to ``p_k``); ``proto`` ``r_jk = x_j - p_k`` (NetVLAD-style); ``proj``
  ``r_jk = x_j - W p_k`` with a learned ``C x C`` ``W`` (initialised to the identity).
* ``weights``: the correlation ``w_jk`` of ``x_j`` and ``p_k`` over channels: ``pearson``
  (cosine of the channel-centred vectors), ``cosine`` or ``dot``; ``softmax_over``
  ``prototypes`` / ``positions`` gives ``a = softmax(w / temperature)`` along that axis,
  ``none`` uses ``a = w``.
* ``aggregate``: ``c_k = sum_j a_jk r_jk``, divided by ``sum_j |a_jk|`` for ``mean``
  (clamped at 1e-6); ``intra_norm`` L2-normalises each ``c_k``; the ``c_k`` are
  concatenated and linearly encoded to the CRT's dimension. ``glob_branch`` (off by
  default: the paper does not describe it) adds ``W_glob . pool(X)``.
* two CRTs: the main one (``prototypes``, ``embed_dim``) and an auxiliary one
  (``aux_prototypes``, ``aux_dim``; ``aux_prototypes=0`` = none). ``consistency``
  (``mse`` / ``kl`` / ``l1``) between their batch similarity matrices, weighted by
  ``consistency_weight``; ``stop_grad`` detaches the named branch in that term;
  ``aux_metric_weight`` > 0 sends the auxiliary embedding to the criterion with the
  labels (:meth:`CRTHead.extra_embeddings`); ``test_embedding`` ``main`` or ``concat``
  (``[e_main/|e_main|; e_aux/|e_aux|]``, ``embed_dim + aux_dim`` wide) at evaluation.
* diversity: ``diversity_weight`` x the mean squared off-diagonal cosine similarity
  between the prototypes of each CRT (orthogonal initialisation).

The head's ``extra_loss()`` is ``consistency_weight * L_cons + diversity_weight * L_div``.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..losses.similarity import similarity_discrepancy
from ..registry import register
from .heads import Head, _check_pool, global_pool
from .pretrained import ModelError

MASS_EPS = 1e-6
"""Lower bound of a prototype's weight mass ``sum_j |a_jk|`` in the ``mean`` aggregation."""


def _pearson(x: Tensor, p: Tensor) -> Tensor:
    xc = F.normalize(x - x.mean(-1, keepdim=True), dim=-1)
    pc = F.normalize(p - p.mean(-1, keepdim=True), dim=-1)
    return xc @ pc.t()


def _cosine(x: Tensor, p: Tensor) -> Tensor:
    return F.normalize(x, dim=-1) @ F.normalize(p, dim=-1).t()


def _dot(x: Tensor, p: Tensor) -> Tensor:
    return x @ p.t()


CORRELATIONS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {"pearson": _pearson, "cosine": _cosine, "dot": _dot}
"""``weights``: ``(x: B x N x C, p: K x C) -> B x N x K`` correlation over channels."""
SOFTMAX_AXES: dict[str, int | None] = {"prototypes": -1, "positions": 1, "none": None}
"""``softmax_over``: the axis of ``B x N x K`` the softmax runs over (None: raw weights)."""
RESIDUALS = ("orth", "proto", "proj")
AGGREGATES = ("mean", "sum")
CONSISTENCIES = ("mse", "kl", "l1")
STOP_GRADS = ("none", "aux", "main")
TEST_EMBEDDINGS = ("main", "concat")


def _choice(name: str, value: str, options) -> str:
    if value not in options:
        raise ModelError(f"{name} must be one of {', '.join(options)}, got {value!r}")
    return value


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

    ``mse`` / ``l1``: mean squared / absolute difference of the off-diagonal similarities;
    ``kl``: symmetric KL between the row-softmaxed similarities (diagonal excluded) at
    ``temperature``.
    """
    _choice("consistency", mode, CONSISTENCIES)
    return similarity_discrepancy(a, b, mode, temperature, symmetric=True)


class CodedResidualTransform(nn.Module):
    """One CRT: feature map ``B x C x h x w`` to ``B x out_dim`` (see the module docstring)."""

    def __init__(
        self,
        dim: int,
        prototypes: int,
        out_dim: int,
        temperature: float = 0.1,
        pool: str = "avg",
        *,
        residual: str = "orth",
        weights: str = "pearson",
        softmax_over: str = "prototypes",
        aggregate: str = "mean",
        intra_norm: bool = True,
        glob_branch: bool = False,
    ) -> None:
        super().__init__()
        if int(prototypes) != prototypes or prototypes < 1:
            raise ModelError(f"prototypes must be a positive integer, got {prototypes!r}")
        if not temperature > 0:
            raise ModelError(f"temperature must be > 0, got {temperature!r}")
        self.temperature = float(temperature)
        self.pool = _check_pool(pool)
        self.residual = _choice("residual", residual, RESIDUALS)
        self.weights = _choice("weights", weights, tuple(CORRELATIONS))
        self.softmax_over = _choice("softmax_over", softmax_over, tuple(SOFTMAX_AXES))
        self.aggregate = _choice("aggregate", aggregate, AGGREGATES)
        self.intra_norm = bool(intra_norm)
        # Orthogonal initialisation: prototypes start diverse (rows orthonormal when K <= C).
        p = torch.empty(int(prototypes), dim)
        nn.init.orthogonal_(p)
        self.prototypes = nn.Parameter(p)
        self.proj = None
        if self.residual == "proj":
            self.proj = nn.Linear(dim, dim, bias=False)
            nn.init.eye_(self.proj.weight)  # starts as the `proto` reading
        self.encode = nn.Linear(int(prototypes) * dim, out_dim)
        self.glob = nn.Linear(dim, out_dim) if glob_branch else None

    def anchors(self) -> Tensor:
        """``K x C``: the point each residual of the ``proto`` / ``proj`` readings is taken to."""
        return self.proj(self.prototypes) if self.proj is not None else self.prototypes

    def correlation_weights(self, x: Tensor) -> Tensor:
        """``B x N x C`` features to the weights ``a`` (``B x N x K``) of their residuals."""
        w = CORRELATIONS[self.weights](x, self.prototypes)
        axis = SOFTMAX_AXES[self.softmax_over]
        return w if axis is None else torch.softmax(w / self.temperature, dim=axis)

    def coded_residuals(self, fmap: Tensor) -> Tensor:
        """``B x K x C``: the aggregated weighted residual per prototype (before intra-norm).

        Computed without materialising ``B x N x K x C``: ``sum_j a_jk (x_j - q_jk)`` is
        ``(a^T x)_k`` minus ``sum_j a_jk (x_j . p^_k) p^_k`` (``orth``) or ``(sum_j a_jk) q_k``.
        """
        x = fmap.flatten(2).transpose(1, 2)  # B x N x C
        a = self.correlation_weights(x)  # B x N x K
        wx = torch.einsum("bnk,bnc->bkc", a, x)
        if self.residual == "orth":
            p_hat = F.normalize(self.prototypes, dim=1)
            sub = (a * (x @ p_hat.t())).sum(1).unsqueeze(-1) * p_hat.unsqueeze(0)
        else:
            sub = a.sum(1).unsqueeze(-1) * self.anchors().unsqueeze(0)
        c = wx - sub
        if self.aggregate == "mean":
            c = c / a.abs().sum(1).clamp_min(MASS_EPS).unsqueeze(-1)
        return c

    def forward(self, fmap: Tensor) -> Tensor:
        c = self.coded_residuals(fmap)
        if self.intra_norm:
            c = F.normalize(c, dim=-1)
        emb = self.encode(c.flatten(1))
        if self.glob is not None:
            emb = emb + self.glob(global_pool(fmap, self.pool))
        return emb

    def diversity(self) -> Tensor:
        return prototype_diversity(self.prototypes)


AUX_NAME = "crt_aux"
"""Name of the auxiliary CRT's embedding for the criterion (its loss is logged as ``loss_crt_aux``)."""


class CRTHead(Head):
    """Main CRT (``prototypes``, ``embed_dim``) + auxiliary CRT (consistency, optional metric loss)."""

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
        *,
        residual: str = "orth",
        weights: str = "pearson",
        softmax_over: str = "prototypes",
        aggregate: str = "mean",
        intra_norm: bool = True,
        glob_branch: bool = False,
        consistency_temperature: float = 0.1,
        stop_grad: str = "none",
        aux_metric_weight: float = 1.0,
        test_embedding: str = "main",
    ) -> None:
        super().__init__()
        self.consistency = _choice("consistency", consistency, CONSISTENCIES)
        self.stop_grad = _choice("stop_grad", stop_grad, STOP_GRADS)
        self.test_embedding = _choice("test_embedding", test_embedding, TEST_EMBEDDINGS)
        if aux_metric_weight < 0 or consistency_weight < 0 or diversity_weight < 0:
            raise ModelError("consistency_weight, diversity_weight and aux_metric_weight must be >= 0")
        if not aux_prototypes and test_embedding == "concat":
            raise ModelError("test_embedding: concat needs the auxiliary CRT (aux_prototypes > 0)")
        dim = int(reduce_dim or in_dim)
        self.reduce = nn.Conv2d(in_dim, dim, 1) if reduce_dim else nn.Identity()
        crt_kw = dict(
            residual=residual, weights=weights, softmax_over=softmax_over, aggregate=aggregate,
            intra_norm=intra_norm, glob_branch=glob_branch,
        )  # fmt: skip
        self.main = CodedResidualTransform(dim, prototypes, embed_dim, temperature, pool, **crt_kw)
        self.aux = None
        if aux_prototypes:
            aux_out = int(aux_dim or max(embed_dim // 2, 1))
            self.aux = CodedResidualTransform(dim, aux_prototypes, aux_out, temperature, pool, **crt_kw)
        self.consistency_weight = float(consistency_weight)
        self.consistency_temperature = float(consistency_temperature)
        self.diversity_weight = float(diversity_weight)
        self.aux_metric_weight = float(aux_metric_weight) if self.aux is not None else 0.0
        self._extra: Tensor | None = None
        self._extra_emb: dict[str, tuple[Tensor, float]] = {}
        self.last_terms: dict[str, Tensor] = {}
        """The last training forward's unweighted terms (detached device tensors: no host sync)."""

    @property
    def supervised_extras(self) -> dict[str, int]:
        """``{name: width}`` of the extra embeddings that training forwards hand to the criterion."""
        return {AUX_NAME: self.aux.encode.out_features} if self.aux is not None and self.aux_metric_weight > 0 else {}

    def _consistency(self, emb: Tensor, aux: Tensor) -> Tensor:
        a, b = emb.float(), aux.float()
        if self.stop_grad == "main":
            a = a.detach()
        elif self.stop_grad == "aux":
            b = b.detach()
        return similarity_consistency(a, b, self.consistency, self.consistency_temperature)

    def forward(self, fmap: Tensor) -> Tensor:
        if fmap.dim() != 4:
            raise ModelError(f"the crt head needs a B x C x h x w feature map, got shape {tuple(fmap.shape)}")
        fmap = self.reduce(fmap)
        emb = self.main(fmap)
        self._extra, self._extra_emb = None, {}
        if not (self.training and torch.is_grad_enabled()):
            if self.test_embedding == "concat":
                return torch.cat([F.normalize(emb, dim=1), F.normalize(self.aux(fmap), dim=1)], dim=1)
            return emb
        div = self.main.diversity()
        cons = emb.new_zeros(())
        if self.aux is not None:
            aux = self.aux(fmap)
            cons = self._consistency(emb, aux)
            div = div + self.aux.diversity()
            if self.aux_metric_weight > 0:
                self._extra_emb = {AUX_NAME: (aux, self.aux_metric_weight)}
        self._extra = self.consistency_weight * cons + self.diversity_weight * div
        self.last_terms = {"crt_consistency": cons.detach(), "crt_diversity": div.detach()}
        return emb

    def extra_loss(self) -> Tensor | None:
        """Weighted consistency + diversity terms of the last training forward (then cleared)."""
        out, self._extra = self._extra, None
        return out

    def extra_embeddings(self) -> dict[str, tuple[Tensor, float]]:
        """``{name: (embedding, weight)}`` of the last training forward for the criterion (then cleared)."""
        out, self._extra_emb = self._extra_emb, {}
        return out


@register("head", "crt", context=("in_dim", "embed_dim"))
def crt(
    prototypes: int = 16,
    aux_prototypes: int = 8,
    aux_dim: int | None = None,
    reduce_dim: int | None = None,
    residual: str = "orth",
    weights: str = "pearson",
    softmax_over: str = "prototypes",
    temperature: float = 0.1,
    aggregate: str = "mean",
    intra_norm: bool = True,
    glob_branch: bool = False,
    pool: str = "avg",
    consistency: str = "mse",
    consistency_weight: float = 1.0,
    consistency_temperature: float = 0.1,
    stop_grad: str = "none",
    aux_metric_weight: float = 1.0,
    test_embedding: str = "main",
    diversity_weight: float = 0.1,
    in_dim: int = 0,
    embed_dim: int = 128,
) -> nn.Module:
    """Coded Residual Transform (Kan et al. 2022): residuals to diversified prototypes, two CRTs tied by a similarity-consistency loss.

    Open readings of the paper are switches: residual (orth | proto | proj), weights
    (pearson | cosine | dot), softmax_over (prototypes | positions | none), temperature,
    aggregate (mean | sum), intra_norm, glob_branch (off: not in the paper), consistency
    (mse | kl | l1) and its weight, stop_grad (none | aux | main), aux_metric_weight (the
    auxiliary CRT's metric loss; 0 = consistency only), test_embedding (main | concat).
    ``aux_prototypes=0`` disables the auxiliary CRT; ``aux_dim`` defaults to
    embed_dim // 2; ``reduce_dim`` adds a 1x1 conv before the transforms. docs/methods.md.
    """
    return CRTHead(
        in_dim, embed_dim, prototypes, aux_prototypes, aux_dim, reduce_dim, temperature,
        consistency, consistency_weight, diversity_weight, pool,
        residual=residual, weights=weights, softmax_over=softmax_over, aggregate=aggregate,
        intra_norm=intra_norm, glob_branch=glob_branch, consistency_temperature=consistency_temperature,
        stop_grad=stop_grad, aux_metric_weight=aux_metric_weight, test_embedding=test_embedding,
    )
