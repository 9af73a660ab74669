"""MNIST and Fashion-MNIST from their published idx files (gzipped or not), in memory.

``data.root`` holds ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
``t10k-images-idx3-ubyte`` and ``t10k-labels-idx1-ubyte`` (each optionally ``.gz``), directly
or under torchvision's ``MNIST/raw`` / ``FashionMNIST/raw``. The 28x28 grey images are stored
as three identical channels (the platform's image contract). The standard (zero-shot) split
is classes 0-4 / 5-9; the closed-set split (``data.split: closed``) keeps the published sides:
the 60,000 train images as reference, the 10,000 t10k images as queries (Guided DML,
MyModel_MNIST.py / MyModel_Fashion.py).
"""

from __future__ import annotations

import functools
import gzip
from pathlib import Path

import numpy as np

from dmlcore.data.base import DATASET_CONTEXT, ArraySource, ClassSplit, DataError, SampleSplit
from dmlcore.data.real import missing
from dmlcore.registry import register

FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
_FOLDERS = {"mnist": "MNIST/raw", "fashion_mnist": "FashionMNIST/raw"}
_NAMES = {
    "mnist": tuple(str(k) for k in range(10)),
    "fashion_mnist": ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"),
}


def read_idx(path: Path, name: str) -> np.ndarray:
    """An idx file (``.gz`` or not) as a uint8 array; one-line :class:`DataError` when malformed."""
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile) as err:
        raise DataError(f"{name}: cannot read {path}: {str(err).splitlines()[0] if str(err) else type(err).__name__}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataError(f"{name}: {path} is not a uint8 idx file (bad magic number)")
    ndim = raw[3]
    if len(raw) < 4 + 4 * ndim:
        raise DataError(f"{name}: {path} is truncated (header)")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    body = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise DataError(f"{name}: {path} holds {body.size} values, its header says {shape}")
    return body.reshape(shape)


def _find(base: Path, folder: str, stem: str) -> Path | None:
    for cand in (base, base / folder):
        for f in (cand / stem, cand / f"{stem}.gz"):
            if f.is_file():
                return f
    return None


@functools.lru_cache(maxsize=2)
def _load(name: str, root: str) -> tuple[np.ndarray, np.ndarray, int]:
    base = Path(root)
    paths = []
    for stem in FILES:
        p = _find(base, _FOLDERS[name], stem)
        if p is None:
            raise missing(name, f"{stem}[.gz]", base, "the four idx files of the published dataset")
        paths.append(p)
    xtr, ytr, xte, yte = (read_idx(p, name) for p in paths)
    for x, y, p in ((xtr, ytr, paths[0]), (xte, yte, paths[2])):
        if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
            raise DataError(f"{name}: {p}: expected N x H x W images with N labels, got {x.shape} and {y.shape}")
    x = np.concatenate([xtr, xte])
    y = np.concatenate([ytr, yte]).astype(np.int64)
    if y.max(initial=0) > 9:
        raise DataError(f"{name}: labels outside 0..9")
    x = np.ascontiguousarray(np.repeat(x[:, None], 3, axis=1))
    x.setflags(write=False)
    y.setflags(write=False)
    return x, y, len(ytr)


def _mnist(name: str, root: str | None) -> ArraySource:
    if root is None:
        raise missing(name, f"{FILES[0]}[.gz]", None, "the four idx files of the published dataset")
    x, y, n_train = _load(name, str(Path(root).expanduser().resolve()))
    split = ClassSplit((0, 1, 2, 3, 4), (5, 6, 7, 8, 9), "standard")
    closed = SampleSplit(np.arange(n_train), np.arange(n_train, len(y)))
    return ArraySource(name, x, y, dict(enumerate(_NAMES[name])), split, flip_ok=False, closed=closed)


@register("dataset", "mnist", context=DATASET_CONTEXT)
def mnist(root: str | None = None) -> ArraySource:
    """MNIST idx files (70,000 28x28 digits): classes 0-4 train, 5-9 test; closed split train / t10k."""
    return _mnist("mnist", root)


@register("dataset", "fashion_mnist", context=DATASET_CONTEXT)
def fashion_mnist(root: str | None = None) -> ArraySource:
    """Fashion-MNIST idx files (70,000 28x28 images): classes 0-4 train, 5-9 test; closed split train / t10k."""
    return _mnist("fashion_mnist", root)
