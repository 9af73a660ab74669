"""Guided DML distillation term (Gonzalez-Zapata et al., "Guided Deep Metric Learning", 2022).

Regulariser ``guided`` (``loss.regularizers.guided: {weight, master, temperature, mode}``):
the frozen master (trained first, see :mod:`dmlcore.guided`) embeds the *same batch*
and the student's batch similarity structure is pulled towards the master's:

* ``mode: kl`` (default): ``S = E E^T`` (cosine similarities of the L2-normalised
  embeddings), ``P = softmax_row(S / T)`` over the other samples of the batch
  (diagonal excluded); term = ``mean_i KL(P_master[i] || P_student[i])``.
* ``mode: mse``: mean squared difference of the off-diagonal similarities.

Both are 0 when the student's similarities equal the master's and positive otherwise;
the master runs under ``no_grad`` with frozen parameters, so gradients reach the student
only. The Criterion adds ``weight * term``.

The trainer must pass the batch images: ``criterion(emb, labels, images=x)``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..registry import register
from .similarity import similarity_discrepancy


def similarity_distillation(student: Tensor, master: Tensor, temperature: float = 0.1, mode: str = "kl") -> Tensor:
    """Distance between the batch similarity structures of ``student`` and ``master`` embeddings
    (``kl``: ``KL(P_master || P_student)`` per row, averaged)."""
    return similarity_discrepancy(student, master, mode, temperature)


class GuidedDistillation(nn.Module):
    """Holds the frozen master *outside* the module tree (not in the student's checkpoints)."""

    def __init__(self, master: nn.Module, temperature: float = 0.1, mode: str = "kl") -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if mode not in ("kl", "mse"):
            raise ValueError(f"mode must be 'kl' or 'mse', got {mode!r}")
        for p in master.parameters():
            p.requires_grad_(False)
        self._master = [master.eval()]
        self.temperature = float(temperature)
        self.mode = mode

    @property
    def master(self) -> nn.Module:
        return self._master[0]

    @torch.no_grad()
    def master_embeddings(self, images: Tensor) -> Tensor:
        m = self.master
        first = next(m.parameters(), None)
        if first is not None and first.device != images.device:
            m.to(images.device)
        m.eval()
        return m(images).float()

    def forward(self, embeddings: Tensor, labels: Tensor | None = None, images: Tensor | None = None, **_: Any) -> Tensor:
        if images is None:
            raise RuntimeError(
                "the guided regularizer needs the batch images: the trainer must call criterion(emb, labels, images=x)"
            )
        target = self.master_embeddings(images.float() if images.dtype != torch.float32 else images)
        return similarity_distillation(embeddings, target, self.temperature, self.mode)


@register("regularizer", "guided")
def guided(master: str | None = None, temperature: float = 0.1, mode: str = "kl", master_config: str | None = None) -> nn.Module:
    """Guided DML: distil the frozen master's batch similarities into the student (KL of row-softmaxed similarities at temperature, or MSE).

    ``master``: checkpoint written by ``python -m dmlcore.guided`` (config inside) or a
    trainer checkpoint with ``master_config`` / a ``config.yaml`` beside it.
    """
    from ..guided import load_embedding_model

    if not master:
        raise ValueError("master: path of the master model checkpoint is required")
    if not Path(str(master)).expanduser().exists():
        raise ValueError(f"master: no such checkpoint {master}")
    model = load_embedding_model(master, master_config)
    return GuidedDistillation(model, float(temperature), str(mode))
