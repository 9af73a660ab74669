"""Shared pieces of the analyses: column names, value canonicalisation, document blocks.

Every analysis is a function ``fn(runs, out_dir, *, study_name="", console=None,
**options) -> AnalysisResult``. ``runs`` is the DataFrame of :func:`sweeper.analysis.runs.load_runs`
(one row per child run; ``params.<dotted key>``, ``metrics.<name>``, ``tags.<name>``,
``status``, ``run_id``). The result carries the files written and a list of document
blocks (headings, paragraphs, tables, images) that ``report`` renders to Markdown and HTML.
"""

from __future__ import annotations

import difflib
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import pandas as pd

PARAM = "params."
METRIC = "metrics."
TAG = "tags."
SEED_KEY = "train.seed"
OK_STATUS = "FINISHED"

# Params that never define a configuration: the trial's name, where it ran, how its data
# was loaded, how often it checkpointed. (``train.seed`` is the replicate index.)
DEFAULT_IGNORE: tuple[str, ...] = (
    "name",
    "train.device",
    "data.root",
    "data.num_workers",
    "data.cache_dir",
    "train.checkpoint_every",
)

# Tags, in order of preference, where the sweeper records a failed trial's error.
ERROR_TAGS: tuple[str, ...] = ("error", "error_message", "exception", "failure", "mlflow.note.content")


# --------------------------------------------------------------------------- results
@dataclass
class Heading:
    text: str
    level: int = 2


@dataclass
class Paragraph:
    text: str


@dataclass
class Bullets:
    items: list[str]


@dataclass
class Table:
    headers: list[str]
    rows: list[list[str]]
    caption: str = ""
    bold: set[tuple[int, int]] = field(default_factory=set)
    """(row, column) cells rendered in bold (the best group of a metric)."""


@dataclass
class Image:
    path: Path
    alt: str = ""


Block = Heading | Paragraph | Bullets | Table | Image


@dataclass
class AnalysisResult:
    name: str
    files: list[Path] = field(default_factory=list)
    blocks: list[Block] = field(default_factory=list)
    table: pd.DataFrame | None = None
    notes: list[str] = field(default_factory=list)


def instance_key(name: str, number: int) -> str:
    """The key of the ``number``-th (1-based) run of analysis ``name`` in one call: ``name``, ``name#2``, ..."""
    return name if number == 1 else f"{name}#{number}"


def instance_name(key: str) -> str:
    """The analysis of an instance key (``correlation#2`` -> ``correlation``)."""
    return key.split("#", 1)[0]


# --------------------------------------------------------------------------- columns
def metric_col(name: str) -> str:
    return name if name.startswith(METRIC) else METRIC + name


def param_col(key: str) -> str:
    return key if key.startswith(PARAM) else PARAM + key


def strip_prefix(col: str) -> str:
    for p in (PARAM, METRIC, TAG):
        if col.startswith(p):
            return col[len(p):]
    return col


def param_keys(runs: pd.DataFrame) -> list[str]:
    return [c[len(PARAM):] for c in runs.columns if c.startswith(PARAM)]


def metric_names(runs: pd.DataFrame) -> list[str]:
    return [c[len(METRIC):] for c in runs.columns if c.startswith(METRIC)]


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def resolve_metrics(runs: pd.DataFrame, wanted: Sequence[str] | None, default: Sequence[str]) -> tuple[list[str], list[str]]:
    """Metric names present in ``runs`` (with at least one value) and notes for the others.

    ``wanted`` None: the ``default`` names that are present, silently. Explicit names that
    are missing give a note each (with a did-you-mean).
    """
    available = [m for m in metric_names(runs) if runs[metric_col(m)].notna().any()]
    if wanted is None:
        return [m for m in default if m in available], []
    names, notes = [], []
    for m in wanted:
        m = strip_prefix(str(m))
        if m in available:
            names.append(m)
        else:
            notes.append(f"metric '{m}' was not logged by any finished run{did_you_mean(m, available)}")
    return names, notes


def default_test_metrics(runs: pd.DataFrame, prefix: str = "best/test/") -> list[str]:
    """``recall_at_k`` for every logged k (ascending), then mAP@R, NMI, F1."""
    names = metric_names(runs)
    recalls = sorted(
        (n for n in names if re.fullmatch(re.escape(prefix) + r"recall_at_\d+", n)),
        key=lambda n: int(n.rsplit("_", 1)[1]),
    )
    return recalls + [prefix + s for s in ("map_at_r", "nmi", "f1")]


def split_status(runs: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(finished runs, every other run). Without a ``status`` column every run counts as finished."""
    if "status" not in runs.columns:
        return runs, runs.iloc[0:0]
    ok = runs["status"].astype(str) == OK_STATUS
    return runs[ok], runs[~ok]


def check_params(runs: pd.DataFrame, keys: Sequence[str], option: str) -> list[str]:
    """Strip ``params.`` prefixes and check the keys exist; one-line ValueError otherwise."""
    known = param_keys(runs)
    out = []
    for k in keys:
        k = strip_prefix(str(k))
        if k not in known:
            raise ValueError(f"{option}: no run has the param '{k}'{did_you_mean(k, known)}")
        out.append(k)
    return out


def varying_params(runs: pd.DataFrame, exclude: Iterable[str] = ()) -> list[str]:
    """Dotted keys whose value differs between the given runs (in column order)."""
    excl = set(exclude)
    out = []
    for k in param_keys(runs):
        if k in excl:
            continue
        if runs[param_col(k)].map(canon).nunique(dropna=False) > 1:
            out.append(k)
    return out


def study_factors(runs: pd.DataFrame, ignore: Sequence[str] | None, seed_key: str) -> list[str]:
    """The varying params of the finished runs, less seed and ignored keys."""
    ok, _ = split_status(runs)
    excl = set(DEFAULT_IGNORE if ignore is None else (strip_prefix(i) for i in ignore)) | {seed_key}
    return varying_params(ok, excl)


# --------------------------------------------------------------------------- values
def is_missing(v: Any) -> bool:
    if v is None or v is pd.NA or v is pd.NaT:
        return True
    return isinstance(v, float) and math.isnan(v)


def canon(v: Any) -> str:
    """A hashable, type-stable key of a param value: 128 and 128.0 match, None and NaN match."""
    if is_missing(v):
        return "None"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, int) or (hasattr(v, "dtype") and getattr(v.dtype, "kind", "") in "iu"):
        return str(int(v))
    if isinstance(v, float) or (hasattr(v, "dtype") and getattr(v.dtype, "kind", "") == "f"):
        f = float(v)
        return str(int(f)) if f.is_integer() and abs(f) < 1e15 else repr(f)
    if hasattr(v, "item") and not isinstance(v, str):  # numpy bool and friends
        return canon(v.item())
    return str(v)


def sort_key(v: Any) -> tuple:
    """Orders mixed values: numbers ascending, then strings, then None."""
    if is_missing(v):
        return (2, 0.0, "")
    if isinstance(v, bool):
        return (1, 0.0, str(v))
    try:
        return (0, float(v), "")
    except (TypeError, ValueError):
        return (1, 0.0, str(v))


def fmt_value(v: Any) -> str:
    if is_missing(v):
        return "—"
    c = canon(v)
    return c


def fmt_num(x: Any, precision: int = 4) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "—"
    return f"{float(x):.{precision}f}"


def fmt_p(p: Any) -> str:
    if p is None or (isinstance(p, float) and not math.isfinite(p)):
        return "—"
    if p == 0:
        return "0"
    return f"{p:.2g}" if p >= 1e-3 else f"{p:.1e}"


_LEAF = {
    "map_at_r": "mAP@R",
    "map_at_1000": "mAP@1000",
    "r_precision": "R-Prec",
    "nmi": "NMI",
    "f1": "F1",
    "pi_intra": "π_intra",
    "pi_inter": "π_inter",
    "pi_ratio": "π_ratio",
    "rho_spectrum": "ρ(Φ)",
    "uniformity": "uniformity",
}


def pretty_metric(name: str) -> str:
    """``best/test/recall_at_1`` -> ``R@1``; ``best/train/rho_spectrum`` -> ``train ρ(Φ)``."""
    n = strip_prefix(name).removeprefix("best/")
    split, _, leaf = n.rpartition("/")
    m = re.fullmatch(r"recall_at_(\d+)", leaf)
    label = f"R@{m.group(1)}" if m else _LEAF.get(leaf, leaf)
    if split in ("", "test"):
        return label
    return f"{split} {label}"


# --------------------------------------------------------------------------- output
def md_escape(s: str) -> str:
    return str(s).replace("|", "\\|").replace("\n", " ")


def table_markdown(t: Table) -> str:
    def cell(i: int, j: int, s: str) -> str:
        s = md_escape(s)
        return f"**{s}**" if (i, j) in t.bold and s else s

    lines = ["| " + " | ".join(md_escape(h) for h in t.headers) + " |", "|" + "---|" * len(t.headers)]
    for i, row in enumerate(t.rows):
        lines.append("| " + " | ".join(cell(i, j, s) for j, s in enumerate(row)) + " |")
    out = "\n".join(lines)
    if t.caption:
        out = f"{out}\n\n{t.caption}"
    return out


def print_table(console: Any, title: str, t: Table) -> None:
    """Print ``t`` as a rich table (best cells bold green) to ``console`` if one is given."""
    if console is None:
        return
    from rich.table import Table as RichTable

    rt = RichTable(title=title, title_justify="left")
    for h in t.headers:
        rt.add_column(h, overflow="fold")
    for i, row in enumerate(t.rows):
        rt.add_row(*(f"[bold green]{s}[/]" if (i, j) in t.bold else s for j, s in enumerate(row)))
    console.print(rt)
    if t.caption:
        console.print(t.caption)


def write_markdown(path: Path, blocks: Sequence[Block]) -> Path:
    """Write blocks as Markdown; images are linked by their path relative to ``path``."""
    path.write_text(blocks_markdown(blocks, path.parent))
    return path


def blocks_markdown(blocks: Sequence[Block], base: Path) -> str:
    parts = []
    for b in blocks:
        if isinstance(b, Heading):
            parts.append("#" * b.level + " " + b.text)
        elif isinstance(b, Paragraph):
            parts.append(b.text)
        elif isinstance(b, Bullets):
            parts.append("\n".join(f"- {md_escape(i)}" for i in b.items) if b.items else "")
        elif isinstance(b, Table):
            parts.append(table_markdown(b))
        elif isinstance(b, Image):
            try:
                rel = Path(b.path).resolve().relative_to(base.resolve())
            except ValueError:
                rel = Path(b.path)
            parts.append(f"![{b.alt}]({rel.as_posix()})")
    return "\n\n".join(p for p in parts if p) + "\n"


def new_figure(width: float, height: float):
    """A matplotlib Figure on the Agg canvas, without touching pyplot's global state."""
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")
