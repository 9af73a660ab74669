"""Factor effects ("how one can cheat", Roth et al. 2020, Fig. 2).

For each factor (a param that varies between the finished runs, seed and ignored keys
excepted) and each of its values other than the reference value: the relative change
(%) of a test metric against the reference value *with every other factor fixed*.

1. Runs are matched on the other factors (a *context*); params set together with the
   factor (a function of it, e.g. a loss-specific parameter that only exists for one
   loss) are left out of the context and named in the ``note``.
2. In each context the metric is averaged over seeds, for the reference value and for
   the alternative value.
3. ``100 * (alt - ref) / |ref|`` per context, then the mean (and std, ddof=1) across
   the contexts where both values were run.

The reference value of a factor is, in order: the ``reference`` option (which may be the
study's whole base config as dotted keys: keys that are not factors are ignored); the
value of the most runs; among values tied for most runs, the platform default
(``RunConfig()``), else the one run first.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from .base import (
    SEED_KEY,
    AnalysisResult,
    Heading,
    Image,
    Paragraph,
    Table,
    canon,
    check_params,
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
    study_factors,
    write_markdown,
)

DEFAULT_METRICS = ("best/test/recall_at_1",)


def _platform_defaults() -> dict[str, Any]:
    try:
        from dmlcore.config import RunConfig

        return RunConfig().to_flat()
    except Exception:  # analysis must work without a loadable dmlcore
        return {}


def resolve_reference(ok: pd.DataFrame, factor: str, explicit: Mapping[str, Any] | None) -> tuple[str, Any, str]:
    """(canonical value, original value, why) of the reference value of ``factor``."""
    col = ok[param_col(factor)]
    keys = col.map(canon)
    first: dict[str, Any] = {}
    for k, v in zip(keys, col):
        first.setdefault(k, v)
    note = ""
    if explicit is not None and factor in explicit:
        want = canon(explicit[factor])
        if want in first:
            return want, first[want], "given"
        note = f"given reference {fmt_value(explicit[factor])} was not run; "
    counts = keys.value_counts(sort=False)
    top = [k for k in first if counts[k] == counts.max()]
    if len(top) == 1:
        return top[0], first[top[0]], note + "most runs"
    default = _platform_defaults().get(factor, object())
    if canon(default) in top:
        return canon(default), first[canon(default)], note + "platform default"
    return top[0], first[top[0]], note + "first run"


def _is_function_of(ok: pd.DataFrame, p: str, f: str) -> bool:
    """Whether varying param ``p`` takes one value for each value of ``f``."""
    g = pd.DataFrame({"f": ok[param_col(f)].map(canon), "p": ok[param_col(p)].map(canon)})
    return bool(g["p"].nunique() > 1 and g.groupby("f")["p"].nunique().max() == 1)


def _determined_by(ok: pd.DataFrame, factor: str, others: Sequence[str]) -> list[str]:
    """The other factors whose value is a function of ``factor`` (set together with it)."""
    return [p for p in others if _is_function_of(ok, p, factor)]


def dependent_factors(ok: pd.DataFrame, factors: Sequence[str]) -> dict[str, str]:
    """Factors that are not factors of their own: ``{dependent: the factor it follows}``.

    A factor ``p`` follows an earlier-listed factor ``f`` when each is a function of the other
    (an alias: two keys always set together), and follows any factor ``f`` when it is a
    function of ``f`` and is sometimes unset (None): a conditional parameter such as
    ``loss.params.margin``, which exists for one loss only.
    """
    out: dict[str, str] = {}
    for i, p in enumerate(factors):
        has_none = (ok[param_col(p)].map(canon) == "None").any()
        for j, f in enumerate(factors):
            if f == p or f in out or not _is_function_of(ok, p, f):
                continue
            if has_none or (j < i and _is_function_of(ok, f, p)):
                out[p] = f
                break
    return out


def factor_effects(
    runs: pd.DataFrame,
    metrics: Sequence[str],
    factors: Sequence[str],
    reference: Mapping[str, Any] | None = None,
) -> pd.DataFrame:
    """The factor-effect table as data: one row per (factor, alternative value, metric).

    Columns: ``factor``, ``reference``, ``value``, ``metric``, ``n_contexts``,
    ``ref_mean`` and ``value_mean`` (over matched contexts), ``rel_change_pct`` (mean
    over contexts), ``rel_change_std``, ``abs_change``, ``reference_from``, ``note``.
    """
    ok, _ = split_status(runs.reset_index(drop=True))
    ref_opt = {strip_prefix(k): v for k, v in (reference or {}).items()}
    rows = []
    for f in factors:
        others = [p for p in factors if p != f]
        tied = _determined_by(ok, f, others)
        context = [p for p in others if p not in tied]
        ref_key, ref_val, why = resolve_reference(ok, f, ref_opt)
        fkeys = ok[param_col(f)].map(canon)
        originals: dict[str, Any] = {}
        for k, v in zip(fkeys, ok[param_col(f)]):
            originals.setdefault(k, v)
        alts = sorted((k for k in originals if k != ref_key), key=lambda k: sort_key(originals[k]))
        ctx = (
            pd.Series(list(zip(*(ok[param_col(p)].map(canon) for p in context))), index=ok.index).map("\x1f".join)
            if context
            else pd.Series("", index=ok.index)
        )
        note_base = f"set together with {', '.join(tied)}" if tied else ""
        for m in metrics:
            vals = pd.to_numeric(ok[metric_col(m)], errors="coerce") if metric_col(m) in ok.columns else pd.Series(np.nan, index=ok.index)
            cells = pd.DataFrame({"ctx": ctx, "f": fkeys, "v": vals}).dropna(subset=["v"])
            means = cells.groupby(["ctx", "f"])["v"].mean().unstack("f") if len(cells) else pd.DataFrame()
            for a in alts:
                row = {
                    "factor": f,
                    "reference": ref_val,
                    "value": originals[a],
                    "metric": m,
                    "n_contexts": 0,
                    "ref_mean": math.nan,
                    "value_mean": math.nan,
                    "rel_change_pct": math.nan,
                    "rel_change_std": math.nan,
                    "abs_change": math.nan,
                    "reference_from": why,
                    "note": note_base,
                }
                if ref_key in means.columns and a in means.columns:
                    both = means[[ref_key, a]].dropna()
                    both = both[both[ref_key] != 0]
                    if len(both):
                        rel = (both[a] - both[ref_key]) / both[ref_key].abs() * 100.0
                        row.update(
                            n_contexts=len(both),
                            ref_mean=float(both[ref_key].mean()),
                            value_mean=float(both[a].mean()),
                            rel_change_pct=float(rel.mean()),
                            rel_change_std=float(rel.std(ddof=1)) if len(rel) > 1 else math.nan,
                            abs_change=float((both[a] - both[ref_key]).mean()),
                        )
                if row["n_contexts"] == 0:
                    row["note"] = "; ".join(filter(None, [note_base, "no context where both values were run"]))
                rows.append(row)
    cols = ["factor", "reference", "value", "metric", "n_contexts", "ref_mean", "value_mean",
            "rel_change_pct", "rel_change_std", "abs_change", "reference_from", "note"]
    return pd.DataFrame(rows, columns=cols)


def factors_table(df: pd.DataFrame, precision: int = 4) -> Table:
    headers = ["factor", "reference", "value", "metric", "contexts", "Δ rel. (%)", "Δ abs.", "note"]
    rows = []
    for r in df.itertuples(index=False):
        rel = "—"
        if math.isfinite(r.rel_change_pct):
            rel = f"{r.rel_change_pct:+.2f}" + (f" ± {r.rel_change_std:.2f}" if math.isfinite(r.rel_change_std) else "")
        absc = f"{r.abs_change:+.{precision}f}" if math.isfinite(r.abs_change) else "—"
        ref = f"{fmt_value(r.reference)} ({r.reference_from})"
        rows.append([r.factor, ref, fmt_value(r.value), pretty_metric(r.metric), str(r.n_contexts), rel, absc, r.note])
    return Table(headers, rows)


def bar_chart(df: pd.DataFrame, metrics: Sequence[str], path: Path) -> Path:
    """Horizontal bars of the relative change, one panel per metric."""
    n_bars = max(1, max((int((df["metric"] == m).sum()) for m in metrics), default=1))
    fig = new_figure(4.2 * len(metrics) + 2.2, 0.38 * n_bars + 1.3)
    axes = fig.subplots(1, len(metrics), squeeze=False)[0]
    for ax, m in zip(axes, metrics):
        sub = df[df["metric"] == m]
        labels = [f"{r.factor}: {fmt_value(r.reference)} → {fmt_value(r.value)}" for r in sub.itertuples(index=False)]
        vals = sub["rel_change_pct"].to_numpy(float)
        err = np.nan_to_num(sub["rel_change_std"].to_numpy(float))
        pos = np.arange(len(sub))[::-1]
        colors = ["C2" if v >= 0 else "C3" for v in np.nan_to_num(vals)]
        ax.barh(pos, np.nan_to_num(vals), xerr=err, color=colors, ecolor="0.3", capsize=2)
        for p, v, e in zip(pos, vals, err):
            ax.text(np.nan_to_num(v) + (e if not math.isfinite(v) or v >= 0 else -e), p, f" {v:+.1f}% " if math.isfinite(v) else " n/a ",
                    va="center", ha="left" if not math.isfinite(v) or v >= 0 else "right", fontsize=7)
        ax.axvline(0, color="black", lw=0.8)
        ax.set_yticks(pos, labels, fontsize=8)
        ax.set_xlabel(f"relative change of {pretty_metric(m)} (%)", fontsize=9)
        ax.grid(axis="x", alpha=0.3)
        lim = np.nanmax(np.abs(vals) + err) if len(vals) and np.isfinite(vals).any() else 1.0
        ax.set_xlim(-1.3 * lim - 0.5, 1.3 * lim + 0.5)
    fig.savefig(path, dpi=90)
    return path


def factors(
    runs: pd.DataFrame,
    out_dir: Path,
    *,
    study_name: str = "",
    console: Any = None,
    metrics: Sequence[str] | None = None,
    factors: Sequence[str] | None = None,
    reference: Mapping[str, Any] | None = None,
    ignore: Sequence[str] | None = None,
    seed_key: str = SEED_KEY,
    precision: int = 4,
    filename: str = "factors",
) -> AnalysisResult:
    """Relative change of test metrics per factor value; writes ``<filename>.csv``, ``.md``, ``.png``.

    Options: ``metrics`` (default ``best/test/recall_at_1``), ``factors`` (default: every
    varying param except ``seed_key`` and ``ignore``), ``reference`` (dotted key -> value;
    the study's base config works), ``ignore``, ``precision``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    seed_key = strip_prefix(seed_key)
    ok, _ = split_status(runs.reset_index(drop=True))
    names, notes = resolve_metrics(ok, metrics, DEFAULT_METRICS)
    if metrics is None and not names:
        notes.append("best/test/recall_at_1 was not logged by any finished run")
    if factors is None:
        keys = study_factors(runs, ignore, seed_key)
        follows = dependent_factors(ok, keys)
        keys = [k for k in keys if k not in follows]
        notes += [f"'{p}' is set together with '{f}' (a function of it): its effect is listed under '{f}'" for p, f in follows.items()]
    else:
        keys = check_params(runs, factors, "factors.factors")
    df = factor_effects(runs, names, keys, reference)
    table = factors_table(df, precision)
    table.caption = (
        "Relative change vs the factor's reference value with all other factors fixed: seeds averaged per "
        "context, then 100·(value − reference)/|reference| averaged over the matched contexts (± std across contexts)."
    )
    blocks = [Heading("Factor effects"), *(Paragraph(f"Note: {n}.") for n in notes)]
    files: list[Path] = []
    if not keys:
        blocks.append(Paragraph("No factor varies between the finished runs (apart from the seed)."))
    else:
        blocks.append(table)
    csv = out_dir / f"{filename}.csv"
    df.to_csv(csv, index=False)
    files.append(csv)
    if len(df) and df["rel_change_pct"].notna().any():
        png = bar_chart(df, names, out_dir / f"{filename}.png")
        files.append(png)
        blocks.append(Image(png, "relative change per factor value"))
    md = write_markdown(out_dir / f"{filename}.md", [Heading(f"{study_name or 'Study'}: factor effects", 1), *blocks[1:]])
    files.insert(1, md)
    if keys:
        print_table(console, f"{study_name}: factor effects".lstrip(": "), table)
    if console is not None:
        for n in notes:
            console.print(f"[yellow]factors: {n}[/]")
    return AnalysisResult("factors", files, blocks, df, notes)
