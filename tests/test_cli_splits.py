"""`sweeper splits`: writes an ooDML split file whose splits a run then uses."""

import json

from dmlcore.config import load_config
from dmlcore.data.base import build_data
from sweeper.cli import main


def test_splits_command_writes_file_used_by_data_split(tmp_path, capsys):
    out = tmp_path / "digits_oodml.json"
    assert main(["splits", "digits", "--n", "3", "--image-size", "8", "--device", "cpu", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    fids = [s["fid"] for s in doc["splits"]]
    assert doc["dataset"] == "digits" and len(fids) >= 2 and fids == sorted(fids)
    assert "ooDML splits" in capsys.readouterr().out
    last = len(doc["splits"]) - 1
    cfg = load_config(None, {"data.dataset": "digits", "data.image_size": 8, "data.split": f"{out}#{last}",
                             "batch.size": 4, "batch.samples_per_class": 2})
    b = build_data(cfg)
    assert sorted(b.test.class_ids.tolist()) == sorted(doc["splits"][last]["test_classes"])
    assert b.info["fid"] == fids[last]
