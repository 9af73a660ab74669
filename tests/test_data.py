"""dmlcore.data: splits, build_data, embedded datasets (glyphs, digits), transforms, samplers."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from dmlcore import registry
from dmlcore.config import load_config
from dmlcore.data import embedded
from dmlcore.data.base import (
    ClassSplit,
    DataError,
    build_data,
    build_source,
    carve_val,
    load_split,
    make_loader,
    save_split_file,
)
from dmlcore.data.samplers import ClassBalancedSampler, RandomSampler, build_sampler
from dmlcore.data.transforms import IMAGENET_MEAN, IMAGENET_STD, eval_transform

GLYPHS_SMALL = {"n_classes": 12, "samples_per_class": 4}


def cfg_for(**overrides):
    return load_config(None, overrides)


# ---------------------------------------------------------------------------- splits
def test_class_split_validates():
    s = ClassSplit([3, 1], np.array([7, 9]), "x")
    assert s.train_classes == (3, 1) and s.test_classes == (7, 9)
    assert all(type(c) is int for c in s.train_classes + s.test_classes)
    with pytest.raises(DataError, match="both train and test classes: 2"):
        ClassSplit((1, 2), (2, 3), "x")
    with pytest.raises(DataError, match="test_classes is empty"):
        ClassSplit((1, 2), (), "x")
    with pytest.raises(DataError, match="repeats classes 1"):
        ClassSplit((1, 1), (2,), "x")
    with pytest.raises(DataError, match="integer class ids"):
        ClassSplit(("a",), (2,), "x")


def test_carve_val_is_disjoint_fixed_by_dataset_name_and_checked():
    train = tuple(range(100, 120))
    keep, val = carve_val(train, 0.25, "cub200")
    assert len(val) == 5 and len(keep) == 15
    assert set(keep) | set(val) == set(train) and not set(keep) & set(val)
    assert carve_val(train, 0.25, "cub200") == (keep, val)  # no dependence on anything else
    assert carve_val(train, 0.25, "cars196")[1] != val  # seeded by the dataset name
    assert carve_val(train, 0.0, "cub200") == (train, ())
    with pytest.raises(DataError, match="both need at least 2"):
        carve_val((1, 2, 3), 0.3, "x")


def test_build_data_digits_splits_labels_and_tensors():
    b = build_data(cfg_for(**{"data.dataset": "digits", "data.image_size": 16}))
    assert b.num_train_classes == 5 and b.val is None
    assert b.train.class_ids.tolist() == [0, 1, 2, 3, 4]
    assert b.test.class_ids.tolist() == [5, 6, 7, 8, 9]
    assert len(b.train) + len(b.test) == 1797
    for ds in (b.train, b.train_eval, b.test):
        assert ds.labels.dtype == np.int64
        assert set(ds.labels.tolist()) == set(range(ds.num_classes))
    np.testing.assert_array_equal(b.train.indices, b.train_eval.indices)
    # remapping: test label k is original class 5 + k
    src = b.source
    np.testing.assert_array_equal(src.labels[b.test.indices], b.test.labels + 5)
    x, y = b.test[0]
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32 and isinstance(y, int)
    # eval images are the stored uint8 image, normalised with the ImageNet statistics
    raw = torch.from_numpy(src.get_image(int(b.test.indices[0]))).permute(2, 0, 1).float() / 255
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    torch.testing.assert_close(x, (raw - mean) / std)
    assert b.info["num_samples"]["train"] == len(b.train) and b.info["flip_ok"] is False


def test_val_split_is_class_disjoint_and_the_same_for_every_training_seed():
    base = {"data.dataset": "glyphs", "data.params": GLYPHS_SMALL, "data.val_classes": 0.4}
    b0 = build_data(cfg_for(**base, **{"train.seed": 0}))
    b1 = build_data(cfg_for(**base, **{"train.seed": 123}))
    tr, va, te = (set(d.class_ids.tolist()) for d in (b0.train, b0.val, b0.test))
    assert len(va) == 2 and len(tr) == 4 and len(te) == 6
    assert not tr & va and not va & te and not tr & te
    assert b0.val.class_ids.tolist() == b1.val.class_ids.tolist()
    assert b0.info["val_classes"] == b0.val.class_ids.tolist()
    assert b0.num_train_classes == 4 and set(b0.train.labels.tolist()) == {0, 1, 2, 3}


def test_split_file_is_loaded_and_checked(tmp_path):
    src = build_source(cfg_for(**{"data.dataset": "digits", "data.image_size": 8}))
    path = save_split_file(
        tmp_path / "splits.json",
        "digits",
        [ClassSplit((0, 1, 2), (7, 8, 9), "easy"), ClassSplit((0, 5, 9, 3), (1, 2), "hard")],
        [{"fid": 12.5}, {"fid": 80.0}],
    )
    split, extra = load_split(f"{path}#1", src)
    assert split.train_classes == (0, 5, 9, 3) and split.test_classes == (1, 2) and split.name == "hard"
    assert extra["fid"] == 80.0

    b = build_data(cfg_for(**{"data.dataset": "digits", "data.image_size": 8, "data.split": f"{path}#0"}))
    assert b.train.class_ids.tolist() == [0, 1, 2] and b.test.class_ids.tolist() == [7, 8, 9]
    assert b.info["split"] == "easy" and b.info["fid"] == 12.5

    def err(spec):
        with pytest.raises(DataError) as e:
            load_split(spec, src)
        assert "\n" not in str(e.value)
        return str(e.value)

    assert "does not exist" in err(f"{tmp_path}/nope.json#0")
    assert "index 2 is out of range" in err(f"{path}#2") and "has 2 splits (0-1)" in err(f"{path}#2")
    assert "expected 'standard' or 'FILE.json#INDEX'" in err(str(path))
    assert "must be an integer" in err(f"{path}#first")
    other = save_split_file(tmp_path / "cub.json", "cub200", [ClassSplit((1,), (2,), "c")])
    assert "written for dataset 'cub200', but data.dataset is 'digits'" in err(f"{other}#0")
    (tmp_path / "unk.json").write_text(json.dumps({"dataset": "digits", "splits": [{"train_classes": [0, 11, 12], "test_classes": [5]}]}))
    assert "2 classes unknown to dataset 'digits': 11, 12" in err(f"{tmp_path}/unk.json#0")
    (tmp_path / "ovl.json").write_text(json.dumps({"dataset": "digits", "splits": [{"train_classes": [0, 1], "test_classes": [1]}]}))
    assert "both train and test classes" in err(f"{tmp_path}/ovl.json#0")
    (tmp_path / "bad.json").write_text("{not json")
    assert "not valid JSON" in err(f"{tmp_path}/bad.json#0")
    (tmp_path / "shape.json").write_text(json.dumps({"dataset": "digits", "splits": [{"train": [1]}]}))
    assert "'train_classes' and 'test_classes'" in err(f"{tmp_path}/shape.json#0")


def test_dataset_param_typo_names_the_config_key():
    with pytest.raises(registry.RegistryError, match=r"data\.params\.n_clases: .*did you mean 'n_classes'"):
        build_source(cfg_for(**{"data.dataset": "glyphs", "data.params": {"n_clases": 3}}))


# ---------------------------------------------------------------------------- glyphs / digits
def test_glyph_charset_has_hundreds_of_classes_without_lookalikes():
    chars, usable = embedded.glyph_charset()
    assert 300 <= len(chars) <= 900
    kept = set(chars)
    # one class per look-alike group, the Latin (lowest) code point kept
    for group in ("AΑА", "BΒВ", "EΕЕ", "HΗН", "KΚК", "MΜМ", "OΟО", "PΡР", "TΤТ", "XΧХ", "aа", "eе", "oοо", "pр", "xх", "IΙІ"):
        assert [c for c in group if ord(c) in kept] == [group[0]], group
    # distinct letters of every script and the digits survive
    for c in "AaZzßÆλΩπЖжБЯя0123456789ÉéÅ":
        assert ord(c) in kept, c
    # independent check: in every face, no two usable classes render identically
    tmpl = torch.from_numpy(embedded._templates(64))
    col = {cp: k for k, cp in enumerate(embedded._covered())}
    for f in range(tmpl.shape[0]):
        cps = [cp for cp in chars if f in usable[cp]]
        canon = torch.nn.functional.avg_pool2d(tmpl[f, [col[cp] for cp in cps]].unsqueeze(1).float(), 2).flatten(1)
        b = (canon > 64).float()
        n = b.sum(1)
        xor = n[:, None] + n[None] - 2 * b @ b.T + 1e6 * torch.eye(len(cps))
        assert xor.min() > 2, (f, xor.argmin())


def test_glyphs_are_deterministic_per_seed_and_in_memory():
    render = embedded.render_glyphs.__wrapped__  # bypass the per-process cache
    a, la, ca = render(12, 4, 1.0, 16, 0)
    b, lb, cb = render(12, 4, 1.0, 16, 0)
    assert a.shape == (48, 3, 16, 16) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(la, lb)
    c, _, cc = render(12, 4, 1.0, 16, 1)
    assert ca == cc and (a != c).mean() > 0.5  # same classes, another rendering
    # a class's samples do not depend on how many samples or classes are asked for
    d, _, _ = render(6, 6, 1.0, 16, 0)
    np.testing.assert_array_equal(d.reshape(6, 6, 3, 16, 16)[:, :4], a.reshape(12, 4, 3, 16, 16)[:6])
    assert ca == embedded.glyph_class_order()[:12]

    src = registry.build("dataset", "glyphs", GLYPHS_SMALL, image_size=16, seed=5, root=None, on_corrupt="error")
    assert src.in_memory and not src.flip_ok and len(src) == 48
    assert src.get_image(0).shape == (16, 16, 3)
    assert set(src.labels.tolist()) == set(ca)
    sp = src.standard_split()
    assert len(sp.train_classes) == len(sp.test_classes) == 6
    assert not set(sp.train_classes) & set(sp.test_classes)
    again = registry.build("dataset", "glyphs", GLYPHS_SMALL, image_size=16, seed=5, root=None, on_corrupt="error")
    assert again.images_chw is src.images_chw  # cached per (params, image_size) within the process
    with pytest.raises(DataError, match="n_classes"):
        registry.build("dataset", "glyphs", {"n_classes": 1}, image_size=16)


def test_digits_source():
    src = registry.build("dataset", "digits", {}, image_size=24, root=None, seed=0, on_corrupt="error")
    assert len(src) == 1797 and sorted(src.class_names) == list(range(10))
    img = src.get_image(0)
    assert img.shape == (24, 24, 3) and img.dtype == np.uint8 and img.max() > 200
    assert src.standard_split() == ClassSplit((0, 1, 2, 3, 4), (5, 6, 7, 8, 9), "standard")
    assert src.flip_ok is False


# ---------------------------------------------------------------------------- transforms
def test_augmentations_and_eval_transform():
    img = torch.randint(0, 256, (3, 37, 50), dtype=torch.uint8)  # a file image at load size for 32
    for name in ("none", "standard", "strong"):
        t = registry.build("augmentation", name, None, image_size=32, flip_ok=True)
        out = t(img)
        assert out.shape == (3, 32, 32) and out.dtype == torch.float32
    ev = eval_transform(32)
    torch.testing.assert_close(ev(img), ev(img))
    # eval = center crop of the load-size image
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    crop = img[:, 2:34, 9:41].float() / 255
    torch.testing.assert_close(ev(img), (crop - mean) / std)
    # an in-memory image already at image_size is used as is; a smaller one is resized up
    assert eval_transform(8)(torch.zeros(3, 8, 8, dtype=torch.uint8)).shape == (3, 8, 8)
    assert eval_transform(16)(torch.zeros(3, 8, 8, dtype=torch.uint8)).shape == (3, 16, 16)



# ---------------------------------------------------------------------------- samplers
def _labels(counts):
    return np.concatenate([np.full(n, c) for c, n in enumerate(counts)])


def test_class_balanced_composition_and_class_coverage():
    labels = _labels([5] * 12)
    s = ClassBalancedSampler(labels, batch_size=8, samples_per_class=2, seed=3, iterations=9)
    batches = list(s)
    assert len(batches) == len(s) == 9
    for b in batches:
        assert len(b) == 8 and len(set(b)) == 8
        cls, cnt = np.unique(labels[b], return_counts=True)
        assert len(cls) == 4 and set(cnt.tolist()) == {2}
    # classes without replacement: each run of 3 batches uses all 12 classes once
    for k in range(0, 9, 3):
        used = np.concatenate([np.unique(labels[b]) for b in batches[k : k + 3]])
        assert sorted(used.tolist()) == list(range(12))
    # samples within a class without replacement: first 2 uses of a class never repeat a sample
    first_two = {}
    for b in batches:
        for i in b:
            first_two.setdefault(labels[i], []).append(i)
    for c, idx in first_two.items():
        assert len(set(idx[:4])) == min(4, len(idx))


def test_samplers_are_deterministic_per_seed_and_epoch():
    labels = _labels([4] * 10)
    s = ClassBalancedSampler(labels, 8, 4, seed=1)
    assert len(s) == 40 // 8
    e0, e0b = list(s), list(s)
    s.set_epoch(1)
    e1 = list(s)
    assert e0 == e0b and e0 != e1
    assert list(ClassBalancedSampler(labels, 8, 4, seed=1)) == e0
    assert list(ClassBalancedSampler(labels, 8, 4, seed=2)) != e0
    r = RandomSampler(labels, 8, seed=1)
    r0 = list(r)
    r.set_epoch(4)
    assert list(RandomSampler(labels, 8, seed=1)) == r0 and list(r) != r0
    assert sorted(np.concatenate(r0).tolist()) == list(range(40))  # one pass, no repeats


def test_sampler_errors_and_small_classes():
    labels = _labels([8] * 9 + [3, 5, 2])
    with pytest.raises(DataError) as e:
        ClassBalancedSampler(labels, 16, 8)
    assert str(e.value).startswith(
        "batch.samples_per_class=8 but 3 train classes have fewer than 8 samples (smallest has 2)"
    )
    s = ClassBalancedSampler(labels, 16, 8, iterations=12, small_classes="replace")
    for b in s:
        cls, cnt = np.unique(labels[b], return_counts=True)
        assert len(cls) == 2 and set(cnt.tolist()) == {8}
    with pytest.raises(DataError, match="needs 13 classes per batch, but the train split has only 12"):
        ClassBalancedSampler(labels, 26, 2)
    with pytest.raises(DataError, match="not a multiple"):
        ClassBalancedSampler(labels, 10, 4)
    with pytest.raises(DataError, match="larger than the train split"):
        RandomSampler(labels[:4], 8)


def test_build_sampler_from_config():
    labels = _labels([4] * 10)
    cfg = cfg_for(**{"batch.size": 8, "batch.samples_per_class": 4, "batch.iterations_per_epoch": 3, "train.seed": 7})
    s = build_sampler(cfg, labels)
    assert isinstance(s, ClassBalancedSampler) and len(s) == 3 and s.seed == 7
    r = build_sampler(cfg_for(**{"batch.size": 8, "batch.samples_per_class": 0}), labels)
    assert isinstance(r, RandomSampler) and len(r) == 5
    small = _labels([4] * 3 + [1])
    with pytest.raises(DataError, match="batch.sampler_params.small_classes=replace"):
        build_sampler(cfg_for(**{"batch.size": 4, "batch.samples_per_class": 2}), small)
    rep = build_sampler(cfg_for(**{"batch.size": 4, "batch.samples_per_class": 2, "batch.sampler_params": {"small_classes": "replace"}}), small)
    assert all(len(b) == 4 for b in rep)
    with pytest.raises(registry.RegistryError, match="batch.sampler_params.small_class:"):
        build_sampler(cfg_for(**{"batch.sampler_params": {"small_class": "replace"}}), labels)


def test_loader_with_workers_follows_the_sampler():
    cfg = cfg_for(
        **{"data.dataset": "digits", "data.image_size": 8, "data.num_workers": 1, "batch.size": 8, "batch.samples_per_class": 4}
    )
    b = build_data(cfg)
    sampler = build_sampler(cfg, b.train.labels)
    loader = make_loader(b.train, cfg, batch_sampler=sampler)
    first = list(sampler)[0]
    x, y = next(iter(loader))
    assert x.shape == (8, 3, 8, 8) and y.tolist() == b.train.labels[first].tolist()
    assert len(loader) == len(sampler) == len(b.train) // 8
    ev = make_loader(b.test, cfg_for(**{"data.dataset": "digits", "eval.batch_size": 100}))
    assert sum(len(yb) for _, yb in ev) == len(b.test)
