"""Aggregation over seeds: one row per configuration, mean ± std (and n) per metric.

Trials are grouped by every param that varies across the finished runs except the seed
(and :data:`~sweeper.analysis.base.DEFAULT_IGNORE`), so the seeds of one configuration
are its replicates. std is the sample standard deviation (ddof=1; undefined for n=1).
Runs that did not finish are left out of the statistics and counted per group.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from . import seeds as seedstats
from .base import (
    SEED_KEY,
    AnalysisResult,
    Heading,
    Image,
    Paragraph,
    Table,
    canon,
    check_params,
    default_test_metrics,
    did_you_mean,
    fmt_num,
    fmt_p,
    fmt_value,
    metric_col,
    param_col,
    pretty_metric,
    print_table,
    resolve_metrics,
    sort_key,
    split_status,
    strip_prefix,
    study_factors,
    write_markdown,
)


def group_keys(runs: pd.DataFrame, keys: Sequence[str]) -> pd.Series:
    """One hashable key per run: the canonical values of ``keys`` (a tuple)."""
    if not keys:
        return pd.Series([()] * len(runs), index=runs.index, dtype=object)
    cols = [runs[param_col(k)].map(canon) if param_col(k) in runs.columns else pd.Series("None", index=runs.index) for k in keys]
    return pd.Series(list(zip(*cols)), index=runs.index, dtype=object)


def aggregate_frame(
    runs: pd.DataFrame,
    metrics: Sequence[str],
    group_by: Sequence[str],
    *,
    seed_key: str = SEED_KEY,
    lower_is_better: Sequence[str] = (),
    level: float = seedstats.LEVEL,
    compare_on: str | None = None,
    alpha: float = seedstats.ALPHA,
    min_pairs: int = seedstats.MIN_PAIRS,
) -> pd.DataFrame:
    """The aggregate table as data.

    Columns: the ``group_by`` keys (original values), ``n`` (finished runs), ``n_failed``,
    ``seeds``, then per metric ``<metric>:mean``, ``<metric>:std``, ``<metric>:n``,
    ``<metric>:ci_low``, ``<metric>:ci_high`` (the ``level`` Student-t interval of the mean,
    :func:`~sweeper.analysis.seeds.t_interval`), and ``best_for`` (the metrics for which this
    group has the best mean, ``;``-joined). With ``compare_on`` (a metric): ``vs_best``
    (``best`` / ``indistinguishable`` / ``worse`` / ...), ``vs_best:p``, ``vs_best:n_pairs``,
    ``vs_best:mean_diff`` of the paired t-test over seeds against the best group
    (:func:`~sweeper.analysis.seeds.vs_best`); ``df.attrs["seed_values"]`` holds each
    group's ``{seed: value}`` of that metric.
    """
    ok, failed = split_status(runs.reset_index(drop=True))
    ok_keys, failed_keys = group_keys(ok, group_by), group_keys(failed, group_by)
    order: dict[tuple, Any] = {}
    for frame, keys in ((ok, ok_keys), (failed, failed_keys)):
        for idx, key in keys.items():
            if key not in order:
                order[key] = tuple(frame.at[idx, param_col(k)] if param_col(k) in frame.columns else None for k in group_by)
    groups = sorted(order, key=lambda key: tuple(sort_key(v) for v in order[key]))
    members: dict[tuple, list] = {}
    for idx, key in ok_keys.items():
        members.setdefault(key, []).append(idx)
    n_failed: dict[tuple, int] = {}
    for key in failed_keys:
        n_failed[key] = n_failed.get(key, 0) + 1

    rows = []
    seed_values: list[dict] = []
    for key in groups:
        row: dict[str, Any] = dict(zip(group_by, order[key]))
        sel = ok.loc[members.get(key, [])]
        row["n"] = len(sel)
        row["n_failed"] = n_failed.get(key, 0)
        sc = param_col(seed_key)
        row["seeds"] = ",".join(fmt_value(s) for s in sorted(sel[sc].dropna().unique(), key=sort_key)) if sc in sel.columns else ""
        for m in metrics:
            col = metric_col(m)
            vals = pd.to_numeric(sel[col], errors="coerce").to_numpy(float) if col in sel.columns else np.array([])
            vals = vals[np.isfinite(vals)]
            row[f"{m}:mean"] = float(vals.mean()) if len(vals) else math.nan
            row[f"{m}:std"] = float(vals.std(ddof=1)) if len(vals) > 1 else math.nan
            row[f"{m}:n"] = len(vals)
            row[f"{m}:ci_low"], row[f"{m}:ci_high"] = seedstats.t_interval(vals, level)
        if compare_on is not None:
            col = metric_col(compare_on)
            vals = pd.to_numeric(sel[col], errors="coerce").to_numpy(float) if col in sel.columns else np.array([])
            seeds = list(sel[sc].map(canon)) if sc in sel.columns else [str(i) for i in range(len(sel))]
            seed_values.append(seedstats.per_seed(vals, seeds))
        rows.append(row)
    df = pd.DataFrame(rows, columns=[*group_by, "n", "n_failed", "seeds",
                                     *(f"{m}:{s}" for m in metrics for s in ("mean", "std", "n", "ci_low", "ci_high"))])

    lower = {strip_prefix(m) for m in lower_is_better}
    best_for: list[list[str]] = [[] for _ in range(len(df))]
    for m in metrics:
        means = df[f"{m}:mean"].to_numpy(float) if len(df) else np.array([])
        if not np.isfinite(means).any():
            continue
        target = np.nanmin(means) if m in lower else np.nanmax(means)
        for i in np.flatnonzero(means == target):
            best_for[i].append(m)
    df["best_for"] = [";".join(b) for b in best_for]
    if compare_on is not None:
        marks = seedstats.vs_best(seed_values, df[f"{compare_on}:mean"].to_numpy(float) if len(df) else [],
                                  lower=strip_prefix(compare_on) in lower, alpha=alpha, min_pairs=min_pairs)
        df["vs_best"] = [m["label"] for m in marks]
        for k in ("p", "n_pairs", "mean_diff"):
            df[f"vs_best:{k}"] = [m[k] for m in marks]
        df.attrs["seed_values"] = seed_values
    return df


def _cell(mean: float, std: float, n: int, n_runs: int, precision: int) -> str:
    if n == 0 or not math.isfinite(mean):
        return "—"
    s = fmt_num(mean, precision)
    s += f" ± {fmt_num(std, precision)}" if math.isfinite(std) else ""
    if n != n_runs or n == 1:
        s += f" (n={n})"
    return s


def _interval(lo: float, hi: float, precision: int) -> str:
    return f"[{fmt_num(lo, precision)}, {fmt_num(hi, precision)}]" if math.isfinite(lo) and math.isfinite(hi) else "—"


def _vs_best(label: str, p: float) -> str:
    if label in (seedstats.SAME, seedstats.WORSE, seedstats.BETTER) and math.isfinite(p):
        return f"{label} (p={fmt_p(p)})"
    return label


def aggregate_table(df: pd.DataFrame, metrics: Sequence[str], group_by: Sequence[str], precision: int = 4,
                    compare_on: str | None = None, level: float = seedstats.LEVEL) -> Table:
    """The leaderboard; with ``compare_on``: its t-interval and the paired test against the best as two more columns."""
    extra = compare_on is not None and "vs_best" in df.columns
    headers = [*group_by, "n", "failed", *(pretty_metric(m) for m in metrics)]
    if extra:
        headers += [f"{pretty_metric(compare_on)} {100 * level:g}% t-interval", f"vs best ({pretty_metric(compare_on)})"]
    rows, bold = [], set()
    for i, r in enumerate(df.itertuples(index=False)):
        d = dict(zip(df.columns, r))
        row = [fmt_value(d[k]) for k in group_by] + [str(d["n"]), str(d["n_failed"])]
        best = set(filter(None, str(d["best_for"]).split(";")))
        for j, m in enumerate(metrics):
            row.append(_cell(d[f"{m}:mean"], d[f"{m}:std"], d[f"{m}:n"], d["n"], precision))
            if m in best:
                bold.add((i, len(group_by) + 2 + j))
        if extra:
            row += [_interval(d[f"{compare_on}:ci_low"], d[f"{compare_on}:ci_high"], precision), _vs_best(d["vs_best"], d["vs_best:p"])]
        rows.append(row)
    return Table(headers, rows, bold=bold)


def aggregate(
    runs: pd.DataFrame,
    out_dir: Path,
    *,
    study_name: str = "",
    console: Any = None,
    metrics: Sequence[str] | None = None,
    group_by: Sequence[str] | None = None,
    ignore: Sequence[str] | None = None,
    seed_key: str = SEED_KEY,
    lower_is_better: Sequence[str] = (),
    precision: int = 4,
    filename: str = "aggregate",
    modes: str | Sequence[str] = ("selected",),
    level: float = seedstats.LEVEL,
    compare_on: str | None = None,
    alpha: float = seedstats.ALPHA,
    min_pairs: int = seedstats.MIN_PAIRS,
    plot: bool = True,
) -> AnalysisResult:
    """Mean ± std over seeds per configuration; writes ``<filename>.csv`` and ``.md``.

    Options: ``metrics`` (default: ``best/test/recall_at_k`` for every logged k,
    ``best/test/map_at_r``, ``best/test/nmi``, ``best/test/f1``), ``group_by`` (default:
    every varying param except ``seed_key`` and ``ignore``), ``ignore`` (params never
    grouped on; default: name, device, data root/workers/cache, checkpoint_every),
    ``lower_is_better`` (metrics whose best group has the lowest mean), ``precision``,
    ``modes`` (``selected``: every metric at the one validation-selected epoch, the default;
    ``as_published``: each test metric at its own best epoch over training, as the tables of
    Roth et al. 2020, optimistic, written to ``<filename>_as_published.csv`` / ``.md``;
    both: ``[selected, as_published]``; see :mod:`sweeper.analysis.history`);
    ``level`` (of the Student-t interval of each mean, 0.95), ``compare_on`` (the metric of the
    paired test against the best configuration and of the seeds plot; default the first
    metric), ``alpha`` (0.05), ``min_pairs`` (3: fewer shared seeds are not tested),
    ``plot`` (``<filename>_seeds.png``, each seed a dot; default on). See :mod:`sweeper.analysis.seeds`.
    """
    if not 0 < level < 1:
        raise ValueError(f"aggregate.level: must be between 0 and 1, got {level!r}")
    if not 0 < alpha < 1:
        raise ValueError(f"aggregate.alpha: must be between 0 and 1, got {alpha!r}")
    modes = [modes] if isinstance(modes, str) else list(modes)
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        raise ValueError(f"aggregate.modes: unknown mode {bad[0] if bad else '(none)'!r} (choose from {', '.join(MODES)})")
    if modes != ["selected"]:
        return _aggregate_modes(runs, out_dir, modes, study_name=study_name, console=console, metrics=metrics,
                                group_by=group_by, ignore=ignore, seed_key=seed_key,
                                lower_is_better=lower_is_better, precision=precision, filename=filename,
                                level=level, compare_on=compare_on, alpha=alpha, min_pairs=min_pairs, plot=plot)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    seed_key = strip_prefix(seed_key)
    ok, failed = split_status(runs)
    names, notes = resolve_metrics(ok, metrics, default_test_metrics(ok))
    if group_by is None:
        keys = study_factors(runs, ignore, seed_key)
    else:
        keys = check_params(runs, group_by, "aggregate.group_by")
    if not names and metrics is None:
        notes.append("no best/test/* metric was logged by any finished run")
    if compare_on is not None:
        compare_on = strip_prefix(str(compare_on))
        if compare_on not in names:
            raise ValueError(f"aggregate.compare_on: {compare_on!r} is not one of the table's metrics{did_you_mean(compare_on, names)} ({', '.join(names) or 'none'})")
    elif names:
        compare_on = names[0]
    df = aggregate_frame(runs, names, keys, seed_key=seed_key, lower_is_better=lower_is_better,
                         level=level, compare_on=compare_on, alpha=alpha, min_pairs=min_pairs)

    table = aggregate_table(df, names, keys, precision, compare_on, level)
    sel = {
        "val": "the validation split",
        "test": "the test set",
        "last": "the last epoch",
    }
    caption = (
        f"Mean ± sample std (ddof=1) over seeds (`{seed_key}`) of {len(ok)} finished runs"
        + (f"; {len(failed)} unfinished/failed runs excluded (column 'failed')" if len(failed) else "")
        + ". Bold: best mean per metric."
    )
    if compare_on is not None:
        caption += (
            f" {100 * level:g}% t-interval: mean ± t·s/√n (Student t, n−1 degrees of freedom)."
            f" vs best: two-sided paired t-test over the seeds shared with the best configuration by"
            f" {pretty_metric(compare_on)}, α = {alpha:g}, no correction for multiple comparisons;"
            f" *indistinguishable*: not rejected; fewer than {max(2, min_pairs)} shared seeds: not tested."
        )
    if "params.eval.select_on" in ok.columns and ok["params.eval.select_on"].notna().any():
        where = sorted({sel.get(str(v), str(v)) for v in ok["params.eval.select_on"].dropna()})
        caption += f" Values at the epoch selected on {' / '.join(where)}."
    table.caption = caption

    blocks = [Heading("Aggregate over seeds"), *(Paragraph(f"Note: {n}.") for n in notes)]
    if not keys:
        blocks.append(Paragraph("No param varies between the finished runs apart from the seed: one group."))
    blocks.append(table)
    files: list[Path] = []
    if plot and compare_on is not None and len(df) and df[f"{compare_on}:n"].sum() > 0:
        labels = [", ".join(f"{k.rsplit('.', 1)[-1] if len(keys) > 2 else k}={fmt_value(v)}" for k, v in zip(keys, r)) or "all runs"
                  for r in df[keys].itertuples(index=False)] if keys else ["all runs"] * len(df)
        png = seedstats.seeds_plot(out_dir / f"{filename}_seeds.png", labels, df.attrs["seed_values"],
                                   list(zip(df[f"{compare_on}:ci_low"], df[f"{compare_on}:ci_high"])),
                                   list(df["vs_best"]), pretty_metric(compare_on),
                                   lower=compare_on in {strip_prefix(m) for m in lower_is_better})
        files.append(png)
        blocks.append(Image(png, f"{pretty_metric(compare_on)} per configuration, each seed a dot"))

    csv = out_dir / f"{filename}.csv"
    df.to_csv(csv, index=False)
    md = write_markdown(out_dir / f"{filename}.md", [Heading(f"{study_name or 'Study'}: aggregate over seeds", 1), *blocks[1:]])
    print_table(console, f"{study_name}: aggregate over seeds".lstrip(": "), Table(table.headers, table.rows, "", table.bold))
    if console is not None:
        for n in notes:
            console.print(f"[yellow]aggregate: {n}[/]")
        console.print(caption)
    return AnalysisResult("aggregate", [csv, md, *files], blocks, df, notes)


# ----------------------------------------------------------------------------- modes
MODES = ("selected", "as_published")
AS_PUBLISHED_NOTE = (
    "**As published (optimistic).** Each test metric at its own best epoch over training, chosen on the "
    "test set, as the tables of Roth et al. 2020 (per-metric nanmax over epochs, R: Result_Evaluations.py:35-67): "
    "Recall@1 and NMI of one run may come from different epochs. Train embedding-space metrics at the epoch of "
    "the best test Recall@1. An upper bound for comparison with the paper's tables, not a result: the honest "
    "numbers are the validation-selected ones."
)


def _aggregate_modes(runs: pd.DataFrame, out_dir: Any, modes: Sequence[str], *, filename: str, console: Any, **kw: Any) -> AnalysisResult:
    """``aggregate`` once per mode; one result whose blocks hold each table under its label."""
    from .history import as_published_frame

    results: dict[str, AnalysisResult] = {}
    skipped: list[str] = []
    for mode in dict.fromkeys(modes):
        if mode == "selected":
            results[mode] = aggregate(runs, out_dir, filename=filename, console=console, **kw)
            continue
        ok, _ = split_status(runs)
        names, _ = resolve_metrics(ok, kw.get("metrics"), default_test_metrics(ok))
        try:
            published = as_published_frame(runs, names, kw.get("lower_is_better") or ())
        except ValueError as err:
            skipped.append(f"as-published table not computed: {err}")
            continue
        published.attrs.update(runs.attrs)
        out_dir = Path(out_dir)
        res = aggregate(published, out_dir, filename=f"{filename}_as_published", console=console, **kw)
        res.blocks[0] = Heading("Aggregate over seeds, as published (optimistic)")
        table = next(b for b in res.blocks if isinstance(b, Table))
        table.caption = (table.caption or "").split(" Values at the epoch selected")[0] + " Values: each test metric at its best epoch (selected on test)."
        res.blocks.insert(1, Paragraph(AS_PUBLISHED_NOTE))
        name = kw.get("study_name") or "Study"
        write_markdown(out_dir / f"{filename}_as_published.md",
                       [Heading(f"{name}: aggregate over seeds, as published (optimistic)", 1), *res.blocks[1:]])
        results[mode] = res
    if "selected" in results and "as_published" in results:
        results["selected"].blocks[0] = Heading("Aggregate over seeds (validation-selected epoch)")
    first = next(iter(results.values()), None)
    blocks = [b for r in results.values() for b in r.blocks] + [Paragraph(f"Note: {n}.") for n in skipped]
    if console is not None:
        for n in skipped:
            console.print(f"[yellow]aggregate: {n}[/]")
    files = [f for r in results.values() for f in r.files]
    notes = [n for r in results.values() for n in r.notes] + skipped
    return AnalysisResult("aggregate", files, blocks, first.table if first else pd.DataFrame(), notes)
