"""Loss ``gdml_regression``: the Guided DML student regresses its master's targets.

As ``ResNet.training_step`` (MyModel_CIFAR10.py:501-510, 477): the batch mean of the
Euclidean (not squared) distance ``||s(x) - t(x)||_2`` between the student's embedding and the
stored master target of the same image. No DML loss, and the labels are not used. The targets
come from :func:`dmlcore.guided.targets.master_targets` (trained or loaded once per run, in
``prepare``); the trainer passes each batch's positions in the train split as ``sample_ids``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..registry import register


def regression_loss(student: Tensor, target: Tensor) -> Tensor:
    """``mean_k ||student_k - target_k||_2`` (Euclidean, not squared; C:477)."""
    return (student - target).norm(dim=1).mean()


class GDMLRegression(nn.Module):
    """Holds the frozen targets (a non-persistent buffer, never a parameter)."""

    uses_batch_context = True  # the Criterion passes sample_ids (and images) through

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("targets", torch.zeros(0, 0), persistent=False)

    def set_targets(self, targets: Tensor) -> None:
        self.targets = targets.detach().float().to(self.targets.device if self.targets.numel() else targets.device)

    def prepare(self, trainer: Any) -> None:
        from .targets import master_targets

        self.set_targets(master_targets(trainer).to(trainer.device))

    def forward(self, embeddings: Tensor, labels: Tensor | None = None, indices_tuple: Any = None,
                sample_ids: Tensor | None = None, **_: Any) -> Tensor:  # fmt: skip
        if self.targets.numel() == 0:
            raise RuntimeError("gdml_regression has no targets: the trainer must call criterion.prepare(trainer) first")
        if sample_ids is None:
            raise RuntimeError("gdml_regression needs the batch's positions in the train split: criterion(..., sample_ids=ids)")
        target = self.targets[sample_ids.to(self.targets.device).long()].to(embeddings.device)
        return regression_loss(embeddings, target)


@register("loss", "gdml_regression", context=("num_classes", "embed_dim"))
def gdml_regression(num_classes: int = 0, embed_dim: int = 2) -> nn.Module:
    """Guided DML student loss: mean L2 distance to the master's stored target of each image (master: guided.master.*; needs data.augmentation=none)."""
    return GDMLRegression()
