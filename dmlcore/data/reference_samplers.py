"""The reference's batch samplers (registry ``sampler``), Roth et al. 2020 (``R: datasampler/``).

``class_random`` (every published run, ``R: datasampler/class_random_sampler.py:35-46``):
for each of ``batch_size / m`` draws, a class uniformly **with replacement**, then ``m``
of its images uniformly **with replacement**; a CUB batch of 112 with m = 2 holds about
43 distinct classes, not 56 (the platform's ``class_balanced`` draws without replacement).

``full_random`` (``R: datasampler/random_sampler.py:28-38``): ``batch_size - 1`` draws of
(a uniform class, then a uniform image of it), plus one image of the class of a random
batch member, so every batch has at least one positive pair.

Both give ``N_train // batch_size`` batches per epoch (``:22``) and draw from a
``numpy`` generator seeded by ``(seed, epoch)`` (the reference uses the global RNG).
"""

from __future__ import annotations

from typing import Any, Iterator

import numpy as np

from dmlcore.data.errors import DataError
from dmlcore.data.samplers import SAMPLER_CONTEXT, _BatchSampler
from dmlcore.registry import register


class _ByClass(_BatchSampler):
    def __init__(self, labels: Any, batch_size: int, samples_per_class: int, seed: int, iterations: int | None) -> None:
        super().__init__(labels, batch_size, seed, iterations)
        m = int(samples_per_class) or 1
        if self.batch_size % m:
            raise DataError(f"batch.size={self.batch_size} is not a multiple of batch.samples_per_class={m}")
        self.m = m
        self.classes, counts = np.unique(self.labels, return_counts=True)
        order = np.argsort(self.labels, kind="stable")
        self.members = np.split(order, np.cumsum(counts)[:-1])
        self.class_pos = {int(c): k for k, c in enumerate(self.classes)}


class ClassRandomSampler(_ByClass):
    def __iter__(self) -> Iterator[list[int]]:
        rng = self._rng()
        for _ in range(self.iterations):
            batch: list[int] = []
            for c in rng.integers(0, len(self.classes), self.batch_size // self.m):
                mem = self.members[int(c)]
                batch.extend(mem[rng.integers(0, len(mem), self.m)].tolist())
            yield batch


class FullRandomSampler(_ByClass):
    def __iter__(self) -> Iterator[list[int]]:
        rng = self._rng()
        for _ in range(self.iterations):
            batch = []
            for c in rng.integers(0, len(self.classes), self.batch_size - 1):
                mem = self.members[int(c)]
                batch.append(int(mem[rng.integers(0, len(mem))]))
            mate = self.members[self.class_pos[int(self.labels[batch[rng.integers(0, len(batch))]])]]
            batch.append(int(mate[rng.integers(0, len(mate))]))  # may be the member itself, as the reference
            yield batch


@register("sampler", "class_random", context=SAMPLER_CONTEXT)
def class_random(labels: Any, batch_size: int, samples_per_class: int, seed: int = 0, iterations: int | None = None) -> ClassRandomSampler:
    """Reference default: batch_size/m classes drawn with replacement, m images each with replacement (R: datasampler/class_random_sampler.py:35-46)."""
    return ClassRandomSampler(labels, batch_size, samples_per_class, seed, iterations)


@register("sampler", "full_random", context=SAMPLER_CONTEXT)
def full_random(labels: Any, batch_size: int, samples_per_class: int = 1, seed: int = 0, iterations: int | None = None) -> FullRandomSampler:
    """Reference: batch_size-1 (uniform class, uniform image) draws + one class mate of a random member (R: datasampler/random_sampler.py:28-38)."""
    return FullRandomSampler(labels, batch_size, samples_per_class, seed, iterations)
