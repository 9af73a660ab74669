"""The reference's batch samplers: composition on a known pool against values computed here."""

import numpy as np
import torch

from dmlcore import registry
from dmlcore.data import storage_samplers as ss


def _labels(classes=100, per=30):
    return np.repeat(np.arange(classes), per)


def test_class_random_draws_with_replacement():
    labels = _labels()
    s = registry.build("sampler", "class_random", None, labels=labels, batch_size=112, samples_per_class=2, seed=0)
    batches = list(s)
    assert len(batches) == len(labels) // 112 and all(len(b) == 112 for b in batches)
    distinct = np.mean([len(set(labels[b].tolist())) for b in batches])
    expected = 100 * (1 - (1 - 1 / 100) ** 56)  # 56 class draws with replacement from 100 classes: 43.0
    assert abs(distinct - expected) < 1.5, (distinct, expected)
    dup = np.mean([112 - len(set(b)) for b in batches])
    assert dup > 0.5  # images with replacement too: same image twice happens (~1.9 per batch on a class of 30)
    for b in batches:  # pairs of one class
        assert all(labels[b[2 * k]] == labels[b[2 * k + 1]] for k in range(56))


def test_full_random_has_a_positive_pair():
    labels = _labels(1000, 3)
    s = registry.build("sampler", "full_random", None, labels=labels, batch_size=32, samples_per_class=2, seed=1)
    for b in s:
        lab = labels[b]
        assert len(b) == 32 and len(lab) - len(set(lab.tolist())) >= 1


def test_greedy_coreset_is_k_center_and_d2_spreads():
    x = np.array([[0.0, 0], [0.1, 0], [10, 0], [10, 0.1], [0, 10], [5, 5]])
    d = ((x[:, None] - x[None]) ** 2).sum(-1)
    got = ss.k_center(d, 3, first=0)
    # written out: from 0 the farthest is 3 (d = 100.01 > 100); then min sq. dist to {0, 3}: point 4 has 100,
    # point 5 min(50, 49.01), points 1/2 ~0.01: so 4
    assert got == [0, 3, 4]
    rng = np.random.default_rng(0)
    pts = np.concatenate([rng.normal(0, 0.01, (50, 2)), rng.normal(5, 0.01, (50, 2))])
    picks = [ss.d2_sample(pts, 2, np.random.default_rng(s)) for s in range(20)]
    split = np.mean([(p[0] < 50) != (p[1] < 50) for p in picks])  # D² weights make the 2nd point far from the 1st
    assert split > 0.9


def test_batchmatch_picks_the_minimum_cost_candidate():
    rng = np.random.default_rng(0)
    big = rng.normal(size=(64, 4))
    cands = [big[:16] + 3.0, big[16:32], big[32:48] * 4]

    def fid(a, b):  # Gaussian Fréchet distance written out with an eigen-decomposed sqrtm
        m1, m2 = a.mean(0), b.mean(0)
        s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
        w, v = np.linalg.eigh(s1)
        r = v @ np.diag(np.sqrt(np.clip(w, 0, None))) @ v.T
        return ((m1 - m2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(np.clip(np.linalg.eigvalsh(r @ s2 @ r), 0, None)).sum()

    costs = [fid(big, c) for c in cands]
    fs = ss.FIDBatchMatch(np.arange(64) // 2, 16, 2)
    assert fs.select(big, cands) == int(np.argmin(costs)) == 1
    assert abs(ss.fid_cost(big, cands[0]) - costs[0]) < 1e-8 * max(1, costs[0])

    def dh(a, b):  # mean/std distance + 75 * 2 * W1 of the pairwise-distance histograms (CDF form)
        da = np.sqrt(((a[:, None] - a[None]) ** 2).sum(-1))[np.triu_indices(len(a), 1)]
        db = np.sqrt(((b[:, None] - b[None]) ** 2).sum(-1))[np.triu_indices(len(b), 1)]
        ha, e = np.histogram(da, 50, (da.min(), da.max()))
        hb, _ = np.histogram(db, 50, (da.min(), da.max()))
        w1 = (e[1] - e[0]) * np.abs(np.cumsum(ha / ha.sum()) - np.cumsum(hb / hb.sum())).sum()
        return np.linalg.norm(a.mean(0) - b.mean(0)) + np.linalg.norm(a.std(0) - b.std(0)) + 150 * w1

    costs = [dh(big, c) for c in cands]
    assert ss.DistHistBatchMatch(np.arange(64) // 2, 16, 2).select(big, cands) == int(np.argmin(costs))
    assert abs(ss.disthist_cost(big, cands[2]) - costs[2]) < 1e-6


def test_storage_samplers_fill_and_refresh_their_storage():
    labels = _labels(20, 10)
    for name in ("greedy_coreset", "d2_coreset", "fid_batchmatch", "disthist_batchmatch"):
        s = registry.build("sampler", name, {"pool": 64, "candidates": 3}, labels=labels, batch_size=16, samples_per_class=2, seed=0)
        assert registry.get("sampler", name).meta["needs_embeddings"] and s.needs_embeddings
        s.set_storage(torch.randn(len(labels), 8))
        for b in s:
            assert len(b) == 16
            s.update_storage(torch.full((16, 8), 7.0))
            assert bool((s.storage[torch.as_tensor(b)] == 7.0).all())
        assert len(list(s)) == len(labels) // 16


def test_trainer_runs_a_storage_sampler():
    from dmlcore.config import load_config
    from dmlcore.train import Trainer

    cfg = load_config(None, {"data.dataset": "digits", "data.image_size": 16, "data.augmentation": "base",
                             "batch.size": 20, "batch.samples_per_class": 2, "batch.sampler": "greedy_coreset",
                             "batch.sampler_params": {"pool": 64}, "batch.iterations_per_epoch": 3,
                             "model.embed_dim": 8, "train.epochs": 1, "train.device": "cpu",
                             "eval.clustering": False, "eval.embedding_metrics": False})
    t = Trainer(cfg, progress=False)
    r = t.fit()
    assert t.sampler.storage is not None and len(t.sampler._pending) == 0 and "test/recall_at_1" in r.final
