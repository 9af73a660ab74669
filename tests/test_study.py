"""Study files: loading, validation (file + key in every message), expansion."""

from __future__ import annotations

import pytest
import yaml

from conftest import TINY_BASE
from dmlcore.config import ConfigError
from sweeper.study import apply_overrides, load_study, resolve_study, trial_table_rows


def test_grid_times_seeds_in_order(study_file):
    s = load_study(
        study_file(axes={"loss.name": ["margin", "multi_similarity"], "model.embed_dim": [8, 16]}, seeds=[0, 1])
    )
    assert s.size == 8 and not s.is_search
    assert [t.overrides for t in s.trials[:3]] == [
        {"loss.name": "margin", "model.embed_dim": 8, "train.seed": 0},
        {"loss.name": "margin", "model.embed_dim": 8, "train.seed": 1},
        {"loss.name": "margin", "model.embed_dim": 16, "train.seed": 0},
    ]
    last = s.trials[-1]
    assert (last.config.loss.name, last.config.model.embed_dim, last.config.train.seed) == ("multi_similarity", 16, 1)
    assert last.config.data.image_size == 16  # from the base
    assert s.varying_keys == ["loss.name", "model.embed_dim", "train.seed"]
    cols, rows = trial_table_rows(s)
    assert cols == ["#", "loss.name", "model.embed_dim", "train.seed"] and len(rows) == 8


def test_zip_pairs_values_and_crosses_with_axes(study_file):
    s = load_study(
        study_file(
            axes={"model.embed_dim": [8, 16]},
            zip=[{"loss.name": ["margin", "contrastive"], "loss.params": [{"margin": 0.1}, {"pos_margin": 0.0}]}],
        )
    )
    assert s.size == 4
    pairs = {(t.config.loss.name, tuple(t.config.loss.params.items())) for t in s.trials}
    assert pairs == {("margin", (("margin", 0.1),)), ("contrastive", (("pos_margin", 0.0),))}


def test_mapping_value_replaces_free_form_dict():
    from dmlcore.config import load_config

    base = load_config(None, {"loss.params": {"margin": 0.2}})
    cfg = apply_overrides(base, {"loss.name": "contrastive", "loss.params": {"pos_margin": 0.1}})
    assert cfg.loss.params == {"pos_margin": 0.1}
    cfg = apply_overrides(base, {"loss.params.beta": 1.0})
    assert cfg.loss.params == {"margin": 0.2, "beta": 1.0}


def test_unknown_axis_key_names_file_and_key(study_file):
    path = study_file(axes={"model.embdim": [8, 16]})
    with pytest.raises(ConfigError) as e:
        load_study(path)
    msg = str(e.value)
    assert str(path) in msg and "model.embdim" in msg and "did you mean 'model.embed_dim'" in msg
    assert "\n" not in msg


def test_unknown_study_key_did_you_mean(study_file):
    with pytest.raises(ConfigError, match=r"tiny\.yaml: unknown study key 'axis' \(did you mean 'axes'\?\)"):
        load_study(study_file(axis={"loss.name": ["margin"]}))


def test_empty_axis(study_file):
    with pytest.raises(ConfigError, match=r"tiny\.yaml: axes\.loss\.name: empty axis"):
        load_study(study_file(axes={"loss.name": []}))


def test_bad_registry_name_did_you_mean(study_file):
    with pytest.raises(ConfigError) as e:
        load_study(study_file(axes={"loss.name": ["margin", "multi_similarty"]}))
    msg = str(e.value)
    assert "tiny.yaml" in msg and "loss.name" in msg and "did you mean 'multi_similarity'" in msg


def test_zip_length_mismatch(study_file):
    path = study_file(zip=[{"loss.name": ["margin", "contrastive"], "model.embed_dim": [8, 16, 32]}])
    with pytest.raises(ConfigError) as e:
        load_study(path)
    msg = str(e.value)
    assert "tiny.yaml: zip[0]" in msg and "loss.name has 2" in msg and "model.embed_dim has 3" in msg


def test_key_varied_twice(study_file):
    with pytest.raises(ConfigError, match="already varied"):
        load_study(study_file(axes={"loss.name": ["margin"]}, zip=[{"loss.name": ["margin"]}]))
    with pytest.raises(ConfigError, match="'seeds' and an axis"):
        load_study(study_file(axes={"train.seed": [0, 1]}, seeds=[0]))


def test_first_failing_trial_is_reported_with_its_values(study_file):
    # 30 is not a multiple of samples_per_class=8 -> the trial config is invalid
    with pytest.raises(ConfigError) as e:
        load_study(study_file(axes={"batch.size": [32, 30]}))
    msg = str(e.value)
    assert "trial 1 (batch.size=30)" in msg and "multiple of samples_per_class" in msg


def test_params_inside_free_form_dict_are_checked_against_the_registry(study_file):
    s = load_study(study_file(axes={"loss.params.margin": [0.1, 0.2]}))
    assert [t.config.loss.params["margin"] for t in s.trials] == [0.1, 0.2]
    with pytest.raises(ConfigError) as e:
        load_study(study_file(axes={"loss.params.margn": [0.1]}))
    assert "trial 0" in str(e.value) and "did you mean 'margin'" in str(e.value)


def test_base_path_relative_to_study_file(tmp_path):
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "base.yaml").write_text(yaml.safe_dump(TINY_BASE))
    (tmp_path / "studies").mkdir()
    p = tmp_path / "studies" / "s.yaml"
    p.write_text(yaml.safe_dump({"name": "s", "base": "../configs/base.yaml", "axes": {"model.embed_dim": [8]}}))
    s = load_study(p)
    assert s.trials[0].config.data.dataset == "digits"
    p.write_text(yaml.safe_dump({"name": "s", "base": "../configs/missing.yaml"}))
    with pytest.raises(ConfigError, match="missing.yaml: no such file"):
        load_study(p)


def test_bad_key_in_base_names_the_base(study_file):
    with pytest.raises(ConfigError, match=r"tiny\.yaml: base: unknown key 'model\.embdim'"):
        resolve_study({"name": "x", "base": {"model": {"embdim": 3}}}, source="tiny.yaml")


def test_quick_and_set_overrides(study_file):
    path = study_file(
        axes={"loss.name": ["margin", "multi_similarity"]},
        seeds=[0, 1, 2],
        quick={"train.epochs": 1, "seeds": [0]},
    )
    full = load_study(path)
    quick = load_study(path, quick=True)
    assert full.size == 6 and quick.size == 2
    assert quick.trials[0].config.train.epochs == 1 and full.trials[0].config.train.epochs == 2
    assert load_study(path, {"optim.lr": 0.01}).trials[0].config.optim.lr == 0.01
    assert full.fingerprint() != quick.fingerprint() == load_study(path, quick=True).fingerprint()
    with pytest.raises(ConfigError, match="varied but also fixed by --set"):
        load_study(path, {"loss.name": "margin"})
    with pytest.raises(ConfigError, match="no 'quick' block"):
        load_study(study_file(name="noquick"), quick=True)


def test_search_spec(study_file):
    s = load_study(
        study_file(
            search={
                "samples": 5,
                "space": {
                    "optim.lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True},
                    "model.embed_dim": {"type": "int", "low": 8, "high": 32, "step": 8},
                    "loss.name": {"type": "categorical", "values": ["margin", "multi_similarity"]},
                },
            },
            seeds=[3],
        )
    )
    assert s.is_search and s.size == 5 and s.trials == [] and s.base.train.seed == 3
    from sweeper.tune import optuna_space

    space = optuna_space(s)
    assert space["optim.lr"].log and space["model.embed_dim"].step == 8
    assert list(space["loss.name"].choices) == ["margin", "multi_similarity"]

    # dict values go through Optuna as JSON text and come back as dicts
    from sweeper.tune import decode_sample

    s2 = load_study(
        study_file(
            name="dicts",
            search={"samples": 2, "space": {"loss.params": {"type": "categorical", "values": [{"margin": 0.1}, {"margin": 0.3}]}}},
        )
    )
    (choices,) = [d.choices for d in optuna_space(s2).values()]
    assert all(isinstance(c, str) for c in choices)
    assert decode_sample(s2, {"loss.params": choices[1]}) == {"loss.params": {"margin": 0.3}}

    bad = {"samples": 2, "space": {"optim.lr": {"type": "float", "low": 0, "high": 1, "log": True}}}
    with pytest.raises(ConfigError, match="log=true needs low > 0"):
        load_study(study_file(search=bad))
    bad = {"samples": 2, "space": {"loss.name": {"type": "categorical", "values": ["margn"]}}}
    with pytest.raises(ConfigError, match="did you mean 'margin'"):
        load_study(study_file(search=bad))
    bad = {"samples": 2, "space": {"optim.lr": {"type": "uniform", "low": 0, "high": 1}}}
    with pytest.raises(ConfigError, match="type must be one of"):
        load_study(study_file(search=bad))
    ok = {"samples": 2, "space": {"optim.lr": {"type": "float", "low": 1e-4, "high": 1e-3}}}
    with pytest.raises(ConfigError, match="cannot also have 'axes'"):
        load_study(study_file(search=ok, axes={"loss.name": ["margin"]}))
    # the bounds are validated as trial configs too: embed_dim 0 is refused by RunConfig
    bad = {"samples": 2, "space": {"model.embed_dim": {"type": "int", "low": 0, "high": 8}}}
    with pytest.raises(ConfigError, match="model.embed_dim=0"):
        load_study(study_file(search=bad))


def test_resources_scheduler_analyses(study_file):
    s = load_study(
        study_file(
            resources={"cpu": 2, "gpu": 0.25},
            scheduler={"type": "asha", "grace_period": 1},
            analyses=["aggregate", {"correlation": {"level": "config"}}],
        )
    )
    assert s.spec.resources.gpu == 0.25
    assert s.spec.analysis_specs() == [("aggregate", {}), ("correlation", {"level": "config"})]
    with pytest.raises(ConfigError, match="fractional gpu"):
        load_study(study_file(resources={"gpu": 1.5}))
    with pytest.raises(ConfigError, match="exactly one name"):
        load_study(study_file(analyses=[{"aggregate": {}, "report": {}}]))
    with pytest.raises(ConfigError, match="unknown study key 'resources.tpu'"):
        load_study(study_file(resources={"tpu": 1}))


def test_not_a_mapping_and_malformed_yaml(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="bad.yaml: a study must be a mapping"):
        load_study(p)
    p.write_text("name: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml:.*malformed YAML"):
        load_study(p)


def test_example_study_is_valid():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    s = load_study(root / "studies" / "quickstart.yaml", quick=True)
    assert s.size >= 2 and s.trials[0].config.data.dataset == "digits"
    assert load_study(root / "studies" / "quickstart.yaml").size > s.size
