"""Study-level keys in ``--set`` (``sweeper show`` / ``sweeper run``).

``--set KEY=VALUE`` sets a dotted key of the run config (``train.epochs``) — or, when
``KEY`` starts with one of :data:`SETTABLE`, a key of the study itself::

    --set seeds=[0,1]            --set search.samples=50      --set metric=val/recall_at_1
    --set max_concurrent=4       --set resources.gpu=0.5      --set scheduler.grace_period=2
    --set axes.model.embed_dim=[16]   (new values for an existing axis)

They apply after the ``quick`` block (the command line wins) and are validated by the
same typed model as the study file (:class:`sweeper.study.Study`): an unknown key or a
wrong type is one line naming it. ``base``, ``quick`` and ``plugins`` cannot be set this
way (:data:`NOT_SETTABLE` says what to do instead); ``name`` is the run config's.
"""

from __future__ import annotations

import copy
import difflib
import typing
from typing import Any, Mapping

from pydantic import BaseModel, ValidationError

from dmlcore.config import ConfigError, RunConfig, all_keys

SETTABLE = ("seeds", "search", "scheduler", "metric", "mode", "resources", "max_concurrent", "max_failures",
            "analyses", "axes", "zip", "description")
"""Top-level study keys ``--set`` may set (with their sub-keys: ``search.samples``)."""
NOT_SETTABLE = {
    "base": "set the run config's keys instead (--set train.epochs=2)",
    "quick": "use --quick, and --set for the keys to change",
    "plugins": "use --plugin MODULE",
}
AXES_PREFIX = "axes."


def split_overrides(overrides: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(study-level keys, run-config keys) of ``--set``, in the order given."""
    study: dict[str, Any] = {}
    run: dict[str, Any] = {}
    for key, value in overrides.items():
        head = key.split(".", 1)[0]
        if head in NOT_SETTABLE:
            raise ConfigError(f"--set {key}: the study's '{head}' cannot be set from the command line; {NOT_SETTABLE[head]}")
        if head not in SETTABLE and head not in RunConfig.model_fields:  # neither: name the closest of both
            close = difflib.get_close_matches(key, [*SETTABLE, *all_keys()], n=1, cutoff=0.6)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"--set: unknown key '{key}'{hint} (a run-config key, see sweeper keys, or a study key: "
                              f"{', '.join(SETTABLE)})")
        (study if head in SETTABLE else run)[key] = value
    return study, run


def _model_of(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model inside ``annotation`` (``SearchSpec | None`` -> SearchSpec)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            return arg
    return None


def _check_path(key: str) -> None:
    """An unknown (sub-)key of a study section: one line with the closest name."""
    from .study import Study

    model: type[BaseModel] | None = Study
    parts = key.split(".")
    for i, part in enumerate(parts):
        if model is None:
            return  # inside a free-form mapping (search.space.<key>, ...): the model validates it
        fields = model.model_fields
        if part not in fields:
            close = difflib.get_close_matches(part, list(fields), n=1, cutoff=0.6)
            where = ".".join(parts[:i])
            hint = f" (did you mean '{'.'.join([*parts[:i], close[0]])}'?)" if close else ""
            raise ConfigError(f"--set: unknown study key '{key}'{hint}"
                              + (f"; keys of '{where}': {', '.join(fields)}" if where and not close else ""))
        model = _model_of(fields[part].annotation)


def apply_study_overrides(spec: Any, overrides: Mapping[str, Any], source: str = "--set") -> Any:
    """``spec`` (a :class:`sweeper.study.Study`) with the study-level ``--set`` keys applied, validated."""
    from .study import Study, _format_study_error

    if not overrides:
        return spec
    d = spec.model_dump()
    for key, value in overrides.items():
        if key.startswith(AXES_PREFIX):
            axis = key[len(AXES_PREFIX):]
            if axis not in d["axes"]:
                known = ", ".join(d["axes"]) or "none"
                raise ConfigError(f"--set {key}: the study has no axis '{axis}' (its axes: {known})")
            d["axes"][axis] = copy.deepcopy(value)
            continue
        _check_path(key)
        parts = key.split(".")
        cur = d
        for i, part in enumerate(parts[:-1]):
            nxt = cur.get(part)
            if nxt is None:
                raise ConfigError(f"--set {key}: the study has no '{'.'.join(parts[:i + 1])}' "
                                  f"(set the whole section, e.g. --set {parts[0]}={{...}})")
            if not isinstance(nxt, dict):
                raise ConfigError(f"--set {key}: '{'.'.join(parts[:i + 1])}' is not a mapping")
            cur = nxt
        cur[parts[-1]] = copy.deepcopy(value)
    try:
        return Study.model_validate(d)
    except ValidationError as err:
        raise ConfigError(_format_study_error(err, source)) from None
