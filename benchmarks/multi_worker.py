"""Multi-worker trials: images/s of N Ray Train workers vs 1 on the same global batch, and
the start-up cost of a multi-worker trial.

Each configuration is one ``TorchTrainer`` run (gloo on CPUs, NCCL with ``--gpu``) of
the dmlcore Trainer, the same config, the same global batch (``batch.size``), measured in
the same process one after the other. Rank 0 times the training epochs after the first
(warm-up) one and reports

* images/s = global batch x steps / training seconds (evaluation not timed),
* start-up = seconds from ``trainer.fit()`` to the first line of the worker function
  (worker processes, process group), and the whole ``fit()`` wall time.

    python benchmarks/multi_worker.py                       # CPU: 1 vs 2 workers, 1 CPU each
    python benchmarks/multi_worker.py --workers 1 2 4 --gpu --backbone resnet50 --image-size 224 \\
        --batch 112                                         # 1 vs N GPUs (goal >= 1.8x at 2)

The trainer is data-parallel inside an initialised process group (``dmlcore/distributed.py``:
each rank trains its slice of the global batch, the loss sees the all-gathered batch), so
the N-worker figure is the real data-parallel throughput.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch


def bench_loop(conf: dict) -> None:
    import ray.train

    from dmlcore.config import RunConfig
    from dmlcore.train import Trainer

    t_start = time.time()
    cfg = RunConfig.model_validate(conf["config"])
    if conf["gpu"]:
        from ray.train.torch import get_device

        torch.cuda.set_device(get_device())
    trainer = Trainer(cfg, progress=False).build()
    times = []
    for epoch in range(1, cfg.train.epochs + 1):
        t0 = time.perf_counter()
        trainer.train_epoch(epoch, _NoBar())
        if conf["gpu"]:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    steps = len(trainer.sampler)
    timed = times[1:] or times
    metrics = {"t_start": t_start, "images_per_s": cfg.batch.size * steps * len(timed) / sum(timed), "steps": steps}
    # Train V2 keeps the metrics of checkpointed reports only: rank 0 reports a tiny one
    with tempfile.TemporaryDirectory() as d:
        ckpt = None
        if ray.train.get_context().get_world_rank() == 0:
            (Path(d) / "m.json").write_text(json.dumps(metrics))
            ckpt = ray.train.Checkpoint.from_directory(d)
        ray.train.report(metrics, checkpoint=ckpt)


class _NoBar:
    def start_epoch(self, epoch: int) -> None: ...
    def advance(self) -> None: ...


def run(workers: int, cfg: dict, cpu: float, gpu: bool) -> dict:
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    per_worker = {"CPU": cpu, **({"GPU": 1.0} if gpu else {})}
    trainer = TorchTrainer(
        bench_loop, train_loop_config={"config": cfg, "gpu": gpu},
        torch_config=TorchConfig(backend="nccl" if gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(num_workers=workers, use_gpu=gpu, resources_per_worker=per_worker),
        run_config=ray.train.RunConfig(name=f"bench-{workers}-{time.time_ns()}", storage_path="/tmp/dml-bench-multi-worker"),
    )
    t0 = time.time()
    result = trainer.fit()
    wall = time.time() - t0
    with result.checkpoint.as_directory() as d:
        m = json.loads((Path(d) / "m.json").read_text())
    return {"workers": workers, "images_per_s": m["images_per_s"], "startup_s": m["t_start"] - t0, "wall_s": wall}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--dataset", default="glyphs")
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--backbone", default="small_cnn")
    ap.add_argument("--batch", type=int, default=64, help="the global batch (batch.size)")
    ap.add_argument("--iterations", type=int, default=20, help="steps per epoch")
    ap.add_argument("--epochs", type=int, default=3, help="the first one is warm-up")
    ap.add_argument("--cpu", type=float, default=1.0, help="CPUs per worker")
    ap.add_argument("--gpu", action="store_true", help="one GPU per worker (NCCL)")
    ap.add_argument("--set", nargs="*", default=[], help="extra dotted overrides")
    args = ap.parse_args()

    import ray

    from dmlcore.config import RunConfig, parse_overrides

    over = {
        "data.dataset": args.dataset, "data.image_size": args.image_size, "data.augmentation": "none",
        "model.backbone": args.backbone, "batch.size": args.batch, "batch.iterations_per_epoch": args.iterations,
        "train.epochs": args.epochs, "train.device": "cuda" if args.gpu else "cpu", "train.checkpoint_every": 0,
        **parse_overrides(args.set),
    }
    cfg = RunConfig().with_overrides(over, "benchmark")
    need = max(args.workers)
    ray.init(num_cpus=max(2, int(need * args.cpu + 0.999)), num_gpus=need if args.gpu else 0,
             include_dashboard=False, log_to_driver=False)
    rows = [run(w, cfg.to_dict(), args.cpu, args.gpu) for w in args.workers]
    ray.shutdown()
    base = rows[0]["images_per_s"]
    print(f"{platform.node()} torch {torch.__version__} ray {ray.__version__}; {args.backbone} {args.image_size}px, "
          f"global batch {args.batch}, {args.iterations} steps/epoch, {'GPU' if args.gpu else f'{args.cpu:g} CPU'}"
          " per worker")
    print(f"{'workers':>7} {'images/s':>10} {'speed-up':>8} {'start-up s':>10} {'fit() s':>8}")
    for r in rows:
        print(f"{r['workers']:>7} {r['images_per_s']:>10.1f} {r['images_per_s'] / base:>8.2f} "
              f"{r['startup_s']:>10.1f} {r['wall_s']:>8.1f}")


if __name__ == "__main__":
    main()
