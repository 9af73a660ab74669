"""RunConfig: typed, frozen, dotted keys, one-line errors naming key and file."""

import pytest
import yaml

from dmlcore.config import (
    ConfigError,
    RunConfig,
    all_keys,
    flatten,
    load_config,
    parse_overrides,
    unflatten,
)


def test_flat_roundtrip_and_overrides():
    cfg = load_config(None, parse_overrides(["model.embed_dim=64", "loss.params.margin=0.3", "optim.lr=1e-4"]))
    flat = cfg.to_flat()
    assert flat["model.embed_dim"] == 64
    assert flat["loss.params.margin"] == 0.3
    assert flat["optim.lr"] == pytest.approx(1e-4)
    assert RunConfig.from_flat(flat) == cfg
    assert isinstance(cfg.optim.lr, float)


def test_yaml_roundtrip(tmp_path):
    cfg = load_config(None, {"data.dataset": "glyphs", "batch.samples_per_class": 4, "eval.recall_k": [8, 1, 2]})
    p = tmp_path / "c.yaml"
    p.write_text(cfg.to_yaml())
    again = load_config(p)
    assert again == cfg
    assert again.eval.recall_k == [1, 2, 8]  # sorted, deduplicated


def test_unknown_key_in_file_names_file_and_key(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text(yaml.safe_dump({"model": {"embdim": 64}}))
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert "\n" not in msg
    assert str(p) in msg and "model.embdim" in msg and "did you mean 'model.embed_dim'" in msg


def test_wrong_type_and_cross_field_errors():
    with pytest.raises(ConfigError, match=r"--set: 'batch.size'.*integer.*'abc'"):
        load_config(None, {"batch.size": "abc"})
    with pytest.raises(ConfigError, match="not a multiple of samples_per_class"):
        load_config(None, {"batch.size": 10, "batch.samples_per_class": 4})
    with pytest.raises(ConfigError, match="select_on=val needs data.val_classes"):
        load_config(None, {"eval.select_on": "val"})
    with pytest.raises(ConfigError, match="unknown key 'nosuch'"):
        load_config(None, {"nosuch": 1})


def test_malformed_yaml_one_line(tmp_path):
    p = tmp_path / "m.yaml"
    p.write_text("model: {embed_dim: 3\nloss: [")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert str(p) in str(e.value) and "malformed YAML" in str(e.value) and "line" in str(e.value)
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "missing.yaml")


def test_frozen_and_fingerprint():
    cfg = RunConfig()
    with pytest.raises(Exception):
        cfg.model.embed_dim = 3  # type: ignore[misc]
    a = cfg.with_overrides({"name": "other"})
    b = cfg.with_overrides({"train.seed": 1})
    assert a.fingerprint() == cfg.fingerprint()  # the name does not change the weights
    assert b.fingerprint() != cfg.fingerprint()


def test_flatten_unflatten_and_keys():
    nested = {"a": {"b": 1, "c": {"d": 2}}, "e": {}}
    assert flatten(nested) == {"a.b": 1, "a.c.d": 2, "e": {}}
    assert unflatten(flatten(nested)) == nested
    keys = all_keys()
    assert "model.embed_dim" in keys and "loss.params" in keys and "train.seed" in keys
    with pytest.raises(ConfigError, match="goes inside"):
        unflatten({"a": 1, "a.b": 2})


def test_set_value_parsing():
    o = parse_overrides(["a=1e-4", "b=true", "c=[1, 2]", "d=resnet50", "e=null"])
    assert o == {"a": 1e-4, "b": True, "c": [1, 2], "d": "resnet50", "e": None}
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_overrides(["novalue"])
