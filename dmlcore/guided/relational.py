"""Relational distillation: **not the paper's method** (the platform's earlier reading of
Guided DML, kept as an option under the name of what it is).

Regulariser ``relational_distillation`` (``loss.regularizers.relational_distillation:
{weight, master, temperature, mode}``): a frozen teacher embedding model (any checkpoint
:func:`dmlcore.guided.load_embedding_model` reads, e.g. ``sweeper train --checkpoint`` of a
run with ``model.head: multi_branch``) embeds the *same batch* and the student's batch
similarity structure is pulled towards the teacher's:

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

from ..losses.similarity import similarity_discrepancy
from ..registry import register


def similarity_distillation(student: Tensor, master: Tensor, temperature: float = 0.1, mode: str = "kl") -> Tensor:
    """Distance between the batch similarity structures of ``student`` and ``master`` embeddings
    (``kl``: ``KL(P_master || P_student)`` per row, averaged)."""
    return similarity_discrepancy(student, master, mode, temperature)


class RelationalDistillation(nn.Module):
    """Holds the frozen master *outside* the module tree (not in the student's checkpoints)."""

    needs_images = True
    """Data-parallel trials gather the batch images for it (:mod:`dmlcore.distributed`)."""

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
                "the relational_distillation regularizer needs the batch images: the trainer must call criterion(emb, labels, images=x)"
            )
        target = self.master_embeddings(images.float() if images.dtype != torch.float32 else images)
        return similarity_distillation(embeddings, target, self.temperature, self.mode)


@register("regularizer", "relational_distillation")
def relational_distillation(master: str | None = None, temperature: float = 0.1, mode: str = "kl",
                            master_config: str | None = None) -> nn.Module:
    """Relational distillation (not the Guided DML paper's method): pull the student's batch similarities towards a frozen teacher's (KL of row-softmaxed similarities at temperature, or MSE).

    ``master``: checkpoint of the teacher (``save_model_checkpoint`` or a trainer checkpoint,
    config inside, else ``master_config`` / a ``config.yaml`` beside it).
    """
    from .checkpoints import load_embedding_model

    if not master:
        raise ValueError("master: path of the master model checkpoint is required")
    if not Path(str(master)).expanduser().exists():
        raise ValueError(f"master: no such checkpoint {master}")
    model = load_embedding_model(master, master_config)
    return RelationalDistillation(model, float(temperature), str(mode))
