"""Multi-branch embedding head ``multi_branch``: label-agnostic pooling branches on one
backbone. **Not the Guided DML master** (that is :mod:`dmlcore.guided.master`: one conv
branch per class); it is the platform's earlier reading, kept as a teacher for
:mod:`dmlcore.guided.relational`. The branches are ``branches`` independent linear embedders on the shared
backbone feature map, each with its own global pooling (cycling avg / max / avgmax by
default, so the branches see the features from different perspectives). The master's
embedding is the concatenation of the L2-normalised branch embeddings scaled by
``1/sqrt(branches)`` (unit length overall), or with ``combine: mean`` the mean of the
normalised branches (each branch then has ``embed_dim`` dimensions).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..models.heads import POOLS, Head, _check_pool, global_pool
from ..models.pretrained import ModelError
from ..registry import register


class MultiBranchHead(Head):
    def __init__(self, in_dim: int, embed_dim: int, branches: int = 3, combine: str = "concat",
                 pools: list[str] | None = None) -> None:  # fmt: skip
        super().__init__()
        if int(branches) != branches or branches < 1:
            raise ModelError(f"branches must be a positive integer, got {branches!r}")
        if combine not in ("concat", "mean"):
            raise ModelError(f"combine must be 'concat' or 'mean', got {combine!r}")
        branches = int(branches)
        if combine == "concat" and embed_dim % branches:
            raise ModelError(f"combine=concat needs embed_dim ({embed_dim}) divisible by branches ({branches})")
        pools = list(pools) if pools else [POOLS[k % len(POOLS)] for k in range(branches)]
        if len(pools) != branches:
            raise ModelError(f"pools names {len(pools)} poolings for {branches} branches")
        self.pools = [_check_pool(p) for p in pools]
        self.combine = combine
        dim = embed_dim // branches if combine == "concat" else embed_dim
        self.branches = nn.ModuleList(nn.Linear(in_dim, dim) for _ in range(branches))

    def branch_embeddings(self, fmap: Tensor) -> list[Tensor]:
        """The L2-normalised embedding of every branch."""
        return [F.normalize(b(global_pool(fmap, p)), dim=1) for b, p in zip(self.branches, self.pools)]

    def forward(self, fmap: Tensor) -> Tensor:
        parts = self.branch_embeddings(fmap)
        if self.combine == "mean":
            return torch.stack(parts).mean(0)
        return torch.cat(parts, dim=1) / math.sqrt(len(parts))


@register("head", "multi_branch", context=("in_dim", "embed_dim"))
def multi_branch(branches: int = 3, combine: str = "concat", pools: list[str] | None = None,
                 in_dim: int = 0, embed_dim: int = 128) -> nn.Module:  # fmt: skip
    """Several label-agnostic embedding branches (own pooling each), normalised and concatenated (or averaged); a relational-distillation teacher, not the Guided DML master."""
    return MultiBranchHead(in_dim, embed_dim, branches, combine, pools)
