"""The training criterion: miner, then loss, plus weighted regularisers.

``build_criterion(cfg, num_classes)`` builds it from ``cfg.loss`` and ``cfg.miner``.
``criterion(embeddings, labels, **batch_context) -> (loss, logs)``; a head's extra
embeddings (e.g. the auxiliary CRT) come as ``extra_embeddings={name: (emb, weight)}``
and get the same miner, loss and labels. The trainer adds ``model.head_loss()`` itself
and handles non-finite losses.

Learning rate of the criterion's own parameters (proxies, class weights, learned
margin betas): ``loss.lr`` if set, else ``optim.lr * optim.loss_lr_mult``
(:attr:`Criterion.lr`, :func:`loss_lr`).
"""

from __future__ import annotations

from typing import Any, Iterator, Mapping

from torch import Tensor, nn

from .. import registry
from ..config import ConfigError, RunConfig


def loss_lr(cfg: RunConfig) -> float:
    """Learning rate of the loss's own parameters: ``loss.lr`` or ``optim.lr * optim.loss_lr_mult``."""
    return float(cfg.loss.lr if cfg.loss.lr is not None else cfg.optim.lr * cfg.optim.loss_lr_mult)


def _tuple_counts(indices: Any) -> dict[str, float]:
    if indices is None:
        return {}
    if len(indices) == 3:
        return {"miner_triplets": float(len(indices[0]))}
    if len(indices) == 4:
        return {"miner_pos_pairs": float(len(indices[0])), "miner_neg_pairs": float(len(indices[2]))}
    return {}


class Criterion(nn.Module):
    """``(embeddings, labels) -> (loss, logs)``: miner, loss and weighted regularisers.

    ``logs`` (floats): ``loss_main`` (the loss before regularisers), ``reg_<name>``
    (each regulariser, unweighted), the miner's tuple counts (``miner_triplets`` or
    ``miner_pos_pairs``/``miner_neg_pairs``) and miner statistics, and ``margin_beta``
    (mean learned beta) for the margin loss.

    ``extra_embeddings`` ``{name: (embedding, weight)}`` (e.g. a head's auxiliary branch,
    :meth:`~dmlcore.models.embedding.EmbeddingModel.head_embeddings`): each goes through
    the same miner and loss with the same labels; ``weight * loss`` is added and the loss
    is logged as ``loss_<name>``. Regularisers see the main embedding only.
    """

    def __init__(
        self,
        loss: nn.Module,
        miner: nn.Module | None = None,
        regularizers: Mapping[str, tuple[float, Any]] | None = None,
        lr: float | None = None,
    ) -> None:
        super().__init__()
        self.loss = loss
        self.miner = miner
        self.reg_weights: dict[str, float] = {}
        self._regs: dict[str, Any] = {}
        for name, (weight, reg) in (regularizers or {}).items():
            self.reg_weights[name] = float(weight)
            self._regs[name] = reg
            if isinstance(reg, nn.Module):
                self.add_module(f"reg_{name}", reg)
        self.lr = lr
        self.embed_dim: int | None = None
        """Width of the main embedding (set by :func:`build_criterion`; see :meth:`check_extra_embeddings`)."""
        self.tensor_logs = False
        """When True, ``logs`` values are detached 0-d tensors (no host sync per step; the
        trainer sums them on the device and converts once per epoch)."""

    def _log(self, value: Tensor) -> Tensor | float:
        v = value.detach()
        return v if self.tensor_logs else float(v)

    def forward(
        self,
        embeddings: Tensor,
        labels: Tensor,
        extra_embeddings: Mapping[str, tuple[Tensor, float]] | None = None,
        **batch_context: Any,
    ) -> tuple[Tensor, dict[str, float]]:
        labels = labels.long()
        indices = self.miner(embeddings, labels) if self.miner is not None else None
        if getattr(self.loss, "uses_batch_context", False):  # e.g. gdml_regression: needs sample_ids
            main = self.loss(embeddings, labels, indices, **batch_context)
        else:
            main = self.loss(embeddings, labels, indices)
        total = main
        logs: dict[str, Any] = {"loss_main": self._log(main)}
        logs.update(_tuple_counts(indices))
        stats = getattr(self.miner, "stats", None)
        if callable(stats):
            logs.update({k: float(v) for k, v in stats().items()})
        for name, reg in self._regs.items():
            term = reg(embeddings, labels, **batch_context)
            total = total + self.reg_weights[name] * term
            logs[f"reg_{name}"] = self._log(term)
        beta = getattr(self.loss, "beta", None)
        if isinstance(beta, nn.Parameter):
            logs["margin_beta"] = self._log(beta.mean())
        for name, (emb, weight) in (extra_embeddings or {}).items():
            emb = emb.float()
            term = self.loss(emb, labels, self.miner(emb, labels) if self.miner is not None else None)
            total = total + float(weight) * term
            logs[f"loss_{name}"] = self._log(term)
        return total, logs

    def check_extra_embeddings(self, dims: Mapping[str, int]) -> None:
        """Refuse extra embeddings (name -> width) that the loss's own parameters cannot score.

        A loss parameter with an axis of the main embedding's width (proxies, class
        weights) fits no other width; parameters of other shapes (e.g. the margin loss's
        beta) are shared by every embedding the criterion scores.
        """
        if not dims or self.embed_dim is None:
            return
        sized = [p for p in self.loss.parameters() if self.embed_dim in p.shape]
        wrong = {k: d for k, d in dims.items() if d != self.embed_dim}
        if sized and wrong:
            raise ConfigError(
                f"loss.name: '{type(self.loss).__name__}' has parameters of the embedding's width "
                f"{self.embed_dim} (proxies / class weights) and cannot also score the head's "
                + ", ".join(f"{k} ({d}-d)" for k, d in wrong.items())
                + " embedding; use a pair or tuple loss, or turn it off (crt: model.head_params.aux_metric_weight: 0)"
            )

    def parameters(self, recurse: bool = True) -> Iterator[nn.Parameter]:
        """Trainable parameters: the loss's (proxies, W, beta), the miner's and regularisers'.

        Frozen parameters (``requires_grad=False``, e.g. a regulariser's teacher net) are left out.
        """
        for p in super().parameters(recurse):
            if p.requires_grad:
                yield p

    def prepare(self, trainer: Any) -> None:
        """Called once by the trainer after it has built the data and the model, before
        training: parts with a ``prepare(trainer)`` (Guided DML's regression loss trains or
        loads its master and stores its targets) get the trainer."""
        for part in (self.loss, self.miner, *self._regs.values()):
            fn = getattr(part, "prepare", None)
            if callable(fn):
                fn(trainer)

    def set_epoch(self, epoch: int) -> None:
        """Re-seed seeded miners (and regularisers that want it) for ``epoch``."""
        for part in (self.miner, self.loss, *self._regs.values()):
            fn = getattr(part, "set_epoch", None)
            if callable(fn):
                fn(epoch)


def loss_param_group(criterion: Any, cfg: RunConfig) -> dict[str, Any] | None:
    """The optimizer group of the criterion's own tensors, or None when it has none.

    lr: ``loss.lr`` if set; else the loss's reference lr (``optimizer_group()`` of a
    ``roth_*`` criterion, which also sets weight decay 0 as R: criteria/__init__.py:53);
    else ``optim.lr * optim.loss_lr_mult``.
    """
    params = [p for p in criterion.parameters() if p.requires_grad]
    if not params:
        return None
    group: dict[str, Any] = {"params": params, "lr": cfg.optim.lr * cfg.optim.loss_lr_mult, "name": "loss"}
    spec = getattr(getattr(criterion, "loss", None), "optimizer_group", None)
    if callable(spec):
        group.update({k: v for k, v in spec().items() if v is not None})
    if cfg.loss.lr is not None:
        group["lr"] = float(cfg.loss.lr)
    return group


def _build(kind: str, name: str, params: Mapping[str, Any] | None, name_key: str, params_key: str, **context: Any) -> Any:
    registry.get(kind, name, key=name_key)
    try:
        return registry.build(kind, name, params, key=params_key, **context)
    except (ValueError, AssertionError) as err:  # invalid values (a ConfigError is a ValueError)
        msg = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ConfigError(f"{params_key}: {kind} '{name}': {msg}") from None


def build_criterion(cfg: RunConfig, num_classes: int) -> Criterion:
    """The criterion ``cfg.loss`` / ``cfg.miner`` describe, for ``num_classes`` train classes."""
    embed_dim = cfg.model.embed_dim
    from .compat import check_loss_miner

    check_loss_miner(cfg.loss.name, cfg.miner.name)
    loss = _build(
        "loss", cfg.loss.name, cfg.loss.params, "loss.name", "loss.params",
        num_classes=int(num_classes), embed_dim=embed_dim,
        optim_lr=cfg.optim.lr, miner_name=cfg.miner.name, train_seed=cfg.train.seed,
    )  # fmt: skip
    miner = _build(
        "miner", cfg.miner.name, cfg.miner.params, "miner.name", "miner.params",
        embed_dim=embed_dim, train_seed=cfg.train.seed,
    )  # fmt: skip
    regs: dict[str, tuple[float, Any]] = {}
    for name, spec in (cfg.loss.regularizers or {}).items():
        key = f"loss.regularizers.{name}"
        if isinstance(spec, (int, float)) and not isinstance(spec, bool):
            spec = {"weight": spec}
        if not isinstance(spec, Mapping):
            raise ConfigError(f"{key}: expected a mapping of parameters (with an optional 'weight'), got {spec!r}")
        params = dict(spec)
        weight = params.pop("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)):
            raise ConfigError(f"{key}.weight: expected a number, got {weight!r}")
        reg = _build(
            "regularizer", name, params, "loss.regularizers", key,
            num_classes=int(num_classes), embed_dim=embed_dim,
        )  # fmt: skip
        regs[name] = (float(weight), reg)
    crit = Criterion(loss, miner, regs, lr=loss_lr(cfg))
    crit.embed_dim = int(embed_dim)
    return crit


__all__ = ["Criterion", "build_criterion", "loss_lr", "loss_param_group"]
