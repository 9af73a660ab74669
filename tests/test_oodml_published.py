"""ooDML as published: the authors' split files imported safely and used exactly."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import scipy.io
from PIL import Image

from dmlcore.config import load_config
from dmlcore.data.base import DataError, build_data
from dmlcore.oodml.published import check_split
from sweeper.cli import main

REFERENCE = Path("/work/shared/reference/oodml_cars196_splits.json")


def write_image(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)).save(path)


def one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err, err
    return err


def authors_dict(train, test, support, fid=12.5):
    """A split dict shaped like the authors' pickles (numpy arrays and scalars included)."""
    return {
        1: {"train": np.array(train), "test": list(test), "fid": np.float64(fid),
            "split_train": list(train[:-2]), "split_val": list(train[-2:]),
            "test_episodes": {2: {0: support, 1: support}}},
    }  # fmt: skip


# ---------------------------------------------------------------------------- import
@pytest.mark.skipif(not REFERENCE.is_file(), reason="the shared reference file is not on this machine")
def test_import_of_the_published_cars196_file_matches_the_reference(tmp_path, capsys):
    out = tmp_path / "x.json"
    assert main(["splits", "import", str(REFERENCE), "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    ref = json.loads(REFERENCE.read_text())["splits"]  # read independently of the importer
    assert doc["dataset"] == "cars196" and doc["format"] == "oodml-published"
    assert [s["id"] for s in doc["splits"]] == list(ref) == [str(i) for i in range(1, 9)]
    for s in doc["splits"]:
        r = ref[s["id"]]
        assert s["train_classes"] == r["train"] and s["test_classes"] == r["test"]
        assert s["fid"] == r["fid"]
        assert s["val_split"] == {"train": r["split_train"], "val": r["split_val"]}
        assert sorted(s["episodes"], key=int) == sorted(r["test_episodes"], key=int) == ["2", "5", "10"]
        for k, eps in r["test_episodes"].items():
            assert len(s["episodes"][k]) == len(eps) == 10
            for e, ep in enumerate(sorted(eps, key=int)):
                assert s["episodes"][k][e]["support"] == eps[ep]
                assert all(len(files) == int(k) for files in eps[ep].values())
    fids = [s["fid"] for s in doc["splits"]]
    assert round(fids[0], 2) == 8.59 and round(fids[-1], 2) == 123.03 and fids == sorted(fids)
    assert (len(doc["splits"][0]["train_classes"]), len(doc["splits"][-1]["test_classes"])) == (98, 62)
    assert "73/25" in capsys.readouterr().out
    # the class-name convention the mapping relies on: folder names, '/' written '-'
    names = {c for r in ref.values() for c in r["train"] + r["test"]}
    assert len(names) == 196 and not any("/" in n for n in names) and "Ram C-V Cargo Van Minivan 2012" in names


def test_a_pickle_that_would_run_code_is_refused_without_running_it(tmp_path, capsys):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    evil = tmp_path / "cars196_splits.pkl"
    evil.write_bytes(pickle.dumps({1: {"train": ["a", "b"], "test": ["c", "d"], "fid": Payload()}}, protocol=3))
    assert main(["splits", "import", str(evil), "--out", str(tmp_path / "o.json")]) == 2
    msg = one_line(capsys)
    assert "refusing to load global" in msg and "system" in msg and str(evil) in msg
    assert not marker.exists() and not (tmp_path / "o.json").exists()
    # the payload is live: a plain unpickler would have run it
    pickle.loads(evil.read_bytes())
    assert marker.exists()


def test_authors_pickle_with_numpy_is_imported_and_bad_shapes_are_one_line(tmp_path, capsys):
    good = tmp_path / "cub200_splits.pkl"
    good.write_bytes(pickle.dumps(authors_dict(["a", "b", "c", "d"], ["e", "f"], {"e": ["x.jpg", "y.jpg"]}), protocol=3))
    out = tmp_path / "g.json"
    assert main(["splits", "import", str(good), "--out", str(out)]) == 0
    s = json.loads(out.read_text())["splits"][0]
    assert s["id"] == "1" and s["train_classes"] == ["a", "b", "c", "d"] and s["fid"] == 12.5
    assert s["val_split"] == {"train": ["a", "b"], "val": ["c", "d"]} and len(s["episodes"]["2"]) == 2
    bad = {
        "nofid": {1: {"train": ["a"], "test": ["b"]}},
        "overlap": {1: {"train": ["a", "b"], "test": ["b"], "fid": 1.0}},
        "episode": {1: {"train": ["a"], "test": ["b"], "fid": 1.0, "test_episodes": {2: {0: {"zz": ["x.jpg"]}}}}},
    }
    expect = {"nofid": "split '1' has no 'fid'", "overlap": "both train and test",
              "episode": "test_episodes[2][0]: class 'zz' is not a test class"}  # fmt: skip
    for name, raw in bad.items():
        f = tmp_path / f"cub200_{name}.pkl"
        f.write_bytes(pickle.dumps(raw))
        assert main(["splits", "import", str(f), "--out", str(tmp_path / "b.json")]) == 2
        msg = one_line(capsys)
        assert expect[name] in msg and str(f) in msg, msg


# ---------------------------------------------------------------------------- class mapping
def imported(tmp_path, raw, name="cars196_splits.pkl"):
    f = tmp_path / name
    f.write_bytes(pickle.dumps(raw, protocol=3))
    out = tmp_path / (name + ".json")
    assert main(["splits", "import", str(f), "--out", str(out)]) == 0
    return out


def test_authors_class_names_map_onto_the_platform_loaders(tmp_path):
    # cars196 (cars_annos.mat): class k = class_names[k-1]; the authors' folder name writes '/' as '-'
    cn = np.empty((1, 100), dtype="O")
    cn[0, :] = [f"Car model {k}" for k in range(1, 101)]
    cn[0, 0], cn[0, 1], cn[0, 98], cn[0, 99] = "AM General Hummer SUV 2000", "Acura RL Sedan 2012", "Ram C/V Cargo Van Minivan 2012", "smart fortwo Convertible 2012"
    root = tmp_path / "cars"
    ann = np.zeros((1, 8), dtype=[("relative_im_path", "O"), ("class", "O")])
    for i, c in enumerate([1, 1, 2, 2, 99, 99, 100, 100]):
        write_image(root / f"car_ims/{i + 1:06d}.jpg", i)
        ann[0, i] = (f"car_ims/{i + 1:06d}.jpg", np.array([[c]], dtype=np.uint8))
    scipy.io.savemat(root / "cars_annos.mat", {"annotations": ann, "class_names": cn})
    split = imported(tmp_path, {1: {"train": ["AM General Hummer SUV 2000", "smart fortwo Convertible 2012"],
                                   "test": ["Ram C-V Cargo Van Minivan 2012", "Acura RL Sedan 2012"], "fid": 3.0}})  # fmt: skip
    b = build_data(load_config(None, {"data.dataset": "cars196", "data.root": str(root), "data.image_size": 8, "data.split": f"{split}#1"}))
    assert b.train.class_ids.tolist() == [1, 100] and b.test.class_ids.tolist() == [2, 99]
    assert b.info["fid"] == 3.0 and b.info["published"] is True

    # sop: the authors' class = product id (file-name prefix), the platform's = Ebay class_id
    base = tmp_path / "sop" / "Stanford_Online_Products"
    k = 0
    for fname, classes in (("Ebay_train.txt", (1, 2)), ("Ebay_test.txt", (3, 4))):
        lines = ["image_id class_id super_class_id path"]
        for c in classes:
            for j in range(2):
                k += 1
                rel = f"bicycle_final/{1000 + c}_{j}.JPG"
                write_image(base / rel, k)
                lines.append(f"{k} {c} 1 {rel}")
        (base / fname).write_text("\n".join(lines) + "\n")
    split = imported(tmp_path, {1: {"train": ["1003", "1001"], "test": ["1002", "1004"], "fid": 1.0,
                                   "test_episodes": {2: {0: ["1002"]}}}}, "online_products_splits.pkl")  # fmt: skip
    cfg = load_config(None, {"data.dataset": "sop", "data.root": str(tmp_path / "sop"), "data.image_size": 8,
                             "data.split": f"{split}#1", "eval.few_shot": {"steps": 2}})  # fmt: skip
    b = build_data(cfg)
    assert b.train.class_ids.tolist() == [1, 3] and b.test.class_ids.tolist() == [2, 4]
    # SOP episodes name whole support classes (the authors' stanford_online_products.py:104-107)
    assert b.episodes[2][0].tolist() == [0, 1] and b.test.class_ids[b.test.labels[[0, 1]]].tolist() == [2, 2]


def authors_layout(root: Path, classes, per_class=4):
    """The authors' images/<class>/<file> layout (an imagefolder)."""
    for c, cls in enumerate(classes):
        for j in range(per_class):
            write_image(root / cls / f"{j:05d}.jpg", 10 * c + j)


def test_published_split_is_used_exactly_and_bad_entries_fail_before_training(tmp_path):
    classes = ["A car 2001", "B car 2002", "C car 2003", "D car 2004", "E car 2005", "F car 2006"]
    root = tmp_path / "images"
    authors_layout(root, classes)
    support = {"E car 2005": ["00002.jpg", "00000.jpg"], "F car 2006": ["00003.jpg", "00001.jpg"]}
    split = imported(tmp_path, authors_dict(classes[:4], classes[4:], support))
    over = {"data.dataset": "imagefolder", "data.root": str(root), "data.image_size": 8, "data.split": f"{split}#1",
            "data.val_classes": 0.5, "eval.few_shot": {"steps": 2}}  # fmt: skip
    cfg = load_config(None, over)
    check_split(cfg)
    b = build_data(cfg)
    cid = {n: k for k, n in enumerate(sorted(classes))}  # imagefolder ids follow sorted folder names
    assert b.train.class_ids.tolist() == [cid[c] for c in classes[:2]]  # the published split_train ...
    assert b.val.class_ids.tolist() == [cid[c] for c in classes[2:4]]  # ... and split_val, exactly
    assert b.test.class_ids.tolist() == [cid[c] for c in classes[4:]]
    sup = b.episodes[2][0]
    files = sorted((classes[b.test.class_ids[b.test.labels[j]]], Path(b.test.store.path(int(b.test.indices[j]))).name) for j in sup)
    assert files == sorted((c, f) for c, fs in support.items() for f in fs)

    def fails(**o) -> str:
        with pytest.raises(DataError) as e:
            check_split(load_config(None, {**over, **o}))
        assert "\n" not in str(e.value)
        return str(e.value)

    assert "has no split 'R1'" in fails(**{"data.split": f"{split}#R1"}) and "did you mean '1'" in fails(**{"data.split": f"{split}#R1"})
    (root / "F car 2006").rename(root / "G car 2007")  # a class missing at data.root
    assert "unknown to dataset 'imagefolder': F car 2006" in fails()
    (root / "G car 2007").rename(root / "F car 2006")
    doc = json.loads(split.read_text())
    doc["splits"][0]["episodes"]["2"][0]["support"]["E car 2005"] = [1, 9]  # position 9 of a 4-image class
    split.write_text(json.dumps(doc))
    msg = fails()
    assert str(split) in msg and "episodes[2][0]: class 'E car 2005': support position 9 is out of range" in msg
    doc["splits"][0]["episodes"]["2"] = {"not": "a list"}
    split.write_text(json.dumps(doc))
    assert "episodes['2'] must be a list" in fails()


# ---------------------------------------------------------------------------- generation by id
def test_split_ids_as_the_authors_and_the_random_encoder_warning(tmp_path, capsys):
    out = tmp_path / "d.json"
    assert main(["splits", "digits", "--ids", "0,2,R2", "--image-size", "8", "--device", "cpu", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert [s["id"] for s in doc["splits"]] == ["0", "2", "R2"] and "meaningless" in doc["warning"]
    assert [s["kind"] for s in doc["splits"]] == ["start", "swap", "removal"]
    assert doc["splits"][1]["step"] == 2 and doc["splits"][2]["step"] == 1  # 2 swaps / 1 removal iteration of 2 swaps
    std = load_config(None, {"data.dataset": "digits", "data.image_size": 8})
    from dmlcore.data.base import build_source

    src = build_source(std).standard_split()
    assert doc["splits"][0]["train_classes"] == sorted(src.train_classes)  # id 0 = the standard split
    capsys.readouterr()
    assert main(["splits", "digits", "--ids", "0,R999", "--image-size", "8", "--device", "cpu", "--out", str(out)]) == 2
    assert "split id 'R999' was not reached" in one_line(capsys)
