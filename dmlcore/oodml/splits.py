"""ooDML: class-disjoint train/test splits of increasing distribution shift
(Milbich et al., "Characterizing Generalization under Out-Of-Distribution Shifts in
Deep Metric Learning", NeurIPS 2021).

1. ``class_features``: the mean feature of every class under a fixed encoder (the paper's
   and the default: an ImageNet ResNet-50's pooled features, ``model.pretrained:
   imagenet``; or any backbone, EmbeddingModel or checkpoint; random weights are warned
   about: their FIDs are meaningless).
2. Shift of a split = Fréchet distance between the set of train class means and the set
   of test class means (:func:`dmlcore.oodml.fid.fid_between`).
3. Harder splits by swapping: with ``mu_tr``/``mu_te`` the means of the train/test class
   means, rank train classes by ``d(x, mu_te) - d(x, mu_tr)`` and test classes by
   ``d(x, mu_tr) - d(x, mu_te)`` (ascending: classes lying towards the other side first)
   and swap the top-ranked pair, ``swaps_per_iter`` times per iteration, never moving a
   class back out within ``history`` swaps of moving it in (tabu). Each iteration's
   split and FID are recorded. ``easy_iters`` runs the reversed ranking (easier splits).
4. "R" splits: from the hardest swap split, when a swap no longer raises the FID, the
   proposed classes are *removed* instead (down to ``min_classes`` per side).
5. ``n`` splits spanning the recorded FID range are selected and returned in order of
   non-decreasing FID, or the splits named by the authors' ids (``ids="0,6,16,R18"``,
   :func:`record_id`).

The public reference code (``split_helpers.py`` of the authors' repository) was read to
confirm the ranking, the 2 swaps per iteration and the 5-swap tabu; differences are listed
in ``docs/methods.md``.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from .fid import fid_between

__all__ = ["SplitRecord", "class_features", "make_splits", "split_sequence", "select_splits", "resolve_encoder",
           "record_id", "select_by_ids", "parse_ids", "RANDOM_WARNING"]  # fmt: skip

log = logging.getLogger(__name__)

PAPER_BACKBONE, PAPER_WEIGHTS = "resnet50", "imagenet"
RANDOM_WARNING = ("the split encoder has random weights: its FIDs are meaningless "
                  "(the paper embeds with an ImageNet ResNet-50; give --pretrained FILE or --encoder CKPT)")  # fmt: skip


@dataclass
class SplitRecord:
    train: tuple[int, ...]
    test: tuple[int, ...]
    fid: float
    kind: str  # start | swap | easy | removal
    step: int

    def key(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        return tuple(sorted(self.train)), tuple(sorted(self.test))


# --------------------------------------------------------------------------------------
# features
# --------------------------------------------------------------------------------------
def _feature_fn(encoder: nn.Module, space: str):
    """Map a batch of images to ``B x d`` features."""
    from ..models.heads import global_pool

    if space not in ("backbone", "embedding"):
        raise ValueError(f"space must be 'backbone' or 'embedding', got {space!r}")
    if hasattr(encoder, "backbone") and hasattr(encoder, "head"):
        if space == "backbone":
            return lambda x: global_pool(encoder.backbone(x), "avg")
        return encoder
    def bare(x: torch.Tensor) -> torch.Tensor:  # a bare backbone (feature map) or any B x d module
        out = encoder(x)
        return global_pool(out, "avg") if out.dim() == 4 else out.flatten(1)

    return bare


@torch.no_grad()
def class_features(
    encoder: nn.Module,
    source: Any,
    image_size: int = 32,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    space: str = "backbone",
    max_per_class: int | None = None,
    seed: int = 0,
) -> tuple[np.ndarray, list[int]]:
    """``(C x d class means, class ids)`` of every class of ``source`` under ``encoder``.

    Images go through the eval transform at ``image_size``. ``space='backbone'``
    (default, as the paper) uses the globally average-pooled backbone feature map of an
    EmbeddingModel; ``'embedding'`` its output. ``max_per_class`` caps the samples per
    class (a seeded subset) for large datasets.
    """
    from ..data.base import FileSource, FileStore, LabeledDataset, TensorStore, load_short_side
    from ..data.transforms import eval_transform

    labels = np.asarray(source.labels, dtype=np.int64)
    idx = np.arange(len(labels))
    if max_per_class is not None:
        rng = np.random.default_rng(seed)
        keep = []
        for c in np.unique(labels):
            members = np.flatnonzero(labels == c)
            if len(members) > max_per_class:
                members = np.sort(rng.choice(members, max_per_class, replace=False))
            keep.append(members)
        idx = np.sort(np.concatenate(keep))
    if getattr(source, "in_memory", False):
        store = TensorStore(source.tensor())
    elif isinstance(source, FileSource):
        store = FileStore(source, load_short_side(image_size))
    else:
        raise TypeError(f"{type(source).__name__}: not a dmlcore data Source")
    present = sorted(set(labels[idx].tolist()))
    ds = LabeledDataset(store, idx, labels, present, eval_transform(image_size), "features")
    if str(device) == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    was_training = encoder.training
    encoder.eval().to(device)
    fn = _feature_fn(encoder, space)
    sums: np.ndarray | None = None
    counts = np.zeros(len(present), dtype=np.int64)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=False)
    for x, y in loader:
        f = fn(x.to(device)).double().cpu().numpy()
        if sums is None:
            sums = np.zeros((len(present), f.shape[1]))
        np.add.at(sums, y.numpy(), f)
        counts += np.bincount(y.numpy(), minlength=len(present))
    encoder.train(was_training)
    assert sums is not None
    return sums / counts[:, None], [int(c) for c in present]


# --------------------------------------------------------------------------------------
# the split sequence
# --------------------------------------------------------------------------------------
def _rank(means: np.ndarray, train: list[int], test: list[int], inverse: bool) -> tuple[list[int], list[int]]:
    """Positions (into ``train``/``test``) ordered by the ooDML swap score, best first."""
    xtr, xte = means[train], means[test]
    mu_tr, mu_te = xtr.mean(0), xte.mean(0)
    s_tr = np.linalg.norm(xtr - mu_te, axis=1) - np.linalg.norm(xtr - mu_tr, axis=1)
    s_te = np.linalg.norm(xte - mu_tr, axis=1) - np.linalg.norm(xte - mu_te, axis=1)
    if inverse:
        s_tr, s_te = -s_tr, -s_te
    return list(np.argsort(s_tr, kind="stable")), list(np.argsort(s_te, kind="stable"))


def _propose(means, train, test, tabu_tr, tabu_te, inverse) -> tuple[int, int] | None:
    """Positions ``(i in train, j in test)`` of the next swap, skipping tabu classes."""
    r_tr, r_te = _rank(means, train, test, inverse)
    i = next((p for p in r_tr if train[p] not in tabu_tr), None)
    j = next((p for p in r_te if test[p] not in tabu_te), None)
    return None if i is None or j is None else (int(i), int(j))


def _fid(means, train, test) -> float:
    return fid_between(means[train], means[test])


def split_sequence(
    means: np.ndarray,
    train: Sequence[int],
    test: Sequence[int],
    iters: int = 25,
    swaps_per_iter: int = 2,
    history: int = 5,
    removal_iters: int = 20,
    min_classes: int | None = None,
    easy_iters: int = 0,
) -> list[SplitRecord]:
    """Every split the ooDML procedure visits. ``train``/``test`` are row indices into ``means``.

    A swap phase stops early when it revisits a split (tabu cycles on small datasets).
    ``min_classes`` (default: half the smaller side, at least 2) bounds the R-split removal.
    """
    means = np.asarray(means, dtype=np.float64)
    start_tr, start_te = [int(c) for c in train], [int(c) for c in test]
    if set(start_tr) & set(start_te):
        raise ValueError("train and test overlap")
    if min(len(start_tr), len(start_te)) < 2:
        raise ValueError("ooDML splits need at least 2 train and 2 test classes")
    records = [SplitRecord(tuple(start_tr), tuple(start_te), _fid(means, start_tr, start_te), "start", 0)]

    def swap_phase(kind: str, n_iter: int, inverse: bool) -> tuple[list[int], list[int]]:
        tr, te = list(start_tr), list(start_te)
        # a class moved into a side may not leave it again within `history` swaps
        h = max(0, min(history, len(tr) - 1, len(te) - 1))
        tabu_tr: deque[int] = deque(maxlen=h or None)
        tabu_te: deque[int] = deque(maxlen=h or None)
        for it in range(1, n_iter + 1):
            moved = False
            for _ in range(swaps_per_iter):
                prop = _propose(means, tr, te, tabu_tr if h else (), tabu_te if h else (), inverse)
                if prop is None:
                    break
                i, j = prop
                tr[i], te[j] = te[j], tr[i]
                if h:
                    tabu_tr.append(tr[i])
                    tabu_te.append(te[j])
                moved = True
            key = (tuple(sorted(tr)), tuple(sorted(te)))
            if not moved or key in seen:  # the swaps cycle (small datasets): nothing new to find
                break
            seen.add(key)
            records.append(SplitRecord(tuple(tr), tuple(te), _fid(means, tr, te), kind, it * swaps_per_iter))
        return tr, te

    seen = {records[0].key()}
    if min_classes is None:
        min_classes = max(2, (min(len(start_tr), len(start_te)) + 1) // 2)

    if easy_iters:
        swap_phase("easy", easy_iters, inverse=True)
    swap_phase("swap", iters, inverse=False)

    # "R" splits: start from the hardest split seen so far, swap while it raises the FID,
    # otherwise remove the proposed classes.
    hardest = max((r for r in records if r.kind in ("start", "swap")), key=lambda r: r.fid)
    tr, te, cur = list(hardest.train), list(hardest.test), hardest.fid
    for it in range(1, removal_iters + 1):
        t_tr, t_te, proposed = list(tr), list(te), []
        for _ in range(swaps_per_iter):
            prop = _propose(means, t_tr, t_te, (), (), False)
            if prop is None:
                break
            i, j = prop
            proposed.append((t_tr[i], t_te[j]))
            t_tr[i], t_te[j] = t_te[j], t_tr[i]
        if not proposed:
            break
        new = _fid(means, t_tr, t_te)
        if new > cur + 1e-12:
            tr, te, cur = t_tr, t_te, new
        else:
            drop_tr = {a for a, _ in proposed}
            drop_te = {b for _, b in proposed}
            if len(tr) - len(drop_tr) < min_classes or len(te) - len(drop_te) < min_classes:
                break
            tr = [c for c in tr if c not in drop_tr]
            te = [c for c in te if c not in drop_te]
            cur = _fid(means, tr, te)
        records.append(SplitRecord(tuple(tr), tuple(te), cur, "removal", it))
    return records


def record_id(r: SplitRecord, swaps_per_iter: int = 2) -> str:
    """The authors' split id of a record (``create_dataset_splits.py:74-87,153-164``):
    ``k`` = the split after k swaps (``0`` the standard split), ``-k`` = after k inverse
    (easier) swaps, ``Rk`` = the removal split at the iteration after k swaps
    (``split_helpers.py:178-179``: ids count swaps, ``SWAPS_PER_ITER`` per iteration)."""
    if r.kind == "start":
        return "0"
    if r.kind == "swap":
        return str(r.step)
    if r.kind == "easy":
        return f"-{r.step}"
    return f"R{r.step * swaps_per_iter}"


def parse_ids(ids: str | Sequence[str]) -> list[str]:
    """``"0,6,16,R18"`` -> ``["0", "6", "16", "R18"]`` (validated)."""
    import re

    items = [str(x).strip() for x in (ids.split(",") if isinstance(ids, str) else ids) if str(x).strip()]
    bad = [x for x in items if not re.fullmatch(r"-?\d+|R\d+", x)]
    if not items or bad:
        raise ValueError(f"--ids: expected split ids like 0,6,16,-20,R18 (k swaps, -k easier swaps, Rk removal), got {bad or ids!r}")
    return items


def ids_budget(ids: Sequence[str], swaps_per_iter: int = 2) -> tuple[int, int, int]:
    """``(iters, easy_iters, removal_iters)`` that reach every id (at least the authors'
    25 swap iterations, ``create_dataset_splits.py:31``; removal ``N_SWAPS+10`` = 35, ``:124``)."""
    sw = [int(i) for i in ids if not i.startswith(("R", "-"))]
    ez = [int(i[1:]) for i in ids if i.startswith("-")]
    rm = [int(i[1:]) for i in ids if i.startswith("R")]
    up = lambda v: -(-v // swaps_per_iter)  # noqa: E731
    return (max([25] + [up(v) for v in sw]), max([0] + [up(v) for v in ez]), max([35] + [up(v) + 1 for v in rm]))


def select_by_ids(records: Sequence[SplitRecord], ids: Sequence[str], swaps_per_iter: int = 2) -> list[tuple[str, SplitRecord]]:
    """The records named by the authors' split ids, in the order given."""
    by_id: dict[str, SplitRecord] = {}
    for r in records:
        by_id.setdefault(record_id(r, swaps_per_iter), r)
    out = []
    for i in ids:
        if i not in by_id:
            from .published import did_you_mean

            have = sorted(by_id, key=lambda x: (x[0] == "R", x[0] == "-", int(x.lstrip("R-") or 0)))
            raise ValueError(f"split id '{i}' was not reached{did_you_mean(i, have)} (the procedure stopped early or needs more "
                             f"iterations); reached: {', '.join(have[:12])}{' ...' if len(have) > 12 else ''}")  # fmt: skip
        out.append((i, by_id[i]))
    return out


def select_splits(records: Sequence[SplitRecord], n: int) -> list[SplitRecord]:
    """``n`` distinct splits spanning the FID range, in non-decreasing FID order."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    uniq: dict[Any, SplitRecord] = {}
    for r in records:
        uniq.setdefault(r.key(), r)
    cands = sorted(uniq.values(), key=lambda r: (r.fid, r.kind != "start", r.step))
    if len(cands) <= n:
        return cands
    fids = np.array([r.fid for r in cands])
    chosen: list[int] = []
    for t in np.linspace(fids[0], fids[-1], n):
        order = np.argsort(np.abs(fids - t), kind="stable")
        chosen.append(int(next(k for k in order if k not in chosen)))
    return [cands[k] for k in sorted(chosen)]


# --------------------------------------------------------------------------------------
# encoders and the entry point
# --------------------------------------------------------------------------------------
def resolve_encoder(encoder: Any, cfg: Any, seed: int = 0) -> tuple[nn.Module, str]:
    """``(module, description)`` from ``None`` (``cfg.model``, its ``pretrained`` weights if
    any, else a seeded random init), an ``nn.Module``, a checkpoint path (file or run
    directory) or a registered backbone name."""
    from .. import registry
    from ..models.embedding import build_model

    if isinstance(encoder, nn.Module):
        return encoder, type(encoder).__name__
    if encoder is None and cfg.model.pretrained:
        return build_model(cfg.model), f"{cfg.model.backbone} ({cfg.model.pretrained})"
    if encoder is None:
        # the paper: ImageNet ResNet-50 pooled features (create_dataset_splits.py:52, README "FID (using R50)")
        from ..models.pretrained import ModelError

        try:
            module, _ = registry.build("backbone", PAPER_BACKBONE, None, pretrained=PAPER_WEIGHTS)
            return module, f"{PAPER_BACKBONE} ({PAPER_WEIGHTS})"
        except ModelError as err:
            torch.manual_seed(seed)
            log.warning("%s (%s weights: %s)", RANDOM_WARNING, PAPER_WEIGHTS, str(err).splitlines()[0])
            return build_model(cfg.model), f"{cfg.model.backbone} (random init, seed {seed}; {PAPER_WEIGHTS} weights unavailable)"
    enc = str(encoder)
    if Path(enc).expanduser().exists():
        from ..guided import load_embedding_model

        return load_embedding_model(Path(enc).expanduser()), enc
    if enc in registry.names("backbone"):
        torch.manual_seed(seed)
        if not cfg.model.pretrained:
            log.warning("%s (backbone %s without model.pretrained)", RANDOM_WARNING, enc)
        module, _ = registry.build("backbone", enc, None, pretrained=cfg.model.pretrained)
        return module, enc + (f" ({cfg.model.pretrained})" if cfg.model.pretrained else f" (random init, seed {seed})")
    raise ValueError(
        f"encoder {enc!r} is neither an existing checkpoint path nor a backbone "
        f"({', '.join(registry.names('backbone'))})"
    )


def _as_config(cfg_or_dataset: Any, root: str | None, image_size: int | None, pretrained: str | None = None):
    from ..config import RunConfig, load_config

    if isinstance(cfg_or_dataset, RunConfig):
        cfg = cfg_or_dataset
    elif isinstance(cfg_or_dataset, (str, Path)) and str(cfg_or_dataset).endswith((".yaml", ".yml")):
        cfg = load_config(cfg_or_dataset)
    else:
        cfg = load_config(None, {"data.dataset": str(cfg_or_dataset)})
    over: dict[str, Any] = {}
    if root is not None:
        over["data.root"] = root
    if image_size is not None:
        over["data.image_size"] = int(image_size)
    if pretrained is not None:  # explicit weights: the paper's ResNet-50 unless a run config names a backbone
        over["model.pretrained"] = pretrained
        if not isinstance(cfg_or_dataset, RunConfig) and not str(cfg_or_dataset).endswith((".yaml", ".yml")):
            over["model.backbone"] = PAPER_BACKBONE
    return cfg.with_overrides(over) if over else cfg


def make_splits(
    cfg_or_dataset: Any,
    n: int = 8,
    encoder: Any = None,
    out: str | Path | None = None,
    *,
    root: str | None = None,
    image_size: int | None = None,
    iters: int | None = None,
    swaps_per_iter: int = 2,
    history: int = 5,
    removal_iters: int | None = None,
    easy_iters: int = 0,
    min_classes: int | None = None,
    max_per_class: int | None = None,
    space: str = "backbone",
    device: str = "cpu",
    seed: int = 0,
    batch_size: int = 256,
    ids: str | Sequence[str] | None = None,
    pretrained: str | None = None,
) -> dict[str, Any]:
    """Build ``n`` ooDML splits of increasing FID and (with ``out``) write the split file.

    ``cfg_or_dataset``: a RunConfig, a run-config YAML path, or a dataset name.
    Returns the split-file document ``{"dataset", "encoder", "splits": [{"name",
    "train_classes", "test_classes", "fid", "kind", "step"}, ...]}``; ``data.split:
    FILE.json#INDEX`` reads it back. Default ``iters``: min(25, #classes); default
    ``removal_iters``: iters.
    """
    from ..data.base import ClassSplit, build_source, save_split_file

    cfg = _as_config(cfg_or_dataset, root, image_size, pretrained)
    source = build_source(cfg)
    module, desc = resolve_encoder(encoder, cfg, seed)
    means, class_ids = class_features(
        module, source, cfg.data.image_size, batch_size, device, space, max_per_class, seed
    )
    pos = {c: k for k, c in enumerate(class_ids)}
    std = source.standard_split()
    tr = [pos[c] for c in std.train_classes if c in pos]
    te = [pos[c] for c in std.test_classes if c in pos]
    wanted = parse_ids(ids) if ids is not None else None
    if wanted is not None:
        b_it, b_easy, b_rm = ids_budget(wanted, swaps_per_iter)
        iters = b_it if iters is None else iters
        easy_iters = max(easy_iters, b_easy)
        removal_iters = b_rm if removal_iters is None else removal_iters
    it = int(iters if iters is not None else min(25, len(class_ids)))
    records = split_sequence(
        means, tr, te, iters=it, swaps_per_iter=swaps_per_iter, history=history,
        removal_iters=int(removal_iters if removal_iters is not None else it),
        min_classes=min_classes, easy_iters=easy_iters,
    )  # fmt: skip
    named = select_by_ids(records, wanted, swaps_per_iter) if wanted is not None else None
    chosen = [r for _, r in named] if named is not None else select_splits(records, n)
    splits, extras = [], []
    for k, r in enumerate(chosen):
        splits.append(ClassSplit(
            tuple(sorted(class_ids[i] for i in r.train)), tuple(sorted(class_ids[i] for i in r.test)),
            f"split{k}" if named is None else f"ooDML-{named[k][0]}",
        ))  # fmt: skip
        extras.append({"fid": float(r.fid), "kind": r.kind, "step": int(r.step)}
                      | ({"id": named[k][0]} if named is not None else {}))  # fmt: skip
    doc = {
        "dataset": source.name,
        "encoder": desc,
        "splits": [
            {"name": s.name, "train_classes": list(s.train_classes), "test_classes": list(s.test_classes), **e}
            for s, e in zip(splits, extras)
        ],
    }
    if "random init" in desc:
        doc["warning"] = RANDOM_WARNING
    if out is not None:
        path = save_split_file(out, source.name, splits, extras)
        # keep the encoder description in the file too
        import json

        full = json.loads(path.read_text())
        full["encoder"] = desc
        if "warning" in doc:
            full["warning"] = doc["warning"]
        path.write_text(json.dumps(full, indent=1))
    return doc
