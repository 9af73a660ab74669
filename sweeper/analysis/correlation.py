"""Correlation of embedding-space metrics (on train data) with test performance.

As in Roth et al. (ICML 2020), each trained model is one point: for every pair
(embedding metric x, test metric y) the Pearson r and Spearman rho across the finished
runs, with their two-sided p-values (scipy.stats). Pairs with fewer than ``min_runs``
points or a constant column get a note instead of a number. ``level="config"`` first
averages the seeds of each configuration and correlates the means.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
from scipy import stats

from .base import (
    SEED_KEY,
    AnalysisResult,
    Heading,
    Image,
    Paragraph,
    Table,
    fmt_p,
    metric_col,
    new_figure,
    param_col,
    pretty_metric,
    print_table,
    resolve_metrics,
    split_status,
    strip_prefix,
    study_factors,
    write_markdown,
)
from .aggregate import group_keys

DEFAULT_X = tuple(f"best/train/{m}" for m in ("pi_intra", "pi_inter", "pi_ratio", "rho_spectrum", "uniformity"))
DEFAULT_Y = ("best/test/recall_at_1", "best/test/map_at_r")


def correlate(x: np.ndarray, y: np.ndarray, min_runs: int = 3) -> dict[str, Any]:
    """Pearson and Spearman of the finite pairs; ``note`` says why a value is missing."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    out: dict[str, Any] = {
        "n": int(len(x)),
        "pearson_r": math.nan,
        "pearson_p": math.nan,
        "spearman_rho": math.nan,
        "spearman_p": math.nan,
        "note": "",
    }
    if len(x) < min_runs:
        out["note"] = f"too few runs (n={len(x)} < {min_runs})"
        return out
    const = [name for name, v in (("x", x), ("y", y)) if np.ptp(v) == 0]
    if const:
        vals = {"x": x, "y": y}
        out["note"] = "; ".join(f"constant {c} (all {vals[c][0]:.4g})" for c in const)
        return out
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pr = stats.pearsonr(x, y)
        sr = stats.spearmanr(x, y)
    out.update(
        pearson_r=float(pr.statistic),
        pearson_p=float(pr.pvalue),
        spearman_rho=float(sr.statistic),
        spearman_p=float(sr.pvalue),
    )
    if not math.isfinite(out["spearman_rho"]):  # all ties in ranks cannot happen past the ptp check, but be safe
        out["note"] = "Spearman undefined (tied ranks)"
    return out


def _points(runs: pd.DataFrame, cols: list[str], level: str, keys: list[str], color_by: str | None) -> pd.DataFrame:
    """The table of points (one per run, or per configuration at ``level="config"``)."""
    color_col = param_col(color_by) if color_by else None
    has_color = color_col is not None and color_col in runs.columns
    pts = pd.DataFrame({c: pd.to_numeric(runs[c], errors="coerce") for c in cols if c in runs.columns}, index=runs.index)
    pts["_color"] = runs[color_col].astype(object).where(runs[color_col].notna(), None) if has_color else None
    if level == "config":
        pts["_key"] = group_keys(runs, keys).map(lambda t: "\x1f".join(t))
        agg = {c: "mean" for c in cols if c in pts.columns}
        agg["_color"] = "first"
        pts = pts.groupby("_key", sort=False, dropna=False).agg(agg).reset_index(drop=True)
    return pts


def _col(pts: pd.DataFrame, metric: str) -> np.ndarray:
    col = metric_col(metric)
    return pts[col].to_numpy(float) if col in pts.columns else np.full(len(pts), np.nan)


def correlation_frame(
    runs: pd.DataFrame,
    x: Sequence[str],
    y: Sequence[str],
    *,
    min_runs: int = 3,
    level: str = "run",
    keys: Sequence[str] = (),
) -> pd.DataFrame:
    ok, _ = split_status(runs)
    pts = _points(ok, [metric_col(m) for m in (*x, *y)], level, list(keys), None)
    rows = []
    for ym in y:
        for xm in x:
            r = correlate(_col(pts, xm), _col(pts, ym), min_runs)
            rows.append({"embedding_metric": xm, "test_metric": ym, **r})
    return pd.DataFrame(
        rows,
        columns=["embedding_metric", "test_metric", "n", "pearson_r", "pearson_p", "spearman_rho", "spearman_p", "note"],
    )


def _fmt_r(v: float) -> str:
    return f"{v:+.3f}" if math.isfinite(v) else "—"


def correlation_table(df: pd.DataFrame) -> Table:
    headers = ["embedding metric", "test metric", "n", "Pearson r", "p", "Spearman ρ", "p", "note"]
    rows = [
        [
            pretty_metric(r.embedding_metric),
            pretty_metric(r.test_metric),
            str(r.n),
            _fmt_r(r.pearson_r),
            fmt_p(r.pearson_p),
            _fmt_r(r.spearman_rho),
            fmt_p(r.spearman_p),
            r.note,
        ]
        for r in df.itertuples(index=False)
    ]
    return Table(headers, rows)


def marker_style(n: int) -> tuple[float, float]:
    """``(size, alpha)`` of scatter markers for ``n`` points: 18 / 0.85 up to 200 points, then both
    shrink like ``1/sqrt(n)`` (2,000 points: 5.7 / 0.27; floors 3 / 0.1) so that dense regions
    read as density instead of one blot."""
    if n <= 200:
        return 18.0, 0.85
    f = math.sqrt(200.0 / n)
    return max(3.0, 18.0 * f), max(0.1, 0.85 * f)


def scatter_grid(pts: pd.DataFrame, df: pd.DataFrame, x: Sequence[str], y: Sequence[str], path: Path, color_by: str | None) -> Path:
    """Rows: test metrics; columns: embedding metrics; r and rho in each title."""
    from matplotlib import colormaps

    fig = new_figure(3.3 * len(x) + (1.6 if color_by else 0), 3.0 * len(y) + 0.4)
    axes = fig.subplots(len(y), len(x), squeeze=False)
    colors = pts["_color"] if "_color" in pts.columns else pd.Series([None] * len(pts))
    cats = sorted({str(c) for c in colors if c is not None})
    cmap = colormaps["tab10" if len(cats) <= 10 else "tab20"]
    stats_by = {(r.embedding_metric, r.test_metric): r for r in df.itertuples(index=False)}
    size, alpha = marker_style(len(pts))
    for i, ym in enumerate(y):
        for j, xm in enumerate(x):
            ax = axes[i][j]
            xs, ys = _col(pts, xm), _col(pts, ym)
            if cats:
                for k, cat in enumerate(cats):
                    sel = (colors.map(lambda c: str(c) if c is not None else None) == cat).to_numpy()
                    ax.scatter(xs[sel], ys[sel], s=size, color=cmap(k % cmap.N), label=cat, alpha=alpha,
                               linewidths=0)
                rest = colors.isna().to_numpy() if len(colors) else np.zeros(0, bool)
                if rest.any():
                    ax.scatter(xs[rest], ys[rest], s=size, color="0.5", label="—", alpha=alpha, linewidths=0)
            else:
                ax.scatter(xs, ys, s=size, color="C0", alpha=alpha, linewidths=0)
            r = stats_by[(xm, ym)]
            title = r.note if r.note else f"r={r.pearson_r:+.2f} (p={fmt_p(r.pearson_p)})\nρ={r.spearman_rho:+.2f} (p={fmt_p(r.spearman_p)})"
            ax.set_title(title, fontsize=9)
            ax.set_xlabel(pretty_metric(xm), fontsize=9)
            ax.set_ylabel(pretty_metric(ym), fontsize=9)
            ax.tick_params(labelsize=7)
            ax.grid(alpha=0.3)
    if cats:
        handles, labels = axes[0][0].get_legend_handles_labels()
        legend = fig.legend(handles, labels, title=color_by, loc="outside right center", fontsize=8, title_fontsize=8,
                            markerscale=max(1.0, 18.0 / size))
        for h in legend.legend_handles:  # the key stays opaque when the points are faint
            h.set_alpha(1.0)
    fig.savefig(path, dpi=90)
    return path


def bar_chart(df: pd.DataFrame, x: Sequence[str], y: Sequence[str], path: Path) -> Path:
    """One panel per test metric: Pearson and Spearman bars for each embedding metric."""
    fig = new_figure(max(4.0, 1.1 * len(x) + 1.5), 2.8 * len(y) + 0.3)
    axes = fig.subplots(len(y), 1, squeeze=False)
    pos = np.arange(len(x))
    w = 0.38
    for i, ym in enumerate(y):
        ax = axes[i][0]
        sub = df[df["test_metric"] == ym].set_index("embedding_metric").reindex(list(x))
        for off, col, label, color in ((-w / 2, "pearson_r", "Pearson r", "C0"), (w / 2, "spearman_rho", "Spearman ρ", "C1")):
            vals = sub[col].to_numpy(float)
            ax.bar(pos + off, np.nan_to_num(vals), w, label=label, color=color)
            for p, v in zip(pos + off, vals):
                ax.text(p, (v if math.isfinite(v) else 0) + (0.03 if not math.isfinite(v) or v >= 0 else -0.03),
                        f"{v:+.2f}" if math.isfinite(v) else "n/a", ha="center", va="bottom" if not math.isfinite(v) or v >= 0 else "top", fontsize=7)
        ax.axhline(0, color="black", lw=0.8)
        ax.set_ylim(-1.15, 1.15)
        ax.set_xticks(pos, [pretty_metric(m) for m in x], fontsize=8)
        ax.set_ylabel(f"corr. with {pretty_metric(ym)}", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
        if i == 0:
            ax.legend(fontsize=8, loc="upper right")
    fig.savefig(path, dpi=90)
    return path


def correlation(
    runs: pd.DataFrame,
    out_dir: Path,
    *,
    study_name: str = "",
    console: Any = None,
    x: Sequence[str] | None = None,
    y: Sequence[str] | None = None,
    color_by: str | None = "loss.name",
    level: str = "run",
    min_runs: int = 3,
    ignore: Sequence[str] | None = None,
    seed_key: str = SEED_KEY,
    filename: str = "correlation",
) -> AnalysisResult:
    """Pearson/Spearman of each (x, y) pair; writes ``<filename>.csv``, ``.md``,
    ``<filename>_scatter.png`` and ``<filename>_bars.png``.

    Options: ``x`` (embedding metrics; default ``best/train/{pi_intra, pi_inter, pi_ratio,
    rho_spectrum, uniformity}``), ``y`` (test metrics; default ``best/test/recall_at_1``,
    ``best/test/map_at_r``), ``color_by`` (param colouring the points; None for one colour),
    ``level`` (``run``: one point per run; ``config``: seeds averaged first), ``min_runs``.
    """
    if level not in ("run", "config"):
        raise ValueError(f"correlation.level: expected 'run' or 'config', got {level!r}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    seed_key = strip_prefix(seed_key)
    ok, failed = split_status(runs.reset_index(drop=True))
    xs, xnotes = resolve_metrics(ok, x, DEFAULT_X)
    ys, ynotes = resolve_metrics(ok, y, DEFAULT_Y)
    notes = xnotes + ynotes
    if x is None and len(xs) < len(DEFAULT_X):
        missing = [m for m in DEFAULT_X if m not in xs]
        notes.append("embedding metrics not logged: " + ", ".join(missing))
    if y is None and len(ys) < len(DEFAULT_Y):
        notes.append("test metrics not logged: " + ", ".join(m for m in DEFAULT_Y if m not in ys))
    keys = study_factors(runs, ignore, seed_key) if level == "config" else []
    color_by = strip_prefix(color_by) if color_by else None
    if color_by and param_col(color_by) not in ok.columns:
        color_by = None

    df = correlation_frame(ok, xs, ys, min_runs=min_runs, level=level, keys=keys)
    npts = len(_points(ok, [], level, keys, None)) if len(ok) else 0
    unit = "runs" if level == "run" else "configurations (seed means)"
    intro = (
        f"Correlation across {npts} finished {unit} between embedding-space metrics on the train data "
        "and test metrics (two-sided p-values). Correlation across configurations is not causation; "
        "with few runs the p-values are unreliable."
    )
    if level == "run" and seed_key and param_col(seed_key) in ok.columns and ok[param_col(seed_key)].nunique() > 1:
        intro += " Seeds of one configuration are separate points, so the points are not independent."
    table = correlation_table(df)
    blocks = [Heading("Embedding-space metrics vs test performance"), Paragraph(intro), *(Paragraph(f"Note: {n}.") for n in notes)]
    if len(df):
        blocks.append(table)
    files: list[Path] = []
    csv = out_dir / f"{filename}.csv"
    df.to_csv(csv, index=False)
    files.append(csv)
    if xs and ys and len(ok):
        pts = _points(ok, [metric_col(m) for m in (*xs, *ys)], level, keys, color_by)
        scatter = scatter_grid(pts, df, xs, ys, out_dir / f"{filename}_scatter.png", color_by)
        bars = bar_chart(df, xs, ys, out_dir / f"{filename}_bars.png")
        files += [scatter, bars]
        blocks += [
            Image(scatter, "scatter plots of test metrics against embedding metrics"),
            Image(bars, "Pearson and Spearman correlations"),
        ]
    else:
        blocks.append(Paragraph("No plot: no finished run has both an embedding metric and a test metric."))
    md = write_markdown(out_dir / f"{filename}.md", [Heading(f"{study_name or 'Study'}: correlation", 1), *blocks[1:]])
    files.insert(1, md)
    if len(df):
        print_table(console, f"{study_name}: embedding metrics vs test metrics".lstrip(": "), table)
    if console is not None:
        for n in notes:
            console.print(f"[yellow]correlation: {n}[/]")
    return AnalysisResult("correlation", files, blocks, df, notes)
