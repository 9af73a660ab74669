"""CIFAR-10 / CIFAR-100 from their python pickles, as in-memory DML datasets.

Train and test images are pooled; the standard (zero-shot) split is the first half of the
classes for training, the second half for testing (0-4 / 5-9, 0-49 / 50-99; CIFAR-100 uses
fine labels). The closed-set split (``data.split: closed``) keeps the published sides:
data_batch_1-5 (50,000 images) as the train / reference side and test_batch (10,000) as the
queries, all classes on both sides (Guided DML's protocol, MyModel_CIFAR10.py:164,177).
"""

from __future__ import annotations

import functools
import pickle
from pathlib import Path
from typing import Any

import numpy as np

from dmlcore.data.base import DATASET_CONTEXT, ArraySource, ClassSplit, DataError, SampleSplit
from dmlcore.data.real import missing
from dmlcore.registry import register

_LAYOUTS = {
    "cifar10": {
        "folder": "cifar-10-batches-py",
        "files": ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch"),
        "test_files": 1,
        "meta": "batches.meta",
        "labels": "labels",
        "names": "label_names",
        "archive": "cifar-10-python.tar.gz",
        "classes": 10,
    },
    "cifar100": {
        "folder": "cifar-100-python",
        "files": ("train", "test"),
        "test_files": 1,
        "meta": "meta",
        "labels": "fine_labels",
        "names": "fine_label_names",
        "archive": "cifar-100-python.tar.gz",
        "classes": 100,
    },
}


def _load_pickle(path: Path, name: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            obj = pickle.load(fh, encoding="bytes")
    except (OSError, pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, ImportError) as err:
        raise DataError(f"{name}: cannot read {path}: {str(err).splitlines()[0] if str(err) else type(err).__name__}") from None
    if not isinstance(obj, dict):
        raise DataError(f"{name}: {path} is not a CIFAR pickle (expected a dict, got {type(obj).__name__})")
    return {k.decode() if isinstance(k, bytes) else str(k): v for k, v in obj.items()}


@functools.lru_cache(maxsize=2)
def _load(name: str, folder: str) -> tuple[np.ndarray, np.ndarray, tuple[str, ...], int]:
    """Images, labels, class names and how many of the images are the published train set."""
    lay = _LAYOUTS[name]
    base = Path(folder)
    xs, ys = [], []
    for f in lay["files"]:
        d = _load_pickle(base / f, name)
        if "data" not in d or lay["labels"] not in d:
            raise DataError(f"{name}: {base / f} lacks the 'data' and '{lay['labels']}' entries")
        x = np.asarray(d["data"])
        y = np.asarray(d[lay["labels"]], dtype=np.int64)
        if x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3 * 32 * 32 or len(x) != len(y):
            raise DataError(f"{name}: {base / f}: expected uint8 data N x 3072 with N labels, got {x.dtype} {x.shape} and {len(y)} labels")
        xs.append(x.reshape(-1, 3, 32, 32))
        ys.append(y)
    meta = _load_pickle(base / lay["meta"], name)
    raw = meta.get(lay["names"])
    if raw is None or len(raw) != lay["classes"]:
        raise DataError(f"{name}: {base / lay['meta']} lacks '{lay['names']}' with {lay['classes']} names")
    names = tuple(n.decode() if isinstance(n, bytes) else str(n) for n in raw)
    x = np.ascontiguousarray(np.concatenate(xs))
    y = np.concatenate(ys)
    if y.min() < 0 or y.max() >= lay["classes"]:
        raise DataError(f"{name}: labels outside 0..{lay['classes'] - 1}")
    x.setflags(write=False)
    y.setflags(write=False)
    return x, y, names, len(y) - sum(len(v) for v in ys[len(ys) - lay["test_files"]:])


def _cifar(name: str, root: str | None) -> ArraySource:
    lay = _LAYOUTS[name]
    hint = f"extract {lay['archive']} there"
    first = lay["files"][0]
    if root is None:
        raise missing(name, f"{lay['folder']}/{first}", None, hint)
    base = Path(root).expanduser()
    for cand in (base / lay["folder"], base):
        if (cand / first).is_file():
            break
    else:
        raise missing(name, f"{lay['folder']}/{first}", base, hint)
    for f in (*lay["files"], lay["meta"]):
        if not (cand / f).is_file():
            raise missing(name, f"{lay['folder']}/{f}", base, hint)
    x, y, names, n_train = _load(name, str(cand.resolve()))
    n = lay["classes"]
    split = ClassSplit(tuple(range(n // 2)), tuple(range(n // 2, n)), "standard")
    closed = SampleSplit(np.arange(n_train), np.arange(n_train, len(y)))
    return ArraySource(name, x, y, dict(enumerate(names)), split, flip_ok=True, closed=closed)


@register("dataset", "cifar10", context=DATASET_CONTEXT)
def cifar10(root: str | None = None) -> ArraySource:
    """CIFAR-10 pickles (60,000 32x32 images pooled): classes 0-4 train, 5-9 test; closed split data_batch_1-5 / test_batch."""
    return _cifar("cifar10", root)


@register("dataset", "cifar100", context=DATASET_CONTEXT)
def cifar100(root: str | None = None) -> ArraySource:
    """CIFAR-100 pickles (60,000 32x32 images pooled, fine labels): classes 0-49 train, 50-99 test."""
    return _cifar("cifar100", root)
