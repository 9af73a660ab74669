"""The master's training set: seeded class-pair triplets, one ordered pair of classes per batch.

As MyModel_CIFAR10.py:104-186 (``TripletDataset``): ``T = min(batch, smallest class size // 2)``
(C:111-113); for each ordered pair of distinct classes ``(i, j)`` (``itertools.permutations``,
C:115), shuffled once (C:117-118), ``2T`` distinct images of class ``i`` (the first ``T``
anchors, the next ``T`` positives) and ``T`` distinct images of class ``j`` (negatives)
(C:171-179). The set is drawn once and read in order with batch size ``T`` and no shuffle
(C:187), so every batch is exactly one pair: ``C (C - 1) T`` triplets (90 T for 10 classes).
The authors draw from numpy's global RNG, unseeded; here from ``numpy.random.default_rng(seed)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import permutations
from typing import Iterator

import numpy as np

from ..data.base import DataError


@dataclass(frozen=True)
class TripletSet:
    """``anchor[k], positive[k], negative[k]``: sample indices of triplet ``k``; batch ``b`` is
    triplets ``b*T .. (b+1)*T - 1``, all of the class pair ``pairs[b]``."""

    anchor: np.ndarray
    positive: np.ndarray
    negative: np.ndarray
    pairs: tuple[tuple[int, int], ...]
    per_pair: int

    def __len__(self) -> int:
        return len(self.anchor)

    def batches(self) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray, int, int]]:
        """``(anchors, positives, negatives, class i, class j)`` per batch, in the fixed order."""
        t = self.per_pair
        for b, (i, j) in enumerate(self.pairs):
            s = slice(b * t, (b + 1) * t)
            yield self.anchor[s], self.positive[s], self.negative[s], i, j


def class_pair_triplets(labels: np.ndarray, max_per_pair: int, seed: int) -> TripletSet:
    """The triplet set of the module docstring over ``labels`` (class ids), ``T = min(max_per_pair,
    smallest class size // 2)``."""
    labels = np.asarray(labels)
    classes = [int(c) for c in np.unique(labels)]
    if len(classes) < 2:
        raise DataError(f"the Guided DML master needs at least 2 classes, the train split has {len(classes)}")
    members = {c: np.flatnonzero(labels == c) for c in classes}
    t = min(int(max_per_pair), min(len(m) for m in members.values()) // 2)
    if t < 1:
        small = min(members, key=lambda c: len(members[c]))
        raise DataError(f"the Guided DML master needs 2 images of every class; class {small} has {len(members[small])}")
    rng = np.random.default_rng(seed)
    pairs = list(permutations(classes, 2))
    pairs = [pairs[k] for k in rng.permutation(len(pairs))]
    a, p, n = [], [], []
    for i, j in pairs:
        ap = rng.choice(members[i], 2 * t, replace=False)
        a.append(ap[:t])
        p.append(ap[t:])
        n.append(rng.choice(members[j], t, replace=False))
    return TripletSet(np.concatenate(a), np.concatenate(p), np.concatenate(n), tuple(pairs), t)
