"""A search study's optimisation history and parameter importances, from the runs frame.

* History: the finished trials in start order, the objective of each and the best so far
  (``search_history.png``, ``search.csv``).
* Importances: PED-ANOVA (``optuna.importance.PedAnovaImportanceEvaluator``, Optuna's default;
  no scikit-learn, no fANOVA forest) on an **in-memory** Optuna study rebuilt from the runs:
  one ``create_trial`` per finished run with its params and objective, the distributions from
  the search space the sweeper logged on the parent run (``search.<key>`` params), widened to
  the values seen; a param without a logged space is a categorical of its seen values
  (``search_importance.png``, ``search_importance.csv``). This does not read the persisted
  Optuna storage, so it works on any execution, also one run before storage existed.

The objective is ``best/<study.metric>`` (the selected-epoch value the trial logged) when that
column exists, else ``<study.metric>`` (its last value); ``study.metric`` / ``study.mode`` come
from the parent run's params (``runs.attrs["parent_params"]``) unless given as options.
``run_analyses`` adds this analysis by itself when the runs are a search's (:func:`is_search`).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from . import register
from .base import (
    AnalysisResult,
    Heading,
    Image,
    Paragraph,
    Table,
    canon,
    check_params,
    fmt_num,
    metric_col,
    new_figure,
    param_col,
    pretty_metric,
    print_table,
    split_status,
    strip_prefix,
    write_markdown,
)

_NOT_SPACE = {"search.samples", "search.sampler"}
MIN_TRIALS = 4  # fewer finished trials: no importances


def _parent_params(runs: pd.DataFrame) -> Mapping[str, Any]:
    return runs.attrs.get("parent_params") or {}


def is_search(runs: pd.DataFrame) -> bool:
    """The runs are a search execution's: its parent run logged ``search.samples``."""
    return "search.samples" in _parent_params(runs)


def search_space(runs: pd.DataFrame) -> dict[str, dict[str, Any]]:
    """key -> the logged space of that key (``{"type": "float", "low": ..., ...}``)."""
    out = {}
    for k, v in _parent_params(runs).items():
        if k.startswith("search.") and k not in _NOT_SPACE:
            try:
                spec = json.loads(v) if isinstance(v, str) else v
            except ValueError:
                continue
            if isinstance(spec, dict) and "type" in spec:
                out[k[len("search."):]] = spec
    return out


def objective_column(runs: pd.DataFrame, metric: str | None) -> str:
    m = strip_prefix(metric or str(_parent_params(runs).get("study.metric") or ""))
    if not m:
        for cand in ("best/val/recall_at_1", "best/test/recall_at_1"):
            if metric_col(cand) in runs.columns:
                return metric_col(cand)
        raise ValueError("search.metric: no study.metric was logged on the parent run; give the option")
    for cand in (m if m.startswith("best/") else f"best/{m}", m):
        if metric_col(cand) in runs.columns:
            return metric_col(cand)
    raise ValueError(f"search.metric: no run logged {m!r}")


def _distribution(spec: Mapping[str, Any] | None, values: Sequence[Any]):
    import optuna.distributions as od

    nums = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
    if spec is not None and spec.get("type") in ("float", "int") and len(nums) == len(values):
        lo, hi = min([spec["low"], *nums]), max([spec["high"], *nums])
        if spec["type"] == "int" and all(float(v).is_integer() for v in nums):
            return od.IntDistribution(int(lo), int(hi), log=bool(spec.get("log"))), [int(v) for v in values]
        return od.FloatDistribution(float(lo), float(hi), log=bool(spec.get("log"))), [float(v) for v in values]
    if spec is None and len(nums) == len(values) and min(nums) < max(nums):
        return od.FloatDistribution(float(min(nums)), float(max(nums))), [float(v) for v in values]
    keys = [canon(v) for v in values]
    return od.CategoricalDistribution(sorted(set(keys))), keys


def importances(ok: pd.DataFrame, objective: str, params: Sequence[str], space: Mapping[str, Mapping[str, Any]],
                maximize: bool) -> dict[str, float]:
    """PED-ANOVA importances of ``params`` for ``objective`` over the runs ``ok`` (normalised to sum 1)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    vals = pd.to_numeric(ok[objective], errors="coerce")
    ok = ok[np.isfinite(vals.to_numpy(float))]
    keep = [p for p in params if param_col(p) in ok.columns and ok[param_col(p)].map(canon).nunique() > 1]
    if len(ok) < MIN_TRIALS or not keep:
        raise ValueError(f"too few finished trials ({len(ok)} < {MIN_TRIALS})" if len(ok) < MIN_TRIALS
                         else "no searched param varies")
    dists, columns = {}, {}
    for p in keep:
        dists[p], columns[p] = _distribution(space.get(p), list(ok[param_col(p)]))
    study = optuna.create_study(direction="maximize" if maximize else "minimize")
    for i, v in enumerate(pd.to_numeric(ok[objective]).to_numpy(float)):
        study.add_trial(optuna.trial.create_trial(params={p: columns[p][i] for p in keep}, distributions=dists, value=float(v)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ExperimentalWarning and friends
        evaluator = optuna.importance.PedAnovaImportanceEvaluator()  # explicit: older Optuna defaulted to fANOVA
        return dict(optuna.importance.get_param_importances(study, evaluator=evaluator))


def history_plot(path: Path, values: np.ndarray, best: np.ndarray, label: str, maximize: bool) -> Path:
    fig = new_figure(6.5, 3.4)
    ax = fig.subplots()
    x = np.arange(len(values))
    ax.scatter(x, values, s=16, color="C0", label="trial", zorder=3)
    ax.step(x, best, where="post", color="C3", lw=1.5, label=f"best so far ({'max' if maximize else 'min'})")
    ax.set_xlabel("trial (start order)")
    ax.set_ylabel(label)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=110)
    return path


def importance_plot(path: Path, imp: Mapping[str, float]) -> Path:
    names = list(imp)[::-1]
    fig = new_figure(6.5, 0.35 * len(names) + 1.3)
    ax = fig.subplots()
    ax.barh(range(len(names)), [imp[n] for n in names], color="C0")
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.set_xlabel("importance (PED-ANOVA, normalised)")
    ax.grid(axis="x", alpha=0.3)
    fig.savefig(path, dpi=110)
    return path


@register("search")
def search(
    runs: pd.DataFrame,
    out_dir: Path,
    *,
    study_name: str = "",
    console: Any = None,
    metric: str | None = None,
    mode: str | None = None,
    params: Sequence[str] | None = None,
    filename: str = "search",
) -> AnalysisResult:
    """Optimisation history and parameter importances of a search; see the module docstring.

    Options: ``metric`` / ``mode`` (default the study's), ``params`` (default the searched keys,
    else every param that varies), ``filename``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    mode = (mode or str(_parent_params(runs).get("study.mode") or "max")).lower()
    if mode not in ("max", "min"):
        raise ValueError(f"search.mode: 'max' or 'min', got {mode!r}")
    maximize = mode == "max"
    ok, failed = split_status(runs.reset_index(drop=True))
    objective = objective_column(runs, metric)
    space = search_space(runs)
    if params is not None:
        keys = check_params(runs, params, "search.params")
    elif space:
        keys = [k for k in space if param_col(k) in runs.columns]
    else:
        from .base import study_factors

        keys = study_factors(runs, None, "train.seed")
    label = pretty_metric(objective)
    values = pd.to_numeric(ok[objective], errors="coerce").to_numpy(float) if objective in ok.columns else np.array([])
    fin = np.isfinite(values)
    done = ok[fin].reset_index(drop=True)
    values = values[fin]
    best = (np.maximum if maximize else np.minimum).accumulate(values) if len(values) else values
    hist = pd.DataFrame({"trial": range(len(done)), "run_id": done.get("run_id", pd.Series(dtype=str)),
                         "value": values, "best_so_far": best})
    for k in keys:
        hist[k] = list(done[param_col(k)]) if param_col(k) in done.columns else None
    csv = out_dir / f"{filename}.csv"
    hist.to_csv(csv, index=False)
    files: list[Path] = [csv]
    blocks: list = [Heading("Search: optimisation history and parameter importances"),
                    Paragraph(f"{len(done)} finished trials with a value of `{strip_prefix(objective)}` ({mode}imised)"
                              + (f"; {len(failed)} unfinished/failed excluded" if len(failed) else "")
                              + (f". Best: {fmt_num(best[-1])} (trial {int(np.flatnonzero(values == best[-1])[0])})." if len(values) else "."))]
    if len(values):
        files.append(history_plot(out_dir / f"{filename}_history.png", values, best, label, maximize))
        blocks.append(Image(files[-1], "optimisation history"))
    try:
        imp = importances(done.assign(**{objective: values}), objective, keys, space, maximize)
    except ValueError as err:
        imp = {}
        blocks.append(Paragraph(f"Parameter importances not computed: {err}."))
    if imp:
        table = Table(["param", "importance"], [[k, fmt_num(v, 3)] for k, v in imp.items()],
                      caption="PED-ANOVA (Optuna's default importance evaluator) on an in-memory Optuna study rebuilt "
                              "from the finished runs; importances sum to 1.")
        pd.DataFrame({"param": list(imp), "importance": list(imp.values())}).to_csv(out_dir / f"{filename}_importance.csv", index=False)
        files.append(out_dir / f"{filename}_importance.csv")
        files.append(importance_plot(out_dir / f"{filename}_importance.png", imp))
        blocks += [table, Image(files[-1], "parameter importances")]
        print_table(console, f"{study_name}: parameter importances".lstrip(": "), table)
    md = write_markdown(out_dir / f"{filename}.md", [Heading(f"{study_name or 'Study'}: search", 1), *blocks[1:]])
    files.insert(1, md)
    return AnalysisResult("search", files, blocks, hist, [])


__all__ = ["search", "is_search", "importances", "search_space"]
