"""Embedding heads: a backbone feature map ``B x C x h x w`` to ``B x embed_dim``.

A head is an ``nn.Module`` built by a ``head`` registry factory with context
``in_dim, embed_dim``. It receives the *feature map* (so a head may work on spatial
features, e.g. a Coded Residual Transform head) and may expose
``extra_loss() -> Tensor | None``: an extra training term (e.g. a consistency loss)
computed during its last forward; :meth:`EmbeddingModel.head_loss` returns it and the
trainer adds it to the loss. ``extra_embeddings()`` (see :class:`Head`) hands further
embeddings to the criterion with the labels (:meth:`EmbeddingModel.head_embeddings`).
New heads are one new file in this package.
"""

from __future__ import annotations

from torch import Tensor, nn

from ..registry import register
from .pretrained import ModelError

POOLS = ("avg", "max", "avgmax")


def global_pool(x: Tensor, mode: str = "avg") -> Tensor:
    """``B x C x h x w`` to ``B x C`` (``avgmax`` = average + max pooling, summed).

    An already pooled ``B x C`` input is returned unchanged.
    """
    if x.dim() == 2:
        return x
    if mode == "avg":
        return x.mean(dim=(2, 3))
    if mode == "max":
        return x.amax(dim=(2, 3))
    if mode == "avgmax":
        return x.mean(dim=(2, 3)) + x.amax(dim=(2, 3))
    raise ModelError(f"unknown pool {mode!r}; choose one of {', '.join(POOLS)}")


def _check_pool(pool: str) -> str:
    if pool not in POOLS:
        raise ModelError(f"pool must be one of {', '.join(POOLS)}, got {pool!r}")
    return pool


class Head(nn.Module):
    """Base class of heads: ``forward(feature_map) -> B x embed_dim``; no extra loss.

    A head may also hand extra embeddings of its last training forward to the criterion
    (which applies its miner and loss to each with the batch labels): it declares them in
    ``supervised_extras`` (``{name: width}``) and returns ``{name: (B x width embedding,
    weight)}`` from ``extra_embeddings()`` (e.g. the auxiliary CRT).
    """

    supervised_extras: dict[str, int] = {}

    def extra_loss(self) -> Tensor | None:
        return None

    def extra_embeddings(self) -> dict[str, tuple[Tensor, float]]:
        return {}


class LinearHead(Head):
    def __init__(self, in_dim: int, embed_dim: int, pool: str = "avg") -> None:
        super().__init__()
        self.pool = _check_pool(pool)
        self.fc = nn.Linear(in_dim, embed_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(global_pool(x, self.pool))


class MLPHead(Head):
    def __init__(self, in_dim: int, embed_dim: int, hidden: int = 512, pool: str = "avg") -> None:
        super().__init__()
        if int(hidden) != hidden or hidden < 1:
            raise ModelError(f"hidden must be a positive integer, got {hidden!r}")
        self.pool = _check_pool(pool)
        self.mlp = nn.Sequential(nn.Linear(in_dim, int(hidden)), nn.ReLU(inplace=True), nn.Linear(int(hidden), embed_dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.mlp(global_pool(x, self.pool))


@register("head", "linear", context=("in_dim", "embed_dim"))
def linear(pool: str = "avg", in_dim: int = 0, embed_dim: int = 128) -> nn.Module:
    """Global pooling (avg | max | avgmax) then one linear layer to embed_dim."""
    return LinearHead(in_dim, embed_dim, pool)


@register("head", "mlp", context=("in_dim", "embed_dim"))
def mlp(hidden: int = 512, pool: str = "avg", in_dim: int = 0, embed_dim: int = 128) -> nn.Module:
    """Global pooling then Linear(in_dim, hidden) - ReLU - Linear(hidden, embed_dim)."""
    return MLPHead(in_dim, embed_dim, hidden, pool)
