"""The dmlcore trainer: one RunConfig in, trained embedding model and metrics out.

It talks to the outside world only through a :class:`Reporter`
(``report(step, metrics, checkpoint)``), so it runs alone, in tests, and under any
orchestrator (the sweeper wraps it in a Ray Tune trial that logs to MLflow).

Per epoch: seeded batches from the batch-composition sampler, miner + loss (+
regularisers), one optimiser step per batch (no host sync per step: the running
loss stays on the device until the end of the epoch). Every ``eval.every`` epochs
and after the last: one evaluation pass per split (``test/``, ``val/``) and the
embedding-space metrics on the train embeddings (``train/``). The epoch selected by
``eval.select_on``/``eval.select_metric`` is reported as ``best/...``.

Determinism: every random stream is a function of ``(train.seed, epoch)``, so the
same seed gives the same metrics on the CPU and a run resumed from a checkpoint
continues exactly as the uninterrupted run would have.
"""

from __future__ import annotations

import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Protocol, runtime_checkable

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from . import __version__, distributed, registry
from .config import ConfigError, RunConfig
from .resources import resolve_workers

CHECKPOINT_FORMAT = 1
RESIDENT_GPU_BYTES = 4 << 30
"""In-memory datasets up to this size live on the GPU for the whole run."""
TRAIN_EMBED_BYTES = 2 << 30
"""Largest train-embedding matrix (float64) for the embedding-space metrics; above: whole classes."""
UNIFORMITY_ROWS = 10000
"""Uniformity (O(n^2), not a reference metric) on at most this many train embeddings."""
RHO_AT = (1, 2)
"""``train/rho_spectrum_at_1`` (the paper's, README of the reference) and ``_at_2`` every evaluation."""


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite. ``str(err)`` is one line for the user."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from (other config, unreadable)."""


@runtime_checkable
class Reporter(Protocol):
    """Where the trainer sends its numbers and checkpoints."""

    def report(self, step: int, metrics: Mapping[str, float], checkpoint: dict | None = None) -> None: ...


class NullReporter:
    def report(self, step: int, metrics: Mapping[str, float], checkpoint: dict | None = None) -> None:
        pass


class ListReporter:
    """Keeps every report in memory (tests, notebooks)."""

    def __init__(self) -> None:
        self.reports: list[tuple[int, dict[str, float]]] = []
        self.checkpoints: list[tuple[int, dict]] = []

    def report(self, step: int, metrics: Mapping[str, float], checkpoint: dict | None = None) -> None:
        self.reports.append((step, dict(metrics)))
        if checkpoint is not None:
            self.checkpoints.append((step, checkpoint))


@dataclass
class TrainResult:
    config: RunConfig
    history: list[dict[str, float]] = field(default_factory=list)
    final: dict[str, float] = field(default_factory=dict)
    """Metrics of the last evaluation."""
    best: dict[str, float] = field(default_factory=dict)
    """Metrics of the evaluation selected by ``eval.select_on``."""
    best_epoch: int = 0
    initial: dict[str, float] = field(default_factory=dict)
    """Metrics of the untrained model (``eval.on_init``)."""
    model: torch.nn.Module | None = None

    def to_json(self) -> dict[str, Any]:
        return {"name": self.config.name, "best_epoch": self.best_epoch, "best": self.best,
                "final": self.final, "initial": self.initial, "history": self.history}


# ---------------------------------------------------------------------------------
# seeding and devices
# ---------------------------------------------------------------------------------

def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def epoch_seed(seed: int, epoch: int) -> int:
    """A seed for every random stream of one epoch (stable across processes)."""
    return (int(seed) * 1_000_003 + int(epoch) * 7919) % 2**31


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device={name}: CUDA is not available on this machine")
    return dev


def _set_deterministic(on: bool, device: torch.device) -> None:
    if on:
        if device.type == "cuda":
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    else:
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.benchmark = device.type == "cuda"


# ---------------------------------------------------------------------------------
# schedulers: a small registry of name -> builder(optimizer, epochs, **params)
# ---------------------------------------------------------------------------------

def _step(opt, epochs, step_size: int | None = None, gamma: float = 0.3):
    return torch.optim.lr_scheduler.StepLR(opt, step_size=step_size or max(1, epochs // 3), gamma=gamma)


def _multistep(opt, epochs, milestones: list[int] | None = None, gamma: float = 0.3):
    ms = milestones or [max(1, int(epochs * f)) for f in (0.5, 0.75)]
    return torch.optim.lr_scheduler.MultiStepLR(opt, milestones=ms, gamma=gamma)


def _cosine(opt, epochs, eta_min: float = 0.0):
    return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs, eta_min=eta_min)


def _plateau(opt, epochs, factor: float = 0.1, patience: int = 10, threshold: float = 1e-4, min_lr: float = 0.0):
    """ReduceLROnPlateau on the epoch's mean train loss (Guided DML's student, MyModel_CIFAR10.py:580,617)."""
    return torch.optim.lr_scheduler.ReduceLROnPlateau(
        opt, mode="min", factor=factor, patience=patience, threshold=threshold, min_lr=min_lr
    )


SCHEDULERS = {"step": _step, "multistep": _multistep, "cosine": _cosine, "plateau": _plateau}


def build_scheduler(cfg: RunConfig, opt: torch.optim.Optimizer):
    name = cfg.optim.scheduler
    if name == "none":
        return None
    try:
        return SCHEDULERS[name](opt, cfg.train.epochs, **cfg.optim.scheduler_params)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"optim.scheduler_params: {name} scheduler: {err}") from None


OPTIMIZERS = {
    "adam": lambda groups, c: torch.optim.Adam(groups, lr=c.lr, weight_decay=c.weight_decay),
    "adamw": lambda groups, c: torch.optim.AdamW(groups, lr=c.lr, weight_decay=c.weight_decay),
    "sgd": lambda groups, c: torch.optim.SGD(groups, lr=c.lr, weight_decay=c.weight_decay, momentum=c.momentum),
}


# ---------------------------------------------------------------------------------
# the trainer
# ---------------------------------------------------------------------------------

class Trainer:
    """Trains one run. ``Trainer(cfg).fit()`` is all a user needs."""

    def __init__(
        self,
        cfg: RunConfig,
        reporter: Reporter | None = None,
        progress: bool = True,
        console: Any = None,
    ) -> None:
        self.cfg = cfg
        self.reporter = reporter or NullReporter()
        self.progress = progress
        self.console = console
        self.device = resolve_device(cfg.train.device)
        self.dp: distributed.DataParallel | None = None
        self._built = False
        self.best_embeddings: dict[str, tuple[torch.Tensor, np.ndarray]] | None = None
        self._eval_embeddings: dict[str, tuple[torch.Tensor, np.ndarray]] | None = None  # the last evaluation's
        """Embeddings of the selected evaluation (``eval.pictures``): ``test`` (and ``gallery``
        for closed_set, ``train`` with embedding metrics) -> (embeddings, labels); None when the
        selected epoch came before a resume point (:mod:`dmlcore.pictures` then skips them)."""

    # ---- construction -----------------------------------------------------------
    def build(self) -> "Trainer":
        if self._built:
            return self
        from .data.base import build_data
        from .losses.criterion import build_criterion
        from .models.embedding import build_model

        cfg = self.cfg
        self.dp = distributed.DataParallel.for_trainer(cfg, self.device)  # W > 1 processes: data-parallel
        if self.dp is not None and self.dp.rank != 0:
            self.progress = False
        _set_deterministic(cfg.train.deterministic, self.device)
        seed_everything(cfg.train.seed)
        self.data = build_data(cfg)
        seed_everything(cfg.train.seed)  # model init independent of data building
        self.model = build_model(cfg.model).to(self.device)
        if self.device.type == "cuda" and cfg.train.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.criterion = build_criterion(cfg, self.data.num_train_classes)
        if isinstance(self.criterion, torch.nn.Module):
            self.criterion.to(self.device)
        if hasattr(self.criterion, "tensor_logs"):
            self.criterion.tensor_logs = True  # per-step logs stay on the device
        if hasattr(self.criterion, "check_extra_embeddings"):  # e.g. the auxiliary CRT's embedding
            self.criterion.check_extra_embeddings(getattr(self.model, "extra_embedding_dims", dict)())
        if self.dp is not None:  # SyncBatchNorm (train.sync_bn), rank 0's weights on every rank
            self.model = self.dp.prepare(self.model, self.criterion)
        groups = [{"params": [p for p in self.model.parameters() if p.requires_grad], "name": "model"}]
        from .losses.criterion import loss_param_group

        loss_group = loss_param_group(self.criterion, cfg)
        if loss_group:
            groups.append(loss_group)
        self.optimizer = OPTIMIZERS[cfg.optim.name](groups, cfg.optim)
        self.scheduler = build_scheduler(cfg, self.optimizer)
        m = cfg.batch.samples_per_class
        sampler_name = "random" if m == 0 else cfg.batch.sampler
        self.sampler = registry.build(
            "sampler",
            sampler_name,
            cfg.batch.sampler_params,
            key="batch.sampler_params",
            labels=self.data.train.labels,
            batch_size=cfg.batch.size,
            samples_per_class=m,
            seed=cfg.train.seed,
            iterations=cfg.batch.iterations_per_epoch,
        )
        if self.dp is not None:  # the same global batches on every rank, this rank's slice of each
            self.sampler = self.dp.shard_sampler(self.sampler)
        # Augmentation and the eval transform run on whole uint8 batches on the device.
        self.train_tf = self.data.train.transform.to(self.device)
        self.eval_tf = self.data.test.transform.to(self.device)
        self.train_images = self._resident(self.data.train)
        self.train_labels = torch.as_tensor(self.data.train.labels)
        self.train_loader = None
        if self.train_images is None and not getattr(self.data.train, "can_gather", False):
            self.train_loader = self._loader(self.data.train.uint8(), batch_sampler=self.sampler)
        prepare = getattr(self.criterion, "prepare", None)
        if callable(prepare):  # e.g. Guided DML: train or load the master, store its targets
            prepare(self)
        self.step_model = self.model
        if cfg.train.compile:
            self.step_model = torch.compile(self.model)
        self.amp_dtype = self._amp_dtype()
        self.scaler = torch.amp.GradScaler("cuda") if self.amp_dtype == torch.float16 else None
        self._built = True
        return self

    def _amp_dtype(self) -> torch.dtype | None:
        if not (self.cfg.train.amp and self.device.type == "cuda"):
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16

    def _resident(self, ds: Any) -> torch.Tensor | None:
        """In-memory splits stay one uint8 tensor, on the GPU when it fits (no DataLoader)."""
        imgs = ds.in_memory_images() if hasattr(ds, "in_memory_images") else None
        if imgs is not None and self.device.type == "cuda" and imgs.nbytes < RESIDENT_GPU_BYTES:
            imgs = imgs.to(self.device)
        return imgs

    def _batches(self, epoch: int) -> Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
        """``(uint8 images, labels, positions in the train split)``; positions are None on the
        DataLoader path (file datasets without ``data.cache_dir``)."""
        if self.train_loader is not None:
            for x, y in self.train_loader:
                yield x, y, None
            return
        if self.train_images is None:  # the decoded cache: one bulk read per batch, no workers
            for idx in self.sampler:
                i = torch.as_tensor(idx)
                yield self.data.train.gather(idx), self.train_labels[i], i
            return
        dev = self.train_images.device
        for idx in self.sampler:
            i = torch.as_tensor(idx)
            yield self.train_images[i.to(dev)], self.train_labels[i], i

    def _loader(self, ds: Dataset, **kw: Any) -> DataLoader:
        workers = resolve_workers(self.cfg.data.num_workers)
        extra: dict[str, Any] = {}
        if workers > 0:
            extra.update(persistent_workers=True, prefetch_factor=4, worker_init_fn=_worker_init)
        from .data.images import collate_images  # whole file images differ in size: padded ImageBatch

        return DataLoader(ds, num_workers=workers, pin_memory=self.device.type == "cuda", collate_fn=collate_images, **extra, **kw)

    # ---- state ------------------------------------------------------------------
    def state_dict(self, epoch: int, history: list[dict], best: dict, best_epoch: int) -> dict:
        """A snapshot (tensors copied to the CPU), safe to keep while training goes on."""
        state = _snapshot({
            "format": CHECKPOINT_FORMAT,
            "version": __version__,
            "fingerprint": self.cfg.fingerprint(),
            "config": self.cfg.to_dict(),
            "epoch": epoch,
            "model": self.model.state_dict(),
            "criterion": self.criterion.state_dict() if hasattr(self.criterion, "state_dict") else {},
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler else {},
            "scaler": self.scaler.state_dict() if self.scaler else {},
            "history": history,
            "best": best,
            "best_epoch": best_epoch,
        })
        if best_epoch != epoch and self._has_best(best_epoch):
            # The selected epoch's weights when they are not "model" (Tune keeps only the latest
            # checkpoint); already a CPU copy that is replaced, never changed, at the next best.
            state["best_model"] = self.best_state
        return state

    def _has_best(self, best_epoch: int) -> bool:
        return getattr(self, "best_state", None) is not None and getattr(self, "best_state_epoch", None) == best_epoch

    def load_state_dict(self, state: Mapping[str, Any]) -> tuple[int, list[dict], dict, int]:
        if state.get("format") != CHECKPOINT_FORMAT:
            raise CheckpointError(f"checkpoint format {state.get('format')!r} is not {CHECKPOINT_FORMAT}")
        if state.get("fingerprint") != self.cfg.fingerprint():
            raise CheckpointError(
                "checkpoint was written by another config (fingerprint "
                f"{state.get('fingerprint')} != {self.cfg.fingerprint()}); refusing to resume"
            )
        self.model.load_state_dict(state["model"])
        if state.get("criterion") and hasattr(self.criterion, "load_state_dict"):
            self.criterion.load_state_dict(state["criterion"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler and state.get("scheduler"):
            self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        epoch, best_epoch = int(state["epoch"]), int(state["best_epoch"])
        if state.get("best_model") is not None:  # the selected weights of an earlier epoch
            self.best_state, self.best_state_epoch = _snapshot(state["best_model"]), best_epoch
        elif best_epoch == epoch and best_epoch > 0:  # the checkpoint's own weights are the selected ones
            self.best_state, self.best_state_epoch = _snapshot(state["model"]), best_epoch
        return epoch, list(state["history"]), dict(state["best"]), best_epoch

    # ---- one epoch ----------------------------------------------------------------
    def train_epoch(self, epoch: int, bar: "_Bar") -> dict[str, float]:
        seed = epoch_seed(self.cfg.train.seed, epoch)
        seed_everything(seed)
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)
        if hasattr(self.criterion, "set_epoch"):
            self.criterion.set_epoch(epoch)
        self.model.train()
        total = torch.zeros((), device=self.device)
        n = 0
        logs_sum: dict[str, Any] = {}
        clip = self.cfg.optim.grad_clip
        clip_value = self.cfg.optim.clip_value
        cl = self.device.type == "cuda" and self.cfg.train.channels_last
        gen = torch.Generator().manual_seed(seed if self.dp is None else self.dp.augment_seed(seed))
        for step, (x, y, ids) in enumerate(self._batches(epoch)):
            x = self.train_tf(x.to(self.device, non_blocking=True), gen)
            if cl:
                x = x.contiguous(memory_format=torch.channels_last)
            y = y.to(self.device, non_blocking=True)
            with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None):
                emb = self.step_model(x)
            if ids is not None:
                ids = ids.to(self.device, non_blocking=True)
            extras = self.model.head_embeddings() if hasattr(self.model, "head_embeddings") else None
            if self.dp is not None:  # the loss and the miner see the global batch
                emb, y, ids, x, extras = self.dp.global_batch(emb.float(), y, ids, x, extras)
            if extras:  # the head's extra embeddings (e.g. the auxiliary CRT) get the metric loss too
                loss, logs = self.criterion(emb.float(), y, extra_embeddings=extras, images=x, sample_ids=ids)
            else:
                loss, logs = self.criterion(emb.float(), y, images=x, sample_ids=ids)
            extra = self.model.head_loss() if hasattr(self.model, "head_loss") else None
            if extra is not None:
                loss = loss + extra
            self.optimizer.zero_grad(set_to_none=True)
            if self.scaler is not None:
                self.scaler.scale(loss).backward()
                if self.dp is not None:
                    self.dp.sync_grads(self.optimizer)
                if clip or clip_value:
                    self.scaler.unscale_(self.optimizer)
                    _clip(self.model.parameters(), clip, clip_value)
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                loss.backward()
                if self.dp is not None:
                    self.dp.sync_grads(self.optimizer)
                if clip or clip_value:
                    _clip(self.model.parameters(), clip, clip_value)
                self.optimizer.step()
            if getattr(self.sampler, "needs_embeddings", False):  # rows refreshed per step (R: main.py:269-270)
                self.sampler.update_storage(emb.detach())
            total += loss.detach()
            n += 1
            for k, v in (logs or {}).items():
                logs_sum[k] = logs_sum.get(k, 0.0) + v  # tensors: summed on the device
            bar.advance()
            if step % 25 == 0 and not math.isfinite(float(loss.detach())):
                # Checked sparsely inside the epoch (one sync per 25 steps) and always at its end.
                raise TrainingDiverged(f"loss became {float(loss.detach()):.4g} at epoch {epoch} step {step}")
        mean = float(total) / max(n, 1)
        if not math.isfinite(mean):
            raise TrainingDiverged(f"loss became {mean:.4g} during epoch {epoch}")
        if isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            self.scheduler.step(mean)  # on the epoch's mean train loss
        elif self.scheduler is not None:
            self.scheduler.step()
        out = {"train/loss": mean, "train/lr": self.optimizer.param_groups[0]["lr"]}
        out.update({f"train/{k}": float(v) / max(n, 1) for k, v in logs_sum.items()})
        return out

    # ---- evaluation -------------------------------------------------------------------
    @torch.no_grad()
    def embed(self, ds: Dataset, indices: Iterable[int] | None = None) -> tuple[torch.Tensor, np.ndarray]:
        """Embeddings (float32, CPU) and labels of a dataset (or a subset of it)."""
        if self.dp is not None and not self.dp.local:  # sharded over the ranks, gathered
            return self.dp.embed(self, ds, indices)
        self.model.eval()
        idx = None if indices is None else np.asarray(list(indices), dtype=np.int64)
        labels = np.asarray(ds.labels) if idx is None else np.asarray(ds.labels)[idx]
        bs = self.cfg.eval.batch_size
        imgs = ds.in_memory_images() if hasattr(ds, "in_memory_images") else None
        if imgs is not None:
            if idx is not None:
                imgs = imgs[torch.as_tensor(idx)]
            batches: Iterable = (imgs[a : a + bs] for a in range(0, len(imgs), bs))
        elif getattr(ds, "can_gather", False):  # the decoded cache: bulk reads, no workers
            order = np.arange(len(ds)) if idx is None else idx
            batches = (ds.gather(order[a : a + bs]) for a in range(0, len(order), bs))
        else:
            view = ds.uint8() if idx is None else torch.utils.data.Subset(ds.uint8(), idx.tolist())
            batches = (x for x, _ in self._loader(view, batch_size=bs, shuffle=False))
        outs = []
        cl = self.device.type == "cuda" and self.cfg.train.channels_last
        for x in batches:
            x = self.eval_tf(x.to(self.device, non_blocking=True))
            if cl:
                x = x.contiguous(memory_format=torch.channels_last)
            # Never autocast here: embeddings are computed and L2-normalised in fp32 (as the
            # reference), whatever train.amp does to the training steps.
            outs.append(self.model(x.float()).float())
        emb = torch.cat(outs).cpu() if outs else torch.zeros(0, self.cfg.model.embed_dim)
        return emb, labels

    def evaluate(self) -> dict[str, float]:
        """Metrics of every evaluation split; with W ranks computed by rank 0 on the gathered
        embeddings and the same on every rank (:meth:`dmlcore.distributed.DataParallel.evaluate`)."""
        if self.dp is not None:
            return self.dp.evaluate(self, self._evaluate)
        return self._evaluate()

    def _evaluate(self) -> dict[str, float]:
        from .metrics import embedding_space_metrics, evaluate_embeddings

        ev = self.cfg.eval
        out: dict[str, float] = {}
        t0 = time.perf_counter()
        held: dict[str, tuple[torch.Tensor, np.ndarray]] = {}  # for the pictures (eval.pictures)
        splits = [("test", self.data.test)] + ([("val", self.data.val)] if self.data.val is not None else [])
        if ev.protocol == "closed_set":  # the test images query every train image
            from .metrics import closed_set_metrics

            q, ql = self.embed(self.data.test)
            r, rl = self.embed(self.data.train_eval)
            metrics = closed_set_metrics(q, ql, r, rl, recall_k=ev.recall_k, distance=ev.distance,
                                         clustering=ev.clustering, seed=self.cfg.train.seed)
            out.update({f"test/{k}": float(v) for k, v in metrics.items()})
            splits = []
            held.update(test=(q, ql), gallery=(r, rl))
        for prefix, ds in splits:
            emb, labels = self.embed(ds)
            metrics = evaluate_embeddings(
                emb, labels, recall_k=ev.recall_k, distance=ev.distance, clustering=ev.clustering,
                seed=self.cfg.train.seed,
            )
            out.update({f"{prefix}/{k}": float(v) for k, v in metrics.items()})
            if prefix == "test":
                held["test"] = (emb, labels)
        if ev.embedding_metrics:
            from .metrics.subsample import class_subset

            n = len(self.data.train_eval)
            budget = min(ev.max_train_embed or n, TRAIN_EMBED_BYTES // (8 * max(1, self.cfg.model.embed_dim)))
            idx = None
            if n > budget:  # whole classes, never a uniform draw (singletons would inflate pi_intra)
                idx = class_subset(np.asarray(self.data.train_eval.labels), budget, self.cfg.train.seed)
            emb, labels = self.embed(self.data.train_eval, idx)
            metrics = embedding_space_metrics(
                emb, labels, rho_m=ev.rho_m, rho_at=RHO_AT, uniformity_rows=UNIFORMITY_ROWS, seed=self.cfg.train.seed
            )
            out.update({f"train/{k}": float(v) for k, v in metrics.items()})
            held["train"] = (emb, labels)
        self._eval_embeddings = held if ev.pictures else None
        if "fid" in self.data.info:  # an ooDML split: its train/test shift
            out["data/fid"] = float(self.data.info["fid"])
            out["data/fid_published"] = 1.0 if self.data.info.get("published") else 0.0
        out["time/eval_s"] = time.perf_counter() - t0
        return out

    def _selection_key(self) -> str | None:
        ev = self.cfg.eval
        if ev.select_on == "last":
            return None
        return f"{ev.select_on}/{ev.select_metric}"

    # ---- the loop -------------------------------------------------------------------
    def fit(self, resume: Mapping[str, Any] | str | Path | None = None) -> TrainResult:
        self.build()
        cfg = self.cfg
        history: list[dict[str, float]] = []
        best: dict[str, float] = {}
        best_epoch = 0
        start = 0
        if resume is not None:
            start, history, best, best_epoch = self.load_state_dict(load_checkpoint(resume))
        if getattr(self.sampler, "needs_embeddings", False):  # storage samplers (R: main.py:128-130)
            self.sampler.set_storage(self.embed(self.data.train_eval)[0])
        key = self._selection_key()
        epochs = cfg.train.epochs
        initial: dict[str, float] = {}
        with _Bar(self.progress, epochs, len(self.sampler), start, self.console, cfg.name) as bar:
            if cfg.eval.on_init and start == 0:
                initial = self.evaluate()
                init = {f"init/{k}": v for k, v in initial.items()}
                self.reporter.report(0, {"epoch": 0, **init})
                bar.log_epoch(0, init)
            for epoch in range(start + 1, epochs + 1):
                bar.start_epoch(epoch)
                t0 = time.perf_counter()
                metrics: dict[str, float] = {"epoch": epoch, **self.train_epoch(epoch, bar)}
                metrics["time/epoch_s"] = time.perf_counter() - t0
                if epoch % cfg.eval.every == 0 or epoch == epochs:
                    ev = self.evaluate()
                    metrics.update(ev)
                    if key is not None and key not in ev:
                        raise ConfigError(
                            f"eval.select_metric: '{key}' is not among the evaluation metrics "
                            f"({', '.join(sorted(k for k in ev if k.startswith(cfg.eval.select_on)))})"
                        )
                    if key is None or not best or ev[key] > best.get(key, -math.inf):
                        best, best_epoch = dict(ev), epoch
                        self.best_embeddings = getattr(self, "_eval_embeddings", None)  # the pictures' (eval.pictures)
                        # The selected weights (a CPU copy): few-shot adapts them, the sweeper logs them.
                        self.best_state, self.best_state_epoch = _snapshot(self.model.state_dict()), epoch
                if self.dp is not None:  # rank 0's numbers (its times) on every rank
                    metrics = self.dp.broadcast(metrics)
                history.append(metrics)
                last = epoch == epochs
                if last:
                    if cfg.eval.few_shot is not None:
                        from .oodml.fewshot import run_after_training

                        metrics.update(run_after_training(self))
                    metrics = {**metrics, **{f"best/{k}": v for k, v in best.items()}, "best_epoch": best_epoch}
                ckpt = None
                every = cfg.train.checkpoint_every
                if every and (epoch % every == 0 or last) and (self.dp is None or self.dp.rank == 0):
                    ckpt = self.state_dict(epoch, history, best, best_epoch)
                if self.dp is not None and last:  # every rank reports the same numbers, the same number of times
                    metrics = self.dp.broadcast(metrics)
                self.reporter.report(epoch, metrics, ckpt)
                bar.log_epoch(epoch, metrics)
        final = next((h for h in reversed(history) if any(k.startswith("test/") for k in h)), {})
        final = {k: v for k, v in final.items() if "/" in k and not k.startswith(("time/",))}
        return TrainResult(cfg, history, final, best, best_epoch, initial, self.model)


def _clip(params: Iterable[torch.nn.Parameter], norm: float | None, value: float | None) -> None:
    """``optim.clip_value`` (element-wise, ``clip_grad_value_``) then ``optim.grad_clip`` (global norm)."""
    params = list(params)
    if value:
        torch.nn.utils.clip_grad_value_(params, value)
    if norm:
        torch.nn.utils.clip_grad_norm_(params, norm)


def _snapshot(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, Mapping):
        return {k: _snapshot(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_snapshot(v) for v in obj)
    return obj


def _worker_init(worker_id: int) -> None:
    info = torch.utils.data.get_worker_info()
    seed = (info.seed if info else worker_id) % 2**32
    np.random.seed(seed)
    random.seed(seed)


def load_checkpoint(src: Mapping[str, Any] | str | Path) -> Mapping[str, Any]:
    """A checkpoint dict, or one read from a file with ``weights_only=True``."""
    if isinstance(src, Mapping):
        return src
    path = Path(src)
    if path.is_dir():
        path = path / "checkpoint.pt"
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # unpickling errors come in many types
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(err).__name__}: {err})") from None


def save_checkpoint(state: Mapping[str, Any], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(dict(state), tmp)
    os.replace(tmp, path)  # atomic: a crash never leaves a half-written checkpoint
    return path


def train(cfg: RunConfig, reporter: Reporter | None = None, progress: bool = True,
          resume: Mapping[str, Any] | str | Path | None = None) -> TrainResult:
    """Convenience: ``Trainer(cfg, reporter, progress).fit(resume)``."""
    return Trainer(cfg, reporter, progress).fit(resume)


# ---------------------------------------------------------------------------------
# progress display (rich), silent when progress=False
# ---------------------------------------------------------------------------------

_SHOWN = ("train/loss", "test/recall_at_1", "test/map_at_r", "test/nmi", "val/recall_at_1", "train/rho_spectrum")


class _Bar:
    def __init__(self, enabled: bool, epochs: int, steps: int, start: int, console: Any, name: str) -> None:
        self.enabled = enabled
        self.epochs, self.steps, self.start, self.name = epochs, steps, start, name
        self.console = console
        self._progress = None

    def __enter__(self) -> "_Bar":
        if self.enabled:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

            self.console = self.console or Console()
            self._progress = Progress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                TimeElapsedColumn(), TimeRemainingColumn(), console=self.console, transient=False,
            )
            self._progress.__enter__()
            self._all = self._progress.add_task(f"{self.name}: epochs", total=self.epochs, completed=self.start)
            self._ep = self._progress.add_task("epoch", total=self.steps)
        return self

    def start_epoch(self, epoch: int) -> None:
        if self._progress:
            self._progress.reset(self._ep, total=self.steps, description=f"epoch {epoch}/{self.epochs}")

    def advance(self) -> None:
        if self._progress:
            self._progress.advance(self._ep)

    def log_epoch(self, epoch: int, metrics: Mapping[str, float]) -> None:
        if not self._progress:
            return
        if epoch:
            self._progress.advance(self._all)
        shown = "  ".join(f"{k}={metrics[k]:.4f}" for k in _SHOWN if k in metrics)
        shown = shown or "  ".join(f"{k}={v:.4f}" for k, v in metrics.items() if k.startswith("init/test/recall"))
        self._progress.console.print(f"[dim]epoch {epoch:>3}[/]  {shown}")

    def __exit__(self, *exc: Any) -> None:
        if self._progress:
            self._progress.__exit__(*exc)
