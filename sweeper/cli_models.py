"""``sweeper embed`` and ``sweeper retrieve``: use a run's selected model (:mod:`sweeper.models`).

Both load the model by run id or ``models:/`` URI on any machine (CPU by default), rebuild
the run's eval transform from its logged config, and embed through the trainer's own
``Trainer.embed`` (the code path of the run's evaluation, so ``sweeper embed RUN --data test``
reproduces its logged test metrics).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

SPLITS = ("test", "val", "train")

# (command, note, runs): RUN_ID is a placeholder, so the help test parses them but does not run them
EMBED_EXAMPLES = (
    ("sweeper embed RUN_ID --data test --out emb.npy", "the run's own test split (+ emb.labels.npy)", False),
    ("sweeper embed RUN_ID --data photos/ --out emb.npy", "every image under photos/ (+ emb.paths.txt)", False),
)
RETRIEVE_EXAMPLES = (
    ("sweeper retrieve RUN_ID query.png --gallery photos/ -k 8", "the 8 nearest images under photos/", False),
)


def add_parsers(sub: Any, add_set: Callable[[argparse.ArgumentParser], None]) -> None:
    """Register ``embed`` and ``retrieve`` on the ``sweeper`` subcommand parser."""
    from .cli_help import add_examples

    e = sub.add_parser("embed", help="embed a split or a folder of images with a run's selected model")
    add_examples(e, *EMBED_EXAMPLES)
    e.add_argument("ref", metavar="RUN_ID", help="an MLflow run id, or models:/<model id>, or models:/<name>/<version>")
    e.add_argument("--data", default="test", metavar="SPLIT|DIR",
                   help="test, val or train (the run's own split, from its config), or a folder of images (default: test)")
    e.add_argument("--out", required=True, metavar="FILE.npy", help="where the embeddings go (float32, one row per image)")
    _common(e, add_set)
    r = sub.add_parser("retrieve", help="the nearest gallery images of query images under a run's selected model")
    add_examples(r, *RETRIEVE_EXAMPLES)
    r.add_argument("ref", metavar="RUN_ID", help="an MLflow run id, or models:/<model id>, or models:/<name>/<version>")
    r.add_argument("images", nargs="+", metavar="IMAGE", help="query image files")
    r.add_argument("--gallery", required=True, metavar="DIR", help="a folder of images to search (recursively)")
    r.add_argument("-k", type=int, default=8, help="neighbours per query (default: 8)")
    r.add_argument("--json", action="store_true", help="print the neighbours as JSON")
    _common(r, add_set)


def _common(sp: argparse.ArgumentParser, add_set: Callable[[argparse.ArgumentParser], None]) -> None:
    sp.add_argument("--device", default="cpu", help="where the model runs: cpu (default), cuda, cuda:1, auto")
    sp.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or ./mlflow.db)")
    add_set(sp)  # e.g. --set data.root=/data/CUB_200_2011 when the data lives elsewhere on this machine


# ----------------------------------------------------------------------------- images
class ImageFiles:
    """Image files as a dataset for ``Trainer.embed``: ``(uint8 3 x h x w, 0)`` items, each
    decoded whole with its shorter side at the run's store size (as the run's file images)."""

    def __init__(self, paths: Sequence[Path], short_side: int) -> None:
        self.paths = [Path(p) for p in paths]
        self.short_side = short_side
        self.labels = np.zeros(len(self.paths), dtype=np.int64)

    def __len__(self) -> int:
        return len(self.paths)

    def uint8(self) -> "ImageFiles":
        return self

    def __getitem__(self, i: int) -> tuple[Any, int]:
        import torch

        from dmlcore.data.base import decode_image

        arr = decode_image(str(self.paths[int(i)]), self.short_side)
        return torch.from_numpy(np.array(arr)).permute(2, 0, 1).contiguous(), 0


def image_files(folder: str | Path) -> list[Path]:
    """Every image file under ``folder`` (recursively, sorted); one line if there is none."""
    from dmlcore.data.real import IMAGE_EXTENSIONS

    from .cli import UserError

    root = Path(folder)
    if not root.is_dir():
        raise UserError(f"{folder}: not a folder")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
                   and not p.name.startswith("."))
    if not files:
        raise UserError(f"{folder}: no image files ({', '.join(IMAGE_EXTENSIONS[:3])}, ...)")
    return files


def check_images(paths: Sequence[str | Path]) -> None:
    """Decode every file once: a missing or undecodable one is one line (exit 2), before any work."""
    from dmlcore.data.base import decode_image

    for p in paths:
        decode_image(str(p))


# ----------------------------------------------------------------------------- embedding
def _embedder(args: argparse.Namespace) -> tuple[Any, Any]:
    """``(Trainer holding the selected model, SelectedModel)`` for ``args.ref`` on ``args.device``."""
    from dmlcore.config import parse_overrides
    from dmlcore.train import Trainer, resolve_device

    from .cli import _quiet_logs
    from .models import load_selected

    _quiet_logs()
    device = str(resolve_device(args.device))
    overrides = {**parse_overrides(args.overrides), "train.device": device}
    sel = load_selected(args.ref, args.tracking_uri, device=device, overrides=overrides)
    trainer = Trainer(sel.config, progress=False)
    trainer.model = sel.model
    return trainer, sel


def _eval_tf(trainer: Any) -> Any:
    from dmlcore.data.transforms import eval_transform

    d = trainer.cfg.data
    crop = getattr(_train_aug(trainer.cfg), "eval_crop", None)
    return eval_transform(d.image_size, crop).to(trainer.device)


def _train_aug(cfg: Any) -> Any:
    """The run's augmentation object (only its ``eval_crop`` matters: ``big`` tests at 256, as build_data)."""
    from dmlcore import registry

    d = cfg.data
    return registry.build("augmentation", d.augmentation, d.augmentation_params, key="data.augmentation_params",
                          image_size=d.image_size, flip_ok=True)


def _short_side(cfg: Any) -> int:
    from dmlcore.data.base import store_short_side

    return store_short_side(cfg.data.image_size, cfg.data.store_side)


def embed_files(trainer: Any, paths: Sequence[Path]) -> np.ndarray:
    trainer.eval_tf = _eval_tf(trainer)
    emb, _ = trainer.embed(ImageFiles(paths, _short_side(trainer.cfg)))
    return emb.numpy()


def embed_split(trainer: Any, split: str) -> tuple[np.ndarray, np.ndarray]:
    from dmlcore.data.base import build_data

    from .cli import UserError

    data = build_data(trainer.cfg)
    ds = {"test": data.test, "val": data.val, "train": data.train_eval}[split]
    if ds is None:
        raise UserError(f"--data {split}: the run has no {split} split (data.val_classes is 0)")
    trainer.data = data
    trainer.eval_tf = data.test.transform.to(trainer.device)
    emb, labels = trainer.embed(ds)
    return emb.numpy(), np.asarray(labels)


def cmd_embed(args: argparse.Namespace) -> int:
    from .cli import UserError, _console

    out = Path(args.out)
    if out.suffix != ".npy":
        raise UserError(f"--out {args.out}: expected a .npy file")
    trainer, sel = _embedder(args)
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.data in SPLITS:
        emb, labels = embed_split(trainer, args.data)
        side = out.with_suffix(".labels.npy")
        np.save(side, labels)
        what = f"the run's {args.data} split"
    else:
        files = image_files(args.data)
        emb = embed_files(trainer, files)
        side = out.with_suffix(".paths.txt")
        side.write_text("".join(f"{p}\n" for p in files))
        what = f"{len(files)} images under {args.data}"
    np.save(out, emb.astype(np.float32))
    _console().print(f"{out}: {emb.shape[0]} x {emb.shape[1]} embeddings of {what} "
                     f"(model {sel.model_id}, epoch {sel.epoch}); {side.name} beside it", soft_wrap=True)
    return 0


def cmd_retrieve(args: argparse.Namespace) -> int:
    from rich.table import Table

    from dmlcore.metrics.search import knn

    from .cli import UserError, _console

    if args.k < 1:
        raise UserError(f"-k {args.k}: must be at least 1")
    gallery = image_files(args.gallery)
    check_images(args.images)
    trainer, sel = _embedder(args)
    q = embed_files(trainer, [Path(p) for p in args.images])
    g = embed_files(trainer, gallery)
    dist, idx = knn(q, min(args.k, len(gallery)), gallery=g, distance=trainer.cfg.eval.distance)
    result = [{"query": str(p), "neighbours": [{"rank": r + 1, "path": str(gallery[j]), "distance": round(float(d), 6)}
                                               for r, (d, j) in enumerate(zip(dist[i], idx[i]))]}
              for i, p in enumerate(args.images)]
    console = _console()
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    console.print(f"[dim]model {sel.model_id} (run {sel.run_id}, epoch {sel.epoch}); "
                  f"{trainer.cfg.eval.distance} distance over {len(gallery)} gallery images[/dim]", soft_wrap=True)
    for item in result:
        table = Table(title=f"{item['query']}: {len(item['neighbours'])} nearest", title_justify="left")
        table.add_column("rank", justify="right")
        table.add_column("gallery image")
        table.add_column("distance", justify="right")
        for n in item["neighbours"]:
            table.add_row(str(n["rank"]), n["path"], f"{n['distance']:.4f}")
        console.print(table)
    return 0


COMMANDS = {"embed": cmd_embed, "retrieve": cmd_retrieve}
