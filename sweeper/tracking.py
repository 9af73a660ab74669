"""MLflow tracking: one parent run per study execution, one child run per trial.

Everything goes through :class:`mlflow.MlflowClient` (no global "active run" state,
so it is safe inside Ray workers). Metrics are written with ``log_batch`` (one call
per trainer report, never one per number); params are the run config's dotted keys.

The tracking URI is ``$MLFLOW_TRACKING_URI`` or, by default, an embedded SQLite file
``sqlite:///<cwd>/mlflow.db`` whose artifacts go next to it in ``mlartifacts/``.

Child runs are idempotent: each carries the tag ``trial_key`` (study execution +
trial), and :func:`open_trial_run` reuses an existing run with that key instead of
creating a second one (a resumed or retried trial continues its run).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, TypeVar
from urllib.parse import unquote

MAX_PARAM_LEN = 6000  # MLflow's limit on a param value
MAX_TAG_LEN = 8000
_PARAMS_PER_BATCH = 100
_METRICS_PER_BATCH = 1000

# Tag names (also read by sweeper.analysis).
TAG_STUDY = "study"
TAG_EXECUTION = "execution"
TAG_ROLE = "role"  # "study" (parent), "trial" (child), "train" (single run)
TAG_TRIAL_ID = "trial_id"
TAG_TRIAL_KEY = "trial_key"
TAG_TRIAL_INDEX = "trial_index"
TAG_ERROR = "error"
TAG_PARENT = "mlflow.parentRunId"

T = TypeVar("T")


# ----------------------------------------------------------------------------- environment
def default_tracking_uri() -> str:
    """``$MLFLOW_TRACKING_URI``, else an SQLite file in the current directory."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    return f"sqlite:///{Path.cwd().resolve() / 'mlflow.db'}"


def sqlite_path(uri: str) -> Path | None:
    """The database file of an ``sqlite:///`` URI (None for other stores and in-memory SQLite).

    ``sqlite:////abs/file.db`` is absolute, ``sqlite:///file.db`` relative to the cwd.
    """
    prefix = "sqlite:///"
    if not uri.startswith(prefix):
        return None
    rest = unquote(uri[len(prefix):].split("?", 1)[0])
    if not rest or rest == ":memory:":
        return None
    return Path(rest) if rest.startswith("/") else Path(rest).resolve()


def git_info(cwd: str | Path | None = None) -> dict[str, str]:
    """Commit (and whether the tree is dirty) of the git checkout at ``cwd``; {} outside git."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10
        )
        if commit.returncode != 0:
            return {}
        out = {"git_commit": commit.stdout.strip(), "mlflow.source.git.commit": commit.stdout.strip()}
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=cwd, capture_output=True, text=True, timeout=10,
        )
        if dirty.returncode == 0:
            out["git_dirty"] = str(bool(dirty.stdout.strip()))
        return out
    except (OSError, subprocess.SubprocessError):
        return {}


def host_tags() -> dict[str, str]:
    """Where the current process runs: hostname, node IP (Ray's view when available), the
    Ray node id (tells nodes apart even when they share a host and IP), the GPUs Ray
    assigned (``gpu_ids``) and the process id."""
    tags = {"host": socket.gethostname(), "pid": str(os.getpid())}
    ip = None
    ray = sys.modules.get("ray")  # only ask Ray when this process already uses it
    try:
        if ray is not None and ray.is_initialized():
            ip = ray.util.get_node_ip_address()
            node_id = ray.get_runtime_context().get_node_id()
            if node_id:
                tags["node_id"] = str(node_id)
            gpus = ray.get_gpu_ids()  # in a trial: the GPU(s) Ray gave it (fractions share one)
            if gpus:
                tags["gpu_ids"] = ",".join(str(g) for g in gpus)
    except Exception:
        ip = None
    if ip is None:
        try:
            ip = socket.gethostbyname(socket.gethostname())
        except OSError:
            ip = None
    if ip:
        tags["node_ip"] = ip
    return tags


# ----------------------------------------------------------------------------- secrets
# Environment variables a trial needs to talk to the tracking server like the driver does.
# They are handed to the trials inside the TrialContext (Ray's object store), never
# through a runtime_env (which Ray shows in its dashboard and job table) and never logged.
_FORWARD_PREFIXES = ("MLFLOW_",)
_NOT_FORWARDED = {
    "MLFLOW_TRACKING_URI",  # the context carries the URI itself
    "MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_PARENT_RUN_ID",
}
SECRET_ENV = (
    "MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_PASSWORD", "DATABRICKS_TOKEN", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
)
_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<user>[^/@:\s]*):(?P<pw>[^/@\s]+)@")
_SECRET_QUERY = re.compile(r"(?i)(?P<key>[?&;](?:password|passwd|pwd|token|access_token|secret|api_key|sslpassword)=)[^&;#\s]+")


def forwarded_env(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The driver's MLflow client settings (``MLFLOW_TRACKING_TOKEN``, ``..._USERNAME``,
    ``..._PASSWORD``, TLS options, timeouts) that the trials apply before they connect."""
    env = os.environ if environ is None else environ
    return {
        k: v for k, v in env.items()
        if k.startswith(_FORWARD_PREFIXES) and k not in _NOT_FORWARDED and v is not None
    }


def redact_uri(uri: str | None) -> str | None:
    """``uri`` without its password (``http://user:***@host``, ``postgresql://u:***@db/x``)
    and without secret query parameters; what may be shown, logged or stored."""
    if not uri:
        return uri
    out = _USERINFO.sub(lambda m: f"{m['scheme']}{m['user']}:***@", str(uri))
    return _SECRET_QUERY.sub(lambda m: f"{m['key']}***", out)


# Config values under a key like these are secrets wherever they appear (params, tags,
# config.yaml / study.yaml artifacts, error lines): ``data.params.password``,
# ``db_token``, ``api-key``. The key's last word (split at ``.``, ``_``, ``-``) or last two
# words decide, so ``token_count`` or ``passes`` are left alone.
SECRET_WORDS = frozenset({"password", "passwd", "passphrase", "token", "secret", "credential", "credentials",
                          "apikey", "api_key", "access_key", "private_key", "secret_key"})
_KEY_WORDS = re.compile(r"[._\-\s]+")
_KEY_VALUE = re.compile(
    r"(?P<key>[A-Za-z_][\w.\-]*)(?P<sep>[\"']?\s*[:=]\s*)(?P<val>\"[^\"\n]*\"|'[^'\n]*'|[^\s,}\]&;#]+)"
)
REDACTED = "***"


def is_secret_key(key: str) -> bool:
    """Whether a (dotted) key names a secret: its last word, or its last two, is in :data:`SECRET_WORDS`."""
    words = [w.lower() for w in _KEY_WORDS.split(str(key)) if w]
    return bool(words) and (words[-1] in SECRET_WORDS or "_".join(words[-2:]) in SECRET_WORDS)


def redact_values(items: Mapping[str, Any]) -> dict[str, Any]:
    """``items`` with the value of every secret-named key (:func:`is_secret_key`) replaced by ``***``;
    nested mappings (``data.params: {password: ...}``) are walked."""
    out: dict[str, Any] = {}
    for k, v in items.items():
        if is_secret_key(k) and v not in (None, "", REDACTED):
            out[k] = REDACTED
        elif isinstance(v, Mapping):
            out[k] = redact_values(v)
        elif isinstance(v, str):
            out[k] = _redact_pairs(v)
        else:
            out[k] = v
    return out


def _redact_pairs(text: str) -> str:
    """``key: value`` / ``key=value`` pairs with a secret-named key -> ``key: ***`` (YAML,
    JSON, flow mappings, query strings, log lines)."""

    def sub(m: re.Match) -> str:
        if not is_secret_key(m["key"]) or m["val"].strip("\"'") in ("", REDACTED, "null", "None"):
            return m[0]
        return f"{m['key']}{m['sep']}{REDACTED}"

    return _KEY_VALUE.sub(sub, text)


def redact(text: str) -> str:
    """``text`` with passwords in URLs, the values of secret environment variables
    (``MLFLOW_TRACKING_TOKEN``, ``MLFLOW_TRACKING_PASSWORD``, ...) and the values of
    secret-named keys (``password: ...``, ``token=...``) replaced by ``***``."""
    out = _redact_pairs(redact_uri(str(text)) or "")
    for name in SECRET_ENV:
        value = os.environ.get(name)
        if value and len(value) >= 4:
            out = out.replace(value, "***")
    return out


def uri_password(uri: str | None) -> bool:
    """Whether ``uri`` carries a password (in its userinfo or its query)."""
    return bool(uri) and redact_uri(uri) != uri


def version_tags() -> dict[str, str]:
    import dmlcore

    return {"dmlcore_version": str(getattr(dmlcore, "__version__", "unknown"))}


def stringify(v: Any, limit: int = MAX_PARAM_LEN) -> str:
    """A param/tag value: scalars as ``str()``, lists and dicts as JSON, cut to ``limit``."""
    s = json.dumps(v, sort_keys=True, default=str) if isinstance(v, (list, dict, tuple)) else str(v)
    return s if len(s) <= limit else s[: limit - 3] + "..."


def config_params(cfg: Any) -> dict[str, str]:
    """MLflow params of a RunConfig: every dotted key, values stringified (secret-named
    keys' values as ``***``, :func:`redact_values`)."""
    return {k: stringify(v) for k, v in redact_values(cfg.to_flat()).items()}


def numeric_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    out = {}
    for k, v in metrics.items():
        if isinstance(v, bool):
            v = float(v)
        if isinstance(v, (int, float)):
            out[str(k)] = float(v)
        else:
            try:  # numpy / torch scalars
                out[str(k)] = float(v)
            except (TypeError, ValueError):
                continue
    return out


_WORKER_WRAPPED = re.compile(r"^Caught (\w+) in DataLoader worker process")


def unwrap_worker_error(err: BaseException) -> tuple[str, str] | None:
    """``(type name, message)`` of the exception a DataLoader worker raised, when ``err``
    is PyTorch's re-raised wrapper (a RuntimeError "Caught X in DataLoader worker process
    N" carrying the worker's traceback as text); None otherwise."""
    text = str(err)
    m = _WORKER_WRAPPED.match(text.strip())
    if m is None:
        return None
    name = m.group(1)
    for ln in reversed([ln.strip() for ln in text.splitlines() if ln.strip()]):
        head, sep, msg = ln.partition(": ")
        if sep and head.rsplit(".", 1)[-1] == name:
            return name, msg.strip()
    return name, ""


def error_line(err: BaseException | str) -> str:
    """The one-line description of an error: ``Type: first line of the message``, with
    secrets (passwords in URLs, token values) replaced by ``***``."""
    if isinstance(err, str):
        lines = [ln.strip() for ln in err.splitlines() if ln.strip()]
        return redact(lines[-1]) if lines else "error"
    from .errors import worker_death_line

    died = worker_death_line(str(err))  # Ray's ActorDiedError: the real reason, not its first line
    if died is not None:
        return redact(died)
    inner = unwrap_worker_error(err)
    if inner is not None:  # the worker's error, not PyTorch's wrapper around it
        name, msg = inner
    else:
        msg = next((ln.strip() for ln in str(err).splitlines() if ln.strip()), "")
        name = type(err).__name__
    return redact(f"{name}: {msg}" if msg else name)


def _retry(fn: Callable[[], T], attempts: int = 6) -> T:
    """Call ``fn``, retrying a few times when an SQLite store is momentarily locked."""
    delay = 0.2
    for i in range(attempts):
        try:
            return fn()
        except Exception as err:  # MlflowException wraps sqlalchemy's OperationalError
            text = str(err).lower()
            if i == attempts - 1 or not ("locked" in text or "busy" in text):
                raise
            time.sleep(delay)
            delay *= 2
    raise AssertionError("unreachable")


# ----------------------------------------------------------------------------- client
@contextlib.contextmanager
def _creation_lock(db: Path) -> Iterator[None]:
    """An exclusive file lock (``<db>.lock``) held while an SQLite store is opened, so one
    process creates and migrates a fresh store while the others wait (MLflow's alembic
    migration is not safe to run twice at once)."""
    import fcntl

    with open(db.with_name(db.name + ".lock"), "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


class Tracker:
    """A thin, retrying wrapper around :class:`mlflow.MlflowClient` for one tracking URI."""

    def __init__(self, tracking_uri: str | None = None):
        from mlflow import MlflowClient

        self.uri = tracking_uri or default_tracking_uri()
        # MLflow prints "View run <name> at: <tracking URI>/#/..." on every finished run of a
        # tracking server: noise in a study, and the URI may carry a password.
        if uri_password(self.uri):
            os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
        else:
            os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
        db = sqlite_path(self.uri)
        if db is not None:
            db.parent.mkdir(parents=True, exist_ok=True)
            with _creation_lock(db):  # F2: two drivers on a fresh store raced in the schema migration
                self.client = MlflowClient(tracking_uri=self.uri)
                _retry(lambda: self.client.search_experiments(max_results=1))  # creates/migrates the schema
        else:
            self.client = MlflowClient(tracking_uri=self.uri)

    # --- experiments
    def artifact_location(self, name: str) -> str | None:
        """For an SQLite store: ``<db dir>/mlartifacts/<name>`` (absolute, so every process agrees)."""
        db = sqlite_path(self.uri)
        if db is None:
            return None
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
        return (db.parent / "mlartifacts" / safe).resolve().as_uri()

    def experiment_id(self, name: str) -> str:
        exp = _retry(lambda: self.client.get_experiment_by_name(name))
        if exp is not None:
            if exp.lifecycle_stage == "deleted":
                _retry(lambda: self.client.restore_experiment(exp.experiment_id))
            return exp.experiment_id
        try:
            return _retry(lambda: self.client.create_experiment(name, artifact_location=self.artifact_location(name)))
        except Exception:
            exp = self.client.get_experiment_by_name(name)  # created concurrently
            if exp is None:
                raise
            return exp.experiment_id

    # --- runs
    def create_run(self, experiment_id: str, run_name: str, tags: Mapping[str, Any]) -> str:
        run = _retry(
            lambda: self.client.create_run(
                experiment_id, tags={k: stringify(v, MAX_TAG_LEN) for k, v in redact_values(tags).items()},
                run_name=run_name
            )
        )
        return run.info.run_id

    def get_run(self, run_id: str):
        return _retry(lambda: self.client.get_run(run_id))

    def search(self, experiment_ids: list[str], filter_string: str, max_results: int = 1000) -> list:
        runs: list = []
        token = None
        while True:
            page = _retry(
                lambda: self.client.search_runs(
                    experiment_ids, filter_string=filter_string, max_results=max_results, page_token=token
                )
            )
            runs.extend(page)
            token = page.token
            if not token:
                return runs

    def find_by_tag(self, experiment_id: str, key: str, value: str) -> list:
        q = value.replace("'", "\\'")
        return self.search([experiment_id], f"tags.`{key}` = '{q}'")

    def children(self, experiment_id: str, parent_run_id: str) -> list:
        return self.find_by_tag(experiment_id, TAG_PARENT, parent_run_id)

    def set_status(self, run_id: str, status: str) -> None:
        if status in ("RUNNING", "SCHEDULED"):
            _retry(lambda: self.client.update_run(run_id, status=status))
        else:
            _retry(lambda: self.client.set_terminated(run_id, status=status))

    def set_tags(self, run_id: str, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        items = [RunTag(k, stringify(v, MAX_TAG_LEN)) for k, v in redact_values(tags).items()]
        for i in range(0, len(items), _PARAMS_PER_BATCH):
            chunk = items[i : i + _PARAMS_PER_BATCH]
            _retry(lambda: self.client.log_batch(run_id, tags=chunk, synchronous=True))

    def log_params(self, run_id: str, params: Mapping[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(k, stringify(v)) for k, v in redact_values(params).items()]
        for i in range(0, len(items), _PARAMS_PER_BATCH):
            chunk = items[i : i + _PARAMS_PER_BATCH]
            _retry(lambda: self.client.log_batch(run_id, params=chunk, synchronous=True))

    def log_metrics(self, run_id: str, metrics: Mapping[str, Any], step: int) -> None:
        """All ``metrics`` of one step in one ``log_batch`` call (chunks of 1000)."""
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        items = [Metric(k, v, ts, int(step)) for k, v in numeric_metrics(metrics).items()]
        for i in range(0, len(items), _METRICS_PER_BATCH):
            chunk = items[i : i + _METRICS_PER_BATCH]
            _retry(lambda: self.client.log_batch(run_id, metrics=chunk, synchronous=True))

    def log_text(self, run_id: str, text: str, artifact_file: str) -> None:
        text = redact(text)  # config.yaml, study.yaml, error.txt: never a secret in clear
        _retry(lambda: self.client.log_text(run_id, text, artifact_file))

    def log_artifact(self, run_id: str, path: str | Path, artifact_path: str | None = None) -> None:
        _retry(lambda: self.client.log_artifact(run_id, str(path), artifact_path))

    def log_artifacts(self, run_id: str, local_dir: str | Path, artifact_path: str | None = None) -> None:
        """Every file of ``local_dir`` in one call (one run look-up, not one per file)."""
        _retry(lambda: self.client.log_artifacts(run_id, str(local_dir), artifact_path))


# ----------------------------------------------------------------------------- one run
class RunLogger:
    """Feeds one MLflow run from the trainer's reports (a study trial or ``sweeper train``).

    Implements the trainer's Reporter protocol: ``report(step, metrics, checkpoint)``.
    """

    def __init__(self, tracker: Tracker, run_id: str):
        self.tracker = tracker
        self.run_id = run_id
        self.last_metrics: dict[str, float] = {}

    def report(self, step: int, metrics: Mapping[str, Any], checkpoint: Any = None) -> None:
        self.tracker.log_metrics(self.run_id, metrics, step)
        self.last_metrics.update(numeric_metrics(metrics))

    def fail(self, err: BaseException | str, tb: str | None = None) -> str:
        """Mark the run FAILED with the error line (tag ``error``) and the traceback (``error.txt``)."""
        line = error_line(err)
        if tb is None and isinstance(err, BaseException):
            tb = "".join(traceback.format_exception(type(err), err, err.__traceback__))
        tb = redact(tb) if tb else tb
        try:
            self.tracker.set_tags(self.run_id, {TAG_ERROR: line})
            self.tracker.log_text(self.run_id, tb or line, "error.txt")
        finally:
            self.tracker.set_status(self.run_id, "FAILED")
        return line

    def finish(self, status: str = "FINISHED") -> None:
        self.tracker.set_status(self.run_id, status)


@contextlib.contextmanager
def recording(
    logger: RunLogger | None,
    killed: tuple[type[BaseException], ...],
    on_tracking_error: Callable[[], None] = lambda: None,
    killed_status: str | None = "KILLED",
) -> Iterator[None]:
    """The body trains ``logger``'s run, which ends FINISHED when the body returns,
    ``killed_status`` on a ``killed`` exception (None: left as it is, for a caller whose
    driver settles it) and FAILED (:meth:`RunLogger.fail`) on any other; the
    exception goes on. A tracking error while recording a failure never replaces the
    body's own error: ``on_tracking_error()`` is called while it is handled (to log it,
    or not). Without a logger the body just runs."""
    if logger is None:
        yield
        return
    try:
        yield
    except killed:
        if killed_status is not None:
            logger.finish(killed_status)
        raise
    except BaseException as err:
        try:
            logger.fail(err)
        except Exception:
            on_tracking_error()
        raise
    logger.finish("FINISHED")


def open_run(
    tracker: Tracker,
    experiment_id: str,
    run_name: str,
    cfg: Any,
    tags: Mapping[str, Any],
    key: str | None = None,
) -> tuple[RunLogger, str | None]:
    """Create a run for ``cfg`` (params, tags, ``config.yaml``), or reuse the one tagged ``trial_key=key``.

    Returns the logger and the status the reused run had (``None`` for a new run). A
    reused run that was not FINISHED is set back to RUNNING and its error tag cleared;
    a FINISHED one is left alone (the caller decides not to train again).
    """
    existing = []
    if key is not None:
        existing = [r for r in tracker.find_by_tag(experiment_id, TAG_TRIAL_KEY, key) if r.info.lifecycle_stage == "active"]
    if existing:
        # the oldest is the trial's run; later ones could only come from a crash mid-creation
        existing.sort(key=lambda r: r.info.start_time or 0)
        run = existing[0]
        status = run.info.status
        logger = RunLogger(tracker, run.info.run_id)
        if status != "FINISHED":
            tracker.set_status(run.info.run_id, "RUNNING")
            tracker.set_tags(run.info.run_id, {**tags, "resumed": "true"})
            if TAG_ERROR in run.data.tags:  # a retried trial: its old error no longer applies
                _retry(lambda: tracker.client.delete_tag(run.info.run_id, TAG_ERROR))
            if not run.data.params:
                tracker.log_params(run.info.run_id, config_params(cfg))
        logger.last_metrics = dict(run.data.metrics)
        return logger, status
    all_tags = dict(tags)
    if key is not None:
        all_tags[TAG_TRIAL_KEY] = key
    run_id = tracker.create_run(experiment_id, run_name, all_tags)
    tracker.log_params(run_id, config_params(cfg))
    tracker.log_text(run_id, cfg.to_yaml(), "config.yaml")
    return RunLogger(tracker, run_id), None


def single_run_tags() -> dict[str, str]:
    return {TAG_ROLE: "train", **version_tags(), **git_info(), **host_tags()}


def latest_metrics_of(runs: Iterable[Any]) -> dict[str, dict[str, float]]:
    return {r.info.run_id: dict(r.data.metrics) for r in runs}
