"""How far apart the similarity structures of two embeddings of the same batch are.

Shared by the Guided DML distillation term (:mod:`dmlcore.losses.guided`, student vs
master) and the CRT head's consistency loss (:mod:`dmlcore.models.crt`, main vs
auxiliary transform).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _row_log_softmax(sim: Tensor, eye: Tensor, temperature: float) -> Tensor:
    """Row-wise log-softmax of ``sim / temperature`` over the other samples (diagonal 0)."""
    return F.log_softmax((sim / temperature).masked_fill(eye, float("-inf")), dim=1).masked_fill(eye, 0.0)


def similarity_discrepancy(
    a: Tensor, b: Tensor, mode: str = "mse", temperature: float = 0.1, symmetric: bool = False
) -> Tensor:
    """Discrepancy between the batch cosine-similarity matrices ``S = E E^T`` of embeddings
    ``a`` and ``b`` (rows: the same samples; L2-normalised here, so it is scale-free).

    ``mse``: mean squared difference of the off-diagonal similarities (``l1``: mean
    absolute difference). ``kl``: with
    ``P = softmax_row(S / temperature)`` over the other samples of the batch, the mean over
    rows of ``KL(P_b || P_a)``; ``symmetric``: the mean of both directions. 0 for fewer
    than two samples.
    """
    na, nb = F.normalize(a.float(), dim=1), F.normalize(b.float(), dim=1)
    sa, sb = na @ na.t(), nb @ nb.t()
    n = sa.shape[0]
    if n < 2:
        return sa.new_zeros(())
    eye = torch.eye(n, dtype=torch.bool, device=sa.device)
    if mode == "mse":
        return ((sa - sb)[~eye] ** 2).mean()
    if mode == "l1":
        return (sa - sb)[~eye].abs().mean()
    if mode != "kl":
        raise ValueError(f"mode must be 'kl', 'mse' or 'l1', got {mode!r}")
    la, lb = _row_log_softmax(sa, eye, temperature), _row_log_softmax(sb, eye, temperature)
    kl_b_a = (lb.exp() * (lb - la)).sum(1)
    if not symmetric:
        return kl_b_a.mean()
    return 0.5 * (kl_b_a + (la.exp() * (la - lb)).sum(1)).mean()
