"""DML losses from pytorch-metric-learning (PML 2.x API).

Every factory returns the PML module itself, called
``loss(embeddings, labels, indices_tuple=None)``. ``indices_tuple`` is a miner's
output: triplets ``(a, p, n)`` or pairs ``(a1, p, a2, n)``; PML converts between
them (pair losses such as ``contrastive``/``snr`` turn triplets into the pairs
``(a, p)`` and ``(a, n)``; triplet losses turn pairs into the triplets they share an
anchor with). Context: ``num_classes`` (train classes) and ``embed_dim``.

Losses with their own parameters (proxies, class weights, learned margins) expose
them through ``.parameters()``; the trainer optimises them in their own parameter
group at ``loss.lr`` (default ``optim.lr * optim.loss_lr_mult``).
"""

from __future__ import annotations

import math
from typing import Any

from torch import nn

from ..lazy import defer_pml_imports

defer_pml_imports()  # scipy.stats and scipy.special: PML imports them, a trial never calls them
from pytorch_metric_learning import losses as L  # noqa: E402
from pytorch_metric_learning import regularizers as R  # noqa: E402

from ..registry import register  # noqa: E402

CTX = ("num_classes", "embed_dim")


def _num(name: str, value: Any, *, low: float | None = None, strict: bool = False, integer: bool = False) -> Any:
    """``value`` as a float (or int), checked against a lower bound; ValueError names ``name``."""
    if isinstance(value, str):  # e.g. YAML 1.1 reads "1e-3" as a string
        try:
            value = float(value)
        except ValueError:
            raise ValueError(f"{name}={value!r}: expected a number") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name}={value!r}: expected a number")
    if integer:
        if int(value) != value:
            raise ValueError(f"{name}={value!r}: expected an integer")
        value = int(value)
    else:
        value = float(value)
        if not math.isfinite(value):
            raise ValueError(f"{name}={value!r}: expected a finite number")
    if low is not None and (value <= low if strict else value < low):
        raise ValueError(f"{name}={value!r}: must be {'>' if strict else '>='} {low}")
    return value


def _tpa(value: Any) -> Any:
    if value == "all":
        return "all"
    return _num("triplets_per_anchor", value, low=0, strict=True, integer=True)


def _classes(num_classes: int | None, embed_dim: int | None, loss: str) -> tuple[int, int]:
    if not num_classes or not embed_dim:
        raise ValueError(f"{loss} needs num_classes and embed_dim (the platform supplies them)")
    return int(num_classes), int(embed_dim)


# ---- pair / triplet losses --------------------------------------------------------


@register("loss", "contrastive", context=CTX)
def contrastive(pos_margin: float = 0.0, neg_margin: float = 1.0, num_classes=None, embed_dim=None) -> nn.Module:
    """Contrastive loss on Euclidean distances of L2-normalised embeddings (Hadsell et al. 2006)."""
    return L.ContrastiveLoss(pos_margin=_num("pos_margin", pos_margin), neg_margin=_num("neg_margin", neg_margin))


@register("loss", "triplet", context=CTX)
def triplet(margin: float = 0.2, triplets_per_anchor: int | str = "all", num_classes=None, embed_dim=None) -> nn.Module:
    """Triplet margin loss (Schroff et al. 2015); all triplets of the batch unless a miner picks them."""
    return L.TripletMarginLoss(margin=_num("margin", margin), triplets_per_anchor=_tpa(triplets_per_anchor))


@register("loss", "margin", context=CTX)
def margin(
    margin: float = 0.2,
    beta: float = 1.2,
    learn_beta: bool = True,
    per_class_beta: bool = True,
    nu: float = 0.0,
    triplets_per_anchor: int | str = "all",
    num_classes=None,
    embed_dim=None,
) -> nn.Module:
    """Margin loss (Wu et al. 2017) with a learned boundary beta, one per class by default.

    beta is a loss parameter: its learning rate is ``loss.lr`` (the reference beta_lr).
    """
    per_class = bool(learn_beta) and bool(per_class_beta)
    if per_class and not num_classes:
        raise ValueError("per-class beta needs num_classes (the platform supplies it)")
    return L.MarginLoss(
        margin=_num("margin", margin),
        nu=_num("nu", nu, low=0),
        beta=_num("beta", beta),
        triplets_per_anchor=_tpa(triplets_per_anchor),
        learn_beta=bool(learn_beta),
        num_classes=int(num_classes) if per_class else None,
    )


@register("loss", "multi_similarity", context=CTX)
def multi_similarity(alpha: float = 2.0, beta: float = 50.0, base: float = 0.5, num_classes=None, embed_dim=None) -> nn.Module:
    """Multi-Similarity loss (Wang et al. 2019) on cosine similarities."""
    return L.MultiSimilarityLoss(
        alpha=_num("alpha", alpha, low=0, strict=True),
        beta=_num("beta", beta, low=0, strict=True),
        base=_num("base", base),
    )


@register("loss", "lifted_structure", context=CTX)
def lifted_structure(neg_margin: float = 1.0, pos_margin: float = 0.0, num_classes=None, embed_dim=None) -> nn.Module:
    """Lifted structure loss (Oh Song et al. 2016)."""
    return L.LiftedStructureLoss(neg_margin=_num("neg_margin", neg_margin), pos_margin=_num("pos_margin", pos_margin))


@register("loss", "npair", context=CTX)
def npair(num_classes=None, embed_dim=None) -> nn.Module:
    """N-pair loss (Sohn 2016): one positive pair per class in the batch, dot-product similarities."""
    return L.NPairsLoss()


@register("loss", "snr", context=CTX)
def snr(
    pos_margin: float = 0.0,
    neg_margin: float = 1.0,
    regularizer_weight: float = 0.005,
    num_classes=None,
    embed_dim=None,
) -> nn.Module:
    """Signal-to-noise-ratio contrastive loss (Yuan et al. 2019) + weighted zero-mean regulariser."""
    w = _num("regularizer_weight", regularizer_weight, low=0)
    extra: dict[str, Any] = {}
    if w > 0:
        extra = {"embedding_regularizer": R.ZeroMeanRegularizer(), "embedding_reg_weight": w}
    return L.SignalToNoiseRatioContrastiveLoss(
        pos_margin=_num("pos_margin", pos_margin), neg_margin=_num("neg_margin", neg_margin), **extra
    )


@register("loss", "circle", context=CTX)
def circle(m: float = 0.4, gamma: float = 80.0, num_classes=None, embed_dim=None) -> nn.Module:
    """Circle loss (Sun et al. 2020) on cosine similarities."""
    return L.CircleLoss(m=_num("m", m), gamma=_num("gamma", gamma, low=0, strict=True))


@register("loss", "ntxent", context=CTX)
def ntxent(temperature: float = 0.07, num_classes=None, embed_dim=None) -> nn.Module:
    """NT-Xent / InfoNCE with label-defined positives (supervised use of Chen et al. 2020)."""
    return L.NTXentLoss(temperature=_num("temperature", temperature, low=0, strict=True))


# ---- proxy / classification losses (own parameters) ---------------------------------


@register("loss", "proxy_nca", context=CTX)
def proxy_nca(softmax_scale: float = 1.0, num_classes=None, embed_dim=None) -> nn.Module:
    """ProxyNCA (Movshovitz-Attias et al. 2017): one learned proxy per class."""
    c, d = _classes(num_classes, embed_dim, "proxy_nca")
    return L.ProxyNCALoss(c, d, softmax_scale=_num("softmax_scale", softmax_scale, low=0, strict=True))


@register("loss", "proxy_anchor", context=CTX)
def proxy_anchor(margin: float = 0.1, alpha: float = 32.0, num_classes=None, embed_dim=None) -> nn.Module:
    """Proxy-Anchor (Kim et al. 2020)."""
    c, d = _classes(num_classes, embed_dim, "proxy_anchor")
    return L.ProxyAnchorLoss(c, d, margin=_num("margin", margin), alpha=_num("alpha", alpha, low=0, strict=True))


@register("loss", "arcface", context=CTX)
def arcface(margin: float = 28.6, scale: float = 64.0, num_classes=None, embed_dim=None) -> nn.Module:
    """ArcFace (Deng et al. 2019); ``margin`` in degrees (PML convention; 28.6 deg = 0.5 rad)."""
    c, d = _classes(num_classes, embed_dim, "arcface")
    return L.ArcFaceLoss(c, d, margin=_num("margin", margin, low=0), scale=_num("scale", scale, low=0, strict=True))


@register("loss", "softtriple", context=CTX)
def softtriple(
    centers_per_class: int = 10,
    la: float = 20.0,
    gamma: float = 0.1,
    margin: float = 0.01,
    num_classes=None,
    embed_dim=None,
) -> nn.Module:
    """SoftTriple (Qian et al. 2019): several learned centres per class."""
    c, d = _classes(num_classes, embed_dim, "softtriple")
    return L.SoftTripleLoss(
        c,
        d,
        centers_per_class=_num("centers_per_class", centers_per_class, low=1, integer=True),
        la=_num("la", la, low=0, strict=True),
        gamma=_num("gamma", gamma, low=0, strict=True),
        margin=_num("margin", margin),
    )


@register("loss", "normalized_softmax", context=CTX)
def normalized_softmax(temperature: float = 0.05, num_classes=None, embed_dim=None) -> nn.Module:
    """Normalised softmax / NormFace (Wang et al. 2017; Zhai & Wu 2019)."""
    c, d = _classes(num_classes, embed_dim, "normalized_softmax")
    return L.NormalizedSoftmaxLoss(c, d, temperature=_num("temperature", temperature, low=0, strict=True))
