"""Real dataset layouts on tiny fake trees: CUB200, Cars196, SOP, CIFAR-10/100, ImageFolder;
layout errors, corrupt images, the decoded-image cache."""

from __future__ import annotations

import logging
import pickle

import numpy as np
import pytest
import scipy.io
import torch
from PIL import Image

from dmlcore import registry
from dmlcore.config import load_config
from dmlcore.data.base import DataError, build_data

CTX = {"image_size": 16, "seed": 0, "on_corrupt": "error"}


def write_image(path, seed, size=(20, 14), fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path, format=fmt)


def source(name, root, **params):
    return registry.build("dataset", name, params, root=None if root is None else str(root), **CTX)


def one_line_error(name, root, **params):
    with pytest.raises(DataError) as e:
        source(name, root, **params)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{name}: ")
    return msg


def bundle(name, root, **over):
    return build_data(load_config(None, {"data.dataset": name, "data.root": str(root), "data.image_size": 16, **over}))


# ---------------------------------------------------------------------------- CUB-200-2011
def make_cub(root, classes=(1, 2, 101, 102), per_class=3):
    base = root / "CUB_200_2011"
    (base / "images").mkdir(parents=True)
    imgs, labels = [], []
    for c in classes:
        for k in range(per_class):
            rel = f"{c:03d}.Bird_{c}/Bird_{c}_{k}.jpg"
            write_image(base / "images" / rel, seed=c * 10 + k)
            imgs.append(rel)
            labels.append(c)
    (base / "images.txt").write_text("".join(f"{i + 1} {p}\n" for i, p in enumerate(imgs)))
    (base / "image_class_labels.txt").write_text("".join(f"{i + 1} {c}\n" for i, c in enumerate(labels)))
    (base / "classes.txt").write_text("".join(f"{c} {c:03d}.Bird_{c}\n" for c in classes))
    return base


def test_cub200_layout_split_and_bundle(tmp_path):
    base = make_cub(tmp_path)
    for root in (tmp_path, base):  # parent or the CUB_200_2011 folder itself
        src = source("cub200", root)
        assert len(src) == 12 and src.class_names[101] == "101.Bird_101"
        assert src.standard_split().train_classes == (1, 2) and src.standard_split().test_classes == (101, 102)
        assert src.get_image(0).shape == (14, 20, 3)
    b = bundle("cub200", tmp_path)
    assert len(b.train) == 6 and len(b.test) == 6 and b.num_train_classes == 2
    assert b.test.class_ids.tolist() == [101, 102] and sorted(set(b.test.labels.tolist())) == [0, 1]
    # whole image: shorter side round(1.5 * round(16*256/224)) = 27, aspect kept: round(20 * 27 / 14) = 39
    assert b.train.store.get(int(b.train.indices[0])).shape == (3, 27, 39)
    x, y = b.train[0]
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32 and y in (0, 1)
    assert b.test[5][0].shape == (3, 16, 16)


def test_cub200_missing_and_malformed(tmp_path):
    msg = one_line_error("cub200", tmp_path)
    assert msg == f"cub200: expected CUB_200_2011/images.txt under {tmp_path} (extract CUB_200_2011.tgz there)"
    assert "data.root is not set" in one_line_error("cub200", None)
    base = make_cub(tmp_path)
    (base / "classes.txt").unlink()
    assert "CUB_200_2011/classes.txt" in one_line_error("cub200", tmp_path)
    (base / "classes.txt").write_text("1 a\n2 b\n101 c\n102 d\n")
    (base / "images.txt").write_text("1 001.x/a.jpg\n2\n")
    msg = one_line_error("cub200", tmp_path)
    assert "images.txt line 2" in msg and "expected '<image_id> <path>'" in msg


# ---------------------------------------------------------------------------- Cars196
def make_cars(root, classes=(1, 2, 99, 100), per_class=2, with_names=True):
    rows = []
    k = 0
    for c in classes:
        for _ in range(per_class):
            k += 1
            rel = f"car_ims/{k:06d}.jpg"
            write_image(root / rel, seed=k)
            rows.append((rel, c, int(c > 98)))
    ann = np.zeros((1, len(rows)), dtype=[("relative_im_path", "O"), ("class", "O"), ("test", "O")])
    for i, (rel, c, t) in enumerate(rows):
        ann[0, i] = (rel, np.array([[c]], dtype=np.uint8), np.array([[t]], dtype=np.uint8))
    mat = {"annotations": ann}
    if with_names:
        names = np.empty((1, 100), dtype="O")
        for i in range(100):
            names[0, i] = f"Car model {i + 1}"
        mat["class_names"] = names
    scipy.io.savemat(root / "cars_annos.mat", mat)


def test_cars196_layout_split_and_errors(tmp_path):
    assert one_line_error("cars196", tmp_path).startswith(f"cars196: expected cars_annos.mat under {tmp_path}")
    make_cars(tmp_path)
    src = source("cars196", tmp_path)
    assert len(src) == 8 and src.class_names[99] == "Car model 99"
    sp = src.standard_split()
    assert set(sp.train_classes) >= {1, 2} and max(sp.train_classes) == 98 and min(sp.test_classes) == 99
    b = bundle("cars196", tmp_path)
    assert len(b.train) == 4 and len(b.test) == 4  # classes without images are simply absent
    assert b.train.class_ids.tolist() == [1, 2] and b.test.class_ids.tolist() == [99, 100]
    assert b.test[0][0].shape == (3, 16, 16)
    scipy.io.savemat(tmp_path / "cars_annos.mat", {"something_else": np.zeros(3)})
    assert "no 'annotations' struct" in one_line_error("cars196", tmp_path)
    (tmp_path / "cars_annos.mat").write_bytes(b"not a mat file")
    assert "cannot read" in one_line_error("cars196", tmp_path)


# ---------------------------------------------------------------------------- SOP
def make_sop(root):
    base = root / "Stanford_Online_Products"
    k = 0
    for fname, classes in (("Ebay_train.txt", (1, 2, 3)), ("Ebay_test.txt", (4, 5))):
        lines = ["image_id class_id super_class_id path"]
        for c in classes:
            for j in range(2):
                k += 1
                rel = f"bicycle_final/{c}_{j}.JPG"
                write_image(base / rel, seed=k, fmt="JPEG")
                lines.append(f"{k} {c} 1 {rel}")
        (base / fname).write_text("\n".join(lines) + "\n")
    return base


def test_sop_layout_split_and_errors(tmp_path):
    assert "Stanford_Online_Products/Ebay_train.txt" in one_line_error("sop", tmp_path)
    base = make_sop(tmp_path)
    src = source("sop", tmp_path)
    assert len(src) == 10 and src.class_names[4] == "bicycle/4"
    assert src.standard_split().train_classes == (1, 2, 3) and src.standard_split().test_classes == (4, 5)
    b = bundle("sop", base, **{"data.val_classes": 0.0})
    assert (len(b.train), len(b.test), b.num_train_classes) == (6, 4, 3)
    assert b.train[0][0].shape == (3, 16, 16)
    (base / "Ebay_test.txt").unlink()
    assert "Stanford_Online_Products/Ebay_test.txt" in one_line_error("sop", tmp_path)


# ---------------------------------------------------------------------------- CIFAR
def make_cifar(root, hundred=False):
    n_cls = 100 if hundred else 10
    folder = root / ("cifar-100-python" if hundred else "cifar-10-batches-py")
    folder.mkdir(parents=True)
    files = ("train", "test") if hundred else ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch")
    key = b"fine_labels" if hundred else b"labels"
    rng = np.random.default_rng(0)
    for f in files:
        y = list(range(n_cls))  # one image of every class per file
        d = {b"data": rng.integers(0, 256, (n_cls, 3072), dtype=np.uint8), key: y, b"batch_label": b"x"}
        with open(folder / f, "wb") as fh:
            pickle.dump(d, fh)
    meta = {(b"fine_label_names" if hundred else b"label_names"): [f"c{i}".encode() for i in range(n_cls)]}
    with open(folder / ("meta" if hundred else "batches.meta"), "wb") as fh:
        pickle.dump(meta, fh)
    return folder


@pytest.mark.parametrize("hundred", [False, True])
def test_cifar_pickles(tmp_path, hundred):
    name = "cifar100" if hundred else "cifar10"
    archive = "cifar-100-python.tar.gz" if hundred else "cifar-10-python.tar.gz"
    assert archive in one_line_error(name, tmp_path)
    folder = make_cifar(tmp_path, hundred)
    n_files, n_cls = (2, 100) if hundred else (6, 10)
    for root in (tmp_path, folder):
        src = source(name, root)
        assert src.in_memory and len(src) == n_files * n_cls and src.class_names[3] == "c3"
        assert src.standard_split().train_classes == tuple(range(n_cls // 2))
        assert src.get_image(0).shape == (32, 32, 3)
    b = bundle(name, tmp_path, **{"data.image_size": 32})
    assert len(b.train) == len(b.test) == n_files * n_cls // 2
    x, _ = b.test[0]
    assert x.shape == (3, 32, 32)
    # the uint8 tensor is the pickle's row-major CHW image
    with open(folder / ("train" if hundred else "data_batch_1"), "rb") as fh:
        raw = pickle.load(fh)[b"data"][0].reshape(3, 32, 32)
    np.testing.assert_array_equal(b.train.get_uint8(0).numpy(), raw)
    (folder / ("meta" if hundred else "batches.meta")).unlink()
    assert "meta" in one_line_error(name, tmp_path)


# ---------------------------------------------------------------------------- ImageFolder
def make_folder(root, classes=("ant", "bee", "cat", "dog"), per_class=2):
    for n, c in enumerate(classes):
        for k in range(per_class):
            write_image(root / c / f"{k}.png", seed=100 * n + k, size=(16 + 6 * n, 12 + 3 * k))  # whole images of different shapes
    (root / "ant" / "notes.txt").write_text("not an image")


def test_imagefolder_rules(tmp_path):
    make_folder(tmp_path)
    src = source("imagefolder", tmp_path)
    assert len(src) == 8 and src.class_names == {0: "ant", 1: "bee", 2: "cat", 3: "dog"}
    assert src.standard_split().test_classes == (2, 3)
    assert source("imagefolder", tmp_path, test_fraction=0.25).standard_split().test_classes == (3,)
    sp = source("imagefolder", tmp_path, test_classes=["ant", "cat"]).standard_split()
    assert sp.train_classes == (1, 3) and sp.test_classes == (0, 2)
    assert "not both" in one_line_error("imagefolder", tmp_path, test_classes=["ant"], test_fraction=0.5)
    assert "not under" in one_line_error("imagefolder", tmp_path, test_classes=["eel"])
    b = bundle("imagefolder", tmp_path, **{"data.params": {"test_classes": ["bee"]}})
    assert b.test.class_ids.tolist() == [1] and b.num_train_classes == 3
    assert "at least 2 class folders" in one_line_error("imagefolder", tmp_path / "ant")
    assert "data.root is not set" in one_line_error("imagefolder", None)


# ---------------------------------------------------------------------------- corrupt files, cache
def test_on_corrupt_error_and_skip(tmp_path, caplog):
    make_folder(tmp_path)
    bad = tmp_path / "ant" / "1.png"
    bad.write_bytes(b"\x89PNG broken")
    b = bundle("imagefolder", tmp_path)
    j = int(np.flatnonzero(np.asarray(b.source.paths)[b.train.indices] == str(bad))[0])
    with pytest.raises(DataError, match=f"unreadable image {bad}"):
        b.train[j]
    b = bundle("imagefolder", tmp_path, **{"data.on_corrupt": "skip", "data.augmentation": "none"})
    with caplog.at_level(logging.WARNING, logger="dmlcore.data"):
        x, y = b.train[j]
        x2, y2 = b.train[j]
    good = int(np.flatnonzero(np.asarray(b.source.paths)[b.train.indices] == str(tmp_path / "ant" / "0.png"))[0])
    assert y == y2 == int(b.train.labels[good])
    torch.testing.assert_close(x, b.train[good][0])  # the class-mate stands in
    assert sum(str(bad) in r.getMessage() for r in caplog.records) == 1  # warned once per file
    (tmp_path / "ant" / "0.png").write_bytes(b"")
    b = bundle("imagefolder", tmp_path, **{"data.on_corrupt": "skip"})
    with pytest.raises(DataError, match="every image of class 0"):
        b.train[j]


def test_decoded_image_cache(tmp_path):
    make_folder(tmp_path / "data")
    cache = tmp_path / "cache"
    b = bundle("imagefolder", tmp_path / "data", **{"data.cache_dir": str(cache)})
    assert b.train.store.cache.built_here
    maps = list(cache.rglob("images.u8"))
    assert len(maps) == 1  # one memory-mapped array for the whole dataset
    nocache = bundle("imagefolder", tmp_path / "data")
    for j in range(len(b.test)):
        torch.testing.assert_close(b.test.get_uint8(j), nocache.test.get_uint8(j))
    # a later run maps the same file: it does not decode again
    arr = np.memmap(maps[0], dtype=np.uint8, mode="r+")
    i = int(b.test.indices[0])
    off, h, w = (int(v) for v in np.load(maps[0].parent / "index.npy")[i])  # channels-first image at its offset
    assert (h, w) == tuple(nocache.test.get_uint8(0).shape[1:])  # the whole image, extent preserved
    arr[off + np.arange(3) * h * w] = [1, 2, 3]
    arr.flush()
    b2 = bundle("imagefolder", tmp_path / "data", **{"data.cache_dir": str(cache)})
    assert not b2.train.store.cache.built_here
    assert b2.test.get_uint8(0)[:, 0, 0].tolist() == [1, 2, 3]  # served from the cache
    b3 = bundle("imagefolder", tmp_path / "data", **{"data.cache_dir": str(cache), "data.image_size": 24})
    assert min(b3.test.get_uint8(0).shape[1:]) == round(1.5 * 27) and len(list(cache.rglob("images.u8"))) == 2  # keyed by size
    # a changed file list gets a new cache; an unreadable file is recorded and follows on_corrupt
    (tmp_path / "data" / "ant" / "1.png").write_bytes(b"broken")
    b4 = bundle("imagefolder", tmp_path / "data", **{"data.cache_dir": str(cache), "data.on_corrupt": "error"})
    assert b4.train.store.cache.built_here and len(b4.train.store.cache.bad) == 1
    j = int(np.flatnonzero(np.asarray(b4.source.paths)[b4.train.indices] == str(tmp_path / "data" / "ant" / "1.png"))[0])
    with pytest.raises(DataError, match="unreadable image"):
        b4.train.get_uint8(j)


def test_concurrent_runs_build_the_cache_once(tmp_path):
    import subprocess
    import sys

    make_folder(tmp_path / "data")
    code = (
        "import sys; from dmlcore.config import load_config; from dmlcore.data.base import build_data;"
        f"b = build_data(load_config(None, {{'data.dataset': 'imagefolder', 'data.root': {str(tmp_path / 'data')!r},"
        f" 'data.image_size': 16, 'data.cache_dir': {str(tmp_path / 'cache')!r}, 'batch.size': 4, 'batch.samples_per_class': 2}}));"
        "print('BUILT' if b.train.store.cache.built_here else 'REUSED')"
    )
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True) for _ in range(3)]
    outs = [p.communicate(timeout=300)[0].strip().splitlines()[-1] for p in procs]
    assert sorted(outs) == ["BUILT", "REUSED", "REUSED"], outs


def test_cached_gather_matches_items_and_applies_on_corrupt(tmp_path):
    """With the decoded cache a batch is one bulk read, equal to the item-by-item images;
    an unreadable file follows data.on_corrupt there too."""
    make_folder(tmp_path / "data")
    (tmp_path / "data" / "ant" / "1.png").write_bytes(b"broken")
    paths = lambda b: np.asarray(b.source.paths)[b.train.indices]  # noqa: E731
    b = bundle("imagefolder", tmp_path / "data", **{"data.cache_dir": str(tmp_path / "c"), "data.on_corrupt": "skip"})
    assert b.train.can_gather and not bundle("imagefolder", tmp_path / "data").train.can_gather
    js = np.arange(len(b.train))[::-1].copy()
    batch = b.train.gather(js)
    assert batch.dtype == torch.uint8 and len(batch) == len(js)
    for k, j in enumerate(js):
        torch.testing.assert_close(batch[k], b.train.get_uint8(int(j)))
    bad = int(np.flatnonzero(paths(b) == str(tmp_path / "data" / "ant" / "1.png"))[0])
    good = int(np.flatnonzero(paths(b) == str(tmp_path / "data" / "ant" / "0.png"))[0])
    assert batch[list(js).index(bad)].sum() > 0  # a class-mate stood in, not the zeros of the slot
    torch.testing.assert_close(b.train.gather([bad])[0], b.train.get_uint8(good))
    b = bundle("imagefolder", tmp_path / "data", **{"data.cache_dir": str(tmp_path / "c"), "data.on_corrupt": "error"})
    with pytest.raises(DataError, match="unreadable image"):
        b.train.gather([good, bad])


def test_trainer_reads_cached_files_in_bulk_with_identical_results(tmp_path, monkeypatch):
    """A file dataset with data.cache_dir trains and evaluates without DataLoader workers
    (bulk reads from the map) and gives the same numbers as the per-item loader path."""
    from dmlcore.config import load_config
    from dmlcore.train import Trainer

    make_folder(tmp_path / "data", classes=("ant", "bee", "cat", "dog", "eel", "fox", "gnu", "hen"), per_class=4)
    over = {
        "data.dataset": "imagefolder", "data.root": str(tmp_path / "data"), "data.image_size": 16,
        "data.num_workers": 0, "model.backbone": "small_cnn", "model.embed_dim": 8, "batch.size": 8,
        "batch.samples_per_class": 2, "train.epochs": 2, "train.device": "cpu", "eval.clustering": False,
    }
    plain = Trainer(load_config(None, over), progress=False).fit()
    # the cached path must never build a DataLoader
    import dmlcore.train as train_mod

    def no_loader(*a, **k):
        raise AssertionError("a DataLoader was built for cached data")

    monkeypatch.setattr(train_mod, "DataLoader", no_loader)
    cached = Trainer(load_config(None, {**over, "data.cache_dir": str(tmp_path / "c")}), progress=False).fit()
    for key in ("train/loss", "test/recall_at_1", "test/map_at_r"):
        assert cached.final[key] == pytest.approx(plain.final[key], abs=1e-6), key
