"""Run a study with Ray Tune; every trial is one dmlcore training run logged to MLflow.

* One execution of a study = one Tune experiment in ``<storage>/<execution>/``
  (default storage ``./runs/<study>/``, absolute) = one MLflow parent run.
* A grid study is one ``tune.grid_search`` over the expanded trials (so the trial
  numbers match ``sweeper show``); a search study is Ray Tune's ``OptunaSearch``
  with Optuna distributions (TPE by default); ``scheduler: asha`` adds
  ``AsyncHyperBandScheduler``.
* The trial function (:func:`run_trial`, in the Ray worker) builds the RunConfig,
  opens its own MLflow child run (tag ``mlflow.parentRunId``), and runs
  :class:`dmlcore.train.Trainer` with a reporter that logs each epoch to MLflow
  (one ``log_batch``) and to Tune (``tune.report``, checkpoints through a temporary
  directory and ``Checkpoint.from_directory``). A restarted trial resumes from
  ``tune.get_checkpoint()``.
* :func:`run_study` is plan -> preflight -> launch -> record: :func:`plan_run` decides
  the execution (reads ``sweeper.json`` on resume, writes nothing), :mod:`sweeper.preflight`
  checks it on the driver in seconds (before Ray starts a trial), :func:`launch` runs
  what is left in a fresh Tune experiment, and the record (:func:`open_record`, then
  :func:`_settle_mlflow` and :func:`_finish_parent`) is where the driver writes MLflow.
* ``resume``: never ``Tuner.restore`` (it unpickles files of the storage folder). The
  trials an earlier attempt finished come from MLflow (child runs by ``trial_key``) and
  are not re-run; the others start again in a new Tune experiment
  ``<execution>/resume-<n>/``, each from its latest checkpoint (a torch file read with
  ``weights_only=True``) in its own MLflow run; a search continues its persisted
  Optuna study (:mod:`sweeper.optuna_store`: every finished trial once, the interrupted
  ones handed out again, no point proposed twice).
"""

from __future__ import annotations

import contextlib
import difflib
import json
import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

from dmlcore.config import ConfigError, RunConfig

from . import conventions, executions, optuna_store, tracking
from .study import ResolvedStudy, apply_overrides, CategoricalParam, FloatParam, IntParam

STATE_FILE = "sweeper.json"
_log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- context
@dataclass
class TrialContext:
    """What every trial needs besides its own config (sent to the workers once)."""

    study: str
    execution: str
    base: dict[str, Any]
    metric: str
    mode: str
    required: dict[str, str] = field(default_factory=dict)
    """Metrics Tune's searcher/scheduler require in every report -> mode (carried forward)."""
    tracking_uri: str | None = field(default=None, repr=False)  # may carry a password
    experiment_id: str | None = None
    parent_run_id: str | None = None
    tags: dict[str, str] = field(default_factory=dict)
    decode: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Search keys whose categorical values went through Optuna as JSON text: key -> {text: value}."""
    env: dict[str, str] = field(default_factory=dict, repr=False)
    """The driver's MLflow client settings (``MLFLOW_TRACKING_TOKEN``, ...), applied by each
    trial before it connects: workers on other nodes do not inherit the driver's environment."""
    plugins: list[str] = field(default_factory=list)
    """Plug-in modules (the study's ``plugins`` and ``$DML_PLUGINS``) each trial imports first."""
    plugin_paths: list[str] = field(default_factory=list)
    """Where the driver found them (tried when Ray's runtime_env did not ship them)."""
    cpus: float | None = None
    cwd: str | None = None
    """The driver's working directory: relative paths in a study (``data.split: studies/splits/...``)
    mean paths from where ``sweeper run`` started; a trial on the same machine works from there
    (Tune starts it in its trial directory)."""
    """The trial's CPU share (``resources.cpu``), handed to dmlcore as ``DMLCORE_NUM_CPUS``
    (it sizes the DataLoader workers of ``data.num_workers: -1`` to it, not to the node)."""
    resume_from: dict[str, str] = field(default_factory=dict)
    """trial_key -> the latest checkpoint file an earlier attempt of the execution left
    (``--resume``); read with ``weights_only=True`` like every checkpoint."""


def trial_key(execution: str, index: int | None, trial_id: str) -> str:
    """The stable identity of a trial across restarts (MLflow tag ``trial_key``)."""
    return f"{execution}/{index:04d}" if index is not None else f"{execution}/{trial_id}"


def trial_name(study: str, index: int | None, trial_id: str) -> str:
    return f"{study}-{index:03d}" if index is not None else f"{study}-{trial_id}"


def split_config(config: Mapping[str, Any]) -> tuple[int | None, dict[str, Any]]:
    """(grid index, dotted overrides) of a Tune trial config (grid point or Optuna sample)."""
    point = config.get("point")
    if isinstance(point, Mapping):
        return point.get("index"), dict(point.get("overrides") or {})
    return None, {k: v for k, v in config.items() if k != "point"}


class TuneReporter:
    """The trainer's Reporter inside a Tune trial: MLflow (per epoch) + ``tune.report``."""

    def __init__(self, logger: tracking.RunLogger | None, required: Mapping[str, str]):
        self.logger = logger
        self.required = dict(required)
        self.last: dict[str, float] = {}
        self.reported = False

    def tune_metrics(self, metrics: Mapping[str, Any]) -> dict[str, float]:
        out = tracking.numeric_metrics(metrics)
        for m, mode in self.required.items():
            if m in out:
                self.last[m] = out[m]
            else:  # not evaluated this epoch: Tune needs the key in every result
                out[m] = self.last.get(m, -math.inf if mode == "max" else math.inf)
        return out

    def report(self, step: int, metrics: Mapping[str, Any], checkpoint: dict | None = None) -> None:
        from ray import tune

        self.reported = True
        if self.logger is not None:
            self.logger.report(step, metrics)
        out = self.tune_metrics(metrics)
        if checkpoint is None:
            tune.report(out)
            return
        from dmlcore.train import save_checkpoint

        with tempfile.TemporaryDirectory(prefix="sweeper-ckpt-") as d:
            save_checkpoint(checkpoint, Path(d) / "checkpoint.pt")
            tune.report(out, checkpoint=tune.Checkpoint.from_directory(d))


def run_trial(config: dict[str, Any], ctx: TrialContext, fit: Any = None) -> None:
    """The Tune trainable: one trial = one Trainer.fit (runs in a Ray worker).

    ``fit(cfg, resume, logger, trial_id)`` replaces the Trainer call (a multi-worker
    trial trains on its Ray Train workers, :mod:`sweeper.multi_worker`).

    An error whose message carries a secret (MLflow's "API request to
    http://user:PASSWORD@host/... failed") is replaced by its redacted one-line form
    before Tune stores it (the trial's error file in the storage folder, Ray's logs)."""
    try:
        _run_trial(config, ctx, fit)
    except Exception as err:
        if tracking.redact(str(err)) != str(err):
            raise RuntimeError(tracking.error_line(err)) from None
        raise


def _run_trial(config: dict[str, Any], ctx: TrialContext, fit: Any = None) -> None:
    from ray import tune

    if ctx.plugins:  # the user's registry entries, before the config is built
        from dmlcore import plugins

        plugins.load(ctx.plugins, "plugins", ctx.plugin_paths)
    index, overrides = split_config(config)
    overrides = decode_values(overrides, ctx.decode)
    trial_id = tune.get_context().get_trial_id() or "local"
    name = trial_name(ctx.study, index, trial_id)
    key = trial_key(ctx.execution, index, trial_id)

    cfg: RunConfig | None = None
    cfg_error: BaseException | None = None
    try:
        cfg = apply_overrides(RunConfig.model_validate(ctx.base), {**overrides, "name": name}, f"trial {name}")
    except Exception as err:  # a sampled value the config refuses: record it, then fail
        cfg_error = err

    logger = None
    if ctx.env:
        os.environ.update(ctx.env)
    if ctx.cwd and os.path.isdir(ctx.cwd):
        os.chdir(ctx.cwd)
    if ctx.cpus:
        os.environ["DMLCORE_NUM_CPUS"] = f"{ctx.cpus:g}"
    if ctx.tracking_uri and ctx.experiment_id:
        tracker = tracking.Tracker(ctx.tracking_uri)
        from dmlcore.oodml.published import split_tags

        tags = {
            tracking.TAG_PARENT: ctx.parent_run_id,
            tracking.TAG_STUDY: ctx.study,
            tracking.TAG_EXECUTION: ctx.execution,
            tracking.TAG_ROLE: "trial",
            tracking.TAG_TRIAL_ID: trial_id,
            **({tracking.TAG_TRIAL_INDEX: index} if index is not None else {}),
            **ctx.tags,
            **tracking.host_tags(),
            **(split_tags(cfg) if cfg is not None else {}),
        }
        params_source: Any = cfg if cfg is not None else _FlatOnly(overrides)
        logger, previous = tracking.open_run(
            tracker, ctx.experiment_id, name, params_source, {k: v for k, v in tags.items() if v is not None}, key
        )
        if previous == "FINISHED" and cfg_error is None:
            # Finished before the driver went down (Tune had not saved that yet): do not
            # train again; hand Tune the metrics MLflow already has.
            tune.report(TuneReporter(None, ctx.required).tune_metrics(logger.last_metrics))
            return
    if cfg_error is not None:
        if logger is not None:
            logger.fail(cfg_error)
        raise cfg_error

    resume = None
    ckpt = tune.get_checkpoint()
    if ckpt is not None:
        from dmlcore.train import load_checkpoint

        with ckpt.as_directory() as d:
            resume = dict(load_checkpoint(Path(d) / "checkpoint.pt"))
    elif key in ctx.resume_from:  # --resume: where the previous attempt of this trial stopped
        from dmlcore.train import load_checkpoint

        resume = dict(load_checkpoint(ctx.resume_from[key]))
    if resume is not None:
        if logger is not None:  # where this attempt picks up (a restarted trial or a resumed study)
            logger.tracker.set_tags(logger.run_id, {"resumed_from_epoch": int(resume.get("epoch", 0))})

    reporter = TuneReporter(logger, ctx.required)
    # SystemExit: Tune stopped the trial (scheduler, or the study is shutting down). The
    # trial writes no status then: the driver settles it (_settle_mlflow: FINISHED for an
    # early stop, KILLED for an interrupted study). Tune does not wait for a stopped
    # trial's thread, so a status written here could land after the driver's and undo it.
    with tracking.recording(
        logger, killed=(SystemExit,), killed_status=None,
        on_tracking_error=lambda: _log.exception("could not record the failure in MLflow"),
    ), conventions.system_metrics(logger and logger.run_id, ctx.tracking_uri):
        from dmlcore.train import Trainer

        from .models import log_selected_model
        from .pictures import log_pictures

        if fit is not None:  # a multi-worker trial: its rank 0 logs the split, the model and the pictures
            fit(cfg, resume, logger, trial_id)
            return
        trainer = Trainer(cfg, reporter=reporter, progress=False)
        if logger is not None:  # the split as the run's dataset inputs (sweeper/conventions.py)
            conventions.log_split(logger.tracker, logger.run_id, trainer.build().data)
        result = trainer.fit(resume=resume)
        if not reporter.reported and logger is not None:
            # killed after its last checkpoint, before its run was FINISHED: nothing was left
            # to train, so hand Tune the metrics MLflow has (best_epoch included), as above
            tune.report(reporter.tune_metrics(logger.last_metrics))
        log_selected_model(logger, trainer, result)  # the selected epoch's weights (never fails the trial)
        log_pictures(trainer, result, logger)  # never raises (eval.pictures: false: nothing)


class _FlatOnly:
    """Stands in for a RunConfig that failed to build: its params are the overrides."""

    def __init__(self, flat: Mapping[str, Any]):
        self.flat = dict(flat)

    def to_flat(self) -> dict[str, Any]:
        return self.flat

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.flat, sort_keys=True)


# ----------------------------------------------------------------------------- outcome
TRIAL_STATUSES = ("done", "stopped", "failed", "pending", "running", "interrupted", "not started")
"""Every status a trial of an outcome can have (parent-run tags ``trials_<status>``, spaces as ``_``)."""

@dataclass
class TrialOutcome:
    trial_id: str
    index: int | None
    overrides: dict[str, Any]
    status: str  # done, stopped, failed, pending, running
    value: float | None = None
    best_epoch: int | None = None
    error: str | None = None
    run_id: str | None = None
    metrics: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"#{self.index:03d}" if self.index is not None else self.trial_id


@dataclass
class StudyOutcome:
    study: str
    execution: str
    exec_dir: Path
    metric: str
    mode: str
    keys: list[str]
    trials: list[TrialOutcome] = field(default_factory=list)
    tracking_uri: str | None = None
    experiment_id: str | None = None
    parent_run_id: str | None = None
    analysis_paths: list[Path] = field(default_factory=list)
    interrupted: bool = False
    total: int = 0
    resume_command: str | None = None
    """The command that continues this execution (``sweeper run PATH --resume EXECUTION ...``)."""

    def ranked(self) -> list[TrialOutcome]:
        ok = [t for t in self.trials if t.status in ("done", "stopped") and t.value is not None and math.isfinite(t.value)]
        return sorted(ok, key=lambda t: t.value, reverse=self.mode == "max")

    @property
    def failed(self) -> list[TrialOutcome]:
        return [t for t in self.trials if t.status == "failed"]

    @property
    def best(self) -> TrialOutcome | None:
        r = self.ranked()
        return r[0] if r else None

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for t in self.trials:
            out[t.status] = out.get(t.status, 0) + 1
        if self.total > len(self.trials):
            out["not started"] = self.total - len(self.trials)
        return out


# ----------------------------------------------------------------------------- tune pieces
def _trial_dirname(trial: Any) -> str:
    return f"trial_{trial.trial_id}"


def _trial_name(trial: Any) -> str:
    index, _ = split_config(trial.config or {})
    return f"t{index:03d}" if index is not None else f"trial_{trial.trial_id}"


def _scalar(v: Any) -> bool:
    return v is None or isinstance(v, (bool, int, float, str))


def optuna_space(study: ResolvedStudy) -> dict[str, Any]:
    """The search space as Optuna distributions (non-scalar categorical values as JSON text)."""
    import optuna

    space = {}
    for key, prm in study.spec.search.space.items():
        if isinstance(prm, FloatParam):
            space[key] = optuna.distributions.FloatDistribution(prm.low, prm.high, log=prm.log, step=prm.step)
        elif isinstance(prm, IntParam):
            space[key] = optuna.distributions.IntDistribution(prm.low, prm.high, log=prm.log, step=prm.step)
        elif isinstance(prm, CategoricalParam):
            # Optuna choices must be None/bool/int/float/str: encode anything else as JSON
            choices = [v if _scalar(v) else json.dumps(v, sort_keys=True) for v in prm.values]
            space[key] = optuna.distributions.CategoricalDistribution(choices)
    return space


def decode_map(study: ResolvedStudy) -> dict[str, dict[str, Any]]:
    """key -> {JSON text: value} for the non-scalar categorical values of a search."""
    out: dict[str, dict[str, Any]] = {}
    if study.spec.search is None:
        return out
    for key, prm in study.spec.search.space.items():
        if isinstance(prm, CategoricalParam):
            enc = {json.dumps(v, sort_keys=True): v for v in prm.values if not _scalar(v)}
            if enc:
                out[key] = enc
    return out


def decode_values(overrides: Mapping[str, Any], decode: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Undo :func:`optuna_space`'s JSON encoding of lists/dicts in a sampled config."""
    out = dict(overrides)
    for key, table in decode.items():
        v = out.get(key)
        if isinstance(v, str) and v in table:
            out[key] = table[v]
    return out


def decode_sample(study: ResolvedStudy, overrides: dict[str, Any]) -> dict[str, Any]:
    return decode_values(overrides, decode_map(study))


def required_metrics(study: ResolvedStudy) -> dict[str, str]:
    req: dict[str, str] = {}
    if study.spec.search is not None:
        req[study.spec.metric] = study.spec.mode
    if study.spec.scheduler is not None:
        s = study.spec.scheduler
        req[s.metric or study.spec.metric] = s.mode or study.spec.mode
    return req


def build_tune_config(
    study: ResolvedStudy,
    trials: list[Any] | None = None,
    evaluated: list[tuple[dict[str, Any], float]] | None = None,
    store: Any = None,
    attempt: int = 0,
) -> tuple[Any, Any]:
    """(TuneConfig, param_space) for a study: every grid trial (or just ``trials``); a
    search's samples (less the ``evaluated`` ones, given to Optuna as finished trials).
    With ``store`` (:class:`sweeper.optuna_store.OptunaStore`, prepared) the search asks
    and tells the persisted study instead: its finished trials are in it already, and the
    sampler's seed is ``search.seed + attempt`` (see :mod:`sweeper.optuna_store`)."""
    from ray import tune

    spec = study.spec
    search_alg = None
    scheduler = None
    if spec.search is not None:
        import optuna
        from ray.tune.search.optuna import OptunaSearch

        s = spec.search
        seed = s.seed + attempt if s.seed is not None and store is not None else s.seed
        if s.sampler == "tpe":
            kw = {"seed": seed}
            if s.startup_trials is not None:
                kw["n_startup_trials"] = s.startup_trials
            sampler = optuna.samplers.TPESampler(**kw)
        else:
            sampler = optuna.samplers.RandomSampler(seed=seed)
        evaluated = list(evaluated or [])
        used = len(evaluated)
        if store is not None:  # the persisted study: its finished trials used `counted` samples
            from .optuna_store import searcher_class

            search_alg = searcher_class()(
                space=optuna_space(study), metric=spec.metric, mode=spec.mode, sampler=sampler,
                storage=store.storage, study_name=store.name, execution=store.execution,
            )
            used = store.counted
        else:
            search_alg = OptunaSearch(
                space=optuna_space(study), metric=spec.metric, mode=spec.mode, sampler=sampler,
                points_to_evaluate=[p for p, _ in evaluated] or None,
                evaluated_rewards=[r for _, r in evaluated] or None,
            )
        param_space = None
        num_samples = max(s.samples - used, 0)
    else:
        points = [{"index": t.index, "overrides": t.overrides} for t in (study.trials if trials is None else trials)]
        param_space = {"point": tune.grid_search(points)}
        num_samples = 1
    if spec.scheduler is not None:
        from ray.tune.schedulers import AsyncHyperBandScheduler

        sc = spec.scheduler
        scheduler = AsyncHyperBandScheduler(
            time_attr="epoch",
            metric=sc.metric or spec.metric,
            mode=sc.mode or spec.mode,
            max_t=sc.max_t or study.base.train.epochs,
            grace_period=sc.grace_period,
            reduction_factor=sc.reduction_factor,
            brackets=sc.brackets,
        )
    from . import multi_worker

    # metric/mode are given to the searcher and the scheduler themselves, not to
    # TuneConfig: they may differ (ASHA on another metric) and Tune refuses both.
    tune_config = tune.TuneConfig(
        search_alg=search_alg,
        scheduler=scheduler,
        num_samples=num_samples,
        max_concurrent_trials=multi_worker.max_concurrent(spec),
        # a stopped multi-worker trial's actor cannot be reused (its driver is still in fit())
        reuse_actors=spec.resources.workers == 1,
        trial_name_creator=_trial_name,
        trial_dirname_creator=_trial_dirname,
    )
    return tune_config, param_space


def make_trainable(study: ResolvedStudy, ctx: TrialContext, exec_dir: Path | None = None) -> Any:
    """The Tune trainable with its resources; ``resources.workers > 1``: the multi-worker
    trial of :mod:`sweeper.multi_worker`, its Train runs stored in ``exec_dir``."""
    from ray import tune

    from . import multi_worker

    spec = study.spec
    res = multi_worker.trial_resources(spec.resources)
    if spec.resources.workers > 1:
        fn = tune.with_parameters(multi_worker.run_trial, ctx=ctx, resources=spec.resources.model_dump(),
                                  storage=str(exec_dir or storage_root(spec.name)), max_failures=spec.max_failures)
        return tune.with_resources(fn, res)
    return tune.with_resources(tune.with_parameters(run_trial, ctx=ctx), res)


# ----------------------------------------------------------------------------- executions
def storage_root(study_name: str, storage: str | Path | None = None) -> Path:
    """``<storage>`` (default ``./runs/<study>``) as an absolute path."""
    root = Path(storage) if storage is not None else Path("runs") / study_name
    return root.expanduser().resolve()


def new_execution_name(root: Path) -> str:
    base = time.strftime("%Y%m%d-%H%M%S")
    name, i = base, 1
    while (root / name).exists():
        i += 1
        name = f"{base}-{i}"
    return name


def find_execution(root: Path, name: str | None = None) -> Path:
    """The execution folder to resume: ``name`` or the latest one with a state file."""
    if name and name != "latest":
        d = root / name
        if not (d / STATE_FILE).is_file():
            known = sorted(p.parent.name for p in root.glob(f"*/{STATE_FILE}"))
            close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(
                f"--resume {name}: no study execution at {d}{hint}"
                + (f"; executions: {', '.join(known)}" if known else "")
            )
        return d
    found = sorted(root.glob(f"*/{STATE_FILE}"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise ConfigError(f"--resume: no earlier execution of this study under {root}")
    return found[-1].parent


def read_state(exec_dir: Path) -> dict[str, Any]:
    """An execution's ``sweeper.json`` (plain JSON: resume never unpickles anything)."""
    path = exec_dir / STATE_FILE
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(f"--resume: cannot read {path}: {err}") from None
    if not isinstance(state, dict) or not {"experiment_id", "parent_run_id", "tracking_uri"} <= set(state):
        raise ConfigError(f"--resume: {path} is not a sweeper execution state")
    return state


def _resume_uri(stored: str, given: str | None, source: str) -> str:
    """The tracking URI of a resumed execution. ``sweeper.json`` keeps it without its
    password; the full URI comes back from ``--tracking-uri`` or ``$MLFLOW_TRACKING_URI``
    when that is the same URI once redacted."""
    for cand in (given, os.environ.get("MLFLOW_TRACKING_URI")):
        if cand and tracking.redact_uri(cand) == stored:
            return cand
    if "***" in stored:
        raise ConfigError(
            f"{source}: this execution logs to {stored}, whose password is not stored; "
            "give the full URI again with --tracking-uri or MLFLOW_TRACKING_URI"
        )
    return stored


def _init_ray(address: str | None, num_cpus: int | None, verbose: bool, plugins: list[str] | None = None,
              workers: int = 1) -> bool:
    """Start or join Ray unless already initialised. Returns whether we started it.
    ``plugins``: module names shipped to every worker (runtime_env ``py_modules`` + ``$DML_PLUGINS``).
    ``workers``: the study's workers per trial (a local Ray gets what multi-worker trials need)."""
    import ray

    if ray.is_initialized():
        return False
    kw: dict[str, Any] = dict(include_dashboard=False, log_to_driver=verbose, logging_level=logging.WARNING)
    if plugins:
        from dmlcore import plugins as plugmod

        renv: dict[str, Any] = {"env_vars": {plugmod.ENV_VAR: ",".join(plugins)}}
        if plugmod.ship_paths(plugins):
            renv["py_modules"] = plugmod.ship_paths(plugins)
        kw["runtime_env"] = renv
    if address and address.startswith("ray://"):
        ray.init(address=address, **({"runtime_env": kw["runtime_env"]} if "runtime_env" in kw else {}))  # Ray Client
    elif address:
        ray.init(address=address, **kw)
    else:
        from . import multi_worker

        ray.init(num_cpus=num_cpus, **{**kw, **multi_worker.ray_init_kwargs(workers)})
    return True


def _quiet_tune(verbose: bool = False) -> None:
    # The new output engine prints an experiment banner even at verbose=0; the legacy
    # reporter at verbose=0 prints nothing, and our LiveView shows the progress. Tune also
    # logs every failed trial with its whole traceback (ERROR "Trial task failed ...");
    # the sweeper reports each failure as one line (live view, summary, MLflow tag
    # `error`) and keeps the traceback in the run's error.txt, so only --verbose shows them.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    level = logging.ERROR if verbose else logging.CRITICAL
    for name in ("ray.tune", "ray.train", "ray.air"):
        logging.getLogger(name).setLevel(level)


# ----------------------------------------------------------------------------- 1. plan
@dataclass
class RunPlan:
    """What one ``sweeper run`` will do, decided before anything starts or is written."""

    study: ResolvedStudy
    root: Path
    """The storage folder of the study (``runs/<study>``, absolute)."""
    execution: str
    uri: str
    resume: bool = False
    state: dict[str, Any] = field(default_factory=dict)
    """The execution's ``sweeper.json`` (resume) or the one to write."""
    address: str | None = None
    num_cpus: int | None = None
    custom_storage: bool = False
    earlier_runs: Any = field(default=None, repr=False, compare=False)
    """On resume: a future of the execution's child runs, listed in a thread while Ray starts
    and the preflight runs (:func:`prefetch_children`); None: listed when needed."""

    @property
    def exec_dir(self) -> Path:
        return self.root / self.execution

    @property
    def resume_command(self) -> str:
        from .hints import run_command

        return run_command(self.study.source, resume=self.execution,
                           storage=self.root if self.custom_storage else None)


def plan_run(
    study: ResolvedStudy,
    *,
    address: str | None = None,
    num_cpus: int | None = None,
    resume: str | bool | None = None,
    storage: str | Path | None = None,
    tracking_uri: str | None = None,
) -> RunPlan:
    """The execution to start or continue, its storage folder and tracking URI. Reads
    ``sweeper.json`` on resume; writes nothing. A changed study is refused here."""
    from .hints import flags_text, run_command

    root = storage_root(study.name, storage)
    custom = storage is not None and root != storage_root(study.name)
    if not resume:
        return RunPlan(study, root, new_execution_name(root), tracking_uri or tracking.default_tracking_uri(),
                       address=address, num_cpus=num_cpus, custom_storage=custom)
    exec_dir = find_execution(root, resume if isinstance(resume, str) else None)
    state = read_state(exec_dir)
    if state.get("fingerprint") != study.fingerprint():
        started = flags_text(bool(state.get("quick")), state.get("overrides") or {})
        raise ConfigError(
            f"{study.source}: the study (or its --set/--quick) changed since execution "
            f"'{exec_dir.name}' started (it ran with {started}); run without --resume to start a new execution: "
            + run_command(study.source, quick=study.quick, overrides=study.overrides, storage=root if custom else None)
        )
    uri = _resume_uri(state["tracking_uri"], tracking_uri, study.source)
    return RunPlan(study, root, exec_dir.name, uri, resume=True, state=state, address=address,
                   num_cpus=num_cpus, custom_storage=custom)


# ----------------------------------------------------------------------------- 2. preflight
def preflight_context(plan: RunPlan) -> Any:
    from . import preflight

    return preflight.Context(plan.study, plan.root, plan.uri, address=plan.address, num_cpus=plan.num_cpus)


def check_plan(plan: RunPlan, only: Any = None) -> None:
    """The driver-side preflight (:mod:`sweeper.preflight`): raises ``PreflightError``."""
    from . import preflight

    preflight.ensure(preflight_context(plan), only)


# ----------------------------------------------------------------------------- 4. record (opening)
@dataclass
class Record:
    """The execution's MLflow side on the driver: the parent run and, on resume, the
    trials an earlier attempt finished. The only place the driver writes to MLflow
    (with :func:`_settle_mlflow` and :func:`_finish_parent` at the end)."""

    tracker: tracking.Tracker
    experiment_id: str
    parent_run_id: str
    earlier: list[TrialOutcome] = field(default_factory=list)
    """Trials finished by an earlier attempt (resume): not run again."""
    resume_from: dict[str, str] = field(default_factory=dict)
    """trial_key -> latest checkpoint of an unfinished trial of an earlier attempt."""
    evaluated: list[tuple[dict[str, Any], float]] = field(default_factory=list)
    """A search's finished points (Optuna encoding) and their metric, for the searcher."""
    optuna: Any = None
    """A search's persisted Optuna study (:class:`sweeper.optuna_store.OptunaStore`), once launched."""


def open_record(plan: RunPlan) -> Record:
    """Create the parent run and ``sweeper.json`` (a new execution) or reopen them (resume)."""
    study, spec = plan.study, plan.study.spec
    tracker = tracking.Tracker(plan.uri)
    exec_dir = plan.exec_dir
    if plan.resume:
        state = plan.state
        rec = Record(tracker, state["experiment_id"], state["parent_run_id"])
        tracker.set_status(rec.parent_run_id, "RUNNING")
        state["resumes"] = int(state.get("resumes", 0)) + 1
        tracker.set_tags(rec.parent_run_id, {"resumes": state["resumes"]})
        state.update(executions.running_fields(spec.metric, spec.mode, study.size))  # status/driver for `sweeper ls`
        state.update(optuna_store.state_entries(optuna_store.for_execution(study, plan.execution, exec_dir, state)))
        _write_state(exec_dir, state)
        _read_earlier(plan, rec)
        return rec
    exec_dir.mkdir(parents=True)
    experiment_id = tracker.experiment_id(spec.name)
    conventions.set_experiment_tags(tracker, experiment_id, conventions.experiment_tags(study))
    parent_tags = {
        tracking.TAG_STUDY: spec.name,
        tracking.TAG_EXECUTION: plan.execution,
        tracking.TAG_ROLE: "study",
        "study_file": study.source,
        "study_size": study.size,
        "storage": str(exec_dir),
        "fingerprint": study.fingerprint(),
        **({"quick": "true"} if study.quick else {}),
        **tracking.version_tags(),
        **tracking.git_info(),
        **tracking.host_tags(),
        **conventions.source_tags(study.source),
    }
    parent_run_id = tracker.create_run(experiment_id, f"{spec.name}/{plan.execution}", parent_tags)
    if spec.description:
        tracker.set_tags(parent_run_id, {"mlflow.note.content": spec.description})
    tracker.log_params(parent_run_id, _study_params(study))
    if study.path is not None and study.path.is_file():
        tracker.log_text(parent_run_id, study.path.read_text(), "study.yaml")
    tracker.log_text(parent_run_id, study.base.to_yaml(), "base_config.yaml")
    if study.trials:
        tracker.log_text(
            parent_run_id,
            json.dumps([{"index": t.index, **t.overrides} for t in study.trials], indent=1, default=str),
            "trials.json",
        )
    plan.state = {
        "study": spec.name,
        "execution": plan.execution,
        "study_file": study.source,
        "fingerprint": study.fingerprint(),
        "quick": study.quick,
        "overrides": study.overrides,
        "storage": str(plan.root) if plan.custom_storage else None,
        "tracking_uri": tracking.redact_uri(plan.uri),  # never a password on disk
        "experiment_id": experiment_id,
        "parent_run_id": parent_run_id,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        **executions.running_fields(spec.metric, spec.mode, study.size),  # status/driver for `sweeper ls`
    }
    plan.state.update(optuna_store.state_entries(optuna_store.for_execution(study, plan.execution, exec_dir)))
    if study.is_search:
        tracker.set_tags(parent_run_id, {k: plan.state[k] for k in (optuna_store.STATE_URL, optuna_store.STATE_STUDY)})
    _write_state(exec_dir, plan.state)
    return Record(tracker, experiment_id, parent_run_id)


def _write_state(exec_dir: Path, state: Mapping[str, Any]) -> None:
    tmp = exec_dir / (STATE_FILE + ".tmp")
    tmp.write_text(json.dumps(state, indent=2, default=str))
    os.replace(tmp, exec_dir / STATE_FILE)


def latest_checkpoint(exec_dir: Path, trial_id: str, logged_epoch: int | None = None) -> Path | None:
    """The newest ``checkpoint.pt`` Tune kept for trial ``trial_id`` under ``exec_dir``
    (any attempt's experiment folder); a torch file, read with ``weights_only=True``.

    A multi-worker trial's are its Train run's, ``<execution>/train-<trial id>/checkpoint_<epoch>/``
    (:mod:`sweeper.multi_worker`); its workers may have written a checkpoint of an epoch
    MLflow has not got yet, so with ``logged_epoch`` (the last epoch in MLflow) only those
    up to that epoch count."""
    return newest_checkpoint(checkpoint_candidates(exec_dir).get(trial_id, []), logged_epoch)


def checkpoint_index(exec_dir: Path) -> dict[str, Path]:
    """trial_id -> its newest ``checkpoint.pt`` under ``exec_dir`` (:func:`checkpoint_candidates`)."""
    found = {tid: newest_checkpoint(c) for tid, c in checkpoint_candidates(exec_dir).items()}
    return {tid: p for tid, p in found.items() if p is not None}


def checkpoint_candidates(exec_dir: Path) -> dict[str, list[tuple[int, float, Path, bool]]]:
    """trial_id -> every ``checkpoint.pt`` kept for it under ``exec_dir`` as ``(epoch, mtime,
    path, of_a_train_run)`` (Tune's ``trial_<id>`` folders of any attempt, a multi-worker
    trial's ``train-<id>`` run), from ONE walk of the folder: :func:`latest_checkpoint` for
    every trial at once (a resume of thousands of trials does not walk the storage once per
    trial)."""
    found: dict[str, list[tuple[int, float, Path, bool]]] = {}
    for ck in exec_dir.rglob("checkpoint_*/checkpoint.pt"):
        tdir = ck.parent.parent.name
        if tdir.startswith("trial_"):
            tid, train = tdir[len("trial_"):], False
        elif tdir.startswith("train-"):
            tid, train = tdir[len("train-"):], True
        else:
            continue
        try:
            found.setdefault(tid, []).append((int(ck.parent.name.rsplit("_", 1)[-1]), ck.stat().st_mtime, ck, train))
        except (ValueError, OSError):
            continue
    return found


def newest_checkpoint(found: list[tuple[int, float, Path, bool]], logged_epoch: int | None = None) -> Path | None:
    """The newest of one trial's :func:`checkpoint_index` entries; a Train run's only up to
    ``logged_epoch`` (the epoch MLflow has) when given."""
    ok = [c for c in found if not (c[3] and logged_epoch is not None and c[0] > logged_epoch)]
    return max(ok, key=lambda c: c[:2])[2] if ok else None


def _search_point(study: ResolvedStudy, params: Mapping[str, str]) -> dict[str, Any] | None:
    """A finished search trial's point in Optuna's encoding, from its MLflow params (text)."""
    point: dict[str, Any] = {}
    for key, prm in study.spec.search.space.items():
        text = params.get(key)
        if text is None:
            return None
        try:
            if isinstance(prm, FloatParam):
                point[key] = float(text)
            elif isinstance(prm, IntParam):
                point[key] = int(text)
            else:
                match = [v for v in prm.values if tracking.stringify(v) == text]
                if not match:
                    return None
                v = match[0]
                point[key] = v if _scalar(v) else json.dumps(v, sort_keys=True)
        except ValueError:
            return None
    return point


def prefetch_children(plan: RunPlan) -> None:
    """On resume, start listing the execution's child runs (one paged ``search_runs``) in a
    thread, so that on a store of thousands of runs the listing overlaps Ray's start-up and
    the preflight instead of following them (issue 20: the time to the first new trial).
    Its result, or its error, is taken by :func:`_read_earlier`."""
    if not plan.resume or plan.earlier_runs is not None:
        return
    from concurrent.futures import ThreadPoolExecutor

    exp, parent = plan.state["experiment_id"], plan.state["parent_run_id"]
    pool = ThreadPoolExecutor(1, thread_name_prefix="sweeper-resume-listing")
    plan.earlier_runs = pool.submit(lambda: tracking.Tracker(plan.uri).children(exp, parent))
    pool.shutdown(wait=False)


def _read_earlier(plan: RunPlan, rec: Record) -> None:
    """What an earlier attempt left, from MLflow (the child runs) and the checkpoints:
    finished trials are kept, unfinished ones continue from their latest checkpoint."""
    study, spec = plan.study, plan.study.spec
    by_index = {t.index: t for t in study.trials}
    checkpoints: dict[str, list[tuple[int, float, Path, bool]]] | None = None  # built on the first unfinished run, once
    listed = plan.earlier_runs
    runs = listed.result() if listed is not None and rec.parent_run_id == plan.state.get("parent_run_id") \
        else rec.tracker.children(rec.experiment_id, rec.parent_run_id)
    for run in runs:
        tags, metrics = run.data.tags, run.data.metrics
        key = tags.get(tracking.TAG_TRIAL_KEY)
        tid = tags.get(tracking.TAG_TRIAL_ID, "")
        try:
            index = int(tags[tracking.TAG_TRIAL_INDEX]) if tracking.TAG_TRIAL_INDEX in tags else None
        except ValueError:
            index = None
        if run.info.status != "FINISHED":
            if checkpoints is None and tid and index is not None:
                checkpoints = checkpoint_candidates(plan.exec_dir)
            logged = int(metrics.get("epoch", 0))
            ck = newest_checkpoint(checkpoints.get(tid, []), logged) if checkpoints is not None and tid and index is not None else None
            if ck is not None and key:
                rec.resume_from[key] = str(ck)
            continue
        if study.is_search:
            point = _search_point(study, run.data.params)
            if point is None:
                continue
            over = decode_sample(study, dict(point))
            value = metrics.get(spec.metric)
            if value is None or not math.isfinite(value):
                continue  # Optuna cannot score it: proposed again
            rec.evaluated.append((point, float(value)))
        elif index in by_index:
            over = dict(by_index[index].overrides)
        else:
            continue
        v = metrics.get(f"best/{spec.metric}", metrics.get(spec.metric))
        be = metrics.get("best_epoch")
        rec.earlier.append(TrialOutcome(
            tid, index, over, "stopped" if tags.get("early_stopped") == "true" else "done",
            float(v) if v is not None and math.isfinite(v) else None,
            int(be) if be is not None else None, run_id=run.info.run_id, metrics=dict(metrics),
        ))


# ----------------------------------------------------------------------------- 3. launch
_STOP_SIGNALS = ("SIGTERM", "SIGHUP")


@contextlib.contextmanager
def stop_signals_as_ctrl_c() -> Iterator[list[int]]:
    """SIGTERM and SIGHUP do what Ctrl-C does (Tune saves, stops the trials; the runs end
    KILLED; Ray is shut down): each is handed to the SIGINT handler in place (Tune's
    while it runs, else Python's, which raises KeyboardInterrupt). Yields the signals
    received."""
    import signal
    import threading

    got: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield got
        return

    def handler(signum: int, frame: Any) -> None:
        got.append(signum)
        h = signal.getsignal(signal.SIGINT)
        if callable(h) and h is not signal.default_int_handler:
            h(signal.SIGINT, frame)
        else:
            raise KeyboardInterrupt

    before = {}
    for name in _STOP_SIGNALS:
        sig = getattr(signal, name, None)
        if sig is not None:
            before[sig] = signal.signal(sig, handler)
    try:
        yield got
    finally:
        for sig, h in before.items():
            signal.signal(sig, h)


def launch(plan: RunPlan, rec: Record, ctx: TrialContext, view: Any) -> tuple[Any, bool]:
    """Run what is left of the execution in a fresh Tune experiment: (results, interrupted).

    A resumed execution never goes through ``Tuner.restore``: that unpickles the storage
    folder's ``tuner.pkl`` and trial states, files anyone able to write there could have
    crafted. The remaining trials come from MLflow and ``sweeper.json`` (JSON), the
    checkpoints are torch files read with ``weights_only=True``."""
    from ray import tune

    from . import live as livemod

    study, spec = plan.study, plan.study.spec
    done = {t.index for t in rec.earlier if t.index is not None}
    trials = [t for t in study.trials if t.index not in done] if not study.is_search else None
    attempt = int(plan.state.get("resumes", 0))
    rec.optuna = optuna_store.for_execution(study, plan.execution, plan.exec_dir, plan.state)
    if rec.optuna is not None:  # reconcile the stored study with what MLflow finished
        finished = {trial_key(plan.execution, None, t.trial_id): t.metrics.get(spec.metric) for t in rec.earlier}
        rec.optuna.prepare("maximize" if spec.mode == "max" else "minimize", optuna_space(study),
                           {k: v for k, v in finished.items() if isinstance(v, (int, float))}, rec.evaluated)
    if (trials is not None and not trials) or (rec.optuna is not None and spec.search.samples <= rec.optuna.counted):
        return None, False
    tune_config, param_space = build_tune_config(study, trials, rec.evaluated, rec.optuna, attempt)
    from . import multi_worker

    many = spec.resources.workers > 1
    run_config = tune.RunConfig(
        name=plan.execution if attempt == 0 else f"resume-{attempt}",
        storage_path=str(plan.root if attempt == 0 else plan.exec_dir),
        # a multi-worker trial's retries are its Train run's (all workers, from its checkpoint)
        failure_config=tune.FailureConfig(max_failures=spec.max_failures if spec.resources.workers == 1 else 0),
        checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
        # a multi-worker trial's epochs are logged by the driver, when Tune takes them
        callbacks=[livemod.LiveCallback(), *([multi_worker.EpochLogCallback()] if many else [])],
        verbose=0,
    )
    _lean_tune()
    tuner = tune.Tuner(make_trainable(study, ctx, plan.exec_dir), param_space=param_space, tune_config=tune_config,
                       run_config=run_config)
    with view, no_forced_state_sync(), multi_worker.logging_epochs(rec.tracker if many else None):
        try:
            return _fit(tuner)
        except KeyboardInterrupt:
            return None, True


def _lean_tune() -> None:
    """What Tune writes per trial beyond what the sweeper uses (issue 20): its default
    CSV/JSON/TensorBoard logger callbacks write ``params.json``, ``params.pkl``,
    ``result.json``, ``progress.csv`` and an events file into every trial folder on every
    result, and ``tuner.fit`` reads every trial's ``result.json`` back into a DataFrame at
    the end. The metrics are in MLflow and the sweeper reads neither, so they are off
    unless ``TUNE_DISABLE_AUTO_CALLBACK_LOGGERS`` is set (``=0`` brings them back).
    Checkpoints are unchanged (``CheckpointConfig(num_to_keep=1)``); for the experiment
    state see :func:`no_forced_state_sync`."""
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")


@contextlib.contextmanager
def no_forced_state_sync() -> Iterator[bool]:
    """Tune without its experiment-state write on every trial checkpoint (issue 20).

    With ``CheckpointConfig(num_to_keep=1)`` Tune's ``_ExperimentCheckpointManager`` is
    built with ``sync_every_n_trial_checkpoints=1`` (ray/tune/execution/tune_controller.py,
    ``_create_checkpoint_manager``), so every checkpoint any trial reports forces a full
    experiment-state snapshot: all trials serialised into one JSON file (~23 KB per trial
    measured here: 13 MB at 560 trials), an O(trials) write per checkpoint and O(trials^2)
    over a study. The snapshot only serves ``Tuner.restore``, which the sweeper never uses
    (resume reads MLflow and the checkpoint files, :func:`_read_earlier`); Tune's periodic
    snapshot (``TUNE_GLOBAL_CHECKPOINT_S``, auto-paced to ~5 % of the driver's time) and
    the one at the end stay. While the context is active the per-checkpoint trigger
    (``on_trial_checkpoint``) is a no-op; yields whether it could be switched off (False
    when this Ray has no such hook: nothing is changed then)."""
    try:
        from ray.tune.execution.experiment_state import _ExperimentCheckpointManager as manager
    except ImportError:  # pragma: no cover - another Ray layout
        yield False
        return
    hook = manager.__dict__.get("on_trial_checkpoint")
    if hook is None:  # pragma: no cover
        yield False
        return
    manager.on_trial_checkpoint = lambda self, trial: None
    try:
        yield True
    finally:
        manager.on_trial_checkpoint = hook


# ----------------------------------------------------------------------------- the run
def run_study(
    study: ResolvedStudy,
    *,
    address: str | None = None,
    num_cpus: int | None = None,
    resume: str | bool | None = None,
    storage: str | Path | None = None,
    tracking_uri: str | None = None,
    console: Any = None,
    live: bool | None = None,
    verbose: bool = False,
    analyses: bool = True,
) -> StudyOutcome:
    """Run (or, with ``resume``, continue) a study: plan -> preflight -> launch -> record.
    Returns its :class:`StudyOutcome`."""
    from rich.console import Console

    console = console or Console()
    # 1. plan: which execution, where; nothing written
    plan = plan_run(study, address=address, num_cpus=num_cpus, resume=resume, storage=storage,
                    tracking_uri=tracking_uri)
    prefetch_children(plan)
    if resume and tracking_uri and tracking.redact_uri(tracking_uri) != tracking.redact_uri(plan.uri):
        console.print(f"[yellow]note:[/] resuming with the execution's tracking URI {tracking.redact_uri(plan.uri)}",
                      soft_wrap=True)
    if address and tracking.sqlite_path(plan.uri) is not None:
        console.print(
            "[yellow]note:[/] trials on other nodes cannot write to the local SQLite store "
            f"{plan.uri}; set MLFLOW_TRACKING_URI to a tracking server for a multi-node cluster",
            soft_wrap=True,
        )
    # 2. preflight: before Ray starts (a local run) or once joined (a cluster's nodes)
    _quiet_tune(verbose)
    from dmlcore import plugins as plugmod

    plugin_mods = plugmod.parse([*study.spec.plugins, *plugmod.env_plugins()])
    plugmod.load(plugin_mods, "plugins")
    if address is None:
        check_plan(plan)
    started_ray = _init_ray(address, num_cpus, verbose, plugin_mods, workers=study.spec.resources.workers)
    try:
        if address is not None:
            check_plan(plan)
        with stop_signals_as_ctrl_c():
            outcome = _launch_and_record(plan, console, live, analyses, plugin_mods)
    finally:
        if started_ray:
            import ray

            ray.shutdown()
    return outcome


def _launch_and_record(plan: RunPlan, console: Any, live: bool | None, analyses: bool,
                       plugin_mods: list[str] | None = None) -> StudyOutcome:
    from dmlcore import plugins as plugmod

    from . import live as livemod

    plugin_mods = list(plugin_mods or [])

    study, spec = plan.study, plan.study.spec
    rec = open_record(plan)  # 4a. record: the parent run
    if rec.earlier:
        console.print(f"resuming {plan.execution}: {len(rec.earlier)} of {study.size} trials finished earlier",
                      soft_wrap=True)
    ctx = TrialContext(
        study=spec.name,
        execution=plan.execution,
        base=study.base.to_dict(),
        metric=spec.metric,
        mode=spec.mode,
        required=required_metrics(study),
        tracking_uri=plan.uri,
        experiment_id=rec.experiment_id,
        parent_run_id=rec.parent_run_id,
        tags={**tracking.version_tags(), **tracking.git_info(), **conventions.source_tags(study.source)},
        decode=decode_map(study),
        env=tracking.forwarded_env(),
        cpus=float(spec.resources.cpu),
        cwd=os.getcwd(),
        resume_from=rec.resume_from,
        plugins=plugin_mods,
        plugin_paths=plugmod.search_paths(plugin_mods),
    )
    view = livemod.LiveView(
        spec.metric, spec.mode, study.varying_keys, study.size, console=console, live=live,
        title=f"{spec.name} · {plan.execution}",
        request={"CPU": float(spec.resources.cpu), "GPU": float(spec.resources.gpu)},
    )
    results, interrupted = launch(plan, rec, ctx, view)  # 3. launch

    # 4b. record: make MLflow agree with what happened, then the parent's summary
    outcome = _collect(study, view, results, plan.execution, plan.exec_dir, plan.uri, rec.experiment_id,
                       rec.parent_run_id, interrupted)
    known = {trial_key(plan.execution, t.index, t.trial_id) for t in outcome.trials}
    outcome.trials = sorted(
        [t for t in rec.earlier if trial_key(plan.execution, t.index, t.trial_id) not in known] + outcome.trials,
        key=lambda t: (t.index if t.index is not None else 10**9, t.trial_id),
    )
    outcome.resume_command = plan.resume_command
    outcome.interrupted = (
        interrupted
        or any(t.status in ("pending", "running", "interrupted") for t in outcome.trials)
        or len(outcome.trials) < study.size
    )
    _settle_mlflow(rec.tracker, outcome, ctx)
    if rec.optuna is not None:
        optuna_store.link_outcome(rec.optuna, outcome, rec.tracker)
    if analyses and not outcome.interrupted and spec.analyses:
        outcome.analysis_paths = _run_analyses(study, outcome, rec.tracker, console)
    _finish_parent(rec.tracker, outcome)
    try:  # the status, counts and best value `sweeper ls` shows without reading MLflow
        _write_state(plan.exec_dir, {**plan.state, **executions.summary_fields(outcome)})
    except OSError as err:
        _log.warning("could not write the execution summary: %s", err)
    return outcome


def _fit(tuner: Any) -> tuple[Any, bool]:
    """``tuner.fit()``, and whether it ended because of SIGINT (Ctrl-C).

    Tune catches the first SIGINT itself (saves the experiment, stops the trials, returns
    normally) and then puts the previous handler back; any other ending leaves Tune's
    handler installed. So "the previous handler is back" means "interrupted".
    """
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return tuner.fit(), False
    before = signal.getsignal(signal.SIGINT)
    try:
        results = tuner.fit()
        after = signal.getsignal(signal.SIGINT)
        watched = os.environ.get("TUNE_DISABLE_SIGINT_HANDLER", "0") != "1"
        return results, bool(watched and after is before)
    finally:
        signal.signal(signal.SIGINT, before)


def _study_params(study: ResolvedStudy) -> dict[str, str]:
    spec = study.spec
    out: dict[str, Any] = {
        "study.metric": spec.metric,
        "study.mode": spec.mode,
        "study.size": study.size,
        "study.seeds": spec.seeds,
        "study.resources.cpu": spec.resources.cpu,
        "study.resources.gpu": spec.resources.gpu,
        "study.resources.workers": spec.resources.workers,
        "study.max_concurrent": spec.max_concurrent,
        "study.quick": study.quick,
    }
    for k, v in spec.axes.items():
        out[f"axes.{k}"] = v
    for gi, group in enumerate(spec.zip):
        for k, v in group.items():
            out[f"zip{gi}.{k}"] = v
    if spec.search is not None:
        out["search.samples"] = spec.search.samples
        out["search.sampler"] = spec.search.sampler
        for k, prm in spec.search.space.items():
            out[f"search.{k}"] = prm.model_dump(exclude_none=True)
    if spec.scheduler is not None:
        out["scheduler"] = spec.scheduler.model_dump(exclude_none=True)
    return {k: tracking.stringify(v) for k, v in out.items()}


def _collect(study, view, results, execution, exec_dir, uri, experiment_id, parent_run_id,
             interrupted: bool = False) -> StudyOutcome:
    outcome = StudyOutcome(
        study=study.name, execution=execution, exec_dir=exec_dir, metric=study.spec.metric,
        mode=study.spec.mode, keys=study.varying_keys, tracking_uri=uri,
        experiment_id=experiment_id, parent_run_id=parent_run_id, total=study.size,
    )
    rows = list(view.rows.values())
    if not rows and results is not None:  # no live events (e.g. Ray Client): use the ResultGrid
        for r in results:
            cfg = r.config or {}
            index, over = split_config(cfg)
            tid = str((r.metrics or {}).get("trial_id", Path(r.path).name if r.path else "?"))
            status = "failed" if r.error else ("done" if "best_epoch" in (r.metrics or {}) else "stopped")
            v = (r.metrics or {}).get(f"best/{study.spec.metric}", (r.metrics or {}).get(study.spec.metric))
            outcome.trials.append(
                TrialOutcome(tid, index, over, status, v, (r.metrics or {}).get("best_epoch"),
                             tracking.error_line(r.error) if r.error else None, metrics=public_metrics(r.metrics or {}))
            )
        return outcome
    for row in rows:
        lr = row.last_result or {}
        v = lr.get(f"best/{study.spec.metric}", lr.get(study.spec.metric))
        v = float(v) if isinstance(v, (int, float)) and math.isfinite(v) else None
        be = lr.get("best_epoch")
        status = "running" if row.status in ("retrying", "paused") else row.status
        if status in ("stopped", "running") and interrupted:
            status = "interrupted"  # stopped by Ctrl-C, not by the scheduler: resume continues it
        outcome.trials.append(
            TrialOutcome(row.trial_id, row.index, decode_sample(study, row.overrides), status, v,
                         int(be) if isinstance(be, (int, float)) else None, row.error, metrics=public_metrics(lr))
        )
    outcome.trials.sort(key=lambda t: (t.index if t.index is not None else 10**9, t.trial_id))
    return outcome


def public_metrics(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """A trial's Tune result without the sweeper's private keys (``_sweeper_*``: what a
    multi-worker trial hands its driver to log, :mod:`sweeper.multi_worker`)."""
    return {k: v for k, v in metrics.items() if not str(k).startswith("_sweeper_")}


def _settle_mlflow(tracker: tracking.Tracker, outcome: StudyOutcome, ctx: TrialContext) -> None:
    """Make MLflow agree with Tune: failed trials FAILED (with their error), early-stopped
    trials FINISHED, runs left RUNNING by a vanished trial KILLED."""
    try:
        children = tracker.children(outcome.experiment_id, outcome.parent_run_id)
    except Exception as err:  # tracking trouble must not lose the study's outcome
        _log.warning("could not read the child runs: %s", err)
        return
    by_key = {r.data.tags.get(tracking.TAG_TRIAL_KEY): r for r in children}
    keys = set()
    for t in outcome.trials:
        key = trial_key(outcome.execution, t.index, t.trial_id)
        keys.add(key)
        run = by_key.get(key)
        if run is not None:
            t.run_id = run.info.run_id
        try:
            if t.status == "failed":
                if run is None:  # died before it could open its run: record it anyway
                    cfg = None
                    try:
                        cfg = apply_overrides(RunConfig.model_validate(ctx.base), t.overrides)
                    except Exception:
                        cfg = _FlatOnly(t.overrides)
                    tags = {
                        tracking.TAG_PARENT: outcome.parent_run_id, tracking.TAG_STUDY: outcome.study,
                        tracking.TAG_EXECUTION: outcome.execution, tracking.TAG_ROLE: "trial",
                        tracking.TAG_TRIAL_ID: t.trial_id, **ctx.tags,
                        **({tracking.TAG_TRIAL_INDEX: t.index} if t.index is not None else {}),
                    }
                    logger, _ = tracking.open_run(
                        tracker, outcome.experiment_id, trial_name(outcome.study, t.index, t.trial_id), cfg, tags, key
                    )
                    t.run_id = logger.run_id
                    logger.fail(t.error or "trial failed")
                elif run.info.status != "FAILED" or not run.data.tags.get(tracking.TAG_ERROR):
                    tracking.RunLogger(tracker, run.info.run_id).fail(t.error or "trial failed")
            elif t.status in ("done", "stopped") and run is not None and run.info.status != "FINISHED":
                if t.status == "stopped":
                    tracker.set_tags(run.info.run_id, {"early_stopped": "true"})
                tracker.set_status(run.info.run_id, "FINISHED")
            elif t.status in ("pending", "running", "interrupted") and run is not None and run.info.status == "RUNNING":
                tracker.set_status(run.info.run_id, "KILLED")
        except Exception as err:
            _log.warning("could not settle the MLflow run of trial %s: %s", t.name, err)
    for key, run in by_key.items():
        if key not in keys and run.info.status == "RUNNING":
            try:
                tracker.set_tags(run.info.run_id, {"orphan": "true"})
                tracker.set_status(run.info.run_id, "KILLED")
            except Exception:
                pass


def call_run_analyses(fn: Any, study: ResolvedStudy | None, study_name: str, analyses: Any, runs_df: Any,
                      out_dir: Path, console: Any) -> list[Path]:
    """Call ``sweeper.analysis.run_analyses`` with whichever signature it has:
    ``(study_name, analyses, runs, out_dir, console)`` or ``(study, runs_df, out_dir)``."""
    import inspect

    params = inspect.signature(fn).parameters
    if "analyses" in params:
        kw = {"console": console} if "console" in params else {}
        out = fn(study_name, analyses, runs_df, out_dir, **kw)
    else:
        out = fn(study, runs_df, out_dir)
    return [Path(p) for p in (out or [])]


def analysis_module() -> Any:
    """``sweeper.analysis`` if it is there and has ``run_analyses``, else None."""
    import importlib

    try:
        mod = importlib.import_module("sweeper.analysis")
    except ModuleNotFoundError:
        return None
    return mod if hasattr(mod, "run_analyses") else None


def _run_analyses(study: ResolvedStudy, outcome: StudyOutcome, tracker: tracking.Tracker, console: Any) -> list[Path]:
    """Run the study's analyses on its child runs (skipped quietly without sweeper.analysis)."""
    mod = analysis_module()
    if mod is None:
        return []
    runs_df = load_runs_frame(tracker, outcome)
    out_dir = outcome.exec_dir / "analysis"
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        paths = call_run_analyses(mod.run_analyses, study, study.name, study.spec.analyses, runs_df, out_dir, console)
    except (ValueError, KeyError) as err:
        console.print(f"[red]analysis failed:[/] {err}", soft_wrap=True, highlight=False)
        return []
    for p in paths:
        try:
            if p.is_file():
                rel = p.parent.relative_to(out_dir) if p.is_relative_to(out_dir) else Path()
                tracker.log_artifact(outcome.parent_run_id, p, str(Path("analysis") / rel))
        except Exception as err:
            _log.warning("could not log %s: %s", p, err)
    return paths


def load_runs_frame(tracker: tracking.Tracker, outcome: StudyOutcome) -> Any:
    """The child runs of the execution as a DataFrame (sweeper.analysis.runs' format when present)."""
    try:
        from .analysis.runs import load_runs

        return load_runs(tracker.uri, parent_run_id=outcome.parent_run_id)
    except ImportError:
        import pandas as pd

        rows = []
        for r in tracker.children(outcome.experiment_id, outcome.parent_run_id):
            row = {"run_id": r.info.run_id, "status": r.info.status}
            row.update({f"params.{k}": v for k, v in r.data.params.items()})
            row.update({f"metrics.{k}": v for k, v in r.data.metrics.items()})
            row.update({f"tags.{k}": v for k, v in r.data.tags.items()})
            rows.append(row)
        return pd.DataFrame(rows)


def _finish_parent(tracker: tracking.Tracker, outcome: StudyOutcome) -> None:
    pid = outcome.parent_run_id
    try:
        c = outcome.counts()
        # every status, 0 when absent: a resumed execution overwrites the counts of the last one
        tracker.set_tags(pid, {f"trials_{k.replace(' ', '_')}": c.get(k, 0) for k in dict.fromkeys((*TRIAL_STATUSES, *c))})
        best = outcome.best
        if best is not None:
            tracker.log_metrics(pid, {f"best/{outcome.metric}": best.value}, step=0)
            tracker.set_tags(pid, {"best_trial": best.name, "best_run_id": best.run_id or ""})
        lines = ["rank,trial,run_id," + ",".join(outcome.keys) + f",{outcome.metric},best_epoch,status"]
        for i, t in enumerate(outcome.ranked(), 1):
            vals = [json.dumps(t.overrides.get(k, ""), default=str) for k in outcome.keys]
            lines.append(",".join([str(i), t.name, t.run_id or "", *vals, f"{t.value}", str(t.best_epoch or ""), t.status]))
        tracker.log_text(pid, "\n".join(lines) + "\n", "leaderboard.csv")
        if outcome.failed:
            tracker.log_text(
                pid, "\n".join(f"{t.name}\t{t.error}" for t in outcome.failed) + "\n", "failed_trials.tsv"
            )
        tracker.set_status(pid, "KILLED" if outcome.interrupted else "FINISHED")
    except Exception as err:
        _log.warning("could not finish the parent run %s: %s", pid, err)
