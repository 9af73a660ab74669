"""``--json`` outputs of ``sweeper show``, ``run``, ``list`` and ``ls``: one JSON document
on stdout (``run`` prints its progress on stderr), schema in docs/cli.md.

Every document has ``"schema": "sweeper.<command>/<version>"``; a version changes only
when a field is removed or changes meaning (new fields may appear). Values are the full
numbers (the tables round them, :mod:`sweeper.numbers`); ``NaN``/``inf`` become ``null``.
"""

from __future__ import annotations

import inspect
import json
import math
import sys
from typing import Any, Iterable, TextIO

SCHEMA_VERSION = 1


def schema(command: str) -> str:
    return f"sweeper.{command}/{SCHEMA_VERSION}"


def _clean(v: Any) -> Any:
    """JSON-safe: non-finite floats -> None, tuples -> lists, unknown objects -> ``repr``."""
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, dict):
        return {str(k): _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple, set)):
        return [_clean(x) for x in v]
    if v is None or isinstance(v, (bool, int, str)):
        return v
    if hasattr(v, "item"):  # numpy scalars
        try:
            return _clean(v.item())
        except Exception:
            pass
    return repr(v)


def dump(doc: dict[str, Any], out: TextIO | None = None) -> None:
    """Write ``doc`` as one JSON document (indented) and a newline."""
    out = out or sys.stdout
    out.write(json.dumps(_clean(doc), indent=2, allow_nan=False) + "\n")
    out.flush()


# ----------------------------------------------------------------------------- show
def study_doc(study: Any) -> dict[str, Any]:
    """``sweeper show --json``: the resolved study (its trials, or its search space)."""
    spec = study.spec
    return {
        "schema": schema("show"),
        "study": spec.name,
        "file": study.source,
        "description": spec.description,
        "quick": study.quick,
        "overrides": dict(study.overrides),
        "kind": "search" if study.is_search else "grid",
        "size": study.size,
        "metric": spec.metric,
        "mode": spec.mode,
        "seeds": spec.seeds,
        "resources": spec.resources.model_dump(),
        "max_concurrent": spec.max_concurrent,
        "max_failures": spec.max_failures,
        "scheduler": spec.scheduler.model_dump() if spec.scheduler else None,
        "search": spec.search.model_dump() if spec.search else None,
        "varying_keys": study.varying_keys,
        "analyses": [name for name, _ in spec.analysis_specs()],
        "fingerprint": study.fingerprint(),
        "base": study.base.to_dict(),
        "trials": [{"index": t.index, "overrides": t.overrides} for t in study.trials],
    }


# ----------------------------------------------------------------------------- run
def outcome_doc(outcome: Any) -> dict[str, Any]:
    """``sweeper run --json``: the outcome of the execution (what the final tables show)."""
    from .executions import outcome_status
    from .tracking import redact_uri

    def trial(t: Any) -> dict[str, Any]:
        return {
            "index": t.index, "trial_id": t.trial_id, "name": t.name, "status": t.status, "value": t.value,
            "best_epoch": t.best_epoch, "run_id": t.run_id, "overrides": t.overrides, "error": t.error,
        }

    best = outcome.best
    return {
        "schema": schema("run"),
        "study": outcome.study,
        "execution": outcome.execution,
        "status": outcome_status(outcome),
        "metric": outcome.metric,
        "mode": outcome.mode,
        "counts": outcome.counts(),
        "total": outcome.total,
        "best": None if best is None else trial(best),
        "ranking": [t.name for t in outcome.ranked()],
        "trials": [trial(t) for t in outcome.trials],
        "storage": str(outcome.exec_dir),
        "tracking_uri": redact_uri(outcome.tracking_uri),
        "experiment_id": outcome.experiment_id,
        "parent_run_id": outcome.parent_run_id,
        "analysis": [str(p) for p in outcome.analysis_paths],
        "resume_command": outcome.resume_command if outcome.interrupted else None,
    }


# ----------------------------------------------------------------------------- list
def registries_doc(kinds: Iterable[str]) -> dict[str, Any]:
    """``sweeper list --json``: every entry of the registries ``kinds`` with its parameters."""
    from dmlcore import registry

    out: dict[str, list[dict[str, Any]]] = {}
    for kind in kinds:
        entries = []
        for name, params, doc in registry.describe(kind):
            entries.append({
                "name": name,
                "parameters": {p: None if d is inspect.Parameter.empty else d for p, d in params.items()},
                "required": [p for p, d in params.items() if d is inspect.Parameter.empty],
                "description": doc,
                "module": registry.entry_module(kind, name),
                "needs_embeddings": bool(registry.get(kind, name).meta.get("needs_embeddings")),
            })
        out[kind] = entries
    return {"schema": schema("list"), "registries": out}


# ----------------------------------------------------------------------------- ls
def executions_doc(executions: Iterable[Any], root: str) -> dict[str, Any]:
    """``sweeper ls --json``: the executions under ``root`` (see :class:`sweeper.executions.Execution`)."""
    return {"schema": schema("ls"), "root": root, "executions": [e.to_json() for e in executions]}
