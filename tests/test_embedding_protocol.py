"""pi on whole-class subsets (never singletons) and rho@1 / rho@2 logged every epoch, as published."""

from __future__ import annotations

import numpy as np
import pytest

from dmlcore.config import load_config
from dmlcore.metrics import embedding_space_metrics
from dmlcore.metrics.subsample import class_subset
from dmlcore.train import ListReporter, Trainer


def _brute_pi_c(x: np.ndarray) -> float:
    """Mean pairwise cosine distance within one class, diagonal excluded (loops)."""
    n = len(x)
    tot = 0.0
    for i in range(n):
        for j in range(n):
            if i != j:
                tot += 1.0 - float(x[i] @ x[j]) / (np.linalg.norm(x[i]) * np.linalg.norm(x[j]))
    return tot / (n * (n - 1))


def test_pi_on_a_subsample_keeps_whole_classes_and_equals_the_full_set():
    rng = np.random.default_rng(0)
    sizes = rng.integers(1, 5, size=300)  # many small classes (1-4 samples), as SOP
    y = np.repeat(np.arange(300), sizes)
    x = rng.normal(size=(len(y), 8)) + rng.normal(size=(300, 8))[y]
    idx = class_subset(y, 200, seed=3)
    ys = y[idx]
    kept, counts = np.unique(ys, return_counts=True)
    assert len(idx) <= 200 and len(idx) >= 190  # the budget is filled as whole classes allow
    assert counts.min() >= 2  # no singleton class
    assert np.array_equal(counts, sizes[kept])  # every kept class is whole
    assert np.array_equal(idx, np.sort(idx))
    # pi_intra on the subsample = the mean over the kept classes of their full-set pi_c
    want = np.mean([_brute_pi_c(x[y == c]) for c in kept])
    got = embedding_space_metrics(x[idx], ys)["pi_intra"]
    assert got == pytest.approx(want, abs=1e-10)
    # the uniform draw this replaces: many singleton classes
    uni = y[np.sort(rng.choice(len(y), 200, replace=False))]
    assert (np.unique(uni, return_counts=True)[1] == 1).sum() > 50
    # another seed, other classes
    assert not np.array_equal(class_subset(y, 200, seed=4), idx)


def _kl_uniform(s: np.ndarray) -> float:
    s = s / s.sum()
    u = np.full(len(s), 1.0 / len(s))
    return float(np.sum(u * np.log(u / s)))


def test_rho_at_1_and_2_logged_every_epoch_and_eval_in_fp32():
    cfg = load_config(None, {
        "data.dataset": "digits", "data.image_size": 16, "data.augmentation": "none",
        "model.backbone": "small_cnn", "model.backbone_params": {"width": 8, "depth": 2}, "model.embed_dim": 8,
        "batch.size": 32, "batch.samples_per_class": 8, "batch.iterations_per_epoch": 2,
        "optim.lr": 1e-3, "train.epochs": 2, "train.device": "cpu",
        "eval.clustering": False, "eval.recall_k": [1], "eval.max_train_embed": 400,
    })
    rep = ListReporter()
    tr = Trainer(cfg, reporter=rep, progress=False)
    tr.fit()
    epochs = [m for _, m in rep.reports]
    assert len(epochs) == 2
    for m in epochs:
        assert {"train/rho_spectrum", "train/rho_spectrum_at_1", "train/rho_spectrum_at_2"} <= set(m)
        assert m["train/rho_spectrum"] == m["train/rho_spectrum_at_2"]  # eval.rho_m = 2
    # the last epoch's numbers from the train embeddings, by hand (whole classes within the budget)
    labels = np.asarray(tr.data.train_eval.labels)
    idx = class_subset(labels, 400, cfg.train.seed)
    assert 0 < len(idx) <= 400 and len(idx) < len(labels) and np.unique(labels[idx], return_counts=True)[1].min() >= 2
    emb, _ = tr.embed(tr.data.train_eval, idx)
    assert emb.dtype.is_floating_point and str(emb.dtype) == "torch.float32"
    s = np.linalg.svd(emb.double().numpy(), compute_uv=False)
    assert epochs[-1]["train/rho_spectrum_at_1"] == pytest.approx(_kl_uniform(s), abs=1e-6)
    assert epochs[-1]["train/rho_spectrum_at_2"] == pytest.approx(_kl_uniform(s[1:]), abs=1e-6)
