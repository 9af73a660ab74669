"""Real DML benchmarks read from a local directory (``data.root``) in their published layouts.

Nothing is downloaded. A missing or malformed directory is one :class:`DataError`
line naming the file that was expected and where.

=============  ==============================================================  ===========================
dataset        layout under ``data.root``                                      standard split
=============  ==============================================================  ===========================
``cub200``     ``CUB_200_2011/{images.txt, image_class_labels.txt,``            classes 1-100 / 101-200
               ``classes.txt, images/}`` (root may also be ``CUB_200_2011``)
``cars196``    ``cars_annos.mat`` + ``car_ims/``                                classes 1-98 / 99-196
``sop``        ``Stanford_Online_Products/{Ebay_train.txt, Ebay_test.txt}``     Ebay_train / Ebay_test
               (root may also be ``Stanford_Online_Products``)
``imagefolder`` ``CLASS/*.jpg|png|...``                                         ``test_classes`` or the last
                                                                                ``test_fraction`` of names
=============  ==============================================================  ===========================
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from dmlcore.data.base import DATASET_CONTEXT, ClassSplit, DataError, FileSource, _preview
from dmlcore.registry import register

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


def missing(name: str, expected: str, root: Any, hint: str) -> DataError:
    """The one-line error for a dataset directory without the expected file."""
    if root is None:
        return DataError(f"{name}: data.root is not set; expected {expected} under it ({hint})")
    return DataError(f"{name}: expected {expected} under {root} ({hint})")


def locate(name: str, root: str | None, folder: str, marker: str, hint: str) -> Path:
    """The dataset folder: ``root/folder`` or ``root`` itself, whichever holds ``marker``."""
    if root is None:
        raise missing(name, f"{folder}/{marker}", None, hint)
    base = Path(root).expanduser()
    for cand in (base / folder, base):
        if (cand / marker).is_file():
            return cand
    raise missing(name, f"{folder}/{marker}", base, hint)


def read_rows(path: Path, ncols: int, what: str, name: str, header: bool = False) -> list[list[str]]:
    """Whitespace-separated rows of ``path`` with at least ``ncols`` fields (the last field
    keeps any spaces); blank lines are skipped; a malformed line is a DataError naming it."""
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError as err:
        raise DataError(f"{name}: cannot read {path}: {err}") from None
    rows = []
    for lineno, line in enumerate(lines, 1):
        if header and lineno == 1 or not line.strip():
            continue
        parts = line.split(maxsplit=ncols - 1)
        if len(parts) < ncols:
            raise DataError(f"{name}: malformed {path} line {lineno}: expected '{what}', got {line.strip()!r}")
        rows.append(parts)
    if not rows:
        raise DataError(f"{name}: {path} has no entries")
    return rows


def to_int(value: str, path: Path, name: str, what: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise DataError(f"{name}: malformed {path}: {what} {value!r} is not an integer") from None


def split_at(classes: Sequence[int], last_train: int, name: str) -> ClassSplit:
    train = tuple(c for c in sorted(classes) if c <= last_train)
    test = tuple(c for c in sorted(classes) if c > last_train)
    if not train or not test:
        raise DataError(
            f"{name}: the standard split needs classes <= {last_train} and > {last_train}; found classes {_preview(sorted(classes))}"
        )
    return ClassSplit(train, test, "standard")


# --------------------------------------------------------------------------------------
# CUB-200-2011
# --------------------------------------------------------------------------------------
@register("dataset", "cub200", context=DATASET_CONTEXT)
def cub200(root: str | None = None, on_corrupt: str = "error") -> FileSource:
    """CUB-200-2011 birds (11,788 images, 200 classes): classes 1-100 train, 101-200 test."""
    name, hint = "cub200", "extract CUB_200_2011.tgz there"
    base = locate(name, root, "CUB_200_2011", "images.txt", hint)
    files = {}
    for f in ("image_class_labels.txt", "classes.txt"):
        if not (base / f).is_file():
            raise missing(name, f"CUB_200_2011/{f}", Path(root).expanduser(), hint)  # type: ignore[arg-type]
        files[f] = base / f
    if not (base / "images").is_dir():
        raise missing(name, "CUB_200_2011/images/", Path(root).expanduser(), hint)  # type: ignore[arg-type]
    images = {to_int(i, base / "images.txt", name, "image id"): p for i, p in read_rows(base / "images.txt", 2, "<image_id> <path>", name)}
    labels = {
        to_int(i, files["image_class_labels.txt"], name, "image id"): to_int(c, files["image_class_labels.txt"], name, "class id")
        for i, c in read_rows(files["image_class_labels.txt"], 2, "<image_id> <class_id>", name)
    }
    names = {
        to_int(c, files["classes.txt"], name, "class id"): n.strip()
        for c, n in read_rows(files["classes.txt"], 2, "<class_id> <name>", name)
    }
    no_label = sorted(set(images) - set(labels))
    if no_label:
        raise DataError(f"{name}: image_class_labels.txt has no class for images {_preview(no_label)} of images.txt")
    ids = sorted(images)
    y = np.asarray([labels[i] for i in ids], dtype=np.int64)
    unnamed = sorted(set(y.tolist()) - set(names))
    if unnamed:
        raise DataError(f"{name}: classes.txt does not name classes {_preview(unnamed)}")
    paths = [str(base / "images" / images[i]) for i in ids]
    return FileSource(name, paths, y, names, split_at(names, 100, name), on_corrupt)


# --------------------------------------------------------------------------------------
# Cars196
# --------------------------------------------------------------------------------------
def _mat_str(v: Any) -> str:
    while isinstance(v, np.ndarray):
        if v.size != 1:
            raise ValueError(f"expected one string, got an array of shape {v.shape}")
        v = v.reshape(-1)[0]
    return str(v)


def _mat_int(v: Any) -> int:
    return int(np.asarray(v).reshape(-1)[0])


@register("dataset", "cars196", context=DATASET_CONTEXT)
def cars196(root: str | None = None, on_corrupt: str = "error") -> FileSource:
    """Stanford Cars196 (16,185 images, 196 classes): classes 1-98 train, 99-196 test."""
    name, hint = "cars196", "put cars_annos.mat there and extract car_ims.tgz next to it"
    if root is None:
        raise missing(name, "cars_annos.mat", None, hint)
    base = Path(root).expanduser()
    mat_path = base / "cars_annos.mat"
    if not mat_path.is_file():
        raise missing(name, "cars_annos.mat", base, hint)
    if not (base / "car_ims").is_dir():
        raise missing(name, "car_ims/", base, hint)
    import scipy.io

    try:
        mat = scipy.io.loadmat(str(mat_path), squeeze_me=True, struct_as_record=True)
    except Exception as err:  # scipy raises several unrelated types for a broken file
        raise DataError(f"{name}: cannot read {mat_path}: {str(err).splitlines()[0] if str(err) else type(err).__name__}") from None
    ann = mat.get("annotations")
    fields = ("relative_im_path", "class")
    if ann is None or getattr(ann, "dtype", None) is None or ann.dtype.names is None or any(f not in ann.dtype.names for f in fields):
        raise DataError(f"{name}: {mat_path} has no 'annotations' struct with fields relative_im_path and class")
    ann = np.atleast_1d(ann)
    try:
        rel = [_mat_str(v) for v in ann["relative_im_path"]]
        y = np.asarray([_mat_int(v) for v in ann["class"]], dtype=np.int64)
    except (ValueError, TypeError, IndexError) as err:
        raise DataError(f"{name}: malformed annotations in {mat_path}: {err}") from None
    if len(rel) == 0:
        raise DataError(f"{name}: {mat_path} has no annotations")
    names: dict[int, str] = {}
    cn = mat.get("class_names")
    if cn is not None:
        for k, v in enumerate(np.atleast_1d(cn).reshape(-1), 1):
            try:
                names[k] = _mat_str(v)
            except ValueError:
                break
    for c in np.unique(y).tolist():
        names.setdefault(int(c), f"class {c}")
    paths = [str(base / r) for r in rel]
    return FileSource(name, paths, y, names, split_at(names, 98, name), on_corrupt)


# --------------------------------------------------------------------------------------
# Stanford Online Products
# --------------------------------------------------------------------------------------
@register("dataset", "sop", context=DATASET_CONTEXT)
def sop(root: str | None = None, on_corrupt: str = "error") -> FileSource:
    """Stanford Online Products (120,053 images, 22,634 classes): Ebay_train classes train, Ebay_test classes test."""
    name, hint = "sop", "extract Stanford_Online_Products.zip there"
    base = locate(name, root, "Stanford_Online_Products", "Ebay_train.txt", hint)
    if not (base / "Ebay_test.txt").is_file():
        raise missing(name, "Stanford_Online_Products/Ebay_test.txt", Path(root).expanduser(), hint)  # type: ignore[arg-type]
    paths: list[str] = []
    labels: list[int] = []
    names: dict[int, str] = {}
    per_file: dict[str, set[int]] = {}
    for fname in ("Ebay_train.txt", "Ebay_test.txt"):
        f = base / fname
        rows = read_rows(f, 4, "image_id class_id super_class_id path", name, header=True)
        seen: set[int] = set()
        for _img, cls, _sup, rel in rows:
            c = to_int(cls, f, name, "class_id")
            rel = rel.strip()
            paths.append(str(base / rel))
            labels.append(c)
            seen.add(c)
            if c not in names:
                names[c] = f"{rel.split('/')[0].removesuffix('_final')}/{c}"
        per_file[fname] = seen
    both = sorted(per_file["Ebay_train.txt"] & per_file["Ebay_test.txt"])
    if both:
        raise DataError(f"{name}: classes {_preview(both)} appear in both Ebay_train.txt and Ebay_test.txt")
    split = ClassSplit(tuple(sorted(per_file["Ebay_train.txt"])), tuple(sorted(per_file["Ebay_test.txt"])), "standard")
    return FileSource(name, paths, np.asarray(labels, dtype=np.int64), names, split, on_corrupt)


# --------------------------------------------------------------------------------------
# ImageFolder
# --------------------------------------------------------------------------------------
@register("dataset", "imagefolder", context=DATASET_CONTEXT)
def imagefolder(
    root: str | None = None,
    on_corrupt: str = "error",
    test_classes: list[str] | None = None,
    test_fraction: float | None = None,
) -> FileSource:
    """Any ROOT/CLASS/*.jpg tree; class ids follow sorted folder names. Test classes: the
    explicit ``test_classes`` (folder names) or the last ``test_fraction`` (default 0.5) of sorted names."""
    name = "imagefolder"
    hint = "one sub-folder of images per class"
    if root is None:
        raise missing(name, "CLASS/*.jpg folders", None, hint)
    base = Path(root).expanduser()
    if not base.is_dir():
        raise missing(name, "CLASS/*.jpg folders", base, hint)
    if test_classes is not None and test_fraction is not None:
        raise DataError(f"{name}: set either data.params.test_classes or data.params.test_fraction, not both")
    classes: list[str] = []
    files: list[list[str]] = []
    for entry in sorted(os.scandir(base), key=lambda e: e.name):
        if not entry.is_dir() or entry.name.startswith("."):
            continue
        imgs = sorted(
            str(Path(entry.path) / f.name)
            for f in os.scandir(entry.path)
            if f.is_file() and f.name.lower().endswith(IMAGE_EXTENSIONS) and not f.name.startswith(".")
        )
        if not imgs:  # a class without samples: say so, never drop it quietly
            exts = ", ".join(IMAGE_EXTENSIONS[:3])
            raise DataError(
                f"{name}: class folder {Path(entry.path)} has no images ({exts}, ...); "
                "add images or remove the folder"
            )
        classes.append(entry.name)
        files.append(imgs)
    if len(classes) < 2:
        raise missing(name, f"at least 2 class folders with images (found {len(classes)})", base, hint)
    ids = {c: k for k, c in enumerate(classes)}
    if test_classes is not None:
        if isinstance(test_classes, str) or not isinstance(test_classes, (list, tuple)):
            raise DataError(f"{name}: data.params.test_classes must be a list of class folder names")
        unknown = [c for c in test_classes if str(c) not in ids]
        if unknown:
            raise DataError(f"{name}: data.params.test_classes names folders not under {base}: {_preview(unknown)}")
        test = sorted(ids[str(c)] for c in test_classes)
    else:
        frac = 0.5 if test_fraction is None else float(test_fraction)
        if not 0 < frac < 1:
            raise DataError(f"{name}: data.params.test_fraction must be in (0, 1), got {test_fraction}")
        n_test = min(len(classes) - 1, max(1, int(round(frac * len(classes)))))
        test = list(range(len(classes) - n_test, len(classes)))
    train = [k for k in range(len(classes)) if k not in set(test)]
    if not train:
        raise DataError(f"{name}: data.params.test_classes leaves no train classes")
    paths = [p for imgs in files for p in imgs]
    labels = np.concatenate([np.full(len(imgs), k, dtype=np.int64) for k, imgs in enumerate(files)])
    split = ClassSplit(tuple(train), tuple(test), "standard")
    return FileSource(name, paths, labels, dict(enumerate(classes)), split, on_corrupt)
