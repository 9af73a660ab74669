"""Data contracts and the one entry point, :func:`build_data`.

A dataset is a :class:`Source` (registry ``dataset``): one class id per sample, the
class names, ``get_image(i)`` and the dataset's published class split. A run sees it
through a :class:`DataBundle` of class-disjoint :class:`LabeledDataset` splits
(``train`` augmented, ``train_eval`` / ``val`` / ``test`` with the eval transform),
each yielding ``(float32 tensor 3xHxW, int label)`` with labels remapped to
``0..C-1`` within the split.

In-memory sources (glyphs, digits, CIFAR) are materialised once as one uint8 tensor
``N x 3 x H x W`` that every split indexes into; file-based sources are decoded per
item with PIL, kept whole (shorter side resized to ``data.store_side``, by default 1.5 x
``round(image_size * 256 / 224)``, aspect ratio kept; the crops are left to the
transforms), optionally through a node-local cache of decoded images.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from .errors import CorruptImageError, DataError
from .images import ImageBatch, collate_images, cut_long_side, stack_images, stored_size

if TYPE_CHECKING:  # pragma: no cover
    from dmlcore.config import RunConfig

log = logging.getLogger("dmlcore.data")

# The context every dataset factory may ask for (see docs/architecture.md).
DATASET_CONTEXT = ("root", "image_size", "seed", "on_corrupt")


def stable_seed(*parts: Any) -> int:
    """A process-independent 63-bit seed from strings/ints (``hash()`` is salted per process)."""
    h = hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(h[:8], "little") >> 1


def _u64(seed: int) -> int:
    return int(seed) & 0xFFFF_FFFF_FFFF_FFFF


def _preview(items: Iterable[Any], n: int = 5) -> str:
    items = list(items)
    head = ", ".join(str(x) for x in items[:n])
    return head + (f" (and {len(items) - n} more)" if len(items) > n else "")


# --------------------------------------------------------------------------------------
# Class splits
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ClassSplit:
    """An explicit, class-disjoint split of original class ids."""

    train_classes: tuple[int, ...]
    test_classes: tuple[int, ...]
    name: str = "standard"

    def __post_init__(self) -> None:
        tr = self._ids(self.train_classes, "train_classes")
        te = self._ids(self.test_classes, "test_classes")
        for ids, what in ((tr, "train_classes"), (te, "test_classes")):
            if not ids:
                raise DataError(f"split '{self.name}': {what} is empty")
            if len(set(ids)) != len(ids):
                dup = sorted({c for c in ids if ids.count(c) > 1})
                raise DataError(f"split '{self.name}': {what} repeats classes {_preview(dup)}")
        both = sorted(set(tr) & set(te))
        if both:
            raise DataError(
                f"split '{self.name}': {len(both)} classes are both train and test classes: {_preview(both)}"
            )
        object.__setattr__(self, "train_classes", tr)
        object.__setattr__(self, "test_classes", te)

    def _ids(self, ids: Iterable[Any], what: str) -> tuple[int, ...]:
        out = []
        for c in ids:
            if isinstance(c, (bool, np.bool_)) or not isinstance(c, (int, np.integer)):
                raise DataError(f"split '{self.name}': {what} must be integer class ids, got {c!r}")
            out.append(int(c))
        return tuple(out)


CLOSED_SPLIT = "closed"
"""``data.split`` value of the closed-set split kind."""


@dataclass(frozen=True)
class SampleSplit:
    """A closed-set split: disjoint *samples* of the same classes (source sample indices)."""

    train_indices: np.ndarray
    test_indices: np.ndarray
    name: str = CLOSED_SPLIT

    def __post_init__(self) -> None:
        tr = np.asarray(self.train_indices, dtype=np.int64)
        te = np.asarray(self.test_indices, dtype=np.int64)
        if not len(tr) or not len(te):
            raise DataError(f"split '{self.name}': the {'train' if not len(tr) else 'test'} side is empty")
        if np.intersect1d(tr, te).size:
            raise DataError(f"split '{self.name}': {np.intersect1d(tr, te).size} samples are on both sides")
        object.__setattr__(self, "train_indices", tr)
        object.__setattr__(self, "test_indices", te)


def stratified_sample_split(labels: np.ndarray, test_fraction: float, seed: int, name: str = CLOSED_SPLIT) -> SampleSplit:
    """Per class, a seeded ``test_fraction`` of the samples (rounded, at least 1) on the test side."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    test = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        k = min(len(members) - 1, max(1, int(round(test_fraction * len(members)))))
        test.append(np.sort(rng.permutation(members)[:k]))
    te = np.sort(np.concatenate(test))
    return SampleSplit(np.setdiff1d(np.arange(len(labels)), te), te, name)


# --------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------
class Source:
    """A dataset: every sample's class id and its image.

    Subclasses set ``name``, ``labels`` (int64, one class id per sample),
    ``class_names`` (``{class id: name}``), ``flip_ok`` and implement
    :meth:`get_image` and :meth:`standard_split`.
    """

    name: str = "source"
    labels: np.ndarray
    class_names: dict[int, str]
    flip_ok: bool = True
    """False where a mirror image changes the meaning (glyphs, digits)."""
    in_memory: bool = False
    on_corrupt: str = "error"

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def classes(self) -> tuple[int, ...]:
        """Every class id of the dataset, sorted."""
        return tuple(sorted(self.class_names))

    def get_image(self, i: int) -> np.ndarray:  # pragma: no cover - abstract
        """Image ``i`` as a uint8 array ``H x W x 3``."""
        raise NotImplementedError

    def standard_split(self) -> ClassSplit:  # pragma: no cover - abstract
        raise NotImplementedError

    def closed_split(self) -> SampleSplit:
        """The dataset's closed-set split (``data.split: closed``), where it has one."""
        raise DataError(f"data.split: dataset '{self.name}' has no closed-set split (data.split=closed)")

    def _check(self) -> None:
        self.labels = np.asarray(self.labels, dtype=np.int64)
        unknown = sorted(set(np.unique(self.labels).tolist()) - set(self.class_names))
        if unknown:
            raise DataError(f"{self.name}: samples carry class ids without a name: {_preview(unknown)}")


class ArraySource(Source):
    """An in-memory dataset held as one uint8 array ``N x 3 x H x W``."""

    in_memory = True

    def __init__(
        self,
        name: str,
        images_chw: np.ndarray,
        labels: np.ndarray,
        class_names: Mapping[int, str],
        split: ClassSplit,
        flip_ok: bool = True,
        closed: SampleSplit | None = None,
    ) -> None:
        images_chw = np.asarray(images_chw)
        if images_chw.dtype != np.uint8 or images_chw.ndim != 4 or images_chw.shape[1] != 3:
            raise DataError(f"{name}: images must be uint8 N x 3 x H x W, got {images_chw.dtype} {images_chw.shape}")
        if len(images_chw) != len(labels):
            raise DataError(f"{name}: {len(images_chw)} images but {len(labels)} labels")
        self.name = name
        self.images_chw = images_chw
        self.labels = np.asarray(labels, dtype=np.int64)
        self.class_names = {int(k): str(v) for k, v in class_names.items()}
        self._split = split
        self.flip_ok = flip_ok
        self._closed = closed
        self._check()

    def get_image(self, i: int) -> np.ndarray:
        return np.ascontiguousarray(self.images_chw[i].transpose(1, 2, 0))

    def closed_split(self) -> SampleSplit:
        if self._closed is None:
            return super().closed_split()
        return self._closed

    def tensor(self) -> torch.Tensor:
        """All images as one uint8 tensor ``N x 3 x H x W`` (shares memory with the array)."""
        import warnings

        with warnings.catch_warnings():  # cached arrays are read-only on purpose; nothing writes to them
            warnings.simplefilter("ignore", UserWarning)
            return torch.from_numpy(self.images_chw)

    def standard_split(self) -> ClassSplit:
        return self._split


class FileSource(Source):
    """A dataset of image files decoded with PIL on demand."""

    def __init__(
        self,
        name: str,
        paths: Sequence[str],
        labels: np.ndarray,
        class_names: Mapping[int, str],
        split: ClassSplit,
        on_corrupt: str = "error",
        flip_ok: bool = True,
    ) -> None:
        if on_corrupt not in ("error", "skip"):
            raise DataError(f"on_corrupt must be 'error' or 'skip', got {on_corrupt!r}")
        if len(paths) != len(labels):
            raise DataError(f"{name}: {len(paths)} image paths but {len(labels)} labels")
        self.name = name
        self.paths = [str(p) for p in paths]
        self.labels = np.asarray(labels, dtype=np.int64)
        self.class_names = {int(k): str(v) for k, v in class_names.items()}
        self._split = split
        self.on_corrupt = on_corrupt
        self.flip_ok = flip_ok
        self._check()

    def standard_split(self) -> ClassSplit:
        return self._split

    def get_image(self, i: int) -> np.ndarray:
        return decode_image(self.paths[i])

    def load(self, i: int, short_side: int | None) -> np.ndarray:
        """Image ``i`` with its shorter side resized to ``short_side`` (``H x W x 3`` uint8)."""
        return decode_image(self.paths[i], short_side)


def decode_image(path: str, short_side: int | None = None) -> np.ndarray:
    """Decode ``path`` to RGB uint8 ``H x W x 3``; resize the shorter side to ``short_side``.

    Any decoding problem (missing, truncated, not an image) raises :class:`CorruptImageError`.
    """
    from PIL import Image

    try:
        with Image.open(path) as img:
            if short_side is not None:
                w0, h0 = img.size  # the target size comes from the original size, not the draft's
                s = short_side / min(w0, h0)
                size = (max(short_side, round(w0 * s)), max(short_side, round(h0 * s)))
                if img.format == "JPEG":
                    img.draft("RGB", size)
            img = img.convert("RGB")
            if short_side is not None and size != img.size:
                img = img.resize(size, Image.BILINEAR, reducing_gap=3.0)
            arr = np.asarray(img, dtype=np.uint8)
    except (OSError, ValueError, SyntaxError) as err:  # PIL raises all three for bad files
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise CorruptImageError(str(path), reason) from None
    if arr.ndim != 3 or arr.shape[2] != 3 or min(arr.shape[:2]) < 1:
        raise CorruptImageError(str(path), f"unexpected decoded shape {arr.shape}")
    return arr


# --------------------------------------------------------------------------------------
# Image stores: how a split gets the uint8 tensor of a source sample
# --------------------------------------------------------------------------------------
class TensorStore:
    """Indexes one uint8 tensor ``N x 3 x H x W`` (in-memory sources)."""

    can_gather = True
    bad: dict[int, str] = {}  # nothing to decode, nothing unreadable

    def __init__(self, images: torch.Tensor) -> None:
        self.images = images

    def get(self, i: int) -> torch.Tensor:
        return self.images[i]

    def gather(self, idx: np.ndarray) -> torch.Tensor:
        """Samples ``idx`` as one uint8 batch."""
        return self.images[torch.as_tensor(idx)]

    def path(self, i: int) -> str:
        return f"<in-memory #{i}>"


def image_size_of(path: str) -> tuple[int, int]:
    """``(w, h)`` of an image file from its header (no decoding)."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            return img.size
    except (OSError, ValueError, SyntaxError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise CorruptImageError(str(path), reason) from None


class FileStore:
    """Decodes file ``i`` of a :class:`FileSource` to a **whole** uint8 image ``3 x h x w``.

    The shorter side is resized to ``short_side`` and the aspect ratio kept (the longer
    side cut to at most 3x the shorter, :data:`dmlcore.data.images.MAX_ASPECT`), so that a
    training crop can come from anywhere in the image as the reference's
    RandomResizedCrop on the whole image (``R: datasets/basic_dataset_scaffold.py:37-38``).
    Batches of such images are :class:`~dmlcore.data.images.ImageBatch` es (padded, with
    each image's extent) that the transforms augment on the device. With ``cache_dir`` the
    whole dataset is decoded once per node into a memory-mapped file
    (:mod:`dmlcore.data.cache`) shared by every later run there.
    """

    def __init__(self, source: FileSource, short_side: int, cache_dir: str | None = None) -> None:
        self.source = source
        self.short_side = int(short_side)
        self.cache = None
        if cache_dir:
            from .cache import DecodedCache

            self.cache = DecodedCache(cache_dir, source.name, source.paths, self.short_side)
            self.cache.ensure(self.decode, self.stored_hw)

    def path(self, i: int) -> str:
        return self.source.paths[i]

    def stored_hw(self, i: int) -> tuple[int, int]:
        """``(h, w)`` that :meth:`decode` gives file ``i``, from its header."""
        w, h = stored_size(*image_size_of(self.source.paths[i]), self.short_side)
        return h, w

    def decode(self, i: int) -> np.ndarray:
        """File ``i`` decoded, shorter side ``short_side``, aspect kept (``h x w x 3``, no cache)."""
        return cut_long_side(self.source.load(i, self.short_side), self.short_side)

    def get(self, i: int) -> torch.Tensor:
        if self.cache is not None:
            return self.cache.get(i)
        return torch.from_numpy(np.ascontiguousarray(self.decode(i).transpose(2, 0, 1)))

    @property
    def can_gather(self) -> bool:
        """Whole batches can be read at once (from the decoded cache): no loader workers needed."""
        return self.cache is not None

    @property
    def bad(self) -> dict[int, str]:
        """Samples the cache found unreadable (their slots hold zeros)."""
        return self.cache.bad if self.cache is not None else {}

    def gather(self, idx: np.ndarray) -> "torch.Tensor | ImageBatch":
        """Samples ``idx`` as one uint8 batch (an ImageBatch when sizes differ), read from the decoded cache."""
        if self.cache is None:
            raise RuntimeError("FileStore.gather needs data.cache_dir")
        return self.cache.gather(idx)


_WARNED: set[str] = set()


class LabeledDataset(Dataset):
    """One class-disjoint split: ``(float32 tensor 3xHxW, int label)`` per item.

    ``labels`` are remapped to ``0..C-1`` (``class_ids[label]`` is the original id),
    ``indices`` are the source's sample indices.
    """

    def __init__(
        self,
        store: TensorStore | FileStore,
        indices: np.ndarray,
        source_labels: np.ndarray,
        classes: Sequence[int],
        transform: Callable[[torch.Tensor], torch.Tensor],
        name: str = "split",
        on_corrupt: str = "error",
    ) -> None:
        self.store = store
        self.indices = np.asarray(indices, dtype=np.int64)
        self.class_ids = np.asarray(sorted(int(c) for c in classes), dtype=np.int64)
        orig = np.asarray(source_labels, dtype=np.int64)[self.indices]
        pos = np.searchsorted(self.class_ids, orig)
        if len(orig) and (pos.max() >= len(self.class_ids) or np.any(self.class_ids[pos] != orig)):
            raise DataError(f"{name} split: some samples belong to none of its classes")
        self.labels = pos.astype(np.int64)
        self.num_classes = len(self.class_ids)
        self.transform = transform
        self.name = name
        self.on_corrupt = on_corrupt
        self._bad: set[int] = set()
        self._by_class: dict[int, np.ndarray] | None = None

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, j: int) -> tuple[torch.Tensor, int]:
        j = int(j)
        return self.transform(self.get_uint8(j)), int(self.labels[j])

    def uint8(self) -> "Uint8View":
        """This split as ``(uint8 image, label)`` items, for batch transforms on the device."""
        return Uint8View(self)

    def in_memory_images(self) -> torch.Tensor | None:
        """All images of the split as one uint8 tensor (in-memory sources), else None."""
        if isinstance(self.store, TensorStore):
            return self.store.images[torch.as_tensor(self.indices)]
        return None

    @property
    def can_gather(self) -> bool:
        """Batches can be read in bulk (:meth:`gather`) instead of item by item."""
        return bool(getattr(self.store, "can_gather", False))

    def gather(self, js: Sequence[int] | np.ndarray | torch.Tensor) -> torch.Tensor:
        """Items ``js`` as one untransformed uint8 batch ``B x 3 x h x w`` (one bulk read from
        the in-memory tensor or the decoded cache; an :class:`ImageBatch` when the whole
        images differ in size), with the on_corrupt policy applied."""
        js = np.asarray(js, dtype=np.int64)
        batch = self.store.gather(self.indices[js])
        bad = self.store.bad
        if bad or self._bad:
            fix = [k for k, j in enumerate(js.tolist()) if j in self._bad or int(self.indices[j]) in bad]
            if fix:
                images = [batch[k] for k in range(len(js))]
                for k in fix:
                    images[k] = self.get_uint8(int(js[k]))
                batch = stack_images(images)
        return batch

    def get_uint8(self, j: int) -> torch.Tensor:
        """The untransformed uint8 image ``3 x h x w`` of item ``j`` (after the on_corrupt policy)."""
        if j not in self._bad:
            try:
                return self.store.get(int(self.indices[j]))
            except CorruptImageError as err:
                if self.on_corrupt != "skip":
                    raise
                self._mark_bad(j, err)
        return self._substitute(j)

    def _mark_bad(self, j: int, err: CorruptImageError) -> None:
        self._bad.add(j)
        if err.path not in _WARNED:
            _WARNED.add(err.path)
            log.warning("%s; using another image of the same class instead (data.on_corrupt=skip)", err)

    def _substitute(self, j: int) -> torch.Tensor:
        if self._by_class is None:
            order = np.argsort(self.labels, kind="stable")
            bounds = np.searchsorted(self.labels[order], np.arange(self.num_classes + 1))
            self._by_class = {c: order[bounds[c] : bounds[c + 1]] for c in range(self.num_classes)}
        members = self._by_class[int(self.labels[j])]
        start = int(np.searchsorted(members, j))
        for k in range(1, len(members) + 1):
            cand = int(members[(start + k) % len(members)])
            if cand in self._bad:
                continue
            try:
                return self.store.get(int(self.indices[cand]))
            except CorruptImageError as err:
                self._mark_bad(cand, err)
        cid = int(self.class_ids[self.labels[j]])
        raise DataError(
            f"every image of class {cid} ({len(members)} files) is unreadable, e.g. {self.store.path(int(self.indices[j]))}"
        )


class Uint8View(Dataset):
    """``(uint8 image 3 x h x w, label)`` items of a :class:`LabeledDataset` (no transform);
    a DataLoader batches them with :data:`collate_fn` (images of different sizes)."""

    collate_fn = staticmethod(collate_images)

    def __init__(self, ds: "LabeledDataset") -> None:
        self.ds = ds
        self.labels = ds.labels

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, j: int) -> tuple[torch.Tensor, int]:
        return self.ds.get_uint8(int(j)), int(self.ds.labels[int(j)])


# --------------------------------------------------------------------------------------
# Split files (written by the ooDML tool)
# --------------------------------------------------------------------------------------
def parse_split_spec(spec: str) -> tuple[Path, str]:
    """``"PATH.json#ID"`` -> ``(path, ID)``; ``ID`` is a split id (imported files) or an index."""
    if "#" not in spec:
        raise DataError(f"data.split: expected 'standard' or 'FILE.json#INDEX', got {spec!r}")
    path, _, idx = spec.rpartition("#")
    if not path:
        raise DataError(f"data.split: missing file name in {spec!r}")
    if not idx:
        raise DataError(f"data.split: missing split index or id after '#' in {spec!r}")
    return Path(path).expanduser(), idx


def select_entry(spec: str) -> tuple[Path, dict[str, Any], dict[str, Any], str]:
    """``(path, document, entry, label)`` of ``PATH.json#ID``: by ``id`` when the file's
    splits have ids (an imported ooDML file), else by position."""
    path, key = parse_split_spec(spec)
    doc = read_split_file(path)
    splits = doc["splits"]
    ids = [str(s["id"]) for s in splits if "id" in s]
    if ids:
        for s in splits:
            if str(s.get("id")) == key:
                return path, doc, s, key
        from dmlcore.oodml.published import did_you_mean

        raise DataError(f"data.split: {path} has no split '{key}'{did_you_mean(key, ids)}; its ids: {', '.join(ids)}")
    try:
        index = int(key)
    except ValueError:
        raise DataError(f"data.split: split index must be an integer in {spec!r}, got {key!r}") from None
    if index < 0:
        raise DataError(f"data.split: split index must be >= 0 in {spec!r}")
    if index >= len(splits):
        span = f"0-{len(splits) - 1}" if splits else "none"
        raise DataError(f"data.split: index {index} is out of range; {path} has {len(splits)} splits ({span})")
    return path, doc, splits[index], str(index)


_SPLIT_FILES: dict[tuple[str, int, int], dict[str, Any]] = {}


def read_split_file(path: str | Path) -> dict[str, Any]:
    """The validated content of an ooDML split file (cached by path and mtime; read-only)."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"data.split: split file {p} does not exist")
    st = p.stat()
    key = (str(p.resolve()), st.st_mtime_ns, st.st_size)
    if key not in _SPLIT_FILES:
        if len(_SPLIT_FILES) > 16:
            _SPLIT_FILES.clear()
        _SPLIT_FILES[key] = _read_split_file(p)
    return _SPLIT_FILES[key]


def _read_split_file(p: Path) -> dict[str, Any]:
    try:
        doc = json.loads(p.read_text())
    except json.JSONDecodeError as err:
        raise DataError(f"data.split: {p} is not valid JSON (line {err.lineno}: {err.msg})") from None
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"data.split: cannot read {p}: {err}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("dataset"), str) or not isinstance(doc.get("splits"), list):
        raise DataError(f"data.split: {p} must be a JSON object with 'dataset' (a name) and 'splits' (a list)")
    for k, s in enumerate(doc["splits"]):
        if not isinstance(s, dict) or not isinstance(s.get("train_classes"), list) or not isinstance(
            s.get("test_classes"), list
        ):
            raise DataError(f"data.split: {p} split {k} must be an object with 'train_classes' and 'test_classes' lists")
    from dmlcore.oodml.published import is_published, validate_document

    if is_published(doc):
        validate_document(doc, str(p))
    return doc


def load_split(spec: str, source: Source) -> tuple[ClassSplit, dict[str, Any]]:
    """The split ``PATH.json#ID`` checked against ``source``; returns it with its extra fields."""
    from dmlcore.oodml.published import is_published, published_class_index, resolve_class

    path, doc, entry, index = select_entry(spec)
    published = is_published(doc)
    # an imported ooDML file also fits an imagefolder over the authors' images/<class>/ layout
    if doc["dataset"] != source.name and not (published and source.name == "imagefolder"):
        raise DataError(
            f"data.split: {path} was written for dataset '{doc['dataset']}', but data.dataset is '{source.name}'"
        )
    by_name = published_class_index(source)
    known = set(source.class_names)

    def resolve(ids: list[Any]) -> tuple[list[int], list[Any]]:
        out, unknown = [], []
        for c in ids:
            cid = resolve_class(c, by_name, known)  # class names are accepted too
            if cid is None:
                unknown.append(c)
            else:
                out.append(cid)
        return out, unknown

    train, bad_tr = resolve(entry["train_classes"])
    test, bad_te = resolve(entry["test_classes"])
    if bad_tr or bad_te:
        bad = bad_tr + bad_te
        raise DataError(
            f"data.split: {path} split {index} names {len(bad)} classes unknown to dataset '{source.name}': {_preview(bad)}"
        )
    name = str(entry.get("name") or f"{path.stem}#{index}")
    try:
        split = ClassSplit(tuple(train), tuple(test), name)
    except DataError as err:
        raise DataError(f"data.split: {path} split {index}: {err}") from None
    extra = {k: v for k, v in entry.items() if k not in ("train_classes", "test_classes")}
    if isinstance(entry.get("val_split"), Mapping):
        vs = entry["val_split"]
        (vtr, bad1), (vval, bad2) = resolve(list(vs.get("train", []))), resolve(list(vs.get("val", [])))
        if bad1 or bad2:
            raise DataError(f"data.split: {path} split {index}: val_split names classes unknown to dataset '{source.name}': {_preview(bad1 + bad2)}")
        extra["val_split"] = {"train": tuple(vtr), "val": tuple(vval)}
    return split, extra


def save_split_file(path: str | Path, dataset: str, splits: Sequence[ClassSplit], extras: Sequence[Mapping[str, Any]] | None = None) -> Path:
    """Write ``splits`` (with optional per-split extra fields, e.g. ``fid``) as a split file."""
    extras = list(extras) if extras is not None else [{} for _ in splits]
    if len(extras) != len(splits):
        raise DataError(f"{len(splits)} splits but {len(extras)} extra-field dicts")
    doc = {
        "dataset": dataset,
        "splits": [
            {"name": s.name, "train_classes": list(s.train_classes), "test_classes": list(s.test_classes), **dict(e)}
            for s, e in zip(splits, extras)
        ],
    }
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(doc, indent=1))
    return p


def resolve_split(spec: str, source: Source) -> tuple[ClassSplit, dict[str, Any]]:
    """``standard`` -> the source's published split; otherwise a split file entry."""
    if spec == "standard":
        split = source.standard_split()
        return split, {}
    return load_split(spec, source)


def carve_val(
    train_classes: Sequence[int], fraction: float, dataset: str
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Hold out ``fraction`` of ``train_classes`` as validation classes.

    The choice uses an RNG seeded from the dataset name only (never the training
    seed), so every seed of a study validates on the same classes.
    Returns ``(remaining train classes, val classes)``, both sorted.
    """
    classes = sorted(int(c) for c in train_classes)
    if fraction <= 0:
        return tuple(classes), ()
    n_val = int(round(fraction * len(classes)))
    if n_val < 2 or len(classes) - n_val < 2:
        raise DataError(
            f"data.val_classes={fraction} of {len(classes)} train classes gives {n_val} validation and "
            f"{len(classes) - n_val} train classes; both need at least 2"
        )
    rng = np.random.default_rng(stable_seed("val-classes", dataset))
    val = sorted(int(c) for c in rng.permutation(np.asarray(classes, dtype=np.int64))[:n_val])
    keep = sorted(set(classes) - set(val))
    return tuple(keep), tuple(val)


# --------------------------------------------------------------------------------------
# build_data
# --------------------------------------------------------------------------------------
@dataclass
class DataBundle:
    train: LabeledDataset
    train_eval: LabeledDataset
    val: LabeledDataset | None
    test: LabeledDataset
    num_train_classes: int
    info: dict[str, Any] = field(default_factory=dict)
    split: ClassSplit | None = None
    source: Source | None = None
    episodes: dict[int, list[np.ndarray]] | None = None
    """Published few-shot episodes of an imported ooDML split: ``{k: [support positions into test]}``."""


def load_short_side(image_size: int) -> int:
    """Shorter side that file images are resized to before the crop (the 256/224 protocol)."""
    return int(round(image_size * 256 / 224))


STORE_FACTOR = 1.5
"""Default stored shorter side of file images: 1.5 x the eval resize side (384 px at
``image_size`` 224). The reference crops RandomResizedCrop from the full JPEG
(``R: datasets/basic_dataset_scaffold.py:37-38,79``); CUB-200's images are mostly
500 x 375 or 375 x 500, so 384 keeps them at about their original resolution, and an
8%-area crop is cut from ~125 px of real pixels (a 256-px square gave ~72 px). Larger
originals (CARS, SOP) are stored at 384 on their shorter side: a cap on the cache size
(a deliberate deviation; ``data.store_side`` raises it)."""


def store_short_side(image_size: int, store_side: int | None = None) -> int:
    """Shorter side that file images are stored at (``data.store_side`` or the default above)."""
    return int(store_side) if store_side else int(round(STORE_FACTOR * load_short_side(image_size)))


def build_source(cfg: "RunConfig") -> Source:
    from dmlcore import registry

    d = cfg.data
    source = registry.build(
        "dataset",
        d.dataset,
        d.params,
        key="data.params",
        root=d.root,
        image_size=d.image_size,
        seed=cfg.train.seed,
        on_corrupt=d.on_corrupt,
    )
    if not isinstance(source, Source):
        raise DataError(f"data.dataset: '{d.dataset}' did not return a Source (got {type(source).__name__})")
    source.name = d.dataset if source.name in ("", "source") else source.name
    source.on_corrupt = d.on_corrupt
    return source


def build_data(cfg: "RunConfig") -> DataBundle:
    """Source + class split (+ validation classes) + transforms -> :class:`DataBundle`."""
    from dmlcore import registry
    from dmlcore.data.transforms import eval_transform

    d = cfg.data
    source = build_source(cfg)
    closed = source.closed_split() if d.split == CLOSED_SPLIT else None
    if closed is not None:  # same classes on both sides, disjoint samples
        present_ids = tuple(int(c) for c in np.unique(source.labels))
        split, extra = None, {}
        train_classes, val_classes = present_ids, ()
    else:
        split, extra = resolve_split(d.split, source)
        if "val_split" in extra and d.val_classes > 0:  # a published ooDML split: its own train/val classes
            train_classes = tuple(sorted(extra["val_split"]["train"]))
            val_classes = tuple(sorted(extra["val_split"]["val"]))
        else:
            train_classes, val_classes = carve_val(split.train_classes, d.val_classes, source.name)

    if source.in_memory:
        store: TensorStore | FileStore = TensorStore(source.tensor())  # type: ignore[attr-defined]
    elif isinstance(source, FileSource):
        store = FileStore(source, store_short_side(d.image_size, d.store_side), d.cache_dir)
    else:
        raise DataError(f"{source.name}: a Source must be an ArraySource or a FileSource")

    train_tf = registry.build(
        "augmentation", d.augmentation, d.augmentation_params, key="data.augmentation_params",
        image_size=d.image_size, flip_ok=source.flip_ok,
    )
    eval_tf = eval_transform(d.image_size, getattr(train_tf, "eval_crop", None))  # 'big' tests at 256

    present = set(np.unique(source.labels).tolist())

    def make(classes: Sequence[int], transform: Callable, name: str, among: np.ndarray | None = None) -> LabeledDataset:
        empty = [c for c in classes if c not in present]
        if len(empty) == len(classes):
            raise DataError(f"{source.name}: the {name} split has no samples (classes {_preview(classes)})")
        idx = np.flatnonzero(np.isin(source.labels, np.asarray(classes, dtype=np.int64)))
        if among is not None:  # a closed-set side: these samples only
            idx = np.intersect1d(idx, among)
        return LabeledDataset(store, idx, source.labels, [c for c in classes if c in present], transform, name, d.on_corrupt)

    tr_among = closed.train_indices if closed is not None else None
    train = make(train_classes, train_tf, "train", tr_among)
    train_eval = make(train_classes, eval_tf, "train_eval", tr_among)
    val = make(val_classes, eval_tf, "val") if val_classes else None
    if closed is not None:
        test = make(train_classes, eval_tf, "test", closed.test_indices)
        missing_cls = sorted(set(np.unique(source.labels[closed.test_indices]).tolist())
                             ^ set(np.unique(source.labels[closed.train_indices]).tolist()))
        if missing_cls:
            raise DataError(f"{source.name}: closed-set split: classes {_preview(missing_cls)} are not on both sides")
    else:
        test = make(split.test_classes, eval_tf, "test")
    info: dict[str, Any] = {
        "dataset": source.name,
        "split": split.name if split is not None else CLOSED_SPLIT,
        "image_size": d.image_size,
        "augmentation": d.augmentation,
        "flip_ok": bool(source.flip_ok),
        "in_memory": bool(source.in_memory),
        "num_classes": {"train": train.num_classes, "val": val.num_classes if val else 0, "test": test.num_classes},
        "num_samples": {"train": len(train), "val": len(val) if val else 0, "test": len(test)},
        "val_classes": list(val_classes),
    }
    info.update({k: v for k, v in extra.items() if k not in ("name", "episodes", "val_split")})
    episodes = None
    fs = cfg.eval.few_shot
    if extra.get("episodes") and fs is not None and getattr(fs, "episode_source", "auto") != "random":
        from dmlcore.oodml.published import resolve_episodes

        episodes = resolve_episodes(extra["episodes"], source, split.test_classes, f"data.split: {d.split}")
    return DataBundle(train, train_eval, val, test, train.num_classes, info, split, source, episodes)


def make_loader(
    dataset: LabeledDataset,
    cfg: "RunConfig",
    batch_sampler: Any = None,
    batch_size: int | None = None,
) -> torch.utils.data.DataLoader:
    """A DataLoader honouring ``data.num_workers``: with ``batch_sampler`` for training,
    otherwise sequential batches of ``batch_size`` (default ``eval.batch_size``)."""
    from torch.utils.data import DataLoader

    from dmlcore.resources import resolve_workers

    workers = resolve_workers(cfg.data.num_workers)
    kw: dict[str, Any] = {
        "num_workers": workers,
        "pin_memory": torch.cuda.is_available(),
        "persistent_workers": workers > 0,
    }
    if workers > 0:
        g = torch.Generator()
        g.manual_seed(_u64(stable_seed("loader", cfg.train.seed)) & 0x7FFF_FFFF_FFFF_FFFF)
        kw["generator"] = g
    if batch_sampler is not None:
        return DataLoader(dataset, batch_sampler=batch_sampler, **kw)
    return DataLoader(dataset, batch_size=batch_size or cfg.eval.batch_size, shuffle=False, **kw)
