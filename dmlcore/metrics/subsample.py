"""Subsets of an embedding set that keep the embedding-space metrics honest.

The pi metrics average per-class quantities, so a subset must keep classes whole: a
uniform draw of 10k SOP images leaves most sampled classes with one image (no pair for
``pi_c``, filled with the largest ``pi_c``) and raises ``pi_intra`` (0.50 -> 0.64 in the
fidelity review, A3). :func:`class_subset` draws whole classes instead, so every class
it keeps has the same ``pi_c`` as on the full set. The reference embeds the whole train
set (``main.py:291`` of Confusezius/Revisiting_Deep_Metric_Learning_PyTorch).
"""

from __future__ import annotations

import numpy as np


def class_subset(labels: np.ndarray, max_samples: int, seed: int = 0) -> np.ndarray:
    """Sorted indices of whole classes, drawn in a seeded random order, at most ``max_samples`` in all.

    Only classes with at least two samples are drawn (a one-sample class has no within-class
    pair). A class that would overflow the budget is skipped and smaller ones are tried,
    so the budget is filled as far as whole classes allow. At least two classes are kept
    (even past the budget) so that ``pi_inter`` is defined.
    """
    y = np.asarray(labels)
    classes, counts = np.unique(y, return_counts=True)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(classes))
    chosen: list[int] = []
    total = 0
    for i in order:
        c = int(counts[i])
        if c < 2:
            continue
        if total + c <= max_samples or len(chosen) < 2:
            chosen.append(int(classes[i]))
            total += c
    return np.flatnonzero(np.isin(y, chosen))
