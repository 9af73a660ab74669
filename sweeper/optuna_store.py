"""The Optuna study of a search, persisted in an RDB storage (``sweeper dashboard`` reads it).

* Where: ``search.storage`` (any SQLAlchemy URL, e.g. ``postgresql://user@db/optuna``), by
  default an SQLite file beside the execution, ``<storage>/<execution>/optuna.db``. The
  Optuna study is named ``<study>/<execution>`` (one storage can hold many executions).
  ``sweeper.json`` keeps the URL (without its password) and the study name, so
  ``--resume`` and ``sweeper dashboard`` find them again.
* What: Ray Tune's ``OptunaSearch`` asks and tells through that study
  (``ray/tune/search/optuna/optuna_search.py``: ``storage=``, ``study_name=``,
  ``create_study(load_if_exists=True)``). Each Optuna trial carries the user attribute
  ``trial_key`` (the MLflow child run's tag of the same name, set when it is proposed);
  after the run the driver tags each MLflow run with its trial's number (``optuna_trial``).
* ``--resume`` reuses the same study, so every finished trial is in it once; the trials
  MLflow finished are *not* added again as evaluated points (that is only done once,
  for an execution that has no Optuna study yet: one started before the storage
  existed). A trial that was running at the Ctrl-C (state RUNNING in the storage) is
  reconciled with MLflow: if its run FINISHED it is told COMPLETE with the run's metric,
  otherwise it goes back to WAITING and Optuna hands it out again *first*, with the same
  number and parameters (it trains again from the start, in a new MLflow run; the old
  run stays KILLED). Fresh proposals come from the sampler re-seeded with
  ``search.seed + resumes``: the same seed would replay the first attempt's random
  proposals (RandomSampler, TPE's startup trials) and propose those points twice.
  The search's budget ``search.samples`` counts the trials in the storage that are
  COMPLETE or PRUNED; failed trials give their sample back, as before.

This module imports Optuna lazily (the preflight check registered here, too).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from dmlcore.config import ConfigError

from . import preflight, tracking

DB_FILE = "optuna.db"
STATE_URL = "optuna_storage"
STATE_STUDY = "optuna_study"
ATTR_TRIAL_KEY = "trial_key"
TAG_OPTUNA_TRIAL = "optuna_trial"


def default_url(exec_dir: Path) -> str:
    return f"sqlite:///{(Path(exec_dir) / DB_FILE).resolve()}"


def study_name(study: str, execution: str) -> str:
    return f"{study}/{execution}"


def resolve_url(configured: str | None, exec_dir: Path, state: Mapping[str, Any] | None = None) -> str:
    """The storage URL of an execution: on resume the one ``sweeper.json`` names (its
    password, never stored, comes back from ``search.storage`` when that is the same URL
    once redacted); else ``search.storage`` or the default SQLite file."""
    stored = (state or {}).get(STATE_URL)
    if stored:
        if configured and tracking.redact_uri(configured) == stored:
            return configured
        if "***" in stored:
            raise ConfigError(
                f"--resume: the Optuna storage {stored} needs its password: give the same URL in search.storage"
            )
        return stored
    return configured or default_url(exec_dir)


def _engine_kwargs(url: str) -> dict[str, Any]:
    # SQLite: wait for a lock instead of failing at once (a dashboard may be reading)
    if url.startswith("sqlite"):
        return {"connect_args": {"timeout": 30}}
    if url.startswith("postgres"):
        return {"pool_pre_ping": True, "connect_args": {"connect_timeout": 10}}
    return {"pool_pre_ping": True}


def open_storage(url: str) -> Any:
    """An ``optuna.storages.RDBStorage`` on ``url`` (tables created when new); one-line ConfigError."""
    import optuna

    try:
        return optuna.storages.RDBStorage(url, engine_kwargs=_engine_kwargs(url))
    except Exception as err:  # a bad URL, a missing driver, a database that does not answer
        raise ConfigError(
            f"search.storage: cannot open the Optuna storage {tracking.redact_uri(url)}: {tracking.error_line(err)}"
        ) from None


@dataclass
class OptunaStore:
    """One execution's Optuna study: where it is and what :meth:`prepare` found there."""

    url: str
    name: str
    execution: str = ""
    counted: int = 0
    """Trials in the storage that use up the budget (COMPLETE or PRUNED)."""
    requeued: int = 0
    """Trials that were RUNNING at the interruption and are handed out again first."""
    seeded: int = 0
    """Finished MLflow trials added as evaluated points (a study that had no storage yet)."""
    _storage: Any = field(default=None, repr=False)

    @property
    def storage(self) -> Any:
        if self._storage is None:
            self._storage = open_storage(self.url)
        return self._storage

    def study_id(self) -> int | None:
        try:
            return self.storage.get_study_id_from_name(self.name)
        except KeyError:  # RDBStorage: no study of that name
            return None

    def prepare(self, direction: str, space: Mapping[str, Any], finished: Mapping[str, float],
                evaluated: list[tuple[dict[str, Any], float]]) -> None:
        """Reconcile the stored study with MLflow before a (resumed) launch.

        ``finished``: trial_key -> metric of the runs MLflow has FINISHED; ``evaluated``:
        the same trials as (Optuna point, metric), used only when there is no study yet."""
        import optuna
        from optuna.trial import TrialState

        optuna.logging.set_verbosity(optuna.logging.WARNING)  # not "A new study created in RDB ..." per attempt
        if self.study_id() is None:
            study = optuna.create_study(storage=self.storage, study_name=self.name, direction=direction)
            for point, value in evaluated:  # an execution from before the storage: once, here
                study.add_trial(optuna.trial.create_trial(
                    state=TrialState.COMPLETE, value=value, params=point, distributions=dict(space)))
                self.seeded += 1
        sid = self.storage.get_study_id_from_name(self.name)
        for t in self.storage.get_all_trials(sid, deepcopy=False, states=(TrialState.RUNNING,)):
            value = finished.get(t.user_attrs.get(ATTR_TRIAL_KEY, ""))
            if value is not None and math.isfinite(value):
                self.storage.set_trial_state_values(t._trial_id, TrialState.COMPLETE, [value])
            else:
                self.storage.set_trial_state_values(t._trial_id, TrialState.WAITING)
        states = [t.state for t in self.storage.get_all_trials(sid, deepcopy=False)]
        self.counted = sum(s in (TrialState.COMPLETE, TrialState.PRUNED) for s in states)
        self.requeued = sum(s == TrialState.WAITING for s in states)

    def link(self, links: Mapping[str, str], tracker: Any) -> None:
        """After the run: ``links`` trial_key -> MLflow run id; each run gets the number of
        its Optuna trial (tag ``optuna_trial``). The other way, the Optuna trial's user
        attribute ``trial_key`` is the run's tag of that name (set when it was proposed: a
        finished Optuna trial cannot be changed)."""
        sid = self.study_id()
        if sid is None:
            return
        for t in self.storage.get_all_trials(sid, deepcopy=False):
            run_id = links.get(t.user_attrs.get(ATTR_TRIAL_KEY, ""))
            if run_id:
                tracker.set_tags(run_id, {TAG_OPTUNA_TRIAL: t.number})


def link_outcome(store: OptunaStore, outcome: Any, tracker: Any) -> None:
    """:meth:`OptunaStore.link` for a finished (or interrupted) run; a failure is one warning."""
    from .tune import trial_key

    links = {trial_key(outcome.execution, t.index, t.trial_id): t.run_id for t in outcome.trials if t.run_id}
    try:
        store.link(links, tracker)
    except Exception as err:  # the outcome matters more than the cross-links
        import logging

        logging.getLogger(__name__).warning("could not link the Optuna trials to their MLflow runs: %s",
                                            tracking.error_line(err))


def searcher_class() -> type:
    """Ray Tune's ``OptunaSearch`` that records each proposal's ``trial_key`` in the storage."""
    from ray.tune.search.optuna import OptunaSearch

    class PersistedOptunaSearch(OptunaSearch):
        def __init__(self, *args: Any, execution: str = "", **kw: Any):
            self._execution = execution
            super().__init__(*args, **kw)

        def suggest(self, trial_id: str) -> dict | None:
            params = super().suggest(trial_id)
            ot_trial = self._ot_trials.get(trial_id)
            if ot_trial is not None:
                from .tune import trial_key

                ot_trial.set_user_attr(ATTR_TRIAL_KEY, trial_key(self._execution, None, trial_id))
            return params

    return PersistedOptunaSearch


def for_execution(study: Any, execution: str, exec_dir: Path, state: Mapping[str, Any] | None = None) -> OptunaStore | None:
    """The Optuna store of a search execution (None for a grid)."""
    if study.spec.search is None:
        return None
    url = resolve_url(study.spec.search.storage, exec_dir, state)
    name = (state or {}).get(STATE_STUDY) or study_name(study.spec.name, execution)
    return OptunaStore(url, name, execution)


def state_entries(store: OptunaStore | None) -> dict[str, str]:
    """What ``sweeper.json`` keeps of the store (never a password)."""
    if store is None:
        return {}
    return {STATE_URL: tracking.redact_uri(store.url) or "", STATE_STUDY: store.name}


@preflight.check("optuna")
def check_optuna_storage(ctx: preflight.Context) -> list[str]:
    """A configured ``search.storage`` must be a URL whose database answers (the default
    SQLite file is checked with the storage folder)."""
    search = getattr(ctx.study.spec, "search", None)
    url = getattr(search, "storage", None)
    if not url:
        return []
    try:
        import sqlalchemy

        engine = sqlalchemy.create_engine(url, **_engine_kwargs(url))
        try:
            with engine.connect():
                pass
        finally:
            engine.dispose()
    except Exception as err:
        return [f"search.storage: cannot open the Optuna storage {tracking.redact_uri(url)}: {tracking.error_line(err)}"]
    return []
