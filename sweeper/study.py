"""Studies: a base run config plus axes over its dotted keys (see docs/studies.md).

A study file is YAML::

    name: margin_vs_ms
    base: ../configs/quickstart.yaml       # or an inline RunConfig mapping
    axes:                                  # full grid (cartesian product)
      model.embed_dim: [64, 128]
    zip:                                   # paired values: one axis per group
      - loss.name: [margin, multi_similarity]
        loss.params: [{margin: 0.2}, {alpha: 2.0}]
    seeds: [0, 1, 2]                       # crossed with the grid (train.seed)
    metric: test/recall_at_1
    mode: max
    resources: {cpu: 1, gpu: 0.25}
    max_concurrent: 4

:func:`load_study` reads, validates and expands it into a :class:`ResolvedStudy`
(the trials and their validated :class:`~dmlcore.config.RunConfig`) before anything
runs. Every problem is a one-line :class:`~dmlcore.config.ConfigError` naming the
study file and the offending key.

This module imports neither Ray nor MLflow.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import itertools
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, Mapping, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from dmlcore.config import ConfigError, RunConfig, all_keys, from_dict, read_yaml, unflatten

# ----------------------------------------------------------------------------- keys
SEED_KEY = "train.seed"

# Config keys whose value is a registry name, and the free-form params key that goes
# with it (checked against the factory's signature).
REGISTRY_KEYS: dict[str, tuple[str, str | None]] = {
    "data.dataset": ("dataset", "data.params"),
    "data.augmentation": ("augmentation", None),
    "batch.sampler": ("sampler", "batch.sampler_params"),
    "model.backbone": ("backbone", "model.backbone_params"),
    "model.head": ("head", "model.head_params"),
    "loss.name": ("loss", "loss.params"),
    "miner.name": ("miner", "miner.params"),
}
# Names that mean "no plug-in" even when the registry has no entry of that name.
_NONE_NAMES = {"miner": {"none"}}

# Study-level keys a ``quick:`` block may set besides RunConfig keys.
QUICK_STUDY_KEYS = ("seeds", "search.samples", "max_concurrent", "zip", "resources")
# ... and ``axes.<key>``: new values for an existing axis (a smaller grid for the quick variant).
QUICK_AXES_PREFIX = "axes."


def free_form_keys() -> list[str]:
    """RunConfig keys whose value is a free-form dict (``loss.params``, ...)."""
    out = []

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, f in model.model_fields.items():
            ann = f.annotation
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                walk(ann, f"{prefix}{name}.")
            elif typing.get_origin(ann) is dict or ann is dict:
                out.append(f"{prefix}{name}")

    walk(RunConfig, "")
    return out


def key_problem(key: str) -> str | None:
    """``None`` when ``key`` is a RunConfig dotted key (or inside a free-form dict), else why not."""
    if not isinstance(key, str) or not key:
        return f"invalid key {key!r}"
    keys = all_keys()
    if key in keys:
        return None
    if any(key.startswith(f + ".") for f in free_form_keys()):
        return None
    close = difflib.get_close_matches(key, keys, n=1, cutoff=0.6)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return f"unknown key '{key}'{hint}"


def check_registries(cfg: RunConfig) -> None:
    """Raise :class:`~dmlcore.registry.RegistryError` for an unknown plug-in name or parameter."""
    from dmlcore import registry

    flat = cfg.to_dict()

    def value(key: str) -> Any:
        cur: Any = flat
        for p in key.split("."):
            if not isinstance(cur, Mapping) or p not in cur:
                return None
            cur = cur[p]
        return cur

    keys = set(all_keys())
    for key, (kind, params_key) in REGISTRY_KEYS.items():
        if key not in keys:
            continue
        name = value(key)
        if name is None or name in _NONE_NAMES.get(kind, ()) and name not in registry.names(kind):
            continue
        registry.get(kind, name, key)  # an unknown name is reported under its own key
        if params_key and params_key in keys:
            registry.check_params(kind, name, value(params_key) or {}, params_key)
    for reg in value("loss.regularizers") or {}:
        registry.get("regularizer", reg, "loss.regularizers")
    from dmlcore.losses.compat import check_loss_miner

    check_loss_miner(cfg.loss.name, cfg.miner.name)  # the reference's ALLOWED_MINING_OPS


# ----------------------------------------------------------------------------- model
class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FloatParam(_Model):
    type: Literal["float"]
    low: float
    high: float
    log: bool = False
    step: float | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _bounds(self) -> "FloatParam":
        if not self.low < self.high:
            raise ValueError(f"low ({self.low}) must be below high ({self.high})")
        if self.log and self.low <= 0:
            raise ValueError("log=true needs low > 0")
        if self.log and self.step is not None:
            raise ValueError("step and log=true cannot be combined")
        return self


class IntParam(_Model):
    type: Literal["int"]
    low: int
    high: int
    log: bool = False
    step: int = Field(1, ge=1)

    @model_validator(mode="after")
    def _bounds(self) -> "IntParam":
        if not self.low < self.high:
            raise ValueError(f"low ({self.low}) must be below high ({self.high})")
        if self.log and self.low < 1:
            raise ValueError("log=true needs low >= 1")
        if self.log and self.step != 1:
            raise ValueError("step and log=true cannot be combined")
        return self


class CategoricalParam(_Model):
    type: Literal["categorical"]
    values: list[Any] = Field(min_length=1)


SearchParam = Annotated[Union[FloatParam, IntParam, CategoricalParam], Field(discriminator="type")]


class SearchSpec(_Model):
    """An Optuna search (Ray Tune's ``OptunaSearch``) over dotted keys."""

    samples: int = Field(ge=1)
    """Number of trials Optuna proposes."""
    sampler: Literal["tpe", "random"] = "tpe"
    seed: int | None = 0
    """Seed of the Optuna sampler (null: not seeded)."""
    startup_trials: int | None = Field(None, ge=0)
    """TPE: random trials before TPE starts modelling (Optuna's default: 10)."""
    space: dict[str, SearchParam] = Field(min_length=1)
    storage: str | None = None
    """Where the Optuna study is kept: an SQLAlchemy URL (``postgresql://user@host/db``,
    ``sqlite:////abs/optuna.db``); default an SQLite file beside the execution
    (``<storage>/<execution>/optuna.db``, see sweeper/optuna_store.py)."""

    @field_validator("storage")
    @classmethod
    def _storage_url(cls, v: str | None) -> str | None:
        if v is None:
            return v
        import sqlalchemy

        try:
            sqlalchemy.engine.make_url(v)
        except Exception:
            raise ValueError(
                "must be an SQLAlchemy URL, e.g. postgresql://user@host/optuna or sqlite:////abs/path/optuna.db"
            ) from None
        return v


class SchedulerSpec(_Model):
    """Early stopping with ASHA (``AsyncHyperBandScheduler``) on a named metric."""

    type: Literal["asha"] = "asha"
    metric: str | None = None
    """Default: the study's metric."""
    mode: Literal["max", "min"] | None = None
    grace_period: int = Field(1, ge=1)
    """Epochs every trial runs before it can be stopped."""
    reduction_factor: float = Field(2.0, gt=1)
    max_t: int | None = Field(None, ge=1)
    """Default: the base config's train.epochs."""
    brackets: int = Field(1, ge=1)


class Resources(_Model):
    """What one trial asks for. ``workers: 1`` (default) is one plain trial process with
    ``cpu``/``gpu``; ``workers: N > 1`` trains data-parallel on N Ray Train workers and
    ``cpu``/``gpu`` are **per worker** (the trial holds N x cpu, N x gpu; docs/cluster.md)."""

    cpu: float = Field(1.0, gt=0)
    gpu: float = Field(0.0, ge=0)
    workers: int = Field(1, ge=1)

    @field_validator("gpu")
    @classmethod
    def _whole_above_one(cls, v: float) -> float:
        if v > 1 and v != int(v):
            raise ValueError("a fractional gpu must be below 1 (e.g. 0.25); above 1 use whole gpus")
        return v


class Study(_Model):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", max_length=100)
    description: str = ""
    base: dict[str, Any] | str = Field(default_factory=dict)
    """A RunConfig mapping (nested sections or dotted keys) or a path to one, relative to the study file."""
    axes: dict[str, list[Any]] = Field(default_factory=dict)
    """Dotted key -> values; the trials are their cartesian product."""
    zip: list[dict[str, list[Any]]] = Field(default_factory=list)
    """Groups of paired axes: within a group the i-th values go together."""
    seeds: list[int] | None = None
    """Crossed with the grid; sets train.seed. Default: the base config's seed."""
    search: SearchSpec | None = None
    scheduler: SchedulerSpec | None = None
    metric: str = "test/recall_at_1"
    mode: Literal["max", "min"] = "max"
    resources: Resources = Field(default_factory=Resources)
    max_concurrent: int | None = Field(None, ge=1)
    max_failures: int = Field(0, ge=-1)
    """Retries of a failed trial (Ray Tune FailureConfig; -1 = unlimited)."""
    analyses: list[str | dict[str, dict[str, Any] | None]] = Field(default_factory=list)
    plugins: list[str] = Field(default_factory=list)
    """Modules to import first (the driver and every trial): a user's own losses, datasets, ... (docs/plugins.md)."""
    quick: dict[str, Any] = Field(default_factory=dict)
    """Dotted overrides applied by ``--quick`` (also ``seeds``, ``search.samples``, ``max_concurrent``)."""

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, v: list[int] | None) -> list[int] | None:
        if v is not None:
            if not v:
                raise ValueError("empty list (give at least one seed, or leave seeds out)")
            if len(set(v)) != len(v):
                raise ValueError("duplicate seeds")
        return v

    @field_validator("analyses")
    @classmethod
    def _analyses(cls, v: list) -> list:
        for item in v:
            if isinstance(item, dict) and len(item) != 1:
                raise ValueError(
                    "each entry is a name or a mapping {name: {options}} with exactly one name"
                )
        return v

    def analysis_specs(self) -> list[tuple[str, dict[str, Any]]]:
        """``analyses`` normalised to ``[(name, options), ...]``."""
        out = []
        for item in self.analyses:
            if isinstance(item, str):
                out.append((item, {}))
            else:
                (name, opts), = item.items()
                out.append((name, dict(opts or {})))
        return out


_STUDY_FIELDS = list(Study.model_fields)


def _format_study_error(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden":
            leaf = str(e["loc"][-1])
            parent = e["loc"][:-1]
            choices = _STUDY_FIELDS if not parent else []
            close = difflib.get_close_matches(leaf, choices, n=1, cutoff=0.6)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            lines.append(f"{source}: unknown study key '{loc}'{hint}")
        elif e["type"] == "union_tag_invalid":
            lines.append(f"{source}: '{loc}': type must be one of float, int, categorical")
        elif e["type"] == "union_tag_not_found":
            lines.append(f"{source}: '{loc}': needs a 'type' (float, int or categorical)")
        else:
            got = e.get("input")
            got_s = "" if isinstance(got, (dict, list)) or got is None else f" (got {got!r})"
            msg = e["msg"].removeprefix("Value error, ")
            lines.append(f"{source}: '{loc}': {msg}{got_s}")
    # one problem per line is plenty; the first is the one to fix
    return lines[0] if lines else f"{source}: invalid study"


# ----------------------------------------------------------------------------- trials
def apply_overrides(base: RunConfig, overrides: Mapping[str, Any], source: str = "<trial>") -> RunConfig:
    """``base`` with dotted keys set. A mapping value replaces the whole sub-dict
    (``loss.params: {alpha: 2}`` drops the base's ``loss.params``); shorter keys apply first."""
    d = base.to_dict()
    for key in sorted(overrides, key=lambda k: k.count(".")):
        parts = key.split(".")
        cur = d
        for p in parts[:-1]:
            nxt = cur.get(p)
            if not isinstance(nxt, dict):
                nxt = {}
                cur[p] = nxt
            cur = nxt
        cur[parts[-1]] = copy.deepcopy(overrides[key])
    return from_dict(d, source)


def _short(v: Any) -> str:
    from .numbers import fmt_num

    s = json.dumps(v, sort_keys=True, default=str) if isinstance(v, (dict, list)) else fmt_num(v)
    return s if len(s) <= 40 else s[:37] + "..."


@dataclass(frozen=True)
class Trial:
    index: int
    overrides: dict[str, Any]
    """The dotted keys this trial sets on top of the base (axes, zip groups, seed)."""
    config: RunConfig

    @property
    def label(self) -> str:
        return ", ".join(f"{k}={_short(v)}" for k, v in self.overrides.items()) or "base"


@dataclass
class ResolvedStudy:
    spec: Study
    path: Path | None
    base: RunConfig
    trials: list[Trial] = field(default_factory=list)
    """The expanded grid (empty for a search study: Optuna proposes the trials)."""
    quick: bool = False
    overrides: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def is_search(self) -> bool:
        return self.spec.search is not None

    @property
    def size(self) -> int:
        return self.spec.search.samples if self.spec.search else len(self.trials)

    @property
    def varying_keys(self) -> list[str]:
        """The keys that differ between trials (axes, zip keys, search keys, seed)."""
        if self.spec.search:
            keys = list(self.spec.search.space)
        else:
            keys = list(self.spec.axes) + [k for g in self.spec.zip for k in g]
        if self.spec.seeds and len(self.spec.seeds) > 1 and SEED_KEY not in keys:
            keys.append(SEED_KEY)
        return keys

    def trial_config(self, overrides: Mapping[str, Any], name: str | None = None) -> RunConfig:
        over = dict(overrides)
        if name is not None and "name" not in over:
            over["name"] = name
        return apply_overrides(self.base, over, f"{self.source}: trial")

    @property
    def source(self) -> str:
        return str(self.path) if self.path else "<study>"

    def fingerprint(self) -> str:
        """Hash of what the trials will run (base, trials or search space, seeds)."""
        payload = {
            "base": self.base.to_dict(),
            "trials": [t.overrides for t in self.trials],
            # where the Optuna study is kept is not what the trials run (sweeper.json keeps it)
            "search": self.spec.search.model_dump(mode="json", exclude={"storage"}) if self.spec.search else None,
            "seeds": self.spec.seeds,
        }
        return hashlib.sha1(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------- loading
def load_study(
    path: str | Path,
    overrides: Mapping[str, Any] | None = None,
    quick: bool = False,
) -> ResolvedStudy:
    """Read, validate and expand a study file (``overrides``: ``--set`` keys on the base)."""
    given = Path(path)
    p = given.expanduser().resolve()
    raw = read_yaml(given)
    return resolve_study(raw, source=str(given), base_dir=p.parent, overrides=overrides, quick=quick, path=p)


def resolve_study(
    raw: Any,
    source: str = "<study>",
    base_dir: str | Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    quick: bool = False,
    path: Path | None = None,
) -> ResolvedStudy:
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{source}: a study must be a mapping (name, base, axes, ...), got {type(raw).__name__}")
    try:
        spec = Study.model_validate(dict(raw))
    except ValidationError as err:
        raise ConfigError(_format_study_error(err, source)) from None
    from .study_keys import apply_study_overrides, split_overrides

    all_overrides = dict(overrides or {})
    study_set, overrides = split_overrides(all_overrides)  # --set seeds=[0], search.samples=50 / run-config keys
    base_dir = Path(base_dir) if base_dir is not None else Path.cwd()
    if spec.plugins:  # before any registry name is checked
        from dmlcore import plugins as _plugins

        _plugins.load(spec.plugins, f"{source}: plugins")

    # --- quick variant: study-level keys first, the rest are config overrides
    run_quick: dict[str, Any] = {}
    if quick:
        if not spec.quick:
            raise ConfigError(f"{source}: --quick given but the study has no 'quick' block")
        update: dict[str, Any] = {}
        for k, v in spec.quick.items():
            if k == "seeds":
                update["seeds"] = v
            elif k == "max_concurrent":
                update["max_concurrent"] = v
            elif k == "search.samples":
                if spec.search is None:
                    raise ConfigError(f"{source}: quick: 'search.samples' but the study has no search")
                update["search"] = {**spec.search.model_dump(), "samples": v}
            elif k.startswith(QUICK_AXES_PREFIX):
                axis = k[len(QUICK_AXES_PREFIX):]
                if axis not in spec.axes:
                    raise ConfigError(f"{source}: quick: '{k}': the study has no axis '{axis}'")
                update.setdefault("axes", dict(spec.axes))[axis] = v
            elif k in ("zip", "resources"):
                update[k] = v
            else:
                run_quick[k] = v
        if update:
            try:
                spec = Study.model_validate({**spec.model_dump(), **update})
            except ValidationError as err:
                raise ConfigError(_format_study_error(err, f"{source} (quick)")) from None
    spec = apply_study_overrides(spec, study_set)  # after quick: the command line wins
    for k in spec.quick:
        if k not in QUICK_STUDY_KEYS and not k.startswith(QUICK_AXES_PREFIX) and (why := key_problem(k)):
            raise ConfigError(f"{source}: quick: {why}")

    # --- base config
    if isinstance(spec.base, str):
        bpath = Path(spec.base)
        if not bpath.is_absolute():
            bpath = base_dir / bpath
        braw = read_yaml(bpath)
        bsource = str(bpath)
    else:
        braw = spec.base
        bsource = f"{source}: base"
    if not isinstance(braw, Mapping):
        raise ConfigError(f"{bsource}: a run config must be a mapping of sections, got {type(braw).__name__}")
    base = from_dict(unflatten(braw), bsource)
    if run_quick:
        base = apply_overrides(base, run_quick, f"{source}: quick")
    if overrides:
        for k in overrides:
            if why := key_problem(k):
                raise ConfigError(f"--set: {why}")
        base = base.with_overrides(overrides, "--set")

    # --- axes
    if spec.search is not None:
        if spec.axes or spec.zip:
            raise ConfigError(
                f"{source}: a study with 'search' cannot also have 'axes' or 'zip' "
                "(put those keys in search.space as categorical parameters)"
            )
        if spec.seeds and len(spec.seeds) > 1:
            raise ConfigError(
                f"{source}: 'seeds' with 'search' takes one seed (Optuna scores one trial per proposal)"
            )
    seen: dict[str, str] = {}

    def claim(key: str, where: str) -> None:
        if why := key_problem(key):
            raise ConfigError(f"{source}: {where}: {why}")
        if key in seen:
            raise ConfigError(f"{source}: {where}: key '{key}' is already varied by {seen[key]}")
        for other, owner in seen.items():
            if other.startswith(key + ".") or key.startswith(other + "."):
                raise ConfigError(f"{source}: {where}: key '{key}' overlaps '{other}' ({owner})")
        if key in overrides or key in run_quick:
            src = "--set" if key in overrides else "quick"
            raise ConfigError(f"{source}: {where}: key '{key}' is varied but also fixed by {src}")
        seen[key] = where

    for key, values in spec.axes.items():
        claim(key, f"axes.{key}")
        if not values:
            raise ConfigError(f"{source}: axes.{key}: empty axis (give at least one value)")
    for gi, group in enumerate(spec.zip):
        where = f"zip[{gi}]"
        if not group:
            raise ConfigError(f"{source}: {where}: empty group")
        lengths = {k: len(v) for k, v in group.items()}
        for key, values in group.items():
            claim(key, f"{where}.{key}")
            if not values:
                raise ConfigError(f"{source}: {where}.{key}: empty axis (give at least one value)")
        if len(set(lengths.values())) > 1:
            desc = ", ".join(f"{k} has {n}" for k, n in lengths.items())
            raise ConfigError(f"{source}: {where}: zipped axes must have the same length ({desc})")
    if spec.seeds is not None:
        if SEED_KEY in seen:
            raise ConfigError(f"{source}: 'seeds' and an axis over '{SEED_KEY}' cannot both be given")
        if SEED_KEY in overrides:
            raise ConfigError(f"{source}: 'seeds' is given; '{SEED_KEY}' cannot also be fixed by --set")
    if spec.search is not None:
        for key in spec.search.space:
            claim(key, f"search.space.{key}")

    # --- registry names in axes (did-you-mean before expanding anything)
    from dmlcore import registry

    def check_names(key: str, values: list[Any], where: str) -> None:
        if key in REGISTRY_KEYS:
            kind = REGISTRY_KEYS[key][0]
            for v in values:
                if not isinstance(v, str):
                    raise ConfigError(f"{source}: {where}: {kind} names are strings, got {v!r}")
                if v in _NONE_NAMES.get(kind, ()) and v not in registry.names(kind):
                    continue
                try:
                    registry.get(kind, v, key)
                except registry.RegistryError as err:
                    raise ConfigError(f"{source}: {where}: {err}") from None

    for key, values in spec.axes.items():
        check_names(key, values, "axes")
    for gi, group in enumerate(spec.zip):
        for key, values in group.items():
            check_names(key, values, f"zip[{gi}]")
    if spec.search is not None:
        for key, prm in spec.search.space.items():
            if isinstance(prm, CategoricalParam):
                check_names(key, prm.values, f"search.space.{key}")

    # --- analyses: names and options, checked by sweeper.analysis when it is installed
    if spec.analyses:
        try:
            from sweeper import analysis as _analysis

            check_analyses = getattr(_analysis, "validate_analyses", None)
        except ImportError:
            check_analyses = None
        if check_analyses is not None:
            try:
                check_analyses(spec.analyses)
            except ValueError as err:
                raise ConfigError(f"{source}: {err}") from None

    resolved = ResolvedStudy(spec=spec, path=path, base=base, quick=quick, overrides=all_overrides)

    # --- expand and validate every trial
    def validate(over: dict[str, Any], what: str) -> RunConfig:
        src = f"{source}: {what}"
        try:
            cfg = apply_overrides(base, {**over, "name": over.get("name", spec.name)}, src)
        except ConfigError as err:
            raise ConfigError(f"{err}") from None
        try:
            check_registries(cfg)
        except (KeyError, ValueError) as err:
            raise ConfigError(f"{src}: {err}") from None
        try:  # the split file and its entry (ids, classes, episodes); missing files/data: the preflight's strict check
            from dmlcore.oodml.published import check_split

            check_split(cfg, strict=False)
        except ValueError as err:
            raise ConfigError(f"{src}: {err}") from None
        return cfg

    if spec.search is None:
        groups: list[list[dict[str, Any]]] = [[{k: v} for v in vals] for k, vals in spec.axes.items()]
        for group in spec.zip:
            n = len(next(iter(group.values())))
            groups.append([{k: vals[i] for k, vals in group.items()} for i in range(n)])
        seeds = spec.seeds or [None]
        trials = []
        for point in itertools.product(*groups):
            merged: dict[str, Any] = {}
            for d in point:
                merged.update(d)
            for s in seeds:
                over = dict(merged)
                if s is not None:
                    over[SEED_KEY] = s
                i = len(trials)
                label = ", ".join(f"{k}={_short(v)}" for k, v in over.items()) or "base"
                cfg = validate({**over, "name": f"{spec.name}-{i:03d}"}, f"trial {i} ({label})")
                trials.append(Trial(i, over, cfg))
        resolved.trials = trials
    else:
        fixed: dict[str, Any] = {}
        if spec.seeds:
            fixed[SEED_KEY] = spec.seeds[0]
            resolved.base = base = apply_overrides(base, fixed, f"{source}: seeds")
        validate({}, "base")
        for key, prm in spec.search.space.items():
            if isinstance(prm, CategoricalParam):
                probes = list(prm.values)
            else:
                probes = [prm.low, prm.high]
            for v in probes:
                validate({key: v}, f"search.space.{key}={_short(v)}")

    if spec.scheduler is not None and spec.scheduler.max_t is None:
        pass  # filled from the base's train.epochs by sweeper.tune
    return resolved


def tuning_warning(spec: Study) -> str | None:
    """The warning for a search or ASHA that optimises a ``test/`` metric (the zero-shot
    test classes), else None."""
    tuned = []
    if spec.search is not None:
        tuned.append(("search", spec.metric))
    if spec.scheduler is not None:
        tuned.append(("scheduler", spec.scheduler.metric or spec.metric))
    bad = [(what, m) for what, m in tuned if m.startswith(("test/", "best/test/"))]
    if not bad:
        return None
    what, m = bad[0]
    return (
        f"the {what} optimises '{m}', measured on the zero-shot test classes: the hyperparameters are "
        f"tuned on the test set; hold out train classes (data.val_classes: 0.2, eval.select_on: val) "
        f"and use metric: {m.replace('test/', 'val/', 1)}"
    )


def trial_table_rows(study: ResolvedStudy) -> tuple[list[str], list[list[str]]]:
    """Columns and rows of the expanded trial table (``sweeper show``)."""
    if study.is_search:
        cols = ["key", "type", "range / values"]
        rows = []
        for key, prm in study.spec.search.space.items():
            if isinstance(prm, CategoricalParam):
                rng = ", ".join(_short(v) for v in prm.values)
            else:
                rng = f"[{_short(prm.low)}, {_short(prm.high)}]" + (" log" if prm.log else "")
                if getattr(prm, "step", None) not in (None, 1):
                    rng += f" step {prm.step}"
            rows.append([key, prm.type, rng])
        return cols, rows
    keys: list[str] = []
    for t in study.trials:
        for k in t.overrides:
            if k not in keys:
                keys.append(k)
    rows = [[str(t.index)] + [_short(t.overrides.get(k, "")) for k in keys] for t in study.trials]
    return ["#"] + keys, rows
