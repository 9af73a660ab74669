"""The studies of Revisiting DML (studies/*.yaml): they load and expand (full and quick), the
full variants use the published pipeline, two quick variants run end to end through Ray Tune +
MLflow + the analyses; and the ``vs_fid`` analysis on synthetic runs with hand-computed areas."""

from __future__ import annotations

import json

import io
import math
from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
import pandas as pd
import pytest
from rich.console import Console

from dmlcore import registry
from dmlcore.config import ConfigError
from sweeper.analysis import REGISTRY, options_of, run_analyses
from sweeper.analysis.vs_fid import fid_frame, normalized_auc
from sweeper.study import load_study

ROOT = Path(__file__).resolve().parents[1]
STUDIES = ROOT / "studies"
PNG = b"\x89PNG\r\n\x1a\n"
R1 = "best/test/recall_at_1"

# file -> (full trials, quick trials)
SIZES = {
    "fair_benchmark": (67 * 5, 14),
    "factors_of_variation": (12 * 4 * 3, 10 * 2),
    "batch_composition": (11 * 4 * 5, 11),
    "rho_regularization": (6 * 5 * 5, 3 * 2),
    "embedding_correlation": (1 * 3 * 10 * 2, 2 * 2 * 3),
}

# Roth et al. 2020's fair pipeline (METHODS.md; the reference code's defaults)
PUBLISHED = {
    "model.backbone": "resnet50",
    "model.freeze_bn": True,
    "model.pretrained": "imagenet",  # torchvision's ImageNet V1 weights, as the reference (pretrainedmodels)
    "train.amp": False,  # fp32, as the reference
    "eval.every": 1,  # the reference evaluates every epoch (main.py:291)
    "model.normalize": True,
    "model.embed_dim": 128,
    "batch.size": 112,
    "batch.samples_per_class": 2,
    "optim.name": "adam",
    "optim.lr": 1e-5,
    "optim.weight_decay": 4e-4,
    "train.epochs": 150,
    "data.augmentation": "base",  # RandomResizedCrop(224) scale 0.08-1 + flip (R: datasets/basic_dataset_scaffold.py:37-38)
    "data.image_size": 224,
    "eval.select_on": "val",
}


def assert_png(path: Path) -> None:
    path = Path(path)
    assert path.is_file(), path
    assert path.read_bytes()[:8] == PNG, path
    img = mpimg.imread(path)
    assert img.ndim == 3 and img.shape[0] > 50 and img.shape[1] > 50


def _flat(cfg) -> dict:
    return cfg.to_flat()


def _varied(key: str, overrides: dict) -> bool:
    return any(key == k or key.startswith(k + ".") for k in overrides)


@pytest.fixture(scope="module")
def loaded():
    return {name: (load_study(STUDIES / f"{name}.yaml"), load_study(STUDIES / f"{name}.yaml", quick=True)) for name in SIZES}


# ----------------------------------------------------------------------------- loading
@pytest.mark.parametrize("name", sorted(SIZES))
def test_study_loads_and_expands_full_and_quick(loaded, name):
    full, quick = loaded[name]
    assert (full.size, quick.size) == SIZES[name]
    assert full.spec.name.startswith("revisiting_") and full.spec.analyses and quick.spec.analyses
    assert any(a == "report" or (isinstance(a, dict) and "report" in a) for a in full.spec.analyses)
    # every trial has its own full config; numbering is the expansion order
    assert [t.index for t in full.trials] == list(range(full.size))
    assert len({t.config.fingerprint() for t in full.trials}) == full.size
    # full: the real datasets on GPUs, epochs selected on validation classes
    assert full.base.data.dataset in ("cub200", "cars196", "sop")
    assert full.spec.resources.gpu >= 1
    assert full.base.data.val_classes > 0 and full.base.eval.select_on == "val"
    # quick: embedded glyphs on a CPU, a handful of tiny trials
    assert quick.spec.resources.gpu == 0
    for t in quick.trials:
        c = t.config
        assert c.data.dataset == "glyphs" and c.data.root is None and c.data.image_size <= 24
        assert c.train.epochs <= 2 and (c.batch.iterations_per_epoch or 99) <= 10
        assert c.eval.select_on == "val" and c.data.val_classes > 0
        assert c.model.backbone in ("small_cnn", "resnet18")
    # the plug-ins build with these values (load_study checks only their names and parameter names)
    from dmlcore.losses.criterion import build_criterion

    seen = set()
    for t in [*full.trials, *quick.trials]:
        c = t.config
        key = (c.data.augmentation, str(c.data.augmentation_params), c.loss.name, str(c.loss.params),
               c.miner.name, str(c.miner.params), c.model.embed_dim)
        if key in seen:
            continue
        seen.add(key)
        registry.build("augmentation", c.data.augmentation, c.data.augmentation_params,
                       key="data.augmentation_params", image_size=c.data.image_size, flip_ok=True)
        build_criterion(c, num_classes=100)


@pytest.mark.parametrize("name", sorted(SIZES))
def test_full_variant_uses_the_published_pipeline(loaded, name):
    """The base is the fair pipeline; a trial departs from it only in the keys it varies."""
    full, _ = loaded[name]
    base = _flat(full.base)
    for key, want in PUBLISHED.items():
        assert base[key] == pytest.approx(want) if isinstance(want, float) else base[key] == want, (name, key)
    assert full.base.optim.scheduler == "none"  # the reference's step scheduler never fires (tau 1000 > 150)
    for t in full.trials:
        flat = _flat(t.config)
        for key, want in PUBLISHED.items():
            if _varied(key, t.overrides):
                continue
            assert flat[key] == pytest.approx(want) if isinstance(want, float) else flat[key] == want, (name, t.index, key)


def test_fair_benchmark_lists_the_reference_sample_runs(loaded):
    from dmlcore.losses.roth_criteria import ROTH_LOSSES

    full, quick = loaded["fair_benchmark"]
    configs: dict[tuple, list] = {}
    for t in full.trials:
        c = t.config
        key = (c.data.dataset, c.loss.name, json.dumps(c.loss.params, sort_keys=True), c.miner.name, json.dumps(c.miner.params, sort_keys=True))
        configs.setdefault(key, []).append(c.train.seed)
    assert len(configs) == 67 and all(sorted(v) == [0, 1, 2, 3, 4] for v in configs.values())
    per_ds = {d: sum(k[0] == d for k in configs) for d in ("cub200", "cars196", "sop")}
    assert per_ds == {"cub200": 23, "cars196": 23, "sop": 21}  # R: Sample_Runs/ICML2020_RevisitDML_SampleRuns.sh
    assert {k[1] for k in configs} == set(ROTH_LOSSES)
    assert ("sop", "roth_histogram", '{"nbins": 11}', "none", "{}") in configs
    assert ("sop", "roth_softmax", '{"lr": 0.002}', "none", "{}") in configs
    assert {k[3] for k in configs if k[1] == "roth_triplet"} == {"roth_random", "roth_semihard", "roth_softhard", "roth_distance", "roth_rho_distance"}
    assert {t.config.loss.name for t in quick.trials} == set(ROTH_LOSSES)


def test_rho_study_grid(loaded):
    full, quick = loaded["rho_regularization"]
    # the Sample_Runs' cp values (R: Sample_Runs/ICML2020_RevisitDML_SampleRuns.sh:115-139, 261-285, 403-427)
    ps = sorted({t.config.miner.params["cp"] for t in full.trials})
    assert ps[0] == 0.0 and len(ps) >= 4 and {0.15, 0.3, 0.35, 0.4} <= set(ps)
    assert {t.config.miner.name for t in full.trials} == {"roth_rho_distance"}
    variants = {(t.config.loss.name, t.config.loss.params.get("beta")) for t in full.trials}
    assert variants == {("roth_margin", 0.6), ("roth_margin", 1.2), ("roth_triplet", None), ("roth_contrastive", None), ("roth_snr", None)}
    # lower cutoff 0.5 (R: parameters.py:147), no upper cutoff (R: batchminer/rho_distance.py:61-63)
    assert all(t.config.miner.params["lower_cutoff"] == 0.5 and "upper_cutoff" not in t.config.miner.params for t in full.trials)
    snr = {t.config.loss.params.get("reg_lambda") for t in full.trials if t.config.loss.name == "roth_snr"}
    assert snr == {0.005}  # the SNR regulariser is on with rho_distance (R: criteria/snr.py:18)
    assert sorted({t.config.miner.params["cp"] for t in quick.trials}) == [0.0, 0.2, 0.4]
    corr = dict(full.spec.analysis_specs())["correlation"]
    assert "best/train/rho_spectrum" in corr["x"] and R1 in corr["y"]


def test_batch_composition_grid(loaded):
    full, quick = loaded["batch_composition"]
    comps = {(t.config.batch.size, t.config.batch.samples_per_class, t.config.batch.sampler) for t in full.trials}
    assert comps == {(112, 2, "class_random"), (112, 4, "class_random"), (112, 8, "class_random"),
                     (112, 16, "class_random"), (112, 0, "random"), (112, 2, "class_balanced"), (112, 2, "full_random"),
                     (112, 2, "greedy_coreset"), (112, 2, "d2_coreset"), (112, 2, "fid_batchmatch"),
                     (112, 2, "disthist_batchmatch")}
    assert len({t.config.loss.name for t in full.trials}) >= 3
    assert all(t.config.loss.name.startswith("roth_") for t in full.trials)  # the reference's criteria
    assert {t.config.miner.name for t in full.trials} == {"roth_distance", "none"}
    assert {t.config.batch.samples_per_class for t in quick.trials} == {0, 2, 4, 8, 16}


def test_factors_study_is_one_factor_at_a_time(loaded):
    full, _ = loaded["factors_of_variation"]
    keys = ("model.backbone", "model.embed_dim", "batch.size", "data.augmentation", "optim.weight_decay")
    base = _flat(full.base)
    pipelines = {tuple(_flat(t.config)[k] for k in keys) for t in full.trials}
    assert tuple(base[k] for k in keys) in pipelines
    for p in pipelines:  # each pipeline changes at most one factor
        assert sum(v != base[k] for k, v in zip(keys, p)) <= 1, p
    for i, k in enumerate(keys):  # every factor has at least two alternatives
        assert len({p[i] for p in pipelines}) >= 3, k
    fac = dict(full.spec.analysis_specs())["factors"]
    assert set(keys) <= set(fac["factors"]) and all(fac["reference"][k] == base[k] for k in keys)
    losses = {t.config.loss.name for t in full.trials}
    assert len(losses) >= 3 and all(n.startswith("roth_") for n in losses)  # the reference's criteria
    assert fac["reference"]["loss.name"] in losses


def test_embedding_correlation_varies_losses_dims_and_composition(loaded):
    full, _ = loaded["embedding_correlation"]
    assert len({(t.config.loss.name, t.config.miner.name, str(t.config.loss.params)) for t in full.trials}) >= 8
    assert all(t.config.loss.name.startswith("roth_") for t in full.trials)  # the reference's criteria
    assert {t.config.miner.name for t in full.trials} == {"roth_distance", "roth_rho_distance", "none"}
    assert {t.config.model.embed_dim for t in full.trials} == {128}  # the paper correlates 128-d runs
    assert len({t.config.batch.samples_per_class for t in full.trials}) >= 3
    corr = [o for n, o in full.spec.analysis_specs() if n == "correlation"][0]
    assert {f"best/train/{m}" for m in ("pi_intra", "pi_inter", "pi_ratio", "rho_spectrum", "rho_spectrum_at_1", "uniformity")} <= set(corr["x"])
    assert set(corr["y"]) == {R1, "best/test/map_at_r"}


def _synthetic_runs(study) -> pd.DataFrame:
    """The study's trials as finished MLflow runs (params as MLflow gives them back) with random metrics."""
    from sweeper.analysis.runs import parse_param

    rng = np.random.default_rng(0)
    rows = []
    for t in study.trials:
        row = {"run_id": f"r{t.index:04d}", "status": "FINISHED", "tags.trial_id": str(t.index)}
        for k, v in _flat(t.config).items():
            row[f"params.{k}"] = parse_param(str(v) if not isinstance(v, (dict, list)) else repr(v))
        for m in ("recall_at_1", "recall_at_2", "recall_at_4", "recall_at_8", "map_at_r", "nmi", "f1"):
            row[f"metrics.best/test/{m}"] = float(rng.uniform(0.2, 0.8))
        for m in ("pi_intra", "pi_inter", "pi_ratio", "rho_spectrum", "rho_spectrum_at_1", "rho_spectrum_at_2", "uniformity"):
            row[f"metrics.best/train/{m}"] = float(rng.uniform(0.1, 1.0))
        rows.append(row)
    return pd.DataFrame(rows)


@pytest.mark.parametrize("name", sorted(SIZES))
def test_analyses_of_the_full_design(loaded, name, tmp_path):
    """The study's analysis options fit its full design: nothing fails, one aggregate row per
    configuration, every factor value has a matching context."""
    full, _ = loaded[name]
    runs = _synthetic_runs(full)
    files = run_analyses(full.name, full.spec.analyses, runs, tmp_path, strict=True)
    assert (tmp_path / "report.md").is_file() and all(Path(f).is_file() for f in files)
    agg = pd.read_csv(tmp_path / "aggregate.csv")
    n_configs = full.size // len(full.spec.seeds)
    assert len(agg) == n_configs and (agg["n"] == len(full.spec.seeds)).all()
    if (tmp_path / "factors.csv").is_file():
        fac = pd.read_csv(tmp_path / "factors.csv")
        assert len(fac) and (fac["n_contexts"] > 0).all(), fac[fac["n_contexts"] == 0]
        assert (fac["reference_from"] == "given").all()


def test_quick_can_shrink_axes_and_zip_and_set_resources(study_file):
    path = study_file(
        "shrink",
        axes={"model.embed_dim": [8, 16, 32]},
        zip=[{"loss.name": ["margin", "triplet", "contrastive"], "loss.params": [{}, {}, {}]}],
        resources={"cpu": 2, "gpu": 1},
        quick={"axes.model.embed_dim": [8], "zip": [{"loss.name": ["triplet"]}], "resources": {"cpu": 1, "gpu": 0}},
    )
    full, quick = load_study(path), load_study(path, quick=True)
    assert full.size == 9 and quick.size == 1 and full.spec.resources.gpu == 1 and quick.spec.resources.gpu == 0
    assert quick.trials[0].config.model.embed_dim == 8 and quick.trials[0].config.loss.name == "triplet"
    bad = study_file("bad", axes={"model.embed_dim": [8, 16]}, quick={"axes.model.embed_dm": [8]})
    with pytest.raises(ConfigError, match="no axis 'model.embed_dm'"):
        load_study(bad, quick=True)


# ----------------------------------------------------------------------------- end to end
def _run_quick(name: str, tmp_path: Path, uri: str):
    from sweeper.tune import run_study

    study = load_study(STUDIES / f"{name}.yaml", quick=True)
    out = io.StringIO()
    outcome = run_study(study, storage=tmp_path / "runs", tracking_uri=uri, console=Console(file=out, width=200), live=False)
    text = out.getvalue()
    assert not outcome.interrupted, text
    assert [t.status for t in outcome.trials] == ["done"] * study.size, text
    adir = outcome.exec_dir / "analysis"
    assert adir.is_dir() and {p.name for p in outcome.analysis_paths} >= {"aggregate.csv", "report.md", "report.html"}, text
    report_md, report_html = (adir / "report.md").read_text(), (adir / "report.html").read_text()
    assert study.name in report_md and study.name in report_html
    assert "This analysis failed" not in report_md and "Analyses that failed" not in report_md, report_md
    assert "`eval.select_on=val`" in report_md  # the protocol section names the validation selection
    assert report_html.count("data:image/png;base64,") >= 1
    return study, outcome, adir, text


def _check_aggregate(agg: pd.DataFrame, n_groups: int, metrics: list[str], seeds: int = 1) -> None:
    assert len(agg) == n_groups
    assert (agg["n"] == seeds).all() and (agg["n_failed"] == 0).all()
    for m in metrics:
        v = agg[f"{m}:mean"].to_numpy(float)
        assert np.isfinite(v).all(), m
        if "recall" in m or "map" in m or "nmi" in m:
            assert ((v >= 0) & (v <= 1)).all(), (m, v)
        std = agg[f"{m}:std"].to_numpy(float)
        if seeds > 1:
            assert (np.isfinite(std) & (std >= 0)).all(), (m, std)
        else:
            assert np.isnan(std).all()  # one seed: no std


@pytest.mark.slow
def test_batch_composition_quick_end_to_end(ray_session, tmp_path, mlflow_uri):
    study, outcome, adir, text = _run_quick("batch_composition", tmp_path, mlflow_uri)
    agg = pd.read_csv(adir / "aggregate.csv")
    _check_aggregate(agg, 11, [R1, "best/test/map_at_r", "best/test/nmi"])  # 5 compositions + 6 more samplers at m = 2
    assert sorted(agg["batch.samples_per_class"]) == [0] + [2] * 7 + [4, 8, 16] and set(agg["loss.name"]) == {"roth_margin"}
    assert (agg["best/train/rho_spectrum:mean"] >= 0).all() and (agg["best/train/pi_ratio:mean"] > 0).all()
    fac = pd.read_csv(adir / "factors.csv")
    rows = fac[(fac["factor"] == "batch.samples_per_class") & (fac["metric"] == R1)]
    assert sorted(rows["value"]) == [0, 4, 8, 16] and (rows["reference"] == 2).all()
    assert (rows["n_contexts"] == 1).all() and np.isfinite(rows["rel_change_pct"]).all()
    assert_png(adir / "factors.png")
    assert "Factor effects" in (adir / "report.md").read_text()


@pytest.mark.slow
def test_rho_regularization_quick_end_to_end(ray_session, tmp_path, mlflow_uri):
    study, outcome, adir, text = _run_quick("rho_regularization", tmp_path, mlflow_uri)
    agg = pd.read_csv(adir / "aggregate.csv")
    _check_aggregate(agg, 3, [R1, "best/test/map_at_r", "best/train/rho_spectrum", "best/train/pi_ratio"], seeds=2)
    assert list(zip(agg["loss.name"], agg["loss.params.beta"], agg["miner.params.cp"])) == [
        ("roth_margin", 0.6, 0.0), ("roth_margin", 0.6, 0.2), ("roth_margin", 0.6, 0.4)]
    assert (agg["seeds"] == "0,1").all() and (agg["best/train/rho_spectrum:mean"] >= 0).all()
    corr = pd.read_csv(adir / "correlation.csv")
    assert set(corr["embedding_metric"]) == {"best/train/rho_spectrum", "best/train/pi_ratio"}
    assert (corr["n"] == 3).all()  # level: config, one point per p
    r = corr["pearson_r"].to_numpy(float)
    assert (np.isnan(r) | ((r >= -1) & (r <= 1))).all()
    for png in ("correlation_scatter.png", "correlation_bars.png"):
        assert_png(adir / png)
    md = (adir / "report.md").read_text()
    assert "Embedding-space metrics vs test performance" in md and "0.649" in md  # the reference note
    # the same-class pushes were made (train/miner_push_triplets > 0) exactly when cp > 0
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_uri)
    exp = client.get_experiment_by_name(study.name)
    runs = client.search_runs([exp.experiment_id], "tags.role = 'trial'")
    assert len(runs) == 6
    for r in runs:
        push = r.data.metrics["train/miner_push_triplets"]
        assert (push > 0) == (float(r.data.params["miner.params.cp"]) > 0), (r.data.params["miner.params.cp"], push)


# ----------------------------------------------------------------------------- vs_fid
def _fid_runs() -> pd.DataFrame:
    """Two methods on three splits (FID 10, 20, 40), two seeds; one failed run."""
    rows = []
    fids = {"s.json#0": 10.0, "s.json#1": 20.0, "s.json#2": 40.0}
    r1 = {  # method -> seed -> per split
        "margin": {0: [0.9, 0.7, 0.5], 1: [0.7, 0.7, 0.5]},
        "multi_similarity": {0: [0.6, 0.6, 0.6], 1: [0.6, 0.6, 0.6]},
    }
    i = 0
    for method, per_seed in r1.items():
        for seed, vals in per_seed.items():
            for (split, fid), v in zip(fids.items(), vals):
                rows.append({"run_id": f"r{i}", "status": "FINISHED", "params.loss.name": method,
                             "params.data.split": split, "params.train.seed": seed,
                             "metrics.data/fid": fid, f"metrics.{R1}": v, "metrics.best/test/map_at_r": v / 2})
                i += 1
    rows.append({"run_id": "bad", "status": "FAILED", "params.loss.name": "margin", "params.data.split": "s.json#2",
                 "params.train.seed": 2, "tags.error": "CUDA out of memory"})
    return pd.DataFrame(rows)


def test_normalized_auc_by_hand():
    # trapezoids: 10 * (0.8 + 0.7) / 2 + 20 * (0.7 + 0.5) / 2 = 7.5 + 12 = 19.5; / (40 - 10) = 0.65
    assert normalized_auc([10, 20, 40], [0.8, 0.7, 0.5]) == pytest.approx(0.65)
    assert normalized_auc([40, 10, 20], [0.5, 0.8, 0.7]) == pytest.approx(0.65)  # sorted by FID first
    assert normalized_auc([5, 9], [0.3, 0.3]) == pytest.approx(0.3)  # a flat curve: its height
    assert math.isnan(normalized_auc([10], [0.5])) and math.isnan(normalized_auc([10, 10], [0.5, 0.7]))
    assert normalized_auc([10, 20, np.nan], [0.8, 0.6, 0.1]) == pytest.approx(0.7)  # non-finite points dropped


def test_vs_fid_table_by_hand(tmp_path):
    runs = _fid_runs()
    assert "vs_fid" in REGISTRY and {"group_by", "fid", "metrics", "split_key"} <= set(options_of("vs_fid"))
    res = REGISTRY["vs_fid"](runs, tmp_path, study_name="oodml_toy", metrics=[R1])
    s = res.table.set_index("loss.name")
    assert list(s.index) == ["margin", "multi_similarity"]  # one row per method
    assert s.loc["margin", "auc"] == pytest.approx(0.65)
    # per-seed AUCs 20/30 and 19/30: std (ddof=1) = (1/30) / sqrt(2)
    assert s.loc["margin", "auc_std"] == pytest.approx((1 / 30) / math.sqrt(2))
    assert s.loc["margin", "auc_seeds"] == 2
    assert s.loc["multi_similarity", "auc"] == pytest.approx(0.6) and s.loc["multi_similarity", "auc_std"] == pytest.approx(0.0)
    assert s.loc["margin", "at_min_fid"] == pytest.approx(0.8) and s.loc["margin", "at_max_fid"] == pytest.approx(0.5)
    assert s.loc["margin", "drop"] == pytest.approx(0.3) and s.loc["margin", "n_splits"] == 3
    assert (s["fid_min"] == 10).all() and (s["fid_max"] == 40).all()
    assert bool(s.loc["margin", "best"]) and not bool(s.loc["multi_similarity", "best"])
    pts = pd.read_csv(tmp_path / "vs_fid.csv")
    m = pts[pts["loss.name"] == "margin"].sort_values("fid")
    assert list(m["fid"]) == [10, 20, 40] and list(m["n"]) == [2, 2, 2]  # the failed run is left out
    assert m["mean"].tolist() == pytest.approx([0.8, 0.7, 0.5])
    assert m["std"].tolist() == pytest.approx([np.std([0.9, 0.7], ddof=1), 0.0, 0.0])
    auc_csv = pd.read_csv(tmp_path / "vs_fid_auc.csv")
    assert len(auc_csv) == 2 and auc_csv["auc"].tolist() == pytest.approx([0.65, 0.6])
    md = (tmp_path / "vs_fid.md").read_text()
    assert "0.6500 ± 0.0236" in md and "**0.6500 ± 0.0236**" in md and "10 – 40" in md
    assert_png(tmp_path / "vs_fid.png")


def test_vs_fid_options_and_gaps(tmp_path):
    runs = _fid_runs()
    # the FID as a param (e.g. a split file's field), two metrics, no split key: the FID names the split
    runs["params.split_fid"] = runs["metrics.data/fid"]
    runs = runs.drop(columns=["metrics.data/fid"])
    points, summary = fid_frame(runs, [R1, "best/test/map_at_r"], ["loss.name"], "params.split_fid", None)
    assert len(summary) == 4 and len(points) == 12
    mp = summary[(summary["loss.name"] == "margin") & (summary["metric"] == "best/test/map_at_r")]
    assert mp["auc"].item() == pytest.approx(0.325)
    res = REGISTRY["vs_fid"](runs, tmp_path, fid="params.split_fid", metrics=[R1], split_key=None)
    assert res.table.set_index("loss.name").loc["margin", "auc"] == pytest.approx(0.65)
    # a method that missed a split: its AUC covers a smaller FID range, and the table says so
    gap = _fid_runs()
    gap = gap[~((gap["params.loss.name"] == "multi_similarity") & (gap["params.data.split"] == "s.json#2"))]
    s = REGISTRY["vs_fid"](gap, tmp_path, metrics=[R1]).table.set_index("loss.name")
    assert s.loc["multi_similarity", "n_splits"] == 2 and s.loc["multi_similarity", "fid_max"] == 20
    assert "not run on 1 of 3 splits" in s.loc["multi_similarity", "note"]
    # no FID anywhere: a one-line error naming the option
    with pytest.raises(ValueError, match="data/fid"):
        REGISTRY["vs_fid"](_fid_runs().drop(columns=["metrics.data/fid"]), tmp_path)
    with pytest.raises(ValueError, match="group_by"):
        REGISTRY["vs_fid"](_fid_runs(), tmp_path, group_by="loss.nme")


def test_vs_fid_in_run_analyses_and_report(tmp_path):
    files = run_analyses("oodml_toy", [{"vs_fid": {"group_by": ["loss.name"]}}, "report"], _fid_runs(), tmp_path,
                         Console(file=io.StringIO()), strict=True)
    names = {Path(f).name for f in files}
    assert {"vs_fid.csv", "vs_fid_auc.csv", "vs_fid.md", "vs_fid.png", "report.md", "report.html"} <= names
    md = (tmp_path / "report.md").read_text()
    assert "Performance against the train–test shift (FID)" in md and "vs_fid.png" in md
    assert "CUDA out of memory" in md  # the failed run is listed
