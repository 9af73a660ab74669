"""The master as a stage of the student's run: trained on first use, cached, and its targets.

:func:`master_targets` (called by the ``gdml_regression`` loss from ``Criterion.prepare``,
after the trainer has built the data and before it trains):

1. checks that the master has one branch per train class (``guided.master.branches``);
2. looks for ``<cache>/master-<key>.pt`` where ``key`` hashes everything the master and its
   targets depend on: ``guided.master``, ``model.embed_dim``, the dataset, its root, params,
   image size and split, ``train.seed``, and the train images and labels themselves;
3. otherwise draws the triplet set (:mod:`.triplets`, seeded by ``train.seed``), trains the
   master (:mod:`.master`, init seeded by ``train.seed``), embeds **every** train image through
   its own class's branch (MyModel_CIFAR10.py:282-296) and writes master weights, targets,
   labels and the loss history there (atomically; read back with ``weights_only=True``);
4. returns the targets, one row per position of the train split (the ids the trainer's
   sampler yields), frozen (no gradient, never updated).

The master sees the raw 0-255 pixels as floats, as the authors' (C:153-169, 292); the student
sees the platform's eval transform (no augmentation: ``data.augmentation`` must be ``none``).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import ConfigError

FORMAT = "dmlcore-gdml-master-2"


def cache_dir(cfg: Any) -> Path:
    """``guided.cache_dir``, else ``$XDG_CACHE_HOME/dmlcore/guided`` (``~/.cache/dmlcore/guided``)."""
    if cfg.guided.cache_dir:
        return Path(cfg.guided.cache_dir).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "dmlcore" / "guided"


def stage_key(cfg: Any, images: torch.Tensor, labels: np.ndarray) -> str:
    """Hash of everything the trained master and its targets depend on."""
    d = cfg.data
    h = hashlib.sha256()
    h.update(json.dumps({
        "format": FORMAT, "master": cfg.guided.master.model_dump(mode="json"), "embed_dim": cfg.model.embed_dim,
        "dataset": d.dataset, "root": d.root, "params": d.params, "image_size": d.image_size, "split": d.split,
        "seed": cfg.train.seed,
    }, sort_keys=True, default=str).encode())  # fmt: skip
    h.update(np.ascontiguousarray(labels, dtype=np.int64).tobytes())
    h.update(images.contiguous().cpu().numpy().tobytes())
    return h.hexdigest()[:24]


def train_images(trainer: Any) -> torch.Tensor:
    """The train split as one uint8 tensor (in-memory datasets, or the decoded cache)."""
    ds = trainer.data.train
    imgs = ds.in_memory_images() if hasattr(ds, "in_memory_images") else None
    if imgs is None and getattr(ds, "can_gather", False):
        imgs = ds.gather(np.arange(len(ds)))
    if imgs is None or trainer.train_loader is not None:
        raise ConfigError(
            f"loss.name=gdml_regression: dataset '{trainer.cfg.data.dataset}' is read file by file; the stored master "
            "targets need an in-memory dataset or data.cache_dir"
        )
    return imgs


def raw_pixels(x: torch.Tensor, generator: Any = None) -> torch.Tensor:
    """The master's input: the uint8 pixels as floats 0-255, as the authors (C:153-169, 292)."""
    return x.float()


def master_targets(trainer: Any) -> torch.Tensor:
    """The frozen targets ``N x embed_dim`` of the train split (module docstring)."""
    from ..train import load_checkpoint, save_checkpoint
    from .master import build_master, embed_by_label, train_master
    from .triplets import class_pair_triplets

    cfg = trainer.cfg
    mc = cfg.guided.master
    labels = np.asarray(trainer.data.train.labels, dtype=np.int64)
    n_cls = int(trainer.data.num_train_classes)
    if mc.branches is not None and mc.branches != n_cls:
        raise ConfigError(
            f"guided.master.branches={mc.branches}: the master has one branch per class and the train split of "
            f"'{cfg.data.dataset}' has {n_cls} classes"
        )
    images = train_images(trainer)
    key = stage_key(cfg, images, labels)
    path = cache_dir(cfg) / f"master-{key}.pt"
    info: dict[str, Any] = {"cache": str(path)}
    if path.is_file():
        state = load_checkpoint(path)
        if state.get("format") == FORMAT and state.get("key") == key:
            targets = state["targets"].float()
            info.update(cached=True, history=list(state.get("history", [])), triplets=int(state.get("triplets", 0)))
            trainer.guided_stage = info
            return targets
    triplets = class_pair_triplets(labels, mc.triplets_per_pair, seed=cfg.train.seed)
    torch.manual_seed(cfg.train.seed)
    model = build_master(cfg, n_cls)
    transform = raw_pixels
    lab = torch.as_tensor(labels)
    history = train_master(model, images, lab, triplets, transform, mc.epochs, mc.lr, mc.margin, mc.beta, trainer.device)
    targets = embed_by_label(model, images, lab, transform, trainer.device, cfg.eval.batch_size)
    save_checkpoint({
        "format": FORMAT, "key": key, "config": cfg.guided.master.model_dump(mode="json"),
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "targets": targets, "labels": lab, "history": history, "triplets": len(triplets), "per_pair": triplets.per_pair,
    }, path)  # fmt: skip
    info.update(cached=False, history=history, triplets=len(triplets))
    trainer.guided_stage = info
    return targets
