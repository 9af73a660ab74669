"""The Guided DML master: one conv branch per class, a shared head, routed by the label.

As ``TripletNet_conv`` (MyModel_CIFAR10.py:233-310): branch ``c`` is
Conv5x5(->32)-PReLU-MaxPool2-Conv5x5(->64)-PReLU-MaxPool2 (C:237-240); the shared head is
Linear(flat->256)-PReLU-Linear(256->256)-PReLU-Linear(256->d) with flat = 1600 at 32 px and
1024 at 28 px (C:241-246); ``forward`` returns the head output ("global") and the flattened
branch features ("local") (C:250-259). The authors pass one class for the whole batch
(``forward(x, c)``); :meth:`ClassBranchMaster.forward` routes *each sample* by its label,
which is the same on their one-pair batches (anchor and positive through branch ``i``, the
negative through branch ``j``, C:265-267) and also serves the targets (every image through its
own class's branch, C:282-296).

Loss (C:247-248, 270): ``(1 - beta) TripletMarginLoss(margin, p=2, eps=0)(a, p, n) + beta *
mean ||local_a - local_p||_2``. Optimiser (C:310, 333): SGD, lr 1e-3, momentum 0, no weight
decay, no schedule.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..models.pretrained import ModelError
from .triplets import TripletSet


def _branch(in_channels: int, c1: int, c2: int, kernel: int = 5) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, c1, kernel), nn.PReLU(), nn.MaxPool2d(2, stride=2),
        nn.Conv2d(c1, c2, kernel), nn.PReLU(), nn.MaxPool2d(2, stride=2),
    )  # fmt: skip


class ClassBranchMaster(nn.Module):
    """``forward(x, y) -> (global B x out_dim, local B x flat)``; sample ``k`` goes through
    ``branches[y[k]]`` and the shared ``head``."""

    def __init__(self, num_classes: int, image_size: int, out_dim: int = 2, channels: Sequence[int] = (32, 64),
                 hidden: int = 256, in_channels: int = 3) -> None:  # fmt: skip
        super().__init__()
        if len(channels) != 2 or any(int(c) < 1 for c in channels):
            raise ModelError(f"guided.master.channels: two positive channel counts are needed, got {list(channels)}")
        c1, c2 = (int(c) for c in channels)
        side = ((int(image_size) - 4) // 2 - 4) // 2
        if side < 1:
            raise ModelError(f"data.image_size={image_size}: the master's two conv5-pool2 blocks need at least 16 px")
        self.num_classes = int(num_classes)
        self.flat = c2 * side * side
        self.branches = nn.ModuleList(_branch(in_channels, c1, c2) for _ in range(self.num_classes))
        self.head = nn.Sequential(
            nn.Linear(self.flat, hidden), nn.PReLU(), nn.Linear(hidden, hidden), nn.PReLU(), nn.Linear(hidden, out_dim)
        )

    def local(self, x: Tensor, y: Tensor) -> Tensor:
        """Flattened branch features, each sample through the branch of its label."""
        y = torch.as_tensor(y, device=x.device).long()
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= self.num_classes):
            raise ValueError(f"labels must be in 0..{self.num_classes - 1} (one branch per class)")
        order, parts = [], []
        for c in torch.unique(y).tolist():
            idx = torch.nonzero(y == c, as_tuple=True)[0]
            order.append(idx)
            parts.append(self.branches[c](x[idx]).flatten(1))
        if not parts:
            return x.new_zeros(0, self.flat)
        perm = torch.cat(order)
        return torch.cat(parts)[torch.argsort(perm)]

    def forward(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        local = self.local(x, y)
        return self.head(local), local


def master_loss(g_a: Tensor, g_p: Tensor, g_n: Tensor, l_a: Tensor, l_p: Tensor, margin: float, beta: float) -> Tensor:
    """``(1 - beta) TripletMargin(margin, p=2, eps=0) + beta mean ||l_a - l_p||_2`` (C:247-248, 270)."""
    trip = F.triplet_margin_loss(g_a, g_p, g_n, margin=float(margin), p=2, eps=0.0)
    local = F.pairwise_distance(l_a, l_p, p=2, eps=0.0).mean()
    return (1.0 - beta) * trip + beta * local


def train_master(model: ClassBranchMaster, images: Tensor, labels: Tensor, triplets: TripletSet,
                 transform: Callable[[Tensor], Tensor], epochs: int, lr: float, margin: float, beta: float,
                 device: torch.device | str = "cpu") -> list[float]:  # fmt: skip
    """Train ``model`` in place on ``triplets`` (indices into ``images`` / ``labels``): the fixed
    batches in their fixed order every epoch (C:187, 312-323), SGD(lr, momentum 0). ``images``:
    uint8 ``N x 3 x H x W``; ``transform`` turns a uint8 batch on ``device`` into the network
    input. Returns the mean loss of every epoch."""
    device = torch.device(device)
    model.to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=float(lr), momentum=0.0, weight_decay=0.0)
    history = []
    for _ in range(int(epochs)):
        losses = []
        for a, p, n, i, j in triplets.batches():
            t = len(a)
            idx = torch.as_tensor(np.concatenate([a, p, n]))
            x = transform(images[idx.to(images.device)].to(device))
            y = torch.tensor([i] * (2 * t) + [j] * t, device=device)
            g, local = model(x, y)
            loss = master_loss(g[:t], g[t : 2 * t], g[2 * t :], local[:t], local[t : 2 * t], margin, beta)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.detach())
        mean = float(torch.stack(losses).mean()) if losses else float("nan")
        if not np.isfinite(mean):
            from ..train import TrainingDiverged

            raise TrainingDiverged(f"the Guided DML master's loss became {mean:.4g}")
        history.append(mean)
    return history


@torch.no_grad()
def embed_by_label(model: ClassBranchMaster, images: Tensor, labels: Tensor, transform: Callable[[Tensor], Tensor],
                   device: torch.device | str = "cpu", batch_size: int = 1024) -> Tensor:  # fmt: skip
    """``head(branch_y(x))`` of every image (its own class's branch, C:282-296), float32 on the CPU."""
    device = torch.device(device)
    model.to(device).eval()
    out = []
    for s in range(0, len(images), batch_size):
        x = transform(images[s : s + batch_size].to(device))
        g, _ = model(x, torch.as_tensor(labels[s : s + batch_size]).to(device))
        out.append(g.float().cpu())
    return torch.cat(out) if out else torch.zeros(0, model.head[-1].out_features)


def build_master(cfg: Any, num_classes: int) -> ClassBranchMaster:
    """The master ``cfg.guided.master`` describes for ``num_classes`` classes (output ``model.embed_dim``)."""
    m = cfg.guided.master
    return ClassBranchMaster(num_classes, cfg.data.image_size, cfg.model.embed_dim, m.channels, m.hidden)
