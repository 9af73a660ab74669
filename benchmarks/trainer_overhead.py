"""Trainer overhead: images/s of ``dmlcore`` training vs a minimal hand-written PyTorch loop.

Both train the same model (same init), with the same loss, on the same data, with the
same batch composition (the same sampler's index lists), for the same number of
steps. The baseline is the fastest plain loop one would write by hand: the whole
normalised dataset as one tensor on the device, indexed per batch, forward, loss,
backward, step. Only training steps are timed (no evaluation).

    python benchmarks/trainer_overhead.py [--dataset glyphs] [--image-size 32] [--epochs 3]
    python benchmarks/trainer_overhead.py --backbone resnet50 --pretrained imagenet --image-size 32 --batch 16

``--pretrained imagenet`` loads the backbone's ImageNet file from the torch hub cache and
freezes the BatchNorm statistics (the Roth et al. pipeline); without the real file a
stand-in with the same keys and shapes is written to a temporary TORCH_HOME (same cost).

Prints images/s of each and the ratio dmlcore / baseline (goal: >= 0.95).
"""

from __future__ import annotations

import argparse
import platform
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dataset", default="glyphs")
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--backbone", default="small_cnn")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--pretrained", default=None, help="'imagenet' or a weight file; freezes the BN statistics")
    ap.add_argument("--set", nargs="*", default=[], help="extra dotted overrides for the dmlcore run")
    args = ap.parse_args()
    if args.pretrained == "imagenet":
        import os
        import tempfile

        from dmlcore.models import weights as W

        if W.find(args.backbone) is None:  # no real file: a stand-in in a temporary TORCH_HOME
            os.environ["TORCH_HOME"] = tempfile.mkdtemp(prefix="dml_torch_home_")
            W.write_stand_in(args.backbone)
            print(f"weights: stand-in {W.find(args.backbone)} (random tensors, published keys and shapes)")
        else:
            print(f"weights: {W.find(args.backbone)}")

    from dmlcore.config import load_config, parse_overrides
    from dmlcore.data.transforms import IMAGENET_MEAN, IMAGENET_STD
    from dmlcore.train import Trainer

    over = {
        "data.dataset": args.dataset,
        "data.image_size": args.image_size,
        "data.augmentation": "none",
        "model.backbone": args.backbone,
        "loss.name": "multi_similarity",
        "batch.size": args.batch,
        "batch.samples_per_class": 4,
        "optim.lr": 1e-3,
        "train.epochs": args.epochs,
        "train.device": args.device,
        **({"model.pretrained": args.pretrained, "model.freeze_bn": True} if args.pretrained else {}),
        **parse_overrides(args.set),
    }
    cfg = load_config(None, over)

    # ---- dmlcore ----------------------------------------------------------------------
    import copy

    tr = Trainer(cfg, progress=False).build()
    steps = len(tr.sampler)
    dev = tr.device

    # ---- baseline: hand-written loop on a copy of the same initial model --------------------
    ds = tr.data.train
    x_all = torch.stack([ds.get_uint8(j) for j in range(len(ds))]).to(dev)
    mean = torch.tensor(IMAGENET_MEAN, device=dev).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=dev).view(1, 3, 1, 1)
    x_all = (x_all.float() / 255 - mean) / std
    y_all = torch.as_tensor(ds.labels, device=dev)
    model = copy.deepcopy(tr.model)
    from pytorch_metric_learning.losses import MultiSimilarityLoss

    loss_fn = MultiSimilarityLoss()
    opt = torch.optim.Adam(model.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    model.train()

    def base_epoch(epoch: int) -> None:
        tr.sampler.set_epoch(epoch)
        for idx in list(iter(tr.sampler)):
            i = torch.as_tensor(idx, device=dev)
            loss = loss_fn(model(x_all[i]), y_all[i])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    # warm-up both, then interleave epochs so that load drift on the machine hits both alike
    tr.train_epoch(0, _NoBar())
    base_epoch(0)
    t_dml = t_base = 0.0
    for e in range(1, args.epochs + 1):
        t0 = time.perf_counter()
        tr.train_epoch(e, _NoBar())
        _sync(dev)
        t_dml += time.perf_counter() - t0
        t0 = time.perf_counter()
        base_epoch(e)
        _sync(dev)
        t_base += time.perf_counter() - t0
    n_img = steps * cfg.batch.size * args.epochs

    ips_dml, ips_base = n_img / t_dml, n_img / t_base
    print(f"machine: {platform.machine()} {torch.get_num_threads()} threads, device {dev}, torch {torch.__version__}")
    print(f"workload: {args.dataset} {args.image_size}px, {args.backbone}"
          f"{' (' + str(args.pretrained) + ', frozen BN statistics)' if args.pretrained else ''}, batch {cfg.batch.size}, "
          f"{steps} steps x {args.epochs} epochs")
    print(f"{'':24}{'images/s':>12}{'seconds':>10}")
    print(f"{'baseline (hand loop)':24}{ips_base:>12.0f}{t_base:>10.2f}")
    print(f"{'dmlcore Trainer':24}{ips_dml:>12.0f}{t_dml:>10.2f}")
    print(f"ratio dmlcore/baseline: {ips_dml / ips_base:.3f}  (goal >= 0.95)")


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


class _NoBar:
    def advance(self) -> None:
        pass


if __name__ == "__main__":
    main()
