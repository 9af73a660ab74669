"""One report per study execution: ``report.md`` and a self-contained ``report.html``.

Sections: the study and its runs, the evaluation protocol (which split selected the
best epoch, the clustering k), then the aggregate table, the correlation table and
plots and the factor plot (from the results of the other analyses of the same
``run_analyses`` call, or computed here with default options), and the failed trials
with their error. The HTML embeds every PNG as base64 and needs nothing else.
"""

from __future__ import annotations

import base64
import html
import re
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping, Sequence

import pandas as pd

from .base import (
    ERROR_TAGS,
    SEED_KEY,
    AnalysisResult,
    Block,
    Bullets,
    Heading,
    Image,
    Paragraph,
    Table,
    blocks_markdown,
    fmt_value,
    instance_name,
    is_missing,
    param_col,
    sort_key,
    split_status,
    study_factors,
)

SECTIONS = ("aggregate", "correlation", "factors")
_SELECT = {
    "val": "on the validation split (classes held out from the train classes, disjoint from the test classes); "
    "the test metrics are those of that epoch, so no test information leaks into the selection",
    "test": "on the **test set**, as the reference code of Roth et al. did: the reported test numbers are "
    "optimistically biased (selection on the data they are measured on)",
    "last": "not selected: the last epoch's evaluation is reported",
}


def _values(runs: pd.DataFrame, key: str) -> list[Any]:
    col = param_col(key)
    if col not in runs.columns:
        return []
    seen: dict[str, Any] = {}
    for v in runs[col]:
        if not is_missing(v):
            seen.setdefault(fmt_value(v), v)
    return list(seen.values())


def _join(vals: Sequence[Any]) -> str:
    return ", ".join(f"`{fmt_value(v)}`" for v in vals)


def protocol_blocks(runs: pd.DataFrame, note: str | None = None) -> list[Block]:
    """What selected the best epoch and how the clustering metrics were computed."""
    items = []
    sel = _values(runs, "eval.select_on")
    metric = _values(runs, "eval.select_metric")
    if not sel:
        items.append("Best-epoch selection: unknown (param `eval.select_on` not logged).")
    for v in sel:
        what = f" by `{'`/`'.join(map(str, metric))}`" if metric and v != "last" else ""
        items.append(f"`eval.select_on={v}`: best epoch selected{what} {_SELECT.get(str(v), '(unknown protocol)')}.")
    if "val" in map(str, sel):
        vc = _values(runs, "data.val_classes")
        if vc:
            items.append(f"Validation split: fraction {_join(vc)} of the train classes (`data.val_classes`).")
    clustering = _values(runs, "eval.clustering")
    if clustering and not any(bool(v) for v in clustering):
        items.append("Clustering metrics (NMI, F1) were switched off (`eval.clustering=false`).")
    else:
        items.append(
            "NMI and F1: one seeded k-means on the test embeddings with k = number of *test* classes "
            "(the reference code clustered with k = number of train classes; its NMI/F1 are not directly comparable)."
        )
    rk, dist = _values(runs, "eval.recall_k"), _values(runs, "eval.distance")
    if rk or dist:
        items.append(
            "Retrieval: query left out of its own gallery"
            + (f"; Recall@k for k in {_join(rk)}" if rk else "")
            + (f"; {_join(dist)} distance" if dist else "")
            + "."
        )
    rho = _values(runs, "eval.rho_m")
    items.append(
        "Embedding-space metrics (π_intra, π_inter, π_ratio, ρ(Φ), uniformity) on the *train* embeddings at the selected epoch"
        + (f"; spectral decay with m = {_join(rho)}" if rho else "")
        + "."
    )
    blocks: list[Block] = [Heading("Protocol"), Bullets(items)]
    if note:
        blocks.append(Paragraph(note))
    return blocks


def _error(row: Mapping[str, Any]) -> str:
    for t in ERROR_TAGS:
        v = row.get(f"tags.{t}")
        if isinstance(v, str) and v.strip():
            first = v.strip().splitlines()
            # a traceback's last line names the exception; a one-line message is itself
            msg = first[-1] if first[0].startswith("Traceback") else first[0]
            return msg if len(msg) <= 300 else msg[:297] + "..."
    return "(no error recorded)"


def failed_blocks(runs: pd.DataFrame, factors: Sequence[str]) -> list[Block]:
    _, failed = split_status(runs)
    blocks: list[Block] = [Heading("Failed trials")]
    if not len(failed):
        blocks.append(Paragraph("None: every trial finished."))
        return blocks
    headers = ["trial", "run", "status", *factors, "seed", "error"]
    rows = []
    for _, r in failed.iterrows():
        d = r.to_dict()
        trial = d.get("tags.trial_id") or d.get("run_name") or ""
        rows.append(
            [
                fmt_value(trial),
                str(d.get("run_id", ""))[:8],
                str(d.get("status", "")),
                *(fmt_value(d.get(param_col(k))) for k in factors),
                fmt_value(d.get(param_col(SEED_KEY))),
                _error(d),
            ]
        )
    blocks.append(Paragraph(f"{len(failed)} trial(s) did not finish; they are excluded from every table above."))
    blocks.append(Table(headers, rows))
    return blocks


# --------------------------------------------------------------------------- HTML
_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}
h1{border-bottom:2px solid #ddd;padding-bottom:.3em}h2{border-bottom:1px solid #eee;padding-bottom:.2em;margin-top:1.8em}
table{border-collapse:collapse;margin:1em 0;font-size:.9em}th,td{border:1px solid #ccc;padding:.3em .6em;text-align:left}
th{background:#f4f4f4}tr:nth-child(even) td{background:#fafafa}td strong{color:#0a6b20}
code{background:#f2f2f2;padding:0 .2em;border-radius:3px}img{max-width:100%;margin:.5em 0}.caption{color:#555;font-size:.9em}
"""


def _inline(text: str) -> str:
    """Escape, then the two bits of Markdown our texts use: `code` and **bold**, *em*."""
    s = html.escape(str(text))
    s = re.sub(r"`([^`]+)`", r"<code>\1</code>", s)
    s = re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", s)
    return re.sub(r"(?<![\w*])\*([^*]+)\*(?![\w*])", r"<em>\1</em>", s)


def blocks_html(blocks: Sequence[Block], title: str) -> str:
    parts = [f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
             f"<style>{_CSS}</style></head><body>"]
    for b in blocks:
        if isinstance(b, Heading):
            parts.append(f"<h{b.level}>{_inline(b.text)}</h{b.level}>")
        elif isinstance(b, Paragraph):
            parts.append(f"<p>{_inline(b.text)}</p>")
        elif isinstance(b, Bullets):
            parts.append("<ul>" + "".join(f"<li>{_inline(i)}</li>" for i in b.items) + "</ul>")
        elif isinstance(b, Table):
            head = "".join(f"<th>{html.escape(h)}</th>" for h in b.headers)
            body = []
            for i, row in enumerate(b.rows):
                cells = []
                for j, c in enumerate(row):
                    c = html.escape(str(c))
                    cells.append(f"<td><strong>{c}</strong></td>" if (i, j) in b.bold else f"<td>{c}</td>")
                body.append("<tr>" + "".join(cells) + "</tr>")
            parts.append(f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>")
            if b.caption:
                parts.append(f"<p class=\"caption\">{_inline(b.caption)}</p>")
        elif isinstance(b, Image):
            data = base64.b64encode(Path(b.path).read_bytes()).decode("ascii")
            parts.append(f"<figure><img alt=\"{html.escape(b.alt)}\" src=\"data:image/png;base64,{data}\"></figure>")
    parts.append("</body></html>\n")
    return "\n".join(parts)


def _labelled(res: AnalysisResult, key: str) -> list[Block]:
    """The blocks of one instance of an analysis run more than once, its first heading naming the
    instance by the stem of its first file (``correlation_runs``), else by its key."""
    blocks = list(res.blocks)
    label = Path(res.files[0]).stem if res.files else key
    for i, b in enumerate(blocks):
        if isinstance(b, Heading):
            blocks[i] = Heading(f"{b.text} (`{label}`)", b.level)
            break
    return blocks


# --------------------------------------------------------------------------- report
def report(
    runs: pd.DataFrame,
    out_dir: Path,
    *,
    study_name: str = "",
    console: Any = None,
    sections: Sequence[str] | None = None,
    title: str | None = None,
    protocol_note: str | None = None,
    ignore: Sequence[str] | None = None,
    filename: str = "report",
    results: Mapping[str, AnalysisResult] | None = None,
    errors: Mapping[str, str] | None = None,
) -> AnalysisResult:
    """Write ``<filename>.md`` and ``<filename>.html``.

    Options: ``sections`` (which analyses to include, in order; default: those run in the
    same ``run_analyses`` call, or all of aggregate, correlation, factors), ``title``, ``protocol_note`` (a paragraph added to the
    protocol section), ``ignore`` (params not listed as factors). ``results`` and
    ``errors`` are filled in by ``run_analyses`` (the other analyses' results; the
    analyses that failed); a section without a result is computed with default options.
    """
    from . import REGISTRY  # the registry lives in the package __init__

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    runs = runs.reset_index(drop=True)
    # ``results``/``errors`` are keyed by instance (``correlation``, ``correlation#2``, ...): every
    # instance of an analysis that ran more than once in the call is a section of its own.
    ran = list(dict.fromkeys([*(results or {}), *(errors or {})]))
    if sections is None:
        names = list(SECTIONS) if results is None else [s for s in SECTIONS if any(instance_name(k) == s for k in ran)]
        # analyses added with ``register`` (e.g. vs_fid) that ran in the same call, after the standard ones
        names += [s for s in dict.fromkeys(map(instance_name, ran)) if s not in SECTIONS and s != "report"]
    else:
        names = list(sections)
    results = dict(results or {})
    errors = dict(errors or {})
    for s in names:
        if s not in REGISTRY or s == "report":
            raise ValueError(f"report.sections: unknown section {s!r} (choose from {', '.join(SECTIONS)})")
    sections = [k for s in dict.fromkeys(names) for k in ([k for k in ran if instance_name(k) == s] or [s])]
    files: list[Path] = []
    for s in sections:
        if s not in results and s not in errors:
            try:
                results[s] = REGISTRY[s](runs, out_dir, study_name=study_name)
                files += results[s].files
            except Exception as err:  # noqa: BLE001 - the report says what failed
                errors[s] = f"{type(err).__name__}: {err}"

    ok, failed = split_status(runs)
    factors = study_factors(runs, ignore, SEED_KEY)
    title = title or f"Study report: {study_name or runs.attrs.get('study') or 'unnamed study'}"
    parent = runs.attrs.get("parent_run_id")
    if not parent and "tags.mlflow.parentRunId" in runs.columns and runs["tags.mlflow.parentRunId"].nunique() == 1:
        parent = runs["tags.mlflow.parentRunId"].iloc[0]
    status = runs["status"].value_counts().to_dict() if "status" in runs.columns else {}
    seeds = _values(ok, SEED_KEY)
    meta = [
        f"Study: `{study_name or runs.attrs.get('study') or '?'}`",
        *( [f"Parent run (study execution): `{parent}`"] if parent else []),
        f"Trials: {len(runs)} ({len(ok)} finished"
        + (", " + ", ".join(f"{n} {s.lower()}" for s, n in status.items() if s != "FINISHED") if len(failed) else "")
        + ")",
        "Factors (params that vary, seed excluded): " + (", ".join(f"`{f}`" for f in factors) if factors else "none"),
        f"Seeds (`{SEED_KEY}`) of the finished runs: "
        + (f"{_join(sorted(seeds, key=sort_key))} ({len(seeds)} distinct)" if seeds else "not logged"),
        f"Generated: {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
    ]
    blocks: list[Block] = [Heading(title, 1), Bullets(meta), *protocol_blocks(ok if len(ok) else runs, protocol_note)]
    if any(isinstance(b, Heading) and "as published (optimistic)" in b.text for r in results.values() for b in r.blocks):
        blocks.append(Paragraph(
            "Tables marked *as published (optimistic)* take each test metric at its own best epoch, chosen on the "
            "test set, as the tables of Roth et al. 2020 (R: Result_Evaluations.py:35-67); the other tables use the "
            "selected epoch above. Compare the paper's numbers with the former, judge methods by the latter."
        ))
    repeated = {n for n in map(instance_name, sections) if sum(instance_name(k) == n for k in sections) > 1}
    for s in sections:
        if s in results:
            blocks += _labelled(results[s], s) if instance_name(s) in repeated else results[s].blocks
        else:
            blocks += [Heading(s.replace("#", " #").capitalize()), Paragraph(f"This analysis failed: {errors.get(s, 'not run')}")]
    other = {k: v for k, v in errors.items() if k not in sections}
    if other:
        blocks += [Heading("Analyses that failed"), Bullets([f"{k}: {v}" for k, v in other.items()])]
    blocks += failed_blocks(runs, factors)

    md = out_dir / f"{filename}.md"
    md.write_text(blocks_markdown(blocks, out_dir))
    page = out_dir / f"{filename}.html"
    page.write_text(blocks_html(blocks, title))
    if console is not None:
        console.print(f"report: {md}  {page}")
    return AnalysisResult("report", [*files, md, page], blocks, None, [])
