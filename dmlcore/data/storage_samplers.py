"""The reference's embedding-storage batch samplers (registry ``sampler``, ``needs_embeddings``).

Storage (``R: main.py:128-130,269-270``): the model's embeddings of the whole train set
under the eval transform, before epoch 0 (the trainer calls :meth:`set_storage`); after
every step the batch's detached training embeddings overwrite their rows
(:meth:`update_storage`). An epoch's batches are computed at its start from the storage
as it is then (``R: main.py:215-216``). Each sampler gives ``N_train // batch_size``
batches of ``batch_size / m`` anchors, each with ``m - 1`` class mates.

Implemented as the algorithms are described; where the reference code differs:

* ``greedy_coreset`` (``R: datasampler/greedy_coreset_sampler.py:111-152``): k-centre
  greedy on a pool of ``pool`` (512) rows drawn without replacement: a random first
  point, then repeatedly the pool member farthest from the chosen set (squared
  Euclidean). The reference maps the chosen pool positions through a *different* array
  (``bigb_idxs``, 512 rows drawn once per epoch with replacement, ``:48-49,56``), so its
  anchors are not the k-centre choice; here they are the pool's own rows. Its score
  init (row norms of D) equals ``D[:, first]`` after the first step, so nothing changes.
* ``d2_coreset`` (``R: datasampler/d2_coreset_sampler.py:90-141``): a Gaussian fitted to
  the pool; start at the member nearest one Gaussian draw; then draws without
  replacement with ``p ~ N(x; mu, S) * (sum of squared distances to the chosen)^lambda``.
  Same index fix as above; the density is evaluated in log space (the reference's
  ``multivariate_normal.pdf`` underflows to 0 in 128-d), with a 1e-6 ridge on S.
* ``fid_batchmatch`` (``R: datasampler/fid_batchmatch_sampler.py:85-143``): a big batch of
  ``pool`` samples built class_random-style, ``candidates`` (10) candidate batches of
  ``batch_size/m`` (a class of the big batch, m of its positions without replacement),
  keep the one with the smallest Fréchet distance to the big batch
  (:func:`dmlcore.oodml.fid.fid_between`, exact). In the reference it cannot be selected
  (``R: datasampler/__init__.py:14`` names an undefined module).
* ``disthist_batchmatch`` (``R: datasampler/disthist_batchmatch_sampler.py:105-162``):
  the same candidates; cost ``|mu_big - mu_c| + |sd_big - sd_c| + 75 * 2 * W1(h_big, h_c)``
  with ``h`` the 50-bin histograms of pairwise Euclidean distances on the big batch's
  [min, max]. The reference passes the histograms to ``scipy.stats.wasserstein_distance``
  as *values* (``:154``), comparing bin heights; here W1 is between the two distance
  distributions (the histograms as weights on the bin centres).
* Class mates of an anchor are drawn with replacement (``:59-62``), as the reference.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Iterator

import numpy as np
import torch

from dmlcore.data.errors import DataError
from dmlcore.data.samplers import SAMPLER_CONTEXT, _BatchSampler
from dmlcore.registry import register


def sq_dists(x: np.ndarray) -> np.ndarray:
    sq = (x * x).sum(1)
    return np.clip(sq[:, None] + sq[None, :] - 2 * x @ x.T, 0, None)


def k_center(d: np.ndarray, k: int, first: int) -> list[int]:
    """Greedy k-centre on the distance matrix ``d``, starting from ``first``."""
    chosen, score = [first], d[:, first].copy()
    while len(chosen) < k:
        nxt = int(np.argmax(score))
        chosen.append(nxt)
        score = np.minimum(score, d[:, nxt])
    return chosen


def gaussian_logpdf(x: np.ndarray, mu: np.ndarray, cov: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh(cov)
    z = ((x - mu) @ v) ** 2 / w
    return -0.5 * (z.sum(1) + np.log(w).sum() + len(mu) * np.log(2 * np.pi))


def d2_sample(x: np.ndarray, k: int, rng: np.random.Generator, lam: float = 1.0) -> list[int]:
    """D² coreset of ``k`` rows of ``x`` (see the module docstring)."""
    mu = x.mean(0)
    cov = np.cov(x, rowvar=False).reshape(x.shape[1], x.shape[1]) + 1e-6 * np.eye(x.shape[1])
    start = int(np.argmin(((x - rng.multivariate_normal(mu, cov)) ** 2).sum(1)))
    d = sq_dists(x)
    logn = gaussian_logpdf(x, mu, cov)
    chosen, acc = [start], d[:, start].copy()
    avail = np.ones(len(x), bool)
    avail[start] = False
    while len(chosen) < k:
        logp = np.where(avail, logn + lam * np.log(np.maximum(acc, 1e-30)), -np.inf)
        p = np.exp(logp - logp.max())
        nxt = int(rng.choice(len(x), p=p / p.sum()))
        chosen.append(nxt)
        avail[nxt] = False
        acc += d[:, nxt]
    return chosen


def fid_cost(big: np.ndarray, cand: np.ndarray) -> float:
    from dmlcore.oodml.fid import fid_between

    return fid_between(big, cand)


def hist_w1(a: np.ndarray, b: np.ndarray, width: float) -> float:
    """W1 between two histograms on the same bins (weights on the bin centres)."""
    return float(width * np.abs(np.cumsum(a / a.sum()) - np.cumsum(b / b.sum())).sum())


def disthist_cost(big: np.ndarray, cand: np.ndarray, bins: int = 50, weight: float = 75.0) -> float:
    iu = np.triu_indices(len(big), 1)
    dbig = np.sqrt(sq_dists(big)[iu])
    ic = np.triu_indices(len(cand), 1)
    dc = np.sqrt(sq_dists(cand)[ic])
    rng_ = (float(dbig.min()), float(dbig.max()))
    hb, edges = np.histogram(dbig, bins=bins, range=rng_)
    hc, _ = np.histogram(dc, bins=bins, range=rng_)
    w1 = hist_w1(hb.astype(float), np.maximum(hc, 0).astype(float) + 1e-12, edges[1] - edges[0])
    return float(np.linalg.norm(big.mean(0) - cand.mean(0)) + np.linalg.norm(big.std(0) - cand.std(0)) + weight * 2 * w1)


class StorageSampler(_BatchSampler):
    """Base of the storage samplers: storage rows, refreshed per step; batches per epoch."""

    needs_embeddings = True
    algorithm = ""

    def __init__(self, labels: Any, batch_size: int, samples_per_class: int, seed: int = 0,
                 iterations: int | None = None, pool: int = 512, candidates: int = 10, d2_lambda: float = 1.0) -> None:
        super().__init__(labels, batch_size, seed, iterations)
        m = int(samples_per_class)
        if m < 1 or self.batch_size % m:
            raise DataError(f"batch.size={self.batch_size} must be a multiple of batch.samples_per_class={m} (>= 1)")
        self.m, self.anchors = m, self.batch_size // m
        self.pool, self.candidates, self.lam = int(pool), int(candidates), float(d2_lambda)
        classes, counts = np.unique(self.labels, return_counts=True)
        self.classes = classes
        order = np.argsort(self.labels, kind="stable")
        self.members = dict(zip(classes.tolist(), np.split(order, np.cumsum(counts)[:-1])))
        self.storage: torch.Tensor | None = None
        self._pending: deque[list[int]] = deque()

    def set_storage(self, embeddings: torch.Tensor) -> None:
        if len(embeddings) != len(self.labels):
            raise DataError(f"storage has {len(embeddings)} rows for {len(self.labels)} train samples")
        self.storage = embeddings.detach().float().clone()

    def update_storage(self, embeddings: torch.Tensor) -> None:
        """Rows of the batch yielded longest ago (FIFO) get ``embeddings`` (detached)."""
        idx = self._pending.popleft()
        assert self.storage is not None
        self.storage = self.storage.to(embeddings.device)
        self.storage[torch.as_tensor(idx, device=embeddings.device)] = embeddings.detach().float()

    def _mates(self, anchors: np.ndarray, rng: np.random.Generator) -> list[int]:
        out = list(map(int, anchors))
        for a in anchors:
            mem = self.members[int(self.labels[a])]
            out.extend(mem[rng.integers(0, len(mem), self.m - 1)].tolist())
        return out

    def _class_random(self, n: int, rng: np.random.Generator) -> np.ndarray:
        out = []
        for c in rng.integers(0, len(self.classes), max(1, n // self.m)):
            mem = self.members[int(self.classes[c])]
            out.extend(mem[rng.integers(0, len(mem), self.m)].tolist())
        return np.asarray(out)

    def candidate_batches(self, big_idx: np.ndarray, rng: np.random.Generator) -> list[np.ndarray]:
        """Positions into the big batch: ``anchors`` x (a class present, m of its positions)."""
        lab = self.labels[big_idx]
        pos = {int(c): np.flatnonzero(lab == c) for c in np.unique(lab)}
        keys = list(pos)
        return [np.concatenate([rng.choice(pos[keys[rng.integers(len(keys))]], self.m, replace=False)
                                for _ in range(self.anchors)]) for _ in range(self.candidates)]

    def select(self, big: np.ndarray, cands: list[np.ndarray]) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def make_batch(self, x: np.ndarray, rng: np.random.Generator) -> list[int]:
        n = len(x)
        if self.algorithm in ("greedy", "d2"):
            pool = rng.choice(n, min(self.pool, n), replace=False)
            sub = x[pool]
            k = min(self.anchors, len(pool))
            pos = k_center(sq_dists(sub), k, int(rng.integers(len(pool)))) if self.algorithm == "greedy" else d2_sample(sub, k, rng, self.lam)
            return self._mates(pool[np.asarray(pos)], rng)  # the pool's own rows (the reference's index bug fixed)
        big_idx = self._class_random(self.pool, rng)
        cands = self.candidate_batches(big_idx, rng)
        best = self.select(x[big_idx], [x[big_idx[c]] for c in cands])
        return big_idx[cands[best]].tolist()

    def __iter__(self) -> Iterator[list[int]]:
        if self.storage is None:
            raise DataError(f"{type(self).__name__} needs the train-set embeddings (the trainer fills them)")
        rng = self._rng()
        x = self.storage.cpu().numpy().astype(np.float64)
        batches = [self.make_batch(x, rng) for _ in range(self.iterations)]  # precomputed at the epoch's start
        self._pending.clear()
        for b in batches:
            self._pending.append(b)
            yield b


class GreedyCoreset(StorageSampler):
    algorithm = "greedy"


class D2Coreset(StorageSampler):
    algorithm = "d2"


class FIDBatchMatch(StorageSampler):
    algorithm = "fid"

    def select(self, big: np.ndarray, cands: list[np.ndarray]) -> int:
        return int(np.argmin([fid_cost(big, c) for c in cands]))


class DistHistBatchMatch(StorageSampler):
    algorithm = "disthist"

    def select(self, big: np.ndarray, cands: list[np.ndarray]) -> int:
        return int(np.argmin([disthist_cost(big, c) for c in cands]))


def _factory(cls: type, doc: str):
    def make(labels: Any, batch_size: int, samples_per_class: int, seed: int = 0, iterations: int | None = None,
             pool: int = 512, candidates: int = 10, d2_lambda: float = 1.0) -> StorageSampler:
        return cls(labels, batch_size, samples_per_class, seed, iterations, pool, candidates, d2_lambda)

    make.__doc__ = doc
    make.needs_embeddings = True  # type: ignore[attr-defined]
    return make


for _name, _cls, _doc in (
    ("greedy_coreset", GreedyCoreset, "k-centre greedy anchors from a 512-row pool + class mates (R: datasampler/greedy_coreset_sampler.py:111-152; index bug fixed)."),
    ("d2_coreset", D2Coreset, "D² (Gaussian-weighted) anchors from a 512-row pool + class mates (R: datasampler/d2_coreset_sampler.py:90-141; index bug fixed)."),
    ("fid_batchmatch", FIDBatchMatch, "Of 10 candidate batches, the one with the smallest FID to a 512-sample big batch (R: datasampler/fid_batchmatch_sampler.py:97-143)."),
    ("disthist_batchmatch", DistHistBatchMatch, "Of 10 candidates, the best match of mean, std and pairwise-distance distribution to a 512-sample big batch (R: datasampler/disthist_batchmatch_sampler.py:105-162; W1 on distributions)."),
):
    register("sampler", _name, context=SAMPLER_CONTEXT, needs_embeddings=True)(_factory(_cls, _doc))
