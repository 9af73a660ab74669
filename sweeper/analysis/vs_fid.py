"""Test performance against the train->test shift (ooDML, Milbich et al., NeurIPS 2021).

Each ooDML split of a dataset has a FID between its train and test classes (the
trainer logs it as the metric ``data/fid``). Per method (the runs sharing the values of
``group_by``, default ``loss.name``) and per split, the seeds of a test metric are
averaged (mean ± sample std, ddof=1); the points, sorted by FID, make one curve per
method. The summary of a curve is its normalised area::

    AUC = trapz(metric_mean, fid) / (fid_max - fid_min)

(trapezoid rule over the method's splits sorted by FID), i.e. the mean height of the
piecewise-linear curve over the FID range: in the metric's units (a Recall@1 of 0.7 at
every split gives 0.7), comparable between methods that were run on the same splits.
``auc_std`` is the std over seeds of the per-seed AUCs (seeds that have every split of
the method); by linearity their mean is the AUC of the mean curve.

Files: ``<filename>.csv`` (one row per method, metric and split: fid, n, mean, std),
``<filename>_auc.csv`` and ``<filename>.md`` (one row per method and metric: splits,
FID range, AUC ± std, the metric at the lowest and highest FID, the drop, notes) and
``<filename>.png`` (one panel per metric, mean ± std per method against FID).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from . import register
from .aggregate import group_keys
from .base import (
    SEED_KEY,
    AnalysisResult,
    Heading,
    Image,
    Paragraph,
    Table,
    check_params,
    fmt_num,
    fmt_value,
    metric_col,
    new_figure,
    param_col,
    pretty_metric,
    print_table,
    resolve_metrics,
    sort_key,
    split_status,
    strip_prefix,
    write_markdown,
)

DEFAULT_METRICS = ("best/test/recall_at_1",)
FID_CANDIDATES = ("data/fid", "best/data/fid")


def normalized_auc(fid: Sequence[float], values: Sequence[float]) -> float:
    """Trapezoid area of ``values`` over ``fid`` (sorted by FID), divided by the FID range.

    NaN with fewer than two distinct FIDs. Points with the same FID are averaged first.
    """
    f = np.asarray(fid, float)
    v = np.asarray(values, float)
    keep = np.isfinite(f) & np.isfinite(v)
    f, v = f[keep], v[keep]
    if len(f) == 0:
        return math.nan
    uf, inv = np.unique(f, return_inverse=True)  # sorted
    if len(uf) < 2:
        return math.nan
    uv = np.bincount(inv, weights=v) / np.bincount(inv)
    area = float(np.sum((uf[1:] - uf[:-1]) * (uv[1:] + uv[:-1]) / 2.0))
    return area / float(uf[-1] - uf[0])


def _fid_source(ok: pd.DataFrame, fid: str | None) -> tuple[str, str]:
    """(column, description) holding each run's FID: a metric or a param (one-line ValueError)."""
    if fid is not None:
        fid = str(fid)
        if fid.startswith("params."):
            key = check_params(ok, [fid], "vs_fid.fid")[0]
            return param_col(key), f"param `{key}`"
        name = strip_prefix(fid)
        if metric_col(name) in ok.columns and ok[metric_col(name)].notna().any():
            return metric_col(name), f"metric `{name}`"
        if not fid.startswith("metrics.") and param_col(name) in ok.columns:
            return param_col(name), f"param `{name}`"
        raise ValueError(f"vs_fid.fid: no finished run has the metric or param '{name}'")
    for name in FID_CANDIDATES:
        if metric_col(name) in ok.columns and ok[metric_col(name)].notna().any():
            return metric_col(name), f"metric `{name}`"
    raise ValueError(
        "vs_fid: no finished run logged 'data/fid' (the FID of its ooDML split); "
        "run on split files with a fid per split, or name the FID with the option 'fid'"
    )


def fid_frame(
    runs: pd.DataFrame,
    metrics: Sequence[str],
    group_by: Sequence[str],
    fid_col: str,
    split_key: str | None,
    seed_key: str = SEED_KEY,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(points, summary) as data; see the module docstring for the columns."""
    ok, _ = split_status(runs.reset_index(drop=True))
    fids = pd.to_numeric(ok[fid_col], errors="coerce") if len(ok) else pd.Series(dtype=float)
    ok = ok[fids.notna()]
    fids = fids[fids.notna()]
    methods = group_keys(ok, group_by)
    if split_key and param_col(split_key) in ok.columns:
        splits = ok[param_col(split_key)].map(fmt_value)
    else:  # the FID itself identifies the split
        splits = fids.map(lambda f: f"fid={f:.6g}")
    seeds = ok[param_col(seed_key)].map(fmt_value) if param_col(seed_key) in ok.columns else pd.Series("—", index=ok.index)
    first: dict[tuple, tuple] = {}
    for idx, key in methods.items():
        first.setdefault(key, tuple(ok.at[idx, param_col(k)] if param_col(k) in ok.columns else None for k in group_by))
    order = sorted(first, key=lambda k: tuple(sort_key(v) for v in first[k]))

    point_rows, auc_rows = [], []
    all_splits = set(splits)
    for m in metrics:
        vals = pd.to_numeric(ok[metric_col(m)], errors="coerce") if metric_col(m) in ok.columns else pd.Series(np.nan, index=ok.index)
        cells = pd.DataFrame({"method": methods, "split": splits, "seed": seeds, "fid": fids, "v": vals})
        for key in order:
            label = dict(zip(group_by, first[key]))
            mine = cells[[k == key for k in cells["method"]]]  # (tuples: no element-wise ==)
            pts = []
            for split, g in mine.groupby("split", sort=False):
                v = g["v"].dropna().to_numpy(float)
                f = float(g["fid"].mean())
                pts.append({
                    **label,
                    "metric": m,
                    "split": split,
                    "fid": f,
                    "fid_spread": float(g["fid"].max() - g["fid"].min()),
                    "n": len(v),
                    "mean": float(v.mean()) if len(v) else math.nan,
                    "std": float(v.std(ddof=1)) if len(v) > 1 else math.nan,
                })
            pts.sort(key=lambda r: (r["fid"], str(r["split"])))
            point_rows += pts
            good = [r for r in pts if math.isfinite(r["mean"])]
            notes = []
            if len(good) < 2:
                notes.append(f"{len(good)} split(s) with a value: no curve")
            missing = all_splits - {r["split"] for r in good}
            if missing and len(all_splits) > 1:
                notes.append(f"not run on {len(missing)} of {len(all_splits)} splits: AUC over a different FID range")
            if any(r["fid_spread"] > 1e-9 * max(1.0, abs(r["fid"])) for r in pts):
                notes.append("runs of one split logged different FIDs (averaged)")
            auc = normalized_auc([r["fid"] for r in good], [r["mean"] for r in good])
            # per-seed AUCs over the seeds that have every split of the method
            per_seed = []
            wanted = {r["split"] for r in good}
            for _, g in mine.dropna(subset=["v"]).groupby("seed", sort=False):
                if set(g["split"]) >= wanted and len(wanted) >= 2:
                    gg = g.groupby("split").agg(fid=("fid", "mean"), v=("v", "mean"))
                    gg = gg.loc[sorted(wanted)]
                    per_seed.append(normalized_auc(gg["fid"].to_numpy(), gg["v"].to_numpy()))
            per_seed = [a for a in per_seed if math.isfinite(a)]
            lo = good[0] if good else None
            hi = good[-1] if good else None
            auc_rows.append({
                **label,
                "metric": m,
                "n_splits": len(good),
                "fid_min": lo["fid"] if lo else math.nan,
                "fid_max": hi["fid"] if hi else math.nan,
                "auc": auc,
                "auc_std": float(np.std(per_seed, ddof=1)) if len(per_seed) > 1 else math.nan,
                "auc_seeds": len(per_seed),
                "at_min_fid": lo["mean"] if lo else math.nan,
                "at_max_fid": hi["mean"] if hi else math.nan,
                "drop": (lo["mean"] - hi["mean"]) if lo and len(good) > 1 else math.nan,
                "note": "; ".join(notes),
            })
    point_cols = [*group_by, "metric", "split", "fid", "fid_spread", "n", "mean", "std"]
    auc_cols = [*group_by, "metric", "n_splits", "fid_min", "fid_max", "auc", "auc_std", "auc_seeds",
                "at_min_fid", "at_max_fid", "drop", "note"]
    points = pd.DataFrame(point_rows, columns=point_cols)
    summary = pd.DataFrame(auc_rows, columns=auc_cols)
    # best AUC per metric
    summary["best"] = False
    for m in metrics:
        sel = summary["metric"] == m
        a = summary.loc[sel, "auc"].to_numpy(float)
        if np.isfinite(a).any():
            summary.loc[sel & (summary["auc"] == np.nanmax(a)), "best"] = True
    return points, summary


def _method_label(row: dict[str, Any], group_by: Sequence[str]) -> str:
    return ", ".join(fmt_value(row[k]) for k in group_by) if group_by else "all runs"


def auc_table(summary: pd.DataFrame, group_by: Sequence[str], precision: int = 4) -> Table:
    headers = ["method" if len(group_by) != 1 else group_by[0], "metric", "splits", "FID range",
               "AUC (normalised)", "at lowest FID", "at highest FID", "drop", "note"]
    rows, bold = [], set()
    for i, r in enumerate(summary.to_dict("records")):
        auc = fmt_num(r["auc"], precision)
        if math.isfinite(r["auc_std"]):
            auc += f" ± {fmt_num(r['auc_std'], precision)}"
        rng = f"{r['fid_min']:.4g} – {r['fid_max']:.4g}" if math.isfinite(r["fid_min"]) else "—"
        rows.append([_method_label(r, group_by), pretty_metric(r["metric"]), str(r["n_splits"]), rng, auc,
                     fmt_num(r["at_min_fid"], precision), fmt_num(r["at_max_fid"], precision),
                     fmt_num(r["drop"], precision), r["note"]])
        if r["best"]:
            bold.add((i, 4))
    return Table(headers, rows, bold=bold)


def line_plot(points: pd.DataFrame, metrics: Sequence[str], group_by: Sequence[str], path: Path) -> Path:
    """One panel per metric: mean ± std over seeds against FID, one line per method."""
    fig = new_figure(4.6 * len(metrics) + 1.8, 3.6)
    axes = fig.subplots(1, len(metrics), squeeze=False)[0]
    for ax, m in zip(axes, metrics):
        sub = points[points["metric"] == m]
        keys = group_keys(sub.rename(columns={k: param_col(k) for k in group_by}), group_by) if len(sub) else pd.Series(dtype=object)
        seen: list = []
        for k in keys:
            if k not in seen:
                seen.append(k)
        for j, k in enumerate(seen):
            g = sub[[kk == k for kk in keys]].sort_values("fid")
            g = g[np.isfinite(g["mean"].to_numpy(float))]
            if not len(g):
                continue
            label = _method_label(g.iloc[0].to_dict(), group_by)
            x, y = g["fid"].to_numpy(float), g["mean"].to_numpy(float)
            err = np.nan_to_num(g["std"].to_numpy(float))
            color = f"C{j % 10}"
            ax.plot(x, y, marker="o", ms=4, color=color, label=label)
            ax.fill_between(x, y - err, y + err, color=color, alpha=0.15, linewidth=0)
        ax.set_xlabel("FID between train and test classes (split)", fontsize=9)
        ax.set_ylabel(pretty_metric(m), fontsize=9)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=8)
    handles, labels = axes[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, title=", ".join(group_by) or None, loc="outside right center", fontsize=8, title_fontsize=8)
    fig.savefig(path, dpi=90)
    return path


@register("vs_fid")
def vs_fid(
    runs: pd.DataFrame,
    out_dir: Path,
    *,
    study_name: str = "",
    console: Any = None,
    metrics: Sequence[str] | None = None,
    group_by: str | Sequence[str] = "loss.name",
    fid: str | None = None,
    split_key: str | None = "data.split",
    seed_key: str = SEED_KEY,
    precision: int = 4,
    filename: str = "vs_fid",
) -> AnalysisResult:
    """A test metric against the split's FID per method, and the normalised area under it.

    Options: ``metrics`` (default ``best/test/recall_at_1``), ``group_by`` (a param or a
    list of params defining a method; default ``loss.name``), ``fid`` (the metric or
    param holding each run's FID; default the metric ``data/fid``, else ``best/data/fid``;
    ``params.<key>`` names a param), ``split_key`` (the param naming the split, default
    ``data.split``; without it the FID value identifies the split), ``precision``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    seed_key = strip_prefix(seed_key)
    ok, failed = split_status(runs.reset_index(drop=True))
    keys = [group_by] if isinstance(group_by, str) else list(group_by or [])
    keys = check_params(ok, keys, "vs_fid.group_by") if keys else []
    names, notes = resolve_metrics(ok, metrics, DEFAULT_METRICS)
    if metrics is None and not names:
        notes.append("best/test/recall_at_1 was not logged by any finished run")
    fid_col, fid_desc = _fid_source(ok, fid)
    no_fid = int(pd.to_numeric(ok[fid_col], errors="coerce").isna().sum())
    if no_fid:
        notes.append(f"{no_fid} finished run(s) without a FID were left out")
    split_key = strip_prefix(split_key) if split_key else None
    if split_key and param_col(split_key) not in ok.columns:
        notes.append(f"param '{split_key}' not logged: splits are identified by their FID")
        split_key = None
    points, summary = fid_frame(runs, names, keys, fid_col, split_key, seed_key)

    table = auc_table(summary, keys, precision)
    table.caption = (
        "AUC: trapezoid area under the mean-over-seeds curve of the metric against the split's FID "
        "(splits sorted by FID), divided by the method's FID range, i.e. the curve's mean height in the "
        "metric's units (± std over seeds of the per-seed AUCs). Compare AUCs only over the same splits. "
        f"FID from the {fid_desc}; drop = value at the lowest FID − value at the highest. Bold: best AUC."
    )
    intro = (
        f"{len(ok)} finished runs" + (f" ({len(failed)} unfinished/failed excluded)" if len(failed) else "")
        + f"; methods by {', '.join(f'`{k}`' for k in keys) or 'none (all runs one method)'}; "
        f"splits by {f'`{split_key}`' if split_key else 'FID value'}; mean ± std over seeds (`{seed_key}`) per split."
    )
    blocks: list = [Heading("Performance against the train–test shift (FID)"), Paragraph(intro),
                    *(Paragraph(f"Note: {n}.") for n in notes), table]
    files: list[Path] = []
    csv = out_dir / f"{filename}.csv"
    points.to_csv(csv, index=False)
    auc_csv = out_dir / f"{filename}_auc.csv"
    summary.to_csv(auc_csv, index=False)
    files += [csv, auc_csv]
    if len(points) and points["mean"].notna().any():
        png = line_plot(points, names, keys, out_dir / f"{filename}.png")
        files.append(png)
        blocks.append(Image(png, "test metric against the split's FID per method"))
    md = write_markdown(out_dir / f"{filename}.md", [Heading(f"{study_name or 'Study'}: performance vs FID", 1), *blocks[1:]])
    files.insert(2, md)
    print_table(console, f"{study_name}: performance vs FID".lstrip(": "), table)
    if console is not None:
        for n in notes:
            console.print(f"[yellow]vs_fid: {n}[/]")
    return AnalysisResult("vs_fid", files, blocks, summary, notes)
