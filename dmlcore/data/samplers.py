"""Batch samplers (registry ``sampler``).

A sampler is an iterable of index lists (one list per batch) for a DataLoader's
``batch_sampler``. It owns a ``numpy.random.Generator`` seeded from
``(seed, epoch)`` (never the global RNG): the same seed and epoch always give the
same batches, and :meth:`set_epoch` moves to the next epoch's batches.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterator, Sequence

import numpy as np

from dmlcore.data.base import DataError, _u64
from dmlcore.registry import register

if TYPE_CHECKING:  # pragma: no cover
    from dmlcore.config import RunConfig

SAMPLER_CONTEXT = ("labels", "batch_size", "samples_per_class", "seed", "iterations")


class _Pool:
    """Draws items without replacement, reshuffling once exhausted; one draw never repeats an item."""

    def __init__(self, items: np.ndarray, rng: np.random.Generator) -> None:
        self.items = np.asarray(items)
        self.rng = rng
        self.queue = self.rng.permutation(self.items)

    def draw(self, k: int) -> np.ndarray:
        if len(self.queue) >= k:
            out, self.queue = self.queue[:k], self.queue[k:]
            return out
        head = self.queue
        perm = self.rng.permutation(self.items)
        fresh = np.flatnonzero(~np.isin(perm, head))[: k - len(head)]
        out = np.concatenate([head, perm[fresh]])
        self.queue = np.delete(perm, fresh)
        return out


class _BatchSampler:
    def __init__(self, labels: Sequence[int] | np.ndarray, batch_size: int, seed: int, iterations: int | None) -> None:
        self.labels = np.asarray(labels, dtype=np.int64)
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.epoch = 0
        if self.batch_size < 1:
            raise DataError(f"batch.size must be >= 1, got {batch_size}")
        if len(self.labels) == 0:
            raise DataError("the train split is empty")
        self.iterations = int(iterations) if iterations else max(1, len(self.labels) // self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.iterations

    def _rng(self) -> np.random.Generator:
        return np.random.default_rng([_u64(self.seed), _u64(self.epoch)])

    def __iter__(self) -> Iterator[list[int]]:  # pragma: no cover - abstract
        raise NotImplementedError


class ClassBalancedSampler(_BatchSampler):
    """Each batch: ``batch_size / m`` distinct classes x ``m`` distinct samples of each.

    Classes are drawn without replacement until every class has been used, then
    reshuffled; samples within a class likewise.
    """

    def __init__(
        self,
        labels: Sequence[int] | np.ndarray,
        batch_size: int,
        samples_per_class: int,
        seed: int = 0,
        iterations: int | None = None,
        small_classes: str = "error",
    ) -> None:
        super().__init__(labels, batch_size, seed, iterations)
        m = int(samples_per_class)
        if m < 1:
            raise DataError(f"class_balanced needs batch.samples_per_class >= 1, got {m}")
        if self.batch_size % m:
            raise DataError(f"batch.size={self.batch_size} is not a multiple of batch.samples_per_class={m}")
        if small_classes not in ("error", "replace"):
            raise DataError(f"sampler param small_classes must be 'error' or 'replace', got {small_classes!r}")
        self.m = m
        self.classes_per_batch = self.batch_size // m
        self.small_classes = small_classes
        classes, counts = np.unique(self.labels, return_counts=True)
        if self.classes_per_batch > len(classes):
            raise DataError(
                f"batch.size={self.batch_size} with batch.samples_per_class={m} needs {self.classes_per_batch} "
                f"classes per batch, but the train split has only {len(classes)} classes"
            )
        small = counts < m
        if small.any() and small_classes == "error":
            raise DataError(
                f"batch.samples_per_class={m} but {int(small.sum())} train classes have fewer than {m} samples "
                f"(smallest has {int(counts.min())}); batch.sampler_params.small_classes=replace repeats their samples"
            )
        order = np.argsort(self.labels, kind="stable")
        bounds = np.concatenate([[0], np.cumsum(counts)])
        self.classes = classes
        self.members = {int(c): order[bounds[k] : bounds[k + 1]] for k, c in enumerate(classes)}

    def __iter__(self) -> Iterator[list[int]]:
        rng = self._rng()
        class_pool = _Pool(self.classes, rng)
        pools: dict[int, _Pool] = {}
        m = self.m
        for _ in range(self.iterations):
            batch = []
            for c in class_pool.draw(self.classes_per_batch).tolist():
                idx = self.members[c]
                if len(idx) >= m:
                    pool = pools.get(c)
                    if pool is None:
                        pool = pools[c] = _Pool(idx, rng)
                    batch.append(pool.draw(m))
                else:  # small_classes == "replace": every sample once, then repeats
                    batch.append(rng.permutation(idx)[np.arange(m) % len(idx)])
            yield np.concatenate(batch).tolist()


class RandomSampler(_BatchSampler):
    """Plain random batches: a fresh permutation of the train set per pass, no repeats within a batch."""

    def __init__(
        self, labels: Sequence[int] | np.ndarray, batch_size: int, seed: int = 0, iterations: int | None = None
    ) -> None:
        super().__init__(labels, batch_size, seed, iterations)
        if self.batch_size > len(self.labels):
            raise DataError(f"batch.size={self.batch_size} is larger than the train split ({len(self.labels)} samples)")

    def __iter__(self) -> Iterator[list[int]]:
        pool = _Pool(np.arange(len(self.labels)), self._rng())
        for _ in range(self.iterations):
            yield pool.draw(self.batch_size).tolist()


@register("sampler", "class_balanced", context=SAMPLER_CONTEXT)
def class_balanced(
    labels: Any,
    batch_size: int,
    samples_per_class: int,
    seed: int = 0,
    iterations: int | None = None,
    small_classes: str = "error",
) -> ClassBalancedSampler:
    """batch_size/m classes x m samples per batch; small_classes: 'error' or 'replace' (repeat samples of classes with fewer than m)."""
    return ClassBalancedSampler(labels, batch_size, samples_per_class, seed, iterations, small_classes)


@register("sampler", "random", context=SAMPLER_CONTEXT)
def random_batches(labels: Any, batch_size: int, seed: int = 0, iterations: int | None = None) -> RandomSampler:
    """Fully random batches (the class composition is left to chance)."""
    return RandomSampler(labels, batch_size, seed, iterations)


def build_sampler(cfg: "RunConfig", labels: Any) -> _BatchSampler:
    """The batch sampler of ``cfg.batch`` over the train ``labels`` (``samples_per_class: 0`` -> random)."""
    from dmlcore import registry

    b = cfg.batch
    name = "random" if b.samples_per_class == 0 else b.sampler
    params = dict(b.sampler_params or {})
    if name == "random" and b.sampler != "random":
        params = {}  # class_balanced params do not apply to the random fallback
    return registry.build(
        "sampler",
        name,
        params,
        key="batch.sampler_params",
        labels=labels,
        batch_size=b.size,
        samples_per_class=b.samples_per_class,
        seed=cfg.train.seed,
        iterations=b.iterations_per_epoch,
    )
