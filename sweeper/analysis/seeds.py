"""Statistics over the seeds of one configuration: t-interval, paired test against the best, strip plot.

* :func:`t_interval`: the two-sided Student-t confidence interval of the mean of the seeds,
  ``mean ± t_{(1+level)/2, n-1} · s / sqrt(n)`` with ``s`` the sample std (ddof=1).
* :func:`paired_t`: the paired t-test of two configurations over the seeds they share,
  ``t = mean(d) / (s_d / sqrt(n))``, ``df = n - 1``, two-sided p, with ``d`` the per-seed
  differences (same seed = same data order, sampler and initialisation, so the pair removes
  the seed's share of the variance).
* :func:`vs_best`: every configuration against the best one (highest mean; lowest for a
  lower-is-better metric), marked ``indistinguishable`` when the test does not reject at
  ``alpha``. Why a paired t-test and not Wilcoxon: docs/analysis.md ("Seeds").
* :func:`seeds_plot`: one row per configuration, each seed a dot, the mean and its
  t-interval as a bar.

scipy is imported lazily (only these functions need it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

ALPHA = 0.05
LEVEL = 0.95
MIN_PAIRS = 3

# Labels of the ``vs_best`` column.
BEST = "best"
SAME = "indistinguishable"
WORSE = "worse"
BETTER = "better on the shared seeds"
FEW = "too few paired seeds"
NONE = "no value"


@lru_cache(maxsize=256)
def _t_quantile(q: float, df: int) -> float:
    """Student's t quantile (cached: one per level and number of seeds, not per group and metric)."""
    from scipy import stats

    return float(stats.t.ppf(q, df))


def t_interval(values: Sequence[float], level: float = LEVEL) -> tuple[float, float]:
    """``(low, high)`` of the ``level`` Student-t interval of the mean; NaNs for fewer than 2 values."""
    x = np.asarray([v for v in values if v is not None and math.isfinite(v)], float)
    n = len(x)
    if n < 2:
        return math.nan, math.nan
    half = _t_quantile((1 + level) / 2, n - 1) * float(x.std(ddof=1)) / math.sqrt(n)
    m = float(x.mean())
    return m - half, m + half


@dataclass
class Paired:
    n: int
    mean_diff: float
    t: float
    p: float


def paired_t(a: Mapping[Any, float], b: Mapping[Any, float]) -> Paired:
    """Paired t-test of ``a - b`` over the keys (seeds) both have a finite value for.

    Differences all equal: ``p = 1`` if they are 0 (the same numbers), else ``p = 0``
    (``t = ±inf``); fewer than 2 pairs: ``t = p = NaN``.
    """
    seeds = [s for s in a if s in b and math.isfinite(a[s]) and math.isfinite(b[s])]
    d = np.asarray([a[s] - b[s] for s in seeds], float)
    n = len(d)
    if n < 2:
        return Paired(n, float(d.mean()) if n else math.nan, math.nan, math.nan)
    mean, sd = float(d.mean()), float(d.std(ddof=1))
    if sd == 0.0:
        return Paired(n, mean, 0.0 if mean == 0 else math.copysign(math.inf, mean), 1.0 if mean == 0 else 0.0)
    from scipy import stats

    t = mean / (sd / math.sqrt(n))
    return Paired(n, mean, t, float(2 * stats.t.sf(abs(t), n - 1)))


def per_seed(values: Sequence[float], seeds: Sequence[Any]) -> dict[Any, float]:
    """seed -> value (the mean if a seed occurs twice); non-finite values dropped."""
    acc: dict[Any, list[float]] = {}
    for s, v in zip(seeds, values):
        if v is not None and math.isfinite(v):
            acc.setdefault(s, []).append(float(v))
    return {s: float(np.mean(v)) for s, v in acc.items()}


def vs_best(groups: Sequence[Mapping[Any, float]], means: Sequence[float], *, lower: bool = False,
            alpha: float = ALPHA, min_pairs: int = MIN_PAIRS) -> list[dict[str, Any]]:
    """Per group: ``label``, ``p``, ``n_pairs``, ``mean_diff`` (group − best over the shared seeds).

    ``groups`` are per-seed values (:func:`per_seed`), ``means`` the groups' means; the best
    group is the first with the best mean.
    """
    m = np.asarray(means, float)
    out = [dict(label=NONE, p=math.nan, n_pairs=0, mean_diff=math.nan) for _ in groups]
    if not np.isfinite(m).any():
        return out
    best = int(np.nanargmin(m) if lower else np.nanargmax(m))
    for i, g in enumerate(groups):
        if i == best:
            out[i].update(label=BEST, n_pairs=len(g), mean_diff=0.0)
            continue
        if not math.isfinite(m[i]):
            continue
        r = paired_t(g, groups[best])
        out[i].update(p=r.p, n_pairs=r.n, mean_diff=r.mean_diff)
        if r.n < max(2, min_pairs):
            out[i]["label"] = f"{FEW} (n={r.n})"
        elif r.p >= alpha:
            out[i]["label"] = SAME
        else:
            worse = r.mean_diff > 0 if lower else r.mean_diff < 0
            out[i]["label"] = WORSE if worse else BETTER
    return out


def seeds_plot(path: Path, labels: Sequence[str], values: Sequence[Mapping[Any, float]],
               intervals: Sequence[tuple[float, float]], marks: Sequence[str], metric: str,
               lower: bool = False, max_rows: int = 60) -> Path:
    """Strip plot: one row per configuration, best mean at the top (the best ``max_rows``), each
    seed a dot, the mean as a tick with its t-interval; the best row green, the indistinguishable
    ones blue, others grey. One scatter and one errorbar call per colour."""
    from .base import new_figure

    means = [float(np.mean(list(v.values()))) if len(v) else math.nan for v in values]
    key = [(math.isnan(m), m if lower else -m) for m in means]
    order = sorted(range(len(labels)), key=lambda i: key[i])[:max_rows]
    n = len(order)
    fig = new_figure(7.5, 0.32 * n + 1.4)
    ax = fig.subplots()
    styles = ((BEST, "C2", "best"), (SAME, "C0", "indistinguishable from best"), (None, "0.45", "other"))
    for mark, colour, name in styles:
        rows = [(n - 1 - r, i) for r, i in enumerate(order) if (marks[i] == mark if mark else marks[i] not in (BEST, SAME))]
        xs, ys, mx, my, lo_err, hi_err = [], [], [], [], [], []
        for y, i in rows:
            v = np.asarray(list(values[i].values()), float)
            if not len(v):
                continue
            xs += list(v)
            ys += list(y + (np.arange(len(v)) - (len(v) - 1) / 2) * (0.5 / len(v)))
            mean = float(v.mean())
            lo, hi = intervals[i]
            mx.append(mean)
            my.append(y)
            lo_err.append(mean - lo if math.isfinite(lo) else 0.0)
            hi_err.append(hi - mean if math.isfinite(hi) else 0.0)
        ax.scatter(xs, ys, s=18, color=colour, zorder=3, edgecolor="white", linewidth=0.5, label=name)
        if mx:
            ax.errorbar(mx, my, xerr=[lo_err, hi_err], fmt="|", color=colour, ms=14, capsize=3, lw=1.2, zorder=2)
    ax.set_yticks(range(n), [labels[i] for i in order][::-1], fontsize=7)
    ax.set_xlabel(f"{metric} (dots: seeds; bar: mean and 95% t-interval)", fontsize=9)
    ax.grid(axis="x", alpha=0.3)
    ax.set_ylim(-0.7, n - 0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)  # beside, never over the dots
    if len(labels) > n:
        ax.set_title(f"the best {n} of {len(labels)} configurations (all in the CSV)", fontsize=8)
    fig.savefig(path, dpi=110)
    return path
