"""Seed statistics of the aggregate: Student-t interval, paired t-test against the best, seeds plot.

The reference values are computed here by hand (formulas written out, the t quantile from a
printed table), never by the code under test.
"""

from __future__ import annotations

import math

import matplotlib.image as mpimg
import numpy as np
import pandas as pd
import pytest
from scipy import stats

from sweeper.analysis import run_analyses
from sweeper.analysis.aggregate import aggregate_frame
from sweeper.analysis.seeds import paired_t, t_interval, vs_best

R1 = "best/test/recall_at_1"
T_975_4 = 2.776  # t_{0.975, 4} from a printed Student-t table (5 seeds -> 4 degrees of freedom)

A = [0.71, 0.74, 0.69, 0.73, 0.70]  # the best configuration, seeds 0..4
B = [0.68, 0.73, 0.66, 0.70, 0.69]  # always below A on the same seed: worse
C = [a + d for a, d in zip(A, [0.01, -0.02, 0.01, -0.02, 0.005])]  # noise around A: indistinguishable
D = [0.60, 0.70]  # seeds 0 and 1 only: too few pairs to test


def by_hand_interval(x):
    n = len(x)
    mean = sum(x) / n
    s = math.sqrt(sum((v - mean) ** 2 for v in x) / (n - 1))  # ddof = 1
    half = T_975_4 * s / math.sqrt(n)
    return mean - half, mean + half


def by_hand_paired_t(x, y):
    d = [a - b for a, b in zip(x, y)]
    n = len(d)
    mean = sum(d) / n
    s = math.sqrt(sum((v - mean) ** 2 for v in d) / (n - 1))
    return mean / (s / math.sqrt(n))


def test_t_interval_equals_the_formula_with_the_table_quantile():
    lo, hi = t_interval(A)
    hand_lo, hand_hi = by_hand_interval(A)
    # mean 0.714, s = 0.020736, half-width 2.776 * s / sqrt(5) = 0.02574
    assert (hand_lo, hand_hi) == pytest.approx((0.714 - 0.025744, 0.714 + 0.025744), abs=2e-6)
    assert (lo, hi) == pytest.approx((hand_lo, hand_hi), abs=1e-5)  # the table's 3 decimals
    assert all(math.isnan(v) for v in t_interval([0.5]))  # one seed: no interval
    lo90, hi90 = t_interval(A, level=0.90)
    half90 = 2.132 * np.std(A, ddof=1) / math.sqrt(5)  # t_{0.95, 4} = 2.132
    assert (lo90, hi90) == pytest.approx((0.714 - half90, 0.714 + half90), abs=1e-5)


def test_paired_t_equals_the_formula_and_scipy():
    seeds = range(5)
    r = paired_t(dict(zip(seeds, B)), dict(zip(seeds, A)))
    t_hand = by_hand_paired_t(B, A)  # d = B - A = [-.03, -.01, -.03, -.03, -.01]: mean -0.022, s 0.010954
    assert t_hand == pytest.approx(-0.022 / (0.0109545 / math.sqrt(5)), rel=1e-5)
    assert r.n == 5 and r.mean_diff == pytest.approx(-0.022) and r.t == pytest.approx(t_hand, rel=1e-12)
    assert abs(t_hand) > T_975_4 and r.p < 0.05  # beyond the 97.5% quantile: rejected at 5%
    assert r.p == pytest.approx(stats.ttest_rel(B, A).pvalue, rel=1e-9)
    rc = paired_t(dict(zip(seeds, C)), dict(zip(seeds, A)))
    assert abs(by_hand_paired_t(C, A)) < T_975_4 and rc.p > 0.05
    # pairing is by seed, not by position; seeds only one side has are left out
    shuffled = dict(zip([4, 3, 2, 1, 0], B[::-1]))
    assert paired_t(shuffled, {**dict(zip(seeds, A)), 9: 0.1}).t == pytest.approx(t_hand, rel=1e-12)
    same = paired_t({0: 0.5, 1: 0.6}, {0: 0.5, 1: 0.6})
    assert same.p == 1.0 and same.t == 0.0
    shifted = paired_t({0: 0.4, 1: 0.5}, {0: 0.5, 1: 0.6})
    assert shifted.p == 0.0 and shifted.t == -math.inf


def seed_runs():
    rows = []
    for loss, vals in (("margin", A), ("triplet", B), ("contrastive", C), ("arcface", D)):
        for seed, v in enumerate(vals):
            rows.append({"run_id": f"{loss}{seed}", "status": "FINISHED", "params.loss.name": loss,
                         "params.train.seed": seed, f"metrics.{R1}": v})
    rows.append({"run_id": "x", "status": "FAILED", "params.loss.name": "triplet", "params.train.seed": 5})
    return pd.DataFrame(rows)


def test_indistinguishable_marking_on_a_hand_made_frame():
    df = aggregate_frame(seed_runs(), [R1], ["loss.name"], compare_on=R1).set_index("loss.name")
    assert df.loc["margin", "vs_best"] == "best"
    assert df.loc["triplet", "vs_best"] == "worse"
    assert df.loc["contrastive", "vs_best"] == "indistinguishable"
    assert df.loc["arcface", "vs_best"] == "too few paired seeds (n=2)"
    assert df.loc["triplet", "vs_best:n_pairs"] == 5
    assert df.loc["triplet", "vs_best:p"] == pytest.approx(stats.ttest_rel(B, A).pvalue, rel=1e-9)
    assert (df.loc["margin", f"{R1}:ci_low"], df.loc["margin", f"{R1}:ci_high"]) == pytest.approx(by_hand_interval(A), abs=1e-5)
    # a stricter alpha keeps triplet apart only if p is below it; lower-is-better flips the best
    strict = aggregate_frame(seed_runs(), [R1], ["loss.name"], compare_on=R1, alpha=1e-6).set_index("loss.name")
    assert strict.loc["triplet", "vs_best"] == "indistinguishable"
    low = vs_best([dict(enumerate(A)), dict(enumerate(B))], [np.mean(A), np.mean(B)], lower=True)
    assert [m["label"] for m in low] == ["worse", "best"]


def test_leaderboard_report_and_seeds_plot(tmp_path):
    files = run_analyses("seeds", ["aggregate", "report"], seed_runs(), tmp_path, strict=True)
    names = {p.name for p in files}
    assert {"aggregate.csv", "aggregate.md", "aggregate_seeds.png", "report.md", "report.html"} <= names
    md = (tmp_path / "report.md").read_text()
    lo, hi = by_hand_interval(A)
    assert f"[{lo:.4f}, {hi:.4f}]" in md and "R@1 95% t-interval" in md and "vs best (R@1)" in md
    assert "indistinguishable (p=" in md and "| worse (p=" in md and "paired t-test" in md
    assert "aggregate_seeds.png" in md
    img = mpimg.imread(tmp_path / "aggregate_seeds.png")
    assert img.shape[0] > 100 and img.shape[1] > 100 and img[..., :3].std() > 0.01  # not blank
    csv = pd.read_csv(tmp_path / "aggregate.csv")
    assert {"vs_best", "vs_best:p", f"{R1}:ci_low", f"{R1}:ci_high"} <= set(csv.columns)


def test_bad_options_are_one_line_errors(tmp_path):
    with pytest.raises(ValueError, match="aggregate.compare_on: 'best/test/nope' is not one of"):
        run_analyses("s", [{"aggregate": {"compare_on": "best/test/nope"}}], seed_runs(), tmp_path, strict=True)
    with pytest.raises(ValueError, match="aggregate.level: must be between 0 and 1"):
        run_analyses("s", [{"aggregate": {"level": 95}}], seed_runs(), tmp_path, strict=True)
