"""The ooDML authors' published split files, read safely and used exactly.

Milbich et al. 2021 publish one split file per benchmark
(CompVis/Characterizing_Generalization_in_DML ``datasplits/{cub200,cars196,online_products}_splits.pkl``,
structure in the authors' README.md:77-98)::

    {split_id: {"train": [class], "test": [class], "fid": float,
                "split_train": [class], "split_val": [class],
                "test_episodes": {shots: {episode: {class: [image file name, ...]}}}}}

* **Reading.** The pickle goes through :class:`RestrictedUnpickler`: only plain
  containers, numbers, strings and numpy arrays/scalars are rebuilt; any other global
  (``os.system`` in a ``__reduce__`` payload, ``copyreg._reconstructor``, ...) is refused
  before anything is called. The JSON form of the same dict (``{"splits": {...}}``, as in
  ``shared/reference/oodml_cars196_splits.json``) is read too.
* **Converting** (:func:`import_split_file`) writes the platform's split file::

      {"format": "oodml-published", "dataset", "imported_from", "source",
       "splits": [{"id", "name", "train_classes", "test_classes", "fid",
                   "val_split": {"train": [...], "val": [...]},
                   "episodes": {"2": [{"support": {class: [file, ...]}}, ...], ...}}]}

  Class ids stay the authors' class names; episodes keep the authors' support lists and
  the authors' query rule (query = every other test image of the class,
  ``datasets/cars196.py:78-82``). SOP episodes name whole support classes
  (``datasets/stanford_online_products.py:104-107``): ``{"support_classes": [...]}``,
  query = the other test classes.
* **Class names onto the platform's loaders** (:func:`published_class_index`): the authors
  read ``<root>/images/<class folder>/<file>`` (``datasets/cars196.py:5-6,28``), so a class
  is its folder name:

  =============  ======================================================================
  ``cub200``     ``classes.txt`` name (``001.Black_footed_Albatross``), as the folders
  ``cars196``    ``cars_annos.mat`` class name with ``/`` written ``-`` (the one
                 character a folder name cannot hold: ``Ram C/V Cargo Van Minivan 2012``
                 is the authors' ``Ram C-V Cargo Van Minivan 2012``)
  ``sop``        the product id = the image file name's prefix before ``_``
                 (``datasets/stanford_online_products.py:32``), one per Ebay class_id
  ``imagefolder`` the folder name (the authors' own layout, exact)
  others         the source's class names, or integer class ids
  =============  ======================================================================

* **Episodes onto samples** (:func:`resolve_episodes`): a support entry is an image file
  name (matched against the base names of the class's files) or an integer position in
  the class's samples (source order). The authors' CARS196 file names come from their
  ``images/<class>/NNNNN.jpg`` layout; the official ``car_ims/NNNNNN.jpg`` layout of the
  ``cars196`` loader has other names, so its episodes only resolve with
  ``data.dataset: imagefolder`` over that layout (otherwise an error says so, or
  ``eval.few_shot.episode_source: random`` draws seeded episodes instead).
"""

from __future__ import annotations

import difflib
import io
import json
import math
import os
import pickle
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

__all__ = [
    "PublishedSplitError", "RestrictedUnpickler", "safe_load_pickle", "read_published", "convert_published",
    "import_split_file", "published_class_index", "resolve_episodes", "check_split", "is_published",
    "FORMAT", "guess_dataset", "validate_document", "split_tags", "did_you_mean",
]  # fmt: skip

FORMAT = "oodml-published"

# (module, name) pairs the unpickler may rebuild: numpy arrays, dtypes and scalars
# (numpy >= 2 pickles them under numpy._core), and the builtin containers.
_ALLOWED_GLOBALS = frozenset(
    [(m, n) for m in ("numpy.core.multiarray", "numpy._core.multiarray") for n in ("_reconstruct", "scalar")]
    + [("numpy", "ndarray"), ("numpy", "dtype")]
    + [("builtins", n) for n in ("list", "dict", "tuple", "set", "frozenset", "int", "float", "str", "bytes", "bool", "complex")]
    + [("collections", "OrderedDict")]
)


class PublishedSplitError(ValueError):
    """A published split file that cannot be used; ``str(err)`` is one line naming the file and the entry."""


def _data_error(msg: str) -> Exception:
    from ..data.base import DataError

    return DataError(msg)


# --------------------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------------------
class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that rebuilds only plain data (containers, numbers, strings, numpy arrays)."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load global '{module}.{name}' (only plain data is allowed)")

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("refusing a persistent id (only plain data is allowed)")


def safe_load_pickle(data: bytes, where: str = "pickle") -> Any:
    try:
        return RestrictedUnpickler(io.BytesIO(data)).load()
    except pickle.UnpicklingError as err:
        raise PublishedSplitError(f"{where}: {err}") from None
    except Exception as err:  # truncated or corrupt pickles raise many types
        raise PublishedSplitError(f"{where}: not a readable pickle ({type(err).__name__}: {err})") from None


def read_published(path: str | Path) -> dict[Any, Any]:
    """The authors' split dict ``{split_id: {...}}`` from their pickle or its JSON form."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise PublishedSplitError(f"{p}: no such split file")
    data = p.read_bytes()
    if data[:1] == b"\x80":  # pickle protocol >= 2
        raw = safe_load_pickle(data, str(p))
    else:
        try:
            raw = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise PublishedSplitError(f"{p}: neither a pickle nor JSON ({err})") from None
    if isinstance(raw, Mapping) and isinstance(raw.get("splits"), Mapping):
        return {"__source__": raw.get("source"), **dict(raw["splits"])}
    if not isinstance(raw, Mapping):
        raise PublishedSplitError(f"{p}: expected a dict of splits {{split_id: {{train, test, fid, ...}}}}, got {type(raw).__name__}")
    return dict(raw)


def _plain(v: Any) -> Any:
    if isinstance(v, np.ndarray):
        return [_plain(x) for x in v.tolist()]
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, Mapping):
        return {(_plain(k) if not isinstance(k, (str, int)) else k): _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple, set, frozenset)):
        return [_plain(x) for x in v]
    return v


def _class_list(v: Any, where: str) -> list[Any]:
    v = _plain(v)
    if not isinstance(v, list) or not v:
        raise PublishedSplitError(f"{where} must be a non-empty list of classes, got {type(v).__name__}")
    for c in v:
        if isinstance(c, bool) or not isinstance(c, (str, int)):
            raise PublishedSplitError(f"{where} holds {c!r}; classes are names or integer ids")
    if len(set(v)) != len(v):
        raise PublishedSplitError(f"{where} repeats classes")
    return v


def _episode(v: Any, where: str, test: set[Any]) -> dict[str, Any]:
    v = _plain(v)
    if isinstance(v, Mapping):  # {class: [file | position]}
        support: dict[str, list[Any]] = {}
        for c, items in v.items():
            if c not in test and not (isinstance(c, str) and c.isdigit() and int(c) in test):
                raise PublishedSplitError(f"{where}: class {c!r} is not a test class of this split")
            if not isinstance(items, list) or not items:
                raise PublishedSplitError(f"{where}: class {c!r} must list its support samples")
            for s in items:
                if isinstance(s, bool) or not isinstance(s, (str, int)) or (isinstance(s, int) and s < 0):
                    raise PublishedSplitError(f"{where}: class {c!r}: support entry {s!r} is neither a file name nor a position >= 0")
            support[str(c)] = items
        return {"support": support}
    if isinstance(v, list):  # SOP: whole support classes
        bad = [c for c in v if c not in test]
        if bad:
            raise PublishedSplitError(f"{where}: support classes {bad[:3]} are not test classes of this split")
        return {"support_classes": v}
    raise PublishedSplitError(f"{where} must be {{class: [files]}} or a list of support classes, got {type(v).__name__}")


def convert_published(raw: Mapping[Any, Any], where: str) -> list[dict[str, Any]]:
    """The platform's split entries from the authors' split dict (validated; errors name the entry)."""
    out = []
    for sid, s in raw.items():
        if sid == "__source__":
            continue
        at = f"{where}: split '{sid}'"
        if not isinstance(s, Mapping):
            raise PublishedSplitError(f"{at} must be a dict with train, test and fid, got {type(s).__name__}")
        missing = [k for k in ("train", "test", "fid") if k not in s]
        if missing:
            raise PublishedSplitError(f"{at} has no {', '.join(repr(m) for m in missing)}")
        train = _class_list(s["train"], f"{at}: 'train'")
        test = _class_list(s["test"], f"{at}: 'test'")
        both = set(train) & set(test)
        if both:
            raise PublishedSplitError(f"{at}: {len(both)} classes are both train and test classes, e.g. {sorted(both, key=str)[0]!r}")
        fid = _plain(s["fid"])
        if isinstance(fid, bool) or not isinstance(fid, (int, float)) or not math.isfinite(fid):
            raise PublishedSplitError(f"{at}: 'fid' must be a finite number, got {fid!r}")
        entry: dict[str, Any] = {"id": str(sid), "name": f"ooDML-{sid}", "train_classes": train, "test_classes": test,
                                 "fid": float(fid), "published": True}  # fmt: skip
        if "split_train" in s or "split_val" in s:
            st = _class_list(s.get("split_train"), f"{at}: 'split_train'")
            sv = _class_list(s.get("split_val"), f"{at}: 'split_val'")
            outside = [c for c in st + sv if c not in set(train)]
            if outside or set(st) & set(sv):
                raise PublishedSplitError(f"{at}: split_train/split_val must partition the train classes (e.g. {(outside or sorted(set(st) & set(sv), key=str))[0]!r})")
            entry["val_split"] = {"train": st, "val": sv}
        eps = _plain(s.get("test_episodes"))
        if eps is not None:
            if not isinstance(eps, Mapping):
                raise PublishedSplitError(f"{at}: 'test_episodes' must be {{shots: {{episode: ...}}}}")
            tset = set(test)
            episodes: dict[str, list[dict[str, Any]]] = {}
            for k, per in eps.items():
                if not str(k).isdigit() or int(k) < 1:
                    raise PublishedSplitError(f"{at}: test_episodes key {k!r} is not a shot count")
                if isinstance(per, Mapping):
                    order = sorted(per, key=lambda e: int(e) if str(e).lstrip("-").isdigit() else str(e))
                    items = [(e, per[e]) for e in order]
                elif isinstance(per, list):
                    items = list(enumerate(per))
                else:
                    raise PublishedSplitError(f"{at}: test_episodes[{k}] must map episode -> support")
                episodes[str(int(k))] = [_episode(v, f"{at}: test_episodes[{k}][{e}]", tset) for e, v in items]
            entry["episodes"] = episodes
        out.append(entry)
    if not out:
        raise PublishedSplitError(f"{where}: no splits")
    return out


_DATASET_TOKENS = (("cub200", "cub200"), ("cub", "cub200"), ("cars196", "cars196"), ("cars", "cars196"),
                   ("online_products", "sop"), ("sop", "sop"))  # fmt: skip


def guess_dataset(path: str | Path, source_text: Any = None) -> str | None:
    """The platform dataset an authors' file belongs to, from its name (``cars196_splits.pkl``) or source note."""
    for text in (Path(path).name.lower(), str(source_text or "").lower()):
        for token, name in _DATASET_TOKENS:
            if token in text:
                return name
    return None


def import_split_file(path: str | Path, out: str | Path, dataset: str | None = None) -> dict[str, Any]:
    """``sweeper splits import``: read the authors' file at ``path``, write the platform's split file ``out``."""
    raw = read_published(path)
    src = raw.get("__source__")
    ds = dataset or guess_dataset(path, src)
    if ds is None:
        raise PublishedSplitError(f"{path}: cannot tell the dataset from the file name; give --dataset cub200|cars196|sop")
    doc = {"format": FORMAT, "dataset": ds, "imported_from": str(path), "source": src or Path(path).name,
           "splits": convert_published(raw, str(path))}  # fmt: skip
    o = Path(out).expanduser()
    o.parent.mkdir(parents=True, exist_ok=True)
    o.write_text(json.dumps(doc, indent=1))
    return doc


def is_published(doc: Mapping[str, Any]) -> bool:
    return doc.get("format") == FORMAT


# --------------------------------------------------------------------------------------
# classes and episodes onto a platform Source
# --------------------------------------------------------------------------------------
def _cars_names(source: Any) -> dict[str, int]:
    out = {n: c for c, n in source.class_names.items()}
    out.update({n.replace("/", "-"): c for c, n in source.class_names.items()})
    return out


def _sop_names(source: Any) -> dict[str, int]:
    out: dict[str, int] = {}
    for p, c in zip(source.paths, source.labels.tolist()):
        out.setdefault(os.path.basename(p).split("_")[0], int(c))
    return out


# dataset name -> {authors' class name: platform class id}
CLASS_KEYS: dict[str, Callable[[Any], dict[str, int]]] = {"cars196": _cars_names, "sop": _sop_names}


def published_class_index(source: Any) -> dict[str, int]:
    """``{authors' class name: class id}`` for ``source`` (see the module table)."""
    fn = CLASS_KEYS.get(source.name)
    base = {n: c for c, n in source.class_names.items()}
    return {**base, **fn(source)} if fn is not None else base


def resolve_class(c: Any, index: Mapping[str, int], known: set[int]) -> int | None:
    if isinstance(c, str) and c in index:
        return int(index[c])
    if isinstance(c, int) and not isinstance(c, bool) and c in known:
        return c
    return None


def resolve_episodes(
    episodes: Mapping[str, Sequence[Mapping[str, Any]]], source: Any, test_classes: Sequence[int], where: str
) -> dict[int, list[np.ndarray]]:
    """``{k: [support positions into the test dataset, one array per episode]}``.

    The test dataset holds the source samples of ``test_classes`` in source order (as
    :func:`dmlcore.data.base.build_data` builds it); the query of an episode is every test
    position not in its support (the authors' rule)."""
    index = published_class_index(source)
    known = set(source.class_names)
    labels = np.asarray(source.labels)
    test_idx = np.flatnonzero(np.isin(labels, np.asarray(sorted(test_classes), dtype=np.int64)))
    pos_of = {int(s): k for k, s in enumerate(test_idx)}
    members: dict[int, np.ndarray] = {}
    paths = getattr(source, "paths", None)
    by_name: dict[int, dict[str, int]] = {}
    tset = {int(c) for c in test_classes}

    def class_members(cid: int) -> np.ndarray:
        if cid not in members:
            members[cid] = test_idx[labels[test_idx] == cid]
        return members[cid]

    out: dict[int, list[np.ndarray]] = {}
    for k, eps in episodes.items():
        per: list[np.ndarray] = []
        for e, ep in enumerate(eps):
            at = f"{where} episodes[{k}][{e}]"
            sup: list[int] = []
            if "support_classes" in ep:
                for c in ep["support_classes"]:
                    cid = resolve_class(c, index, known)
                    if cid is None or cid not in tset:
                        raise _data_error(f"{at}: support class {c!r} is not a test class of dataset '{source.name}'")
                    sup.extend(pos_of[int(s)] for s in class_members(cid))
            else:
                for c, items in ep["support"].items():
                    cid = resolve_class(c if not c.isdigit() or c in index else int(c), index, known)
                    if cid is None or cid not in tset:
                        raise _data_error(f"{at}: class {c!r} is not a test class of dataset '{source.name}'")
                    mem = class_members(cid)
                    for s in items:
                        if isinstance(s, int):
                            if s >= len(mem):
                                raise _data_error(f"{at}: class {c!r}: support position {s} is out of range (the class has {len(mem)} samples)")
                            sup.append(pos_of[int(mem[s])])
                            continue
                        if paths is None:
                            raise _data_error(f"{at}: class {c!r}: support file {s!r} needs a file dataset ('{source.name}' has no files)")
                        if cid not in by_name:
                            by_name[cid] = {os.path.basename(paths[int(j)]): int(j) for j in mem}
                        j = by_name[cid].get(s)
                        if j is None:
                            hint = (" (the authors' CARS196 files follow their images/<class>/<file> layout: use "
                                    "data.dataset=imagefolder on it, or eval.few_shot.episode_source=random)")  # fmt: skip
                            raise _data_error(f"{at}: class {c!r}: support file {s!r} is not among its {len(mem)} images"
                                              + (hint if source.name == "cars196" else ""))  # fmt: skip
                        sup.append(pos_of[j])
            if len(set(sup)) != len(sup):
                raise _data_error(f"{at}: the support repeats samples")
            per.append(np.asarray(sorted(sup), dtype=np.int64))
        out[int(k)] = per
    return out


# --------------------------------------------------------------------------------------
# validation before any trial starts
# --------------------------------------------------------------------------------------
def did_you_mean(given: str, ids: Sequence[str]) -> str:
    close = difflib.get_close_matches(str(given), [str(i) for i in ids], n=1, cutoff=0.5)
    return f" (did you mean '{close[0]}'?)" if close else ""


_SOURCE_CACHE: dict[Any, Any] = {}


def _source_for(cfg: Any) -> Any:
    from ..data.base import build_source

    root = cfg.data.root
    stamp = os.stat(os.path.expanduser(root)).st_mtime_ns if root and os.path.exists(os.path.expanduser(root)) else None
    key = (cfg.data.dataset, root, stamp, json.dumps(cfg.data.params, sort_keys=True, default=str), cfg.data.image_size)
    if key not in _SOURCE_CACHE:
        if len(_SOURCE_CACHE) > 8:
            _SOURCE_CACHE.clear()
        _SOURCE_CACHE[key] = build_source(cfg)
    return _SOURCE_CACHE[key]


def check_split(cfg: Any, strict: bool = True) -> None:
    """Check ``cfg.data.split`` against its file and the dataset at ``data.root``: file shape,
    split id, classes, episodes. One :class:`~dmlcore.data.base.DataError` line otherwise.

    ``strict=False`` (study resolution): a split file that does not exist yet, or a dataset
    that cannot be read here (a cluster-only ``data.root``), is left to the preflight and the
    trainer; everything that can be checked is. ``strict=True`` (the driver's preflight):
    both are errors too."""
    from ..data.base import DataError, load_split, parse_split_spec, select_entry

    from ..data.base import CLOSED_SPLIT

    spec = cfg.data.split
    if spec in ("standard", CLOSED_SPLIT):  # no split file
        return
    path, _ = parse_split_spec(spec)
    if not path.is_file():
        if strict:
            raise DataError(f"data.split: split file {path} does not exist")
        return
    from ..data.base import read_split_file

    read_split_file(path)  # shape and JSON errors are always errors
    try:
        source = _source_for(cfg)
    except DataError:
        if strict:
            raise
        select_entry(spec)  # the id still has to exist
        return
    split, extra = load_split(spec, source)
    eps = extra.get("episodes")
    fs = cfg.eval.few_shot
    if eps and fs is not None and fs.episode_source != "random":  # as build_data resolves them
        resolve_episodes(eps, source, split.test_classes, f"data.split: {spec}")
    if fs is not None and fs.episode_source == "published":
        missing = [k for k in fs.shots if str(k) not in (eps or {})]
        if missing:
            raise DataError(f"data.split: {spec} has no published {missing}-shot episodes (eval.few_shot.episode_source=published)")


def validate_document(doc: Mapping[str, Any], where: str) -> None:
    """Shape of an imported (``format: oodml-published``) split file; one DataError line naming the entry."""
    from ..data.base import DataError

    for n, s in enumerate(doc["splits"]):
        at = f"data.split: {where} split {n}"
        if not isinstance(s.get("id"), str) or not s["id"]:
            raise DataError(f"{at} has no 'id' (a string)")
        at = f"data.split: {where} split '{s['id']}'"
        fid = s.get("fid")
        if isinstance(fid, bool) or not isinstance(fid, (int, float)):
            raise DataError(f"{at}: 'fid' must be a number, got {fid!r}")
        vs = s.get("val_split")
        if vs is not None and not (isinstance(vs, Mapping) and isinstance(vs.get("train"), list) and isinstance(vs.get("val"), list)):
            raise DataError(f"{at}: 'val_split' must be {{train: [...], val: [...]}}")
        eps = s.get("episodes")
        if eps is None:
            continue
        if not isinstance(eps, Mapping):
            raise DataError(f"{at}: 'episodes' must map a shot count to a list of episodes")
        for k, per in eps.items():
            if not str(k).isdigit() or not isinstance(per, list):
                raise DataError(f"{at}: episodes[{k!r}] must be a list of episodes under a shot count")
            for e, ep in enumerate(per):
                ok = isinstance(ep, Mapping) and (
                    (isinstance(ep.get("support"), Mapping) and all(isinstance(v, list) for v in ep["support"].values()))
                    or isinstance(ep.get("support_classes"), list)
                )
                if not ok:
                    raise DataError(f"{at}: episodes[{k}][{e}] must be {{support: {{class: [file | position]}}}} or {{support_classes: [...]}}")
                for c, items in (ep.get("support") or {}).items():
                    for x in items:
                        if isinstance(x, bool) or not isinstance(x, (str, int)) or (isinstance(x, int) and x < 0):
                            raise DataError(f"{at}: episodes[{k}][{e}] class {c!r}: support entry {x!r} is neither a file name nor a position >= 0")
    ids = [s["id"] for s in doc["splits"]]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise DataError(f"data.split: {where} repeats split ids {dup}")


def split_tags(cfg: Any) -> dict[str, str]:
    """Run tags naming the ooDML split of ``cfg`` (no file access): ``split_id``, ``split_file``.
    The published FID is reported as the metric ``data/fid``."""
    spec = str(cfg.data.split)
    if spec == "standard" or "#" not in spec:
        return {}
    path, _, key = spec.rpartition("#")
    return {"split_id": key, "split_file": path}
