"""Analyses of a study's trials: aggregate over seeds, correlations, factor effects, report.

    from sweeper.analysis import load_runs, run_analyses
    runs = load_runs("sqlite:///mlflow.db", "revisiting_factors")   # or a parent run id
    files = run_analyses("revisiting_factors", None, runs, Path("analysis"))

``analyses`` is a list whose items are a name (``"aggregate"``) or a one-key mapping
``{name: {option: value}}`` (``{"name": ..., **options}`` and ``(name, options)`` work
too); None means every analysis with its default options, ``[]`` none. See docs/analysis.md for the options.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import pandas as pd

# The functions are imported under other names so that ``sweeper.analysis.aggregate`` etc.
# stay the submodules.
from .aggregate import aggregate as _aggregate
from .base import AnalysisResult, did_you_mean, instance_key
from .correlation import correlation as _correlation
from .factors import factors as _factors
from .report import report as _report
from .runs import find_parent_run, load_runs
from .cache import load_runs_cached

Analysis = Callable[..., AnalysisResult]

REGISTRY: dict[str, Analysis] = {
    "aggregate": _aggregate,
    "correlation": _correlation,
    "factors": _factors,
    "report": _report,
}
DEFAULT_ANALYSES = ("aggregate", "correlation", "factors", "report")

# Arguments every analysis gets from the platform, never from the study's options.
_CONTEXT = {"runs", "out_dir", "study_name", "console", "results", "errors"}


def register(name: str) -> Callable[[Analysis], Analysis]:
    """Add an analysis: ``fn(runs, out_dir, *, study_name, console, **options) -> AnalysisResult``."""

    def deco(fn: Analysis) -> Analysis:
        REGISTRY[name] = fn
        return fn

    return deco


def options_of(name: str) -> dict[str, Any]:
    """The user-settable options of an analysis and their defaults."""
    sig = inspect.signature(REGISTRY[name])
    return {p.name: p.default for p in sig.parameters.values() if p.name not in _CONTEXT and p.kind is p.KEYWORD_ONLY}


def validate_analyses(analyses: Sequence[str | Mapping[str, Any]] | None) -> list[tuple[str, dict[str, Any]]]:
    """``[(name, options), ...]``, checked; one-line ValueError (with did-you-mean) otherwise.

    The study loader can call this at load time so that a typo fails before training.
    """
    if analyses is None:
        return [(n, {}) for n in DEFAULT_ANALYSES]
    if isinstance(analyses, (str, Mapping)):
        analyses = [analyses]
    out = []
    for item in analyses:
        if isinstance(item, str):
            name, opts = item, {}
        elif isinstance(item, Mapping) and "name" in item:
            name, opts = item["name"], {k: v for k, v in item.items() if k != "name"}
        elif isinstance(item, Mapping) and len(item) == 1:
            ((name, opts),) = item.items()
            opts = {} if opts is None else opts
        elif isinstance(item, tuple) and len(item) == 2:  # already normalised: (name, options)
            name, opts = item
            opts = {} if opts is None else opts
        else:
            raise ValueError(f"analyses: expected a name or a one-key mapping {{name: options}}, got {item!r}")
        if not isinstance(name, str) or name not in REGISTRY:
            raise ValueError(f"analyses: unknown analysis {name!r}{did_you_mean(str(name), REGISTRY)} (choose from {', '.join(REGISTRY)})")
        if not isinstance(opts, Mapping):
            raise ValueError(f"analyses: options of '{name}' must be a mapping, got {opts!r}")
        known = options_of(name)
        for k in opts:
            if k not in known:
                raise ValueError(f"analyses: '{name}' has no option {k!r}{did_you_mean(str(k), known)} (options: {', '.join(known)})")
        out.append((name, dict(opts)))
    return out


def run_analyses(
    study_name: str,
    analyses: Sequence[str | Mapping[str, Any]] | None,
    runs: pd.DataFrame,
    out_dir: Path,
    console: Any = None,
    *,
    strict: bool = False,
) -> list[Path]:
    """Run the analyses on ``runs`` and write their files under ``out_dir``; return the files.

    ``report`` always runs last and includes the results of the others. An analysis that
    raises is reported on ``console`` (and in the report) and the others still run;
    ``strict=True`` re-raises instead. Unknown names/options raise ValueError before
    anything runs.
    """
    specs = validate_analyses(analyses)
    if "search" in REGISTRY and not any(n == "search" for n, _ in specs) and specs:
        from .search import is_search

        if is_search(runs):  # a search's history and importances, whichever analyses the study lists
            specs.append(("search", {}))
    specs = [s for s in specs if s[0] != "report"] + [s for s in specs if s[0] == "report"]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    runs = runs.reset_index(drop=True)
    results: dict[str, AnalysisResult] = {}
    errors: dict[str, str] = {}
    files: list[Path] = []
    seen: dict[str, int] = {}
    for name, opts in specs:
        fn = REGISTRY[name]
        # every instance of an analysis the study runs twice is kept (and reported): name, name#2, ...
        seen[name] = seen.get(name, 0) + 1
        key = instance_key(name, seen[name])
        kwargs: dict[str, Any] = dict(study_name=study_name, console=console, **opts)
        if name == "report":
            kwargs.update(results=results, errors=errors)
        try:
            res = fn(runs, out_dir, **kwargs)
        except Exception as err:
            if strict:
                raise
            errors[key] = f"{type(err).__name__}: {err}"
            if console is not None:
                console.print(f"[red]analysis '{key}' failed: {errors[key]}[/]")
            continue
        results[key] = res
        files += [f for f in res.files if f not in files]
    return files


# Analyses in their own modules register themselves with ``@register`` when imported.
from . import vs_fid  # noqa: E402,F401  (performance vs the ooDML split's FID)
from . import search as _search_module  # noqa: E402,F401  (a search's history and importances)

__all__ = [
    "REGISTRY",
    "DEFAULT_ANALYSES",
    "AnalysisResult",
    "find_parent_run",
    "load_runs",
    "load_runs_cached",
    "register",
    "options_of",
    "validate_analyses",
    "run_analyses",
]
