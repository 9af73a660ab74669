"""Analyses on synthetic run tables with known numbers (no MLflow needed)."""

from __future__ import annotations

import base64
import math
import re

import matplotlib.image as mpimg
import numpy as np
import pandas as pd
import pytest
from rich.console import Console
from scipy import stats

from sweeper.analysis import REGISTRY, options_of, run_analyses, validate_analyses
from sweeper.analysis.aggregate import aggregate_frame
from sweeper.analysis.base import canon, pretty_metric
from sweeper.analysis.correlation import correlate, correlation_frame
from sweeper.analysis.factors import dependent_factors, factor_effects, resolve_reference

PNG = b"\x89PNG\r\n\x1a\n"
R1, MAP = "best/test/recall_at_1", "best/test/map_at_r"


def run(i, status="FINISHED", **fields):
    row = {"run_id": f"r{i:02d}", "run_name": f"trial-{i}", "status": status, "tags.trial_id": str(i)}
    row.update({("metrics." if "/" in k else "params.") + k: v for k, v in fields.items()})
    return row


def frame(rows):
    return pd.DataFrame(rows)


def assert_png(path):
    assert path.read_bytes()[:8] == PNG
    img = mpimg.imread(path)
    assert img.ndim == 3 and img.shape[0] > 50 and img.shape[1] > 50


# ----------------------------------------------------------------------------- aggregate
@pytest.fixture
def seeds_runs():
    rows = []
    i = 0
    for d, vals in ((64, [0.5, 0.6, 0.7]), (128, [0.8, 0.9]), (256, [0.4])):
        for s, v in enumerate(vals):
            rows.append(run(i, **{"model.embed_dim": d, "train.seed": s, "name": f"t{i}", R1: v, MAP: v / 2,
                                  "best/test/recall_at_2": min(1.0, v + 0.1)}))
            i += 1
    rows.append(run(i, status="FAILED", **{"model.embed_dim": 128, "train.seed": 2, "name": f"t{i}"}))
    return frame(rows)


def test_aggregate_mean_std_per_group(seeds_runs):
    df = aggregate_frame(seeds_runs, [R1, MAP], ["model.embed_dim"])
    df = df.set_index("model.embed_dim")
    assert list(df.index) == [64, 128, 256]
    assert df.loc[64, f"{R1}:mean"] == pytest.approx(0.6)
    assert df.loc[64, f"{R1}:std"] == pytest.approx(0.1)  # sample std, ddof=1
    assert df.loc[128, f"{R1}:mean"] == pytest.approx(0.85)
    assert df.loc[128, f"{R1}:std"] == pytest.approx(np.std([0.8, 0.9], ddof=1))
    assert df.loc[128, f"{MAP}:mean"] == pytest.approx(0.425)
    assert math.isnan(df.loc[256, f"{R1}:std"])  # n=1: undefined, not 0
    assert list(df["n"]) == [3, 2, 1]
    assert list(df["n_failed"]) == [0, 1, 0]
    assert df.loc[128, "seeds"] == "0,1"
    assert df.loc[128, "best_for"] == f"{R1};{MAP}"
    assert df.loc[64, "best_for"] == ""


def test_aggregate_files_and_console(seeds_runs, tmp_path):
    console = Console(record=True, width=200)
    res = REGISTRY["aggregate"](seeds_runs, tmp_path, study_name="s", console=console)
    # default metrics: every logged recall_at_k, then map_at_r (nmi/f1 not logged here)
    assert [c for c in res.table.columns if c.endswith(":mean")] == [f"{R1}:mean", "best/test/recall_at_2:mean", f"{MAP}:mean"]
    # grouped on the varying params except the seed and the trial name
    assert "name" not in res.table.columns and "train.seed" not in res.table.columns
    csv = pd.read_csv(tmp_path / "aggregate.csv")
    assert csv.loc[0, f"{R1}:mean"] == pytest.approx(0.6)
    md = (tmp_path / "aggregate.md").read_text()
    assert "| model.embed_dim | n | failed | R@1 | R@2 | mAP@R |" in md
    assert "| 64 | 3 | 0 | 0.6000 ± 0.1000 |" in md
    assert "**0.8500 ± 0.0707**" in md
    assert "0.4000 (n=1)" in md
    text = console.export_text()
    assert "0.6000 ± 0.1000" in text and "1 unfinished/failed runs excluded" in text


def test_aggregate_group_by_unknown_param(seeds_runs, tmp_path):
    with pytest.raises(ValueError, match=r"did you mean 'model.embed_dim'"):
        REGISTRY["aggregate"](seeds_runs, tmp_path, group_by=["model.embed_dims"])


def test_canonical_values_match_across_types():
    assert canon(128) == canon(128.0) == canon(np.int64(128)) == "128"
    assert canon(None) == canon(float("nan")) == "None"
    assert canon(True) == "True" and canon(np.bool_(False)) == "False"
    assert canon(1e-5) == "1e-05"
    assert pretty_metric("best/test/recall_at_4") == "R@4"
    assert pretty_metric("metrics.best/train/rho_spectrum") == "train ρ(Φ)"


# ----------------------------------------------------------------------------- correlation
@pytest.fixture
def corr_runs():
    rng = np.random.default_rng(3)
    rows = []
    for i in range(9):
        rho = rng.uniform(0.1, 1.0)
        rows.append(run(i, **{
            "loss.name": ["margin", "triplet", "multisimilarity"][i % 3],
            "train.seed": i // 3,
            "best/train/rho_spectrum": rho,
            "best/train/pi_ratio": rng.uniform(),
            "best/train/pi_intra": 0.3,  # constant
            R1: 0.7 - 0.2 * rho + rng.normal(0, 0.02),
            MAP: rng.uniform(0.2, 0.4),
        }))
    rows.append(run(9, status="FAILED", **{"loss.name": "margin", "train.seed": 3}))
    return frame(rows)


def test_correlation_matches_numpy_and_scipy(corr_runs):
    ok = corr_runs[corr_runs.status == "FINISHED"]
    df = correlation_frame(corr_runs, ["best/train/rho_spectrum", "best/train/pi_ratio"], [R1, MAP])
    assert len(df) == 4
    for r in df.itertuples():
        x = ok[f"metrics.{r.embedding_metric}"].to_numpy()
        y = ok[f"metrics.{r.test_metric}"].to_numpy()
        assert r.n == 9
        assert r.pearson_r == pytest.approx(np.corrcoef(x, y)[0, 1], abs=1e-12)
        assert r.pearson_p == pytest.approx(stats.pearsonr(x, y).pvalue)
        sp = stats.spearmanr(x, y)
        assert r.spearman_rho == pytest.approx(sp.statistic) and r.spearman_p == pytest.approx(sp.pvalue)
        assert r.note == ""


def test_correlation_notes_instead_of_nan_noise():
    c = correlate(np.array([1.0, 2.0]), np.array([3.0, 4.0]))
    assert c["note"] == "too few runs (n=2 < 3)" and math.isnan(c["pearson_r"])
    c = correlate(np.array([1.0, 1.0, 1.0, 1.0]), np.array([3.0, 4.0, 5.0, 1.0]))
    assert c["note"].startswith("constant x") and math.isnan(c["spearman_rho"])
    c = correlate(np.array([1.0, np.nan, 2.0, 3.0]), np.array([1.0, 5.0, 2.0, 2.5]))  # NaN pairs dropped
    assert c["n"] == 3 and c["note"] == ""


def test_correlation_config_level_averages_seeds(corr_runs):
    df = correlation_frame(corr_runs, ["best/train/rho_spectrum"], [R1], level="config", keys=["loss.name"])
    assert df.loc[0, "n"] == 3
    ok = corr_runs[corr_runs.status == "FINISHED"]
    means = ok.groupby("params.loss.name")[["metrics.best/train/rho_spectrum", f"metrics.{R1}"]].mean()
    expected = np.corrcoef(means.iloc[:, 0], means.iloc[:, 1])[0, 1]
    assert df.loc[0, "pearson_r"] == pytest.approx(expected)


def test_correlation_files(corr_runs, tmp_path):
    res = REGISTRY["correlation"](corr_runs, tmp_path, study_name="s", console=Console(record=True, width=200))
    names = sorted(p.name for p in res.files)
    assert names == ["correlation.csv", "correlation.md", "correlation_bars.png", "correlation_scatter.png"]
    assert_png(tmp_path / "correlation_scatter.png")
    assert_png(tmp_path / "correlation_bars.png")
    csv = pd.read_csv(tmp_path / "correlation.csv")
    # default x: the five embedding metrics that were logged (3 of them), default y: R@1, mAP@R
    assert len(csv) == 6
    assert csv.loc[csv.embedding_metric == "best/train/pi_intra", "note"].str.startswith("constant x").all()
    assert any("not logged" in n for n in res.notes)
    md = (tmp_path / "correlation.md").read_text()
    assert "| embedding metric | test metric | n | Pearson r |" in md and "correlation_scatter.png" in md


# ----------------------------------------------------------------------------- factors
GRID = {  # (embed_dim, batch.size) -> R@1 of seeds 0 and 1
    (128, 112): (0.60, 0.62),
    (64, 112): (0.55, 0.57),
    (128, 56): (0.50, 0.50),
    (64, 56): (0.45, 0.47),
}


@pytest.fixture
def grid_runs():
    rows, i = [], 0
    for (d, b), vals in GRID.items():
        for s, v in enumerate(vals):
            rows.append(run(i, **{"model.embed_dim": d, "batch.size": b, "train.seed": s, R1: v}))
            i += 1
    return frame(rows)


def test_factor_relative_change_on_grid(grid_runs):
    df = factor_effects(grid_runs, [R1], ["model.embed_dim", "batch.size"])
    d = df.set_index("factor")
    # full grid: every value is run equally often -> the platform defaults 128 / 112 are the references
    assert d.loc["model.embed_dim", "reference"] == 128 and d.loc["model.embed_dim", "reference_from"] == "platform default"
    assert d.loc["model.embed_dim", "value"] == 64
    by_hand = [(0.56 - 0.61) / 0.61 * 100, (0.46 - 0.50) / 0.50 * 100]  # contexts batch=112, batch=56
    assert d.loc["model.embed_dim", "n_contexts"] == 2
    assert d.loc["model.embed_dim", "rel_change_pct"] == pytest.approx(np.mean(by_hand))
    assert d.loc["model.embed_dim", "rel_change_std"] == pytest.approx(np.std(by_hand, ddof=1))
    assert d.loc["model.embed_dim", "abs_change"] == pytest.approx(np.mean([0.56 - 0.61, 0.46 - 0.50]))
    by_hand = [(0.50 - 0.61) / 0.61 * 100, (0.46 - 0.56) / 0.56 * 100]  # contexts embed=128, embed=64
    assert d.loc["batch.size", "rel_change_pct"] == pytest.approx(np.mean(by_hand))


def test_factor_given_reference_and_most_runs(grid_runs):
    df = factor_effects(grid_runs, [R1], ["model.embed_dim"], reference={"params.model.embed_dim": 64, "optim.lr": 1e-5})
    r = df.iloc[0]
    assert (r.reference, r.value, r.reference_from) == (64, 128, "given")
    # batch.size is not a factor here, so it is not held fixed: one context, seeds and batches pooled
    assert r.n_contexts == 1
    assert r.rel_change_pct == pytest.approx((np.mean([0.61, 0.50]) - np.mean([0.56, 0.46])) / np.mean([0.56, 0.46]) * 100)
    # one-factor-at-a-time design: the base value has the most runs
    oat = grid_runs[~((grid_runs["params.model.embed_dim"] == 64) & (grid_runs["params.batch.size"] == 56))]
    ok = oat[oat.status == "FINISHED"]
    assert resolve_reference(ok, "batch.size", None)[1:] == (112, "most runs")
    df = factor_effects(oat, [R1], ["model.embed_dim", "batch.size"]).set_index("factor")
    assert d_close(df.loc["model.embed_dim", "rel_change_pct"], (0.56 - 0.61) / 0.61 * 100)
    assert df.loc["model.embed_dim", "n_contexts"] == 1


def d_close(a, b):
    return a == pytest.approx(b)


def test_conditional_param_follows_its_factor(tmp_path):
    rows, i = [], 0
    for loss, margin, vals in (("margin", 0.2, (0.6, 0.64)), ("triplet", None, (0.5, 0.52))):
        for s, v in enumerate(vals):
            rows.append(run(i, **{"loss.name": loss, "loss.params.margin": margin, "train.seed": s, R1: v}))
            i += 1
    runs = frame(rows)
    assert dependent_factors(runs, ["loss.name", "loss.params.margin"]) == {"loss.params.margin": "loss.name"}
    res = REGISTRY["factors"](runs, tmp_path, reference={"loss.name": "margin"})
    assert list(res.table["factor"]) == ["loss.name"]
    assert res.table.loc[0, "rel_change_pct"] == pytest.approx((0.51 - 0.62) / 0.62 * 100)
    assert any("loss.params.margin" in n for n in res.notes)
    assert_png(tmp_path / "factors.png")


def test_factors_files(grid_runs, tmp_path):
    res = REGISTRY["factors"](grid_runs, tmp_path, study_name="s", console=Console(record=True, width=200))
    assert sorted(p.name for p in res.files) == ["factors.csv", "factors.md", "factors.png"]
    assert_png(tmp_path / "factors.png")
    md = (tmp_path / "factors.md").read_text()
    assert "| model.embed_dim | 128 (platform default) | 64 | R@1 | 2 | -8.10 ± 0.14 |" in md


# ----------------------------------------------------------------------------- registry + report
def test_validate_analyses():
    assert validate_analyses(None) == [(n, {}) for n in ("aggregate", "correlation", "factors", "report")]
    specs = validate_analyses(["aggregate", {"correlation": {"x": ["a"]}}, {"name": "factors", "metrics": ["m"]}, {"report": None}])
    assert specs == [("aggregate", {}), ("correlation", {"x": ["a"]}), ("factors", {"metrics": ["m"]}), ("report", {})]
    assert validate_analyses(specs) == specs and validate_analyses([]) == []
    with pytest.raises(ValueError, match=r"unknown analysis 'corelation' \(did you mean 'correlation'\?\)") as e:
        validate_analyses(["corelation"])
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match=r"'aggregate' has no option 'metric' \(did you mean 'metrics'\?\)"):
        validate_analyses([{"aggregate": {"metric": [R1]}}])
    assert "results" not in options_of("report") and "x" in options_of("correlation")


def test_run_analyses_report(corr_runs, tmp_path):
    runs = corr_runs.copy()
    runs["params.eval.select_on"] = "val"
    runs["params.data.val_classes"] = 0.15
    runs.loc[runs.status == "FAILED", "tags.error"] = "Traceback (most recent call last):\n  ...\nRuntimeError: CUDA out of memory"
    console = Console(record=True, width=200)
    files = run_analyses("revisiting", [{"report": {"title": "My study"}}, {"aggregate": {"metrics": [R1, MAP]}}, "correlation", "factors"],
                         runs, tmp_path / "out", console)
    names = [p.name for p in files]
    assert names[-2:] == ["report.md", "report.html"]  # report runs last whatever the order
    assert all(p.exists() for p in files) and len(set(names)) == len(names)
    md = (tmp_path / "out" / "report.md").read_text()
    assert md.startswith("# My study")
    assert "`eval.select_on=val`: best epoch selected by" not in md  # select_metric not logged
    assert "`eval.select_on=val`: best epoch selected on the validation split" in md
    assert "k = number of *test* classes" in md
    agg_md = (tmp_path / "out" / "aggregate.md").read_text()
    agg_table = agg_md[agg_md.index("| loss.name"):agg_md.index("\n\n", agg_md.index("| loss.name"))]
    assert agg_table in md  # the aggregate table, as is
    assert "| embedding metric | test metric |" in md and "![" in md and "factors.png" in md
    assert "## Failed trials" in md and "RuntimeError: CUDA out of memory" in md
    page = (tmp_path / "out" / "report.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and "<table>" in page and "<th>Pearson r</th>" in page
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(images) == 4 and all(base64.b64decode(i)[:8] == PNG for i in images)  # seeds, scatter, bars, factors
    assert not re.search(r'src="(?!data:)', page)  # self-contained
    assert "RuntimeError: CUDA out of memory" in page


def test_failing_analysis_does_not_stop_the_others(seeds_runs, tmp_path):
    console = Console(record=True, width=200)
    bad = [{"aggregate": {"group_by": ["nope"]}}, "report"]
    files = run_analyses("s", bad, seeds_runs, tmp_path, console)
    assert [p.name for p in files if p.suffix in (".md", ".html") and p.stem == "report"] == ["report.md", "report.html"]
    assert "analysis 'aggregate' failed" in console.export_text()
    assert "This analysis failed: ValueError" in (tmp_path / "report.md").read_text()
    with pytest.raises(ValueError, match="no run has the param 'nope'"):
        run_analyses("s", bad, seeds_runs, tmp_path, strict=True)


def test_empty_and_metricless_runs(tmp_path):
    files = run_analyses("empty", None, pd.DataFrame(columns=["run_id", "status"]), tmp_path / "a")
    assert (tmp_path / "a" / "report.md").exists() and (tmp_path / "a" / "report.html") in files
    runs = frame([run(i, **{"train.seed": i}) for i in range(2)])
    files = run_analyses("bare", None, runs, tmp_path / "b", strict=True)
    assert "Note: no best/test/* metric" in (tmp_path / "b" / "aggregate.md").read_text()


def test_report_alone_computes_its_sections(grid_runs, tmp_path):
    res = REGISTRY["report"](grid_runs, tmp_path, study_name="grid")
    names = {p.name for p in res.files}
    assert {"aggregate.csv", "correlation.csv", "factors.png", "report.md", "report.html"} <= names
    md = (tmp_path / "report.md").read_text()
    assert "## Aggregate over seeds" in md and "## Factor effects" in md and "None: every trial finished." in md
    assert "Best-epoch selection: unknown" in md
