"""The driver-side preflight: what a study needs, checked in seconds before any trial starts.

``sweeper run`` (and ``--dry-run``) calls :func:`run_checks` on the driver *before* Ray
starts a trial. Every problem is one line naming the key, what was asked and what is
there; the CLI prints one ``error:`` line per problem and exits 2. Nothing is written:
no storage folder, no MLflow run.

The checks are a registry: a check is a function ``(Context) -> list[str]`` (its
problems; empty when fine) registered with :func:`check`. Other modules add theirs the
same way, e.g. a weights check for the backbones' ``pretrained`` files::

    from sweeper.preflight import check

    @check("weights")
    def pretrained_files(ctx):
        return [f"model.pretrained: ... {path} ..." for cfg in ctx.configs() if ...]

Checks run in registration order; ``SWEEPER_SKIP_CHECKS=resources,tracking`` (comma
separated names) skips some, e.g. for an autoscaling cluster whose GPU nodes join only
when trials ask for them.

This module imports neither Ray nor MLflow at import time (Ray is asked only when the
driver already joined a cluster).
"""

from __future__ import annotations

import difflib
import json
import os
import socket
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable
from urllib.parse import urlsplit

from dmlcore.config import ConfigError, RunConfig

TRACKING_TIMEOUT_S = 10.0
"""The tracking server (or the database behind the store) must answer within this."""
SKIP_ENV = "SWEEPER_SKIP_CHECKS"


class PreflightError(ConfigError):
    """One or more preflight problems (``problems``: one line each)."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


@dataclass
class Context:
    """What the checks look at: the resolved study and where it will run and write."""

    study: Any  # sweeper.study.ResolvedStudy
    storage: Path
    tracking_uri: str
    address: str | None = None
    num_cpus: int | None = None
    nodes: list[dict[str, float]] | None = None
    """Resources of each alive node (``{"CPU": 8, "GPU": 1, ...}``); None: read them."""
    where: str = ""
    """How the nodes are named in a message ("this machine", "the Ray cluster")."""

    def configs(self) -> list[RunConfig]:
        """The run configs the trials will train: every grid trial's, or a search's base."""
        trials = getattr(self.study, "trials", None) or []
        return [t.config for t in trials] or [self.study.base]


Check = Callable[[Context], list[str]]
CHECKS: dict[str, Check] = {}


def check(name: str) -> Callable[[Check], Check]:
    """Register ``fn`` as the preflight check ``name`` (a later registration replaces it)."""

    def deco(fn: Check) -> Check:
        CHECKS[name] = fn
        return fn

    return deco


def skipped() -> set[str]:
    return {s.strip() for s in os.environ.get(SKIP_ENV, "").split(",") if s.strip()}


def run_checks(ctx: Context, only: Iterable[str] | None = None) -> list[str]:
    """Every problem the registered checks find (``only``: just these checks)."""
    names = [n for n in CHECKS if (only is None or n in set(only)) and n not in skipped()]
    problems: list[str] = []
    for name in names:
        try:
            problems.extend(CHECKS[name](ctx))
        except (ValueError, KeyError, OSError) as err:  # a check's own failure is a problem too
            problems.append(f"{name}: {err}")
    return problems


def ensure(ctx: Context, only: Iterable[str] | None = None) -> None:
    """Raise :class:`PreflightError` when a check finds a problem."""
    problems = run_checks(ctx, only)
    if problems:
        raise PreflightError(problems)


# ----------------------------------------------------------------------------- resources
def local_cpus() -> float:
    """CPUs a local ``ray.init()`` would offer (Ray's own count: cgroup limits included)."""
    try:
        from ray._private.utils import get_num_cpus

        return float(get_num_cpus())
    except Exception:
        try:
            return float(len(os.sched_getaffinity(0)))
        except (AttributeError, OSError):
            return float(os.cpu_count() or 1)


def local_gpus() -> float:
    """GPUs a local ``ray.init()`` would see (``CUDA_VISIBLE_DEVICES`` first, then CUDA)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        ids = [v for v in visible.split(",") if v.strip() and v.strip() != "-1"]
        return float(len(ids))
    try:
        import torch

        return float(torch.cuda.device_count()) if torch.cuda.is_available() else 0.0
    except Exception:
        return 0.0


def cluster_nodes(ctx: Context) -> tuple[list[dict[str, float]] | None, str]:
    """The nodes' resources and how to name them; (None, "") when unknown yet (a cluster
    to join, not joined)."""
    if ctx.nodes is not None:
        return ctx.nodes, ctx.where or "the Ray cluster"
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        nodes = [dict(n.get("Resources") or {}) for n in ray.nodes() if n.get("Alive")]
        return nodes, "the Ray cluster"
    if ctx.address is None:
        cpus = float(ctx.num_cpus) if ctx.num_cpus else local_cpus()
        return [{"CPU": cpus, "GPU": local_gpus()}], "this machine"
    return None, ""


def _n(x: float) -> str:
    return f"{x:g}"


def _describe(nodes: list[dict[str, float]]) -> str:
    shapes: dict[str, int] = {}
    for n in nodes:
        s = f"{_n(n.get('CPU', 0))} CPU/{_n(n.get('GPU', 0))} GPU"
        shapes[s] = shapes.get(s, 0) + 1
    return ", ".join(f"{c} x {s}" if c > 1 else s for s, c in shapes.items())


def resource_problems(cpu: float, gpu: float, nodes: list[dict[str, float]], where: str) -> list[str]:
    """Why a trial asking ``cpu``/``gpu`` fits on none of ``nodes`` (empty when it fits)."""
    if any(cpu <= n.get("CPU", 0) and gpu <= n.get("GPU", 0) for n in nodes):
        return []
    if not nodes:
        return [f"resources: {where} has no alive node"]
    max_cpu = max(n.get("CPU", 0) for n in nodes)
    max_gpu = max(n.get("GPU", 0) for n in nodes)
    has = _describe(nodes)
    largest = "this machine has" if where == "this machine" else f"the largest node of {where} has"
    out = []
    if gpu > 0 and max_gpu == 0:
        out.append(f"resources.gpu: each trial asks for {_n(gpu)} GPU but {where} has no GPU ({has}); "
                   "set resources.gpu: 0 to train on CPUs")
    elif gpu > max_gpu:
        out.append(f"resources.gpu: each trial asks for {_n(gpu)} GPUs but {largest} {_n(max_gpu)} ({has})")
    if cpu > max_cpu:
        out.append(f"resources.cpu: each trial asks for {_n(cpu)} CPUs but {largest} {_n(max_cpu)} ({has})")
    if not out:
        out.append(f"resources: a trial asking cpu={_n(cpu)} gpu={_n(gpu)} fits on no node of {where} ({has})")
    return out


@check("resources")
def check_resources(ctx: Context) -> list[str]:
    nodes, where = cluster_nodes(ctx)
    if nodes is None:
        return []  # a cluster not joined yet: checked again once joined
    res = ctx.study.spec.resources
    return resource_problems(float(res.cpu), float(res.gpu), nodes, where)


@check("workers")
def check_workers(ctx: Context) -> list[str]:
    """A multi-worker study (``resources.workers > 1``): its N x (cpu, gpu) workers fit on
    the cluster, which offers what their trials need (:mod:`sweeper.multi_worker`)."""
    from .multi_worker import check_workers as workers_check

    return workers_check(ctx)


# ----------------------------------------------------------------------------- paths
def _existing_ancestor(p: Path) -> Path:
    cur = p
    while not cur.exists() and cur != cur.parent:
        cur = cur.parent
    return cur


def path_problem(path: Path, key: str, what: str) -> str | None:
    """Why ``path`` (a folder, made if missing) cannot be written; None when it can.
    Probes with a real file (``os.access`` says yes to root on a read-only mount)."""
    path = Path(path)
    anc = _existing_ancestor(path)
    if not anc.is_dir():
        return f"{key}: {what} {path} cannot be created: {anc} is not a folder"
    try:
        fd, probe = tempfile.mkstemp(prefix=".sweeper-probe-", dir=anc)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        return f"{key}: {what} {path} is not writable ({err.strerror or err} in {anc})"
    return None


@check("storage")
def check_storage(ctx: Context) -> list[str]:
    why = path_problem(ctx.storage, "--storage", "the Tune storage folder")
    return [why] if why else []


def _tcp(host: str, port: int, timeout: float) -> str | None:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except OSError as err:
        return err.strerror or str(err) or type(err).__name__


_DB_PORTS = {"postgresql": 5432, "postgres": 5432, "mysql": 3306, "mssql": 1433}


@check("tracking")
def check_tracking(ctx: Context) -> list[str]:
    from . import tracking

    uri = ctx.tracking_uri
    shown = tracking.redact_uri(uri)
    db = tracking.sqlite_path(uri)
    if db is not None:
        if db.exists() and not db.is_file():
            return [f"tracking: the MLflow store {db} is not a file"]
        folder = path_problem(db.parent, "tracking", "the MLflow store's folder")
        if folder:
            return [folder]
        if db.exists():
            try:
                with open(db, "r+b"):
                    pass
            except OSError as err:
                return [f"tracking: the MLflow store {db} is not writable ({err.strerror or err})"]
        return []
    parts = urlsplit(uri)
    scheme = parts.scheme.split("+", 1)[0].lower()
    if scheme in ("", "file"):
        folder = Path(parts.path if scheme == "file" else uri)
        why = path_problem(folder, "tracking", "the MLflow store")
        return [why] if why else []
    if scheme in ("http", "https"):
        url = uri.rstrip("/") + "/health"
        req = urllib.request.Request(url, method="GET")
        # credentials stay out of the URL that urllib sees (it would send them anyway)
        if parts.username or parts.password:
            netloc = parts.hostname + (f":{parts.port}" if parts.port else "")
            url = parts._replace(netloc=netloc).geturl().rstrip("/") + "/health"
            req = urllib.request.Request(url, method="GET")
        t0 = time.monotonic()
        try:
            with urllib.request.urlopen(req, timeout=TRACKING_TIMEOUT_S):
                return []
        except urllib.error.HTTPError:
            return []  # it answered (a 401/404 from a proxy in front is for MLflow to report)
        except (urllib.error.URLError, OSError) as err:
            reason = getattr(err, "reason", err)
            waited = time.monotonic() - t0
            return [f"tracking: the MLflow server {shown} did not answer "
                    f"({reason}; after {waited:.1f} s, limit {TRACKING_TIMEOUT_S:g} s)"]
    if parts.hostname and scheme in _DB_PORTS:
        why = _tcp(parts.hostname, parts.port or _DB_PORTS[scheme], TRACKING_TIMEOUT_S)
        if why:
            return [f"tracking: the database of {shown} did not answer ({why})"]
    return []


# ----------------------------------------------------------------------------- ray
@check("ray")
def check_ray_address(ctx: Context) -> list[str]:
    addr = ctx.address
    if not addr or addr == "auto":
        return []
    sys_ray = sys.modules.get("ray")
    if sys_ray is not None and sys_ray.is_initialized():
        return []
    rest = addr.split("://", 1)[1] if "://" in addr else addr
    host, _, port = rest.rpartition(":")
    if not host or not port.isdigit():
        return [f"--address: expected 'auto', HOST:PORT or ray://HOST:PORT, got {addr!r}"]
    why = _tcp(host.strip("[]"), int(port), TRACKING_TIMEOUT_S)
    if why:
        return [f"--address: no Ray cluster answers at {addr} ({why})"]
    return []


# ----------------------------------------------------------------------------- metric
def reported_metrics(cfg: RunConfig) -> tuple[set[str], tuple[str, ...]]:
    """(the per-epoch metric names the trainer reports for ``cfg``, prefixes whose names
    depend on the loss or on the end of training and are not listed: ``train/``, ``fewshot/``).
    Mirrors ``dmlcore.train.Trainer.evaluate`` and ``dmlcore.metrics.evaluate_embeddings``."""
    from dmlcore.metrics.retrieval import metric_name

    ev = cfg.eval
    names: set[str] = {"train/loss", "train/lr", "time/eval_s", "time/epoch_s"}
    per_split = [metric_name("recall", k) for k in ev.recall_k] + ["map_at_r", "r_precision", metric_name("map", 1000)]
    if ev.clustering:
        per_split += ["nmi", "f1"]
    if getattr(ev, "protocol", "zero_shot") == "closed_set":  # dmlcore/metrics/closed_set.py
        per_split += ["precision_at_1", "knn_accuracy", "knn_precision", "knn_recall", "knn_f1"]
    splits = ["test"] + (["val"] if cfg.data.val_classes > 0 else [])
    names |= {f"{s}/{m}" for s in splits for m in per_split}
    if ev.embedding_metrics:
        names |= {f"train/{m}" for m in ("pi_intra", "pi_inter", "pi_ratio", "rho_spectrum", "uniformity")}
    if cfg.data.split not in ("standard", "closed"):
        names.add("data/fid")
    open_prefixes = ("train/",) + (("fewshot/",) if ev.few_shot is not None else ())
    return names, open_prefixes


def metric_problem(key: str, metric: str, configs: list[RunConfig]) -> str | None:
    for cfg in configs:
        names, open_prefixes = reported_metrics(cfg)
        name = metric[len("best/"):] if metric.startswith("best/") else metric
        if name in names or name.startswith(open_prefixes):
            continue
        close = difflib.get_close_matches(name, sorted(names), n=1, cutoff=0.6)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        if name.startswith("val/") and cfg.data.val_classes <= 0 and not close:
            return f"{key}: '{metric}' is reported only with data.val_classes > 0"
        if name.startswith("val/") and cfg.data.val_classes <= 0:
            hint += "; val/ metrics need data.val_classes > 0"
        return f"{key}: '{metric}' is not a metric the trainer reports for this study{hint}"
    return None


@check("metric")
def check_metric(ctx: Context) -> list[str]:
    spec = ctx.study.spec
    configs = ctx.configs()
    out = []
    if why := metric_problem("metric", spec.metric, configs):
        out.append(why)
    sc = spec.scheduler
    if sc is not None and sc.metric and sc.metric != spec.metric:
        if why := metric_problem("scheduler.metric", sc.metric, configs):
            out.append(why)
    return out


# ----------------------------------------------------------------------------- data
def _data_key(cfg: RunConfig) -> str:
    return json.dumps(cfg.data.model_dump(mode="json"), sort_keys=True, default=str)


def data_problem(cfg: RunConfig) -> str | None:
    """The dataset loader's own check of ``cfg.data``: its root and required files, the
    split file and the validation classes (no image is decoded)."""
    from dmlcore.data.base import DataError, build_source, carve_val, resolve_split

    def line(err: BaseException, key: str) -> str:
        msg = " ".join(str(err).split())
        return msg if msg.startswith("data.") else f"{key}: {msg}"

    try:
        source = build_source(cfg)
    except (DataError, ConfigError) as err:
        return line(err, "data.root")
    except (KeyError, ValueError) as err:  # a registry or parameter problem
        return line(err, "data.dataset")
    from dmlcore.data.base import CLOSED_SPLIT

    if cfg.data.split == CLOSED_SPLIT:  # same classes on both sides: nothing to resolve
        return None
    try:
        split, extra = resolve_split(cfg.data.split, source)
        if "val_split" in extra and cfg.data.val_classes > 0:  # a published ooDML split's own train classes
            train_classes = tuple(extra["val_split"]["train"])
        else:
            train_classes, _ = carve_val(split.train_classes, cfg.data.val_classes, source.name)
        # an imported ooDML split file: its shape, id, classes at data.root and episodes
        from dmlcore.oodml.published import check_split

        check_split(cfg, strict=True)
    except (DataError, ConfigError, KeyError, ValueError) as err:
        return line(err, "data.split")
    try:  # the batch composition the train classes must fill (the trainer's own sampler check)
        import numpy as np

        from dmlcore.data.samplers import build_sampler

        labels = np.asarray(source.labels)
        build_sampler(cfg, labels[np.isin(labels, np.asarray(train_classes, dtype=labels.dtype))])
    except (DataError, ConfigError, KeyError, ValueError) as err:
        return f"batch: {' '.join(str(err).split())}"
    return None


def data_problems(configs: list[dict[str, Any]]) -> list[str]:
    """:func:`data_problem` of each distinct data section (configs as dicts: this also
    runs as a Ray task on a cluster node, where the trials will read the data)."""
    seen: set[str] = set()
    out: list[str] = []
    for d in configs:
        cfg = RunConfig.model_validate(d)
        k = _data_key(cfg)
        if k in seen:
            continue
        seen.add(k)
        why = data_problem(cfg)
        if why and why not in out:
            out.append(why)
    return out


@check("data")
def check_data(ctx: Context) -> list[str]:
    configs = [c.to_dict() for c in ctx.configs()]
    ray = sys.modules.get("ray")
    if ctx.address and ray is not None and ray.is_initialized():
        # A cluster: data.root is a path on the nodes, not on the driver.
        task = ray.remote(num_cpus=0)(data_problems)
        try:
            return list(ray.get(task.remote(configs), timeout=120))
        except Exception as err:
            return [f"data: the check on a cluster node did not complete ({type(err).__name__}: {err})"]
    return data_problems(configs)


# ----------------------------------------------------------------------------- weights
@check("weights")
def check_weights(ctx: Context) -> list[str]:
    """The backbones' ``pretrained: imagenet`` files (``sweeper/weights.py``): on this machine
    for a local run, on every node that can hold a trial once a cluster is joined."""
    from .weights import study_problems

    ray = sys.modules.get("ray")
    on_nodes = bool(ctx.address and ray is not None and ray.is_initialized())
    return study_problems(ctx.study, on_nodes=on_nodes)
