"""Which miner a loss accepts: the reference's ``ALLOWED_MINING_OPS`` for the ``roth_*``
criteria (``R: criteria/__init__.py:40-45``), read from the registry metadata
(``miners``, ``requires_miner`` of a loss; ``tuples`` of a miner).

:func:`check_loss_miner` raises a one-line :class:`~dmlcore.config.ConfigError`; it runs
where configs are validated (``sweeper.study.check_registries``: ``sweeper train``,
``show`` and ``run``) and again in ``build_criterion``.
"""

from __future__ import annotations

from .. import registry
from ..config import ConfigError

SET_TUPLES = ("npair", "lifted")


def check_loss_miner(loss_name: str, miner_name: str | None) -> None:
    loss = registry.get("loss", loss_name, "loss.name")
    miner_name = miner_name or "none"
    tuples = None
    if miner_name != "none":
        tuples = registry.get("miner", miner_name, "miner.name").meta.get("tuples")
    allowed = loss.meta.get("miners")
    if allowed is None:  # not a roth_* criterion: only set tuples are unreadable for it
        if tuples in SET_TUPLES:
            raise ConfigError(
                f"miner.name: miner '{miner_name}' returns {tuples} set tuples that only "
                f"{'roth_npair/roth_angular' if tuples == 'npair' else 'roth_lifted'} read; loss '{loss_name}' cannot"
            )
        return
    ref = loss.meta.get("reference", "")
    if miner_name == "none":
        if loss.meta.get("requires_miner"):
            raise ConfigError(
                f"miner.name: loss '{loss_name}' needs a miner (R: {ref}); allowed: {', '.join(allowed)}"
            )
        return
    if miner_name not in allowed:
        what = f"allowed: {', '.join(allowed)}" if allowed else "allowed: none (the reference passes it no miner)"
        raise ConfigError(f"miner.name: miner '{miner_name}' is not allowed for loss '{loss_name}' (R: {ref}); {what}")


__all__ = ["check_loss_miner"]
