"""Data-parallel training and exact distributed evaluation for the dmlcore trainer.

When ``torch.distributed`` is initialised with more than one process at
``Trainer.build()`` (the caller, e.g. a Ray Train worker or a test's spawned gloo
process, has set up the process group and the device), the trainer runs data-parallel
through a :class:`DataParallel` helper, with no other argument. One place per concept:

* **The global batch keeps its composition.** Every rank builds the *same* seeded batch
  sampler (m-per-class, class_random, storage samplers, ...) and takes the strided slice
  ``idx[rank::W]`` of each global batch (:class:`ShardedBatchSampler`); the slices are
  disjoint and their union is the global batch. ``batch.size`` must be a multiple of the
  world size W (one ``ConfigError`` line otherwise).
* **The loss and the miner see the global batch.** Each rank's embeddings go through
  :func:`all_gather_with_grad`, labels and sample ids through a plain all-gather; the rows
  are put back into the sampler's global order (:func:`global_order`), so the miner (seeded
  identically on every rank, ``set_epoch``) draws exactly what a single process would.
  Method: an ``autograd.Function`` on the public ``dist.all_gather``/``dist.all_reduce``
  whose backward *sums* the gathered gradient over the ranks and returns the rank's own rows
  -- the semantics of ``torch.distributed.nn.functional.all_gather`` (method (a) of
  ``../shared/notes/ddp_in_tune.md`` section 3, deprecated with a FutureWarning in torch 2.14)
  without its deprecation, and without the private ``_functional_collectives`` module of
  method (b). Method (c) (no-grad gather, local rows put back, loss times W) was not chosen:
  the factor W is right for the model but gives the criterion's own parameters, which see
  the whole global batch on every rank, W times their gradient.
* **Gradient scaling (why the result is the 1-process gradient).** Every rank computes the
  same global loss L. Model parameters: the gather's backward gives rank r
  ``sum_k dL/de_r = W * dL/de_r`` for its rows, so its model gradient is ``W * g_r`` with
  ``g_r`` the share of its slice; the mean over ranks is ``sum_r g_r = dL/dtheta``.
  Criterion parameters (proxies, class weights, a learned beta): each rank has the full
  ``dL/dp`` already, and the mean of W equal values is that value. So one all-reduce
  *mean* over every optimiser parameter (:meth:`DataParallel.sync_grads`) gives exactly the
  1-process gradient for both, and keeps the criterion's parameters in sync on every rank.
  Measured in the notes for all three methods: max|d grad| = 8.9e-8 (2 workers vs 1
  process); the control (c) without the factor W is off by 0.21, a local-only loss by 0.14.
  The gradients are averaged after the backward pass in one flat all-reduce (not DDP's
  bucketed hooks): no unused-parameter errors, works with ``torch.compile``, and the model's
  parameters and buffers are broadcast from rank 0 once at build.
* **BatchNorm.** Frozen BN (``model.freeze_bn``, the Roth protocol's ResNet-50) needs
  nothing: it normalises with fixed statistics, so a 2-worker step equals the 1-worker
  step. Training BN normalises each rank's slice with the slice's statistics (as DDP does),
  and the running statistics used at evaluation and saved in checkpoints are rank 0's
  (broadcast before every evaluation: DDP's ``broadcast_buffers`` convention).
  ``train.sync_bn: true`` converts them to ``SyncBatchNorm`` (global-batch statistics;
  CUDA only, refused on CPU workers).
* **Augmentation** draws its random crops per rank from a stream seeded by
  ``(seed, epoch, rank)``: the same distribution as one process, not the same draws.
* **Head extras.** Extra embeddings of a head (the auxiliary CRT) are gathered like the
  main one; a head's extra loss term (``head_loss``) is computed on the local slice and
  averaged over the ranks with the gradients. Regularisers that need the batch images
  (``needs_images``, e.g. relational distillation) get the gathered images.

Exact evaluation (:meth:`DataParallel.evaluate`): rank 0 runs the single-process
evaluation; each of its embedding passes is broadcast as a request, every rank embeds the
strided shard ``idx[rank::W]`` with the unwrapped model, the shards (sizes exchanged,
padded) are gathered to rank 0, padding stripped and the order restored, so rank 0
computes every metric (R@k, mAP@R, NMI, pi, rho) on exactly the embeddings one process
would have. The metrics are then broadcast: every rank returns the same dict, so the
selection of the best epoch agrees everywhere (notes section 4: Recall@1 equal, max|d emb|
2.1e-7; ``DistributedSampler`` is not used, it pads by repeating samples). Embedding passes
outside an evaluation (the storage samplers' train embeddings) are all-gathered to every
rank. Every embedding pass is a collective call: all ranks make it, in the same order (the
trainer does); code that embeds on one rank only wraps it in
:meth:`DataParallel.local_embedding`.

:func:`rank` and :func:`world_size` tell a reporter who logs (0 and 1 without a process
group).
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping

import numpy as np
import torch
import torch.distributed as dist

from .config import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    from .config import RunConfig


# ---------------------------------------------------------------------------------
# rank and world
# ---------------------------------------------------------------------------------

def is_active() -> bool:
    """True inside an initialised process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    """Number of processes of the group (1 without a process group)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def comm_device() -> torch.device:
    """Where tensors must live for the group's collectives (NCCL: this rank's GPU)."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# ---------------------------------------------------------------------------------
# collectives
# ---------------------------------------------------------------------------------

class _AllGather(torch.autograd.Function):
    """Concatenation of every rank's (equal-sized) tensor; the backward sums the gathered
    gradient over the ranks and returns this rank's rows."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        ctx.n = x.shape[0]
        return torch.cat(parts)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        r = dist.get_rank()
        return grad[r * ctx.n : (r + 1) * ctx.n]


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Every rank's ``x`` (same shape on all ranks) in rank order, differentiable."""
    return _AllGather.apply(x)


def all_gather_nograd(x: torch.Tensor) -> torch.Tensor:
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def global_order(n: int, world: int) -> torch.Tensor:
    """Rows of ``cat(idx[0::W], idx[1::W], ...)`` in the order of ``idx`` (``n % W == 0``)."""
    p = torch.arange(n)
    return (p % world) * (n // world) + p // world


def shard(n: int, rank_: int, world: int, indices: np.ndarray | None = None) -> np.ndarray:
    """This rank's strided shard of ``indices`` (default ``arange(n)``)."""
    idx = np.arange(n, dtype=np.int64) if indices is None else np.asarray(indices, dtype=np.int64)
    return idx[rank_::world]


def gather_rows(local: torch.Tensor, dst: int | None = 0) -> torch.Tensor | None:
    """Concatenate the ranks' row blocks (any sizes) in rank order: on rank ``dst`` only
    (None elsewhere), or on every rank when ``dst`` is None. Sizes are exchanged, blocks
    padded to the largest, gathered, and the padding stripped."""
    dev, world = comm_device(), dist.get_world_size()
    local = local.to(dev).contiguous()
    n = torch.tensor([local.shape[0]], device=dev, dtype=torch.int64)
    sizes_t = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes_t, n)
    sizes = [int(s) for s in sizes_t]
    padded = torch.zeros((max(sizes), *local.shape[1:]), dtype=local.dtype, device=dev)
    padded[: local.shape[0]] = local
    if dst is None:
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded)
    else:
        parts = [torch.empty_like(padded) for _ in range(world)] if dist.get_rank() == dst else None
        dist.gather(padded, parts, dst=dst)
        if parts is None:
            return None
    return torch.cat([p[:s] for p, s in zip(parts, sizes)])


def unshard(rows: torch.Tensor, world: int) -> torch.Tensor:
    """Rows gathered as ``cat(shard_0, ..., shard_{W-1})`` (strided shards) back in the original order."""
    n = rows.shape[0]
    order = torch.as_tensor(np.concatenate([np.arange(n)[r::world] for r in range(world)]), dtype=torch.long)
    out = torch.empty_like(rows)
    out[order.to(rows.device)] = rows
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` of rank ``src`` on every rank (pickled)."""
    box = [obj if dist.get_rank() == src else None]
    dist.broadcast_object_list(box, src=src, device=comm_device() if dist.get_backend() == "nccl" else None)
    return box[0]


# ---------------------------------------------------------------------------------
# the sampler
# ---------------------------------------------------------------------------------

class ShardedBatchSampler:
    """Wraps a batch sampler: the same seeded global batches on every rank, this rank's
    slice ``idx[rank::W]`` of each. Everything else (``set_epoch``, the storage samplers'
    ``needs_embeddings``/``set_storage``/``update_storage``, ...) goes to the wrapped sampler."""

    def __init__(self, sampler: Any, rank_: int, world: int) -> None:
        self.sampler, self.rank, self.world = sampler, int(rank_), int(world)

    def __iter__(self) -> Iterator[list[int]]:
        for idx in self.sampler:
            idx = list(idx)
            if len(idx) % self.world:
                raise ConfigError(_indivisible(len(idx), self.world, "a batch of the sampler has"))
            yield idx[self.rank :: self.world]

    def __len__(self) -> int:
        return len(self.sampler)

    def __getattr__(self, name: str) -> Any:
        if name == "sampler":  # not set yet (unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.sampler, name)


def _indivisible(size: int, world: int, what: str = "batch.size=") -> str:
    lead = f"batch.size={size}" if what == "batch.size=" else f"{what} {size} samples, which"
    return (f"{lead} is not divisible by the {world} workers of this trial (each worker trains on an equal "
            f"slice of the global batch); use a multiple of {world}")


# ---------------------------------------------------------------------------------
# the trainer's helper
# ---------------------------------------------------------------------------------

class DataParallel:
    """What the trainer does differently with W > 1 processes (see the module docstring)."""

    def __init__(self, cfg: "RunConfig", device: torch.device) -> None:
        self.rank, self.world = rank(), world_size()
        self.device = device
        if cfg.batch.size % self.world:
            raise ConfigError(_indivisible(cfg.batch.size, self.world))
        if cfg.train.sync_bn and device.type != "cuda":
            raise ConfigError(
                f"train.sync_bn: SyncBatchNorm runs on CUDA only, and this trial's workers are on {device.type}; "
                "set train.sync_bn: false (each CPU worker then normalises its own slice)"
            )
        self.sync_bn = bool(cfg.train.sync_bn)
        self.serving = False
        """True on rank 0 while it runs an evaluation whose embedding passes the others serve."""
        self.local = False
        """True while this rank embeds its own shard (the trainer's embed then runs as usual)."""
        self.needs_images = False

    @classmethod
    def for_trainer(cls, cfg: "RunConfig", device: torch.device) -> "DataParallel | None":
        return cls(cfg, device) if is_active() else None

    # ---- build ----------------------------------------------------------------------
    def prepare(self, model: torch.nn.Module, criterion: Any) -> torch.nn.Module:
        """SyncBatchNorm (``train.sync_bn``), then rank 0's parameters and buffers everywhere."""
        if self.sync_bn:
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        parts = [model] + ([criterion] if isinstance(criterion, torch.nn.Module) else [])
        for part in parts:
            for t in list(part.parameters()) + list(part.buffers()):
                self._broadcast_tensor(t.data)
        self.needs_images = _needs_images(criterion)
        return model

    def shard_sampler(self, sampler: Any) -> ShardedBatchSampler:
        return ShardedBatchSampler(sampler, self.rank, self.world)

    def augment_seed(self, seed: int) -> int:
        """The augmentation stream of this rank in an epoch seeded ``seed``."""
        return (int(seed) + 104_729 * self.rank) % 2**31

    # ---- one step --------------------------------------------------------------------
    def global_batch(
        self, emb: torch.Tensor, labels: torch.Tensor, ids: torch.Tensor | None, images: torch.Tensor,
        extras: Mapping[str, tuple[torch.Tensor, float]] | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None, dict | None]:
        """The global batch, in the sampler's order: embeddings (with gradient), labels,
        sample ids, images (only when the criterion needs them, else None) and extras."""
        order = global_order(emb.shape[0] * self.world, self.world).to(emb.device)
        g_emb = all_gather_with_grad(emb)[order]
        g_lab = all_gather_nograd(labels)[order.to(labels.device)]
        g_ids = None if ids is None else all_gather_nograd(ids)[order.to(ids.device)]
        g_img = all_gather_nograd(images.detach())[order.to(images.device)] if self.needs_images else None
        g_ext = None
        if extras:
            g_ext = {k: (all_gather_with_grad(e.float())[order.to(e.device)], w) for k, (e, w) in extras.items()}
        return g_emb, g_lab, g_ids, g_img, g_ext

    def sync_grads(self, optimizer: torch.optim.Optimizer) -> None:
        """Mean over the ranks of every optimiser parameter's gradient, in one flat all-reduce
        per dtype (the exact 1-process gradient: module docstring)."""
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for gr in grads:
            by_dtype.setdefault(gr.dtype, []).append(gr)
        for group in by_dtype.values():
            flat = torch.cat([gr.reshape(-1) for gr in group])
            dev = flat.device
            flat = flat.to(comm_device())
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            flat = flat.to(dev).div_(self.world)
            a = 0
            for gr in group:
                gr.copy_(flat[a : a + gr.numel()].view_as(gr))
                a += gr.numel()

    # ---- evaluation ------------------------------------------------------------------
    def sync_buffers(self, model: torch.nn.Module) -> None:
        """Rank 0's buffers (BatchNorm running statistics) on every rank."""
        for b in model.buffers():
            self._broadcast_tensor(b.data)

    def evaluate(self, trainer: Any, run: Callable[[], dict[str, float]]) -> dict[str, float]:
        """``run()`` (the single-process evaluation) on rank 0, its embedding passes served by
        every rank; the metrics on every rank."""
        self.sync_buffers(trainer.model)
        if self.rank == 0:
            self.serving = True
            try:
                out = run()
            except BaseException as err:
                self.serving = False
                broadcast_object(("error", type(err).__name__, str(err)))
                raise
            self.serving = False
            return broadcast_object(("done", out))[1]
        while True:
            msg = broadcast_object(None)
            if msg[0] == "embed":
                self._gathered(trainer, _dataset(trainer, msg[1]), msg[2], dst=0)
            elif msg[0] == "done":
                return msg[1]
            else:
                error = ConfigError if msg[1] == "ConfigError" else RuntimeError
                raise error(msg[2] if msg[1] == "ConfigError" else f"rank 0 failed during evaluation: {msg[1]}: {msg[2]}")

    def embed(self, trainer: Any, ds: Any, indices: Any) -> tuple[torch.Tensor, np.ndarray]:
        """The trainer's ``embed`` with W ranks: inside an evaluation, a request served by
        every rank and gathered to rank 0; outside, a collective call gathered to every rank."""
        indices = None if indices is None else np.asarray(list(indices), dtype=np.int64)
        if self.serving:
            broadcast_object(("embed", _dataset_name(trainer, ds), indices))
            return self._gathered(trainer, ds, indices, dst=0)
        return self._gathered(trainer, ds, indices, dst=None)

    @contextlib.contextmanager
    def local_embedding(self) -> Iterator[None]:
        """Inside: the trainer's ``embed`` embeds on this rank alone, no collective (e.g. rank 0
        embedding after training while the other ranks do something else)."""
        before, self.local = self.local, True
        try:
            yield
        finally:
            self.local = before

    def _gathered(self, trainer: Any, ds: Any, indices: Any, dst: int | None) -> tuple[torch.Tensor, np.ndarray]:
        idx = None if indices is None else np.asarray(list(indices), dtype=np.int64)
        mine = shard(len(ds), self.rank, self.world, idx)
        with self.local_embedding():
            emb, _ = trainer.embed(ds, mine)
        rows = gather_rows(emb, dst=dst)
        labels = np.asarray(ds.labels) if idx is None else np.asarray(ds.labels)[idx]
        if rows is None:
            return emb[:0], labels
        return unshard(rows, self.world).cpu(), labels

    # ---- reporting -------------------------------------------------------------------
    def broadcast(self, obj: Any) -> Any:
        return broadcast_object(obj)

    def _broadcast_tensor(self, t: torch.Tensor) -> None:
        dev = comm_device()
        if t.device == dev:
            dist.broadcast(t, src=0)
        else:
            tmp = t.to(dev)
            dist.broadcast(tmp, src=0)
            t.copy_(tmp.to(t.device))


def _needs_images(criterion: Any) -> bool:
    parts = [getattr(criterion, "loss", None), getattr(criterion, "miner", None),
             *getattr(criterion, "_regs", {}).values()]
    return any(getattr(p, "needs_images", False) for p in parts)


def _dataset_name(trainer: Any, ds: Any) -> str:
    for name, value in vars(trainer.data).items():
        if value is ds:
            return name
    raise RuntimeError(f"distributed evaluation: the dataset {type(ds).__name__} is not a split of the trainer's data")


def _dataset(trainer: Any, name: str) -> Any:
    return getattr(trainer.data, name)


__all__ = [
    "DataParallel", "ShardedBatchSampler", "all_gather_nograd", "all_gather_with_grad", "broadcast_object",
    "comm_device", "gather_rows", "global_order", "is_active", "rank", "shard", "unshard", "world_size",
]
