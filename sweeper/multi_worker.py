"""Multi-worker trials: ``resources: {workers: N, cpu: C, gpu: G}`` with N > 1.

One Tune trial trains data-parallel on N Ray Train workers (Ray Train V2's
``TorchTrainer`` inside the Tune function trial, the Train-inside-Tune pattern of the
pinned Ray; gloo on CPUs, NCCL on GPUs). ``cpu``/``gpu`` are per worker. A one-worker
trial stays today's plain trial (:func:`sweeper.tune.run_trial`, no Train start-up).

* The Tune trial is only a driver: it reserves one unit of the custom resource
  :data:`TRIAL_DRIVER` (no CPU: a driver holding a CPU, a fraction of one, or a
  placement group of the workers' bundles makes Train wait for its workers forever on
  a small machine, ``/work/shared/notes/ddp_in_tune.md`` §1), resolves the trial as every
  trial does (:func:`sweeper.tune.run_trial`: config, its MLflow child run, the
  checkpoint to resume from) and then runs ``TorchTrainer.fit()``.
* Each worker (:func:`worker_loop`) runs :class:`dmlcore.train.Trainer` with a
  :class:`TrainReporter`: every rank calls ``ray.train.report`` once per epoch (rank 0
  with the checkpoint). :func:`TrialReportCallback` (Ray's ``TuneReportCallback``) hands
  rank 0's metrics (and the trial's run id) to the trial's Tune session, so one epoch is
  one Tune result and ASHA and Optuna work as for any trial. The *driver* logs the epoch
  to MLflow when Tune takes it (:class:`EpochLogCallback`, Tune's ``on_trial_result``):
  not the rank-0 worker, whose workers train on after an ASHA stop until Tune's kill
  reaches them, and not the Train controller, whose write of the epoch a trial is stopped
  at raced the trial's end (it was lost, or landed after the driver settled the run).
* Checkpoints: rank 0's, in ``<execution>/train-<trial id>/checkpoint_<epoch>/``;
  Train restores them on all workers on a retry (``ray.train.get_checkpoint``),
  ``sweeper run --resume`` finds them through :func:`sweeper.tune.latest_checkpoint`
  (the newest whose epoch MLflow has: the workers run ahead of the MLflow log).
* Against silent waits: the Train controller gives up on a worker group it cannot place
  after :data:`START_TIMEOUT_S` (``RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S`` when set) and
  :data:`CONTROLLER_FAILURE_LIMIT` retries; the preflight (:func:`check_workers`)
  refuses a study whose N workers fit on no cluster before anything starts; the sweep's
  concurrency is capped (:func:`concurrency_cap`) so trials never wait for each other's
  workers; trials do not reuse actors.
* A trial stopped by ASHA is killed by Tune; Train's worker placement group is then
  removed by Train's own cleaner, which asks Ray's State API: the dashboard must run
  (``ray[default]``; the sweeper starts its local Ray with it when a study has workers
  > 1, and the preflight refuses a joined cluster without it).

This module is the only place that imports Ray Train.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterator, Mapping

from dmlcore.config import RunConfig

from . import tracking
from .tune import TrialContext, TuneReporter

_log = logging.getLogger(__name__)

TRIAL_DRIVER = "trial_driver"
"""The custom resource a multi-worker trial's driver reserves (one unit each)."""
DRIVER_SLOTS = 1000
"""Units of :data:`TRIAL_DRIVER` a Ray started by the sweeper offers (the sweep's
concurrency is capped by the workers, :func:`concurrency_cap`, not by this)."""
START_TIMEOUT_S = 120.0
"""Seconds the Train controller waits for its workers to be placed and started."""
CONTROLLER_FAILURE_LIMIT = 1
"""Retries of a worker group that could not start (Train's default, -1, retries forever)."""
START_TIMEOUT_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"
KEEP_CHECKPOINTS = 4
"""Train checkpoints a multi-worker trial keeps (see :func:`train_fit`)."""


# ----------------------------------------------------------------------------- placement
def worker_slots(cpu: float, gpu: float, node: Mapping[str, float]) -> int:
    """How many workers of ``cpu``/``gpu`` one node holds."""
    fits = [math.floor(node.get("CPU", 0.0) / cpu + 1e-9)]
    if gpu > 0:
        fits.append(math.floor(node.get("GPU", 0.0) / gpu + 1e-9))
    return max(0, min(fits))


def concurrency_cap(workers: int, cpu: float, gpu: float, nodes: list[Mapping[str, float]]) -> int:
    """How many trials of ``workers`` x (``cpu``, ``gpu``) run at once on ``nodes``
    (Train packs a trial's workers onto as few nodes as it can, spreading when needed):
    min(CPU // (N*C), GPU // (N*G)), counted in whole workers per node. At least 1."""
    return max(1, sum(worker_slots(cpu, gpu, n) for n in nodes) // workers)


def trial_resources(resources: Any) -> dict[str, float]:
    """The Tune trial's own request: a one-worker trial holds its CPUs/GPUs; a
    multi-worker trial's driver holds one :data:`TRIAL_DRIVER` (its workers hold the rest)."""
    if resources.workers > 1:
        return {TRIAL_DRIVER: 1.0}
    res = {"cpu": float(resources.cpu)}
    if resources.gpu:
        res["gpu"] = float(resources.gpu)
    return res


API_SERVER_ENV = "RAY_API_SERVER_ADDRESS"


def ray_init_kwargs(workers: int) -> dict[str, Any]:
    """What a local ``ray.init`` started by the sweeper adds: the :data:`TRIAL_DRIVER`
    resource and, for a multi-worker study, the dashboard. Train's placement-group
    cleaner asks the State API whether a trial's controller is gone; without the
    dashboard an ASHA-stopped trial keeps its workers' reservation and the next trial
    waits forever. The cleaner finds the API server by auto-detecting "the" Ray of its
    machine, which fails when the machine runs several; so the dashboard gets a free port
    chosen here and ``RAY_API_SERVER_ADDRESS`` names it to every process of this Ray
    (set before ``ray.init``: the Ray processes inherit it; one inherited from another
    Ray, e.g. the parent's, would name the wrong one)."""
    kw: dict[str, Any] = {"resources": {TRIAL_DRIVER: DRIVER_SLOTS}}
    if workers > 1:
        import socket

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        kw["include_dashboard"], kw["dashboard_port"] = True, port
        os.environ[API_SERVER_ENV] = f"http://127.0.0.1:{port}"
    return kw


def max_concurrent(spec: Any) -> int | None:
    """The study's ``max_concurrent``, capped by :func:`concurrency_cap` for a
    multi-worker study on the Ray this driver uses."""
    res = spec.resources
    if res.workers <= 1:
        return spec.max_concurrent
    import ray

    if not ray.is_initialized():
        return spec.max_concurrent
    nodes = [dict(n.get("Resources") or {}) for n in ray.nodes() if n.get("Alive")]
    cap = concurrency_cap(res.workers, float(res.cpu), float(res.gpu), nodes)
    return min(cap, spec.max_concurrent) if spec.max_concurrent else cap


# ----------------------------------------------------------------------------- preflight
def _n(x: float) -> str:
    return f"{x:g}"


def workers_problems(workers: int, cpu: float, gpu: float, nodes: list[Mapping[str, float]], where: str) -> list[str]:
    """Why ``workers`` x (``cpu``, ``gpu``) fit nowhere on ``nodes`` (one line; empty when they fit)."""
    if workers <= 1:
        return []
    slots = sum(worker_slots(cpu, gpu, n) for n in nodes)
    if slots >= workers:
        return []
    total_cpu = sum(n.get("CPU", 0.0) for n in nodes)
    total_gpu = sum(n.get("GPU", 0.0) for n in nodes)
    ask = f"{workers} workers x ({_n(cpu)} CPU, {_n(gpu)} GPU) = {_n(workers * cpu)} CPUs, {_n(workers * gpu)} GPUs"
    return [f"resources.workers: each trial asks for {ask} but {where} ({_n(total_cpu)} CPUs, "
            f"{_n(total_gpu)} GPUs) can place {slots} such worker{'s' if slots != 1 else ''}; "
            "lower resources.workers or resources.cpu/gpu"]


def joined_cluster_problems(workers: int) -> list[str]:
    """What a multi-worker study needs from a Ray this driver has joined (not started):
    the :data:`TRIAL_DRIVER` resource and a dashboard (State API)."""
    ray = sys.modules.get("ray")
    if workers <= 1 or ray is None or not ray.is_initialized():
        return []
    out = []
    if not ray.cluster_resources().get(TRIAL_DRIVER):
        out.append(
            f"resources.workers: the Ray cluster has no '{TRIAL_DRIVER}' resource, which a multi-worker trial's "
            f"driver reserves; start a node with  ray start --resources='{{\"{TRIAL_DRIVER}\": {DRIVER_SLOTS}}}'"
        )
    try:
        from ray.util.state import list_nodes

        list_nodes(address=ray.get_runtime_context().gcs_address, limit=1, timeout=10,
                   raise_on_missing_output=False)
    except Exception:
        out.append(
            "resources.workers: the Ray cluster's State API does not answer (no dashboard): a trial stopped early "
            "would never release its workers; start the head node with the dashboard (pip install 'ray[default]')"
        )
    return out


def check_workers(ctx: Any) -> list[str]:
    """The preflight check ``workers`` (registered in :mod:`sweeper.preflight`)."""
    from .preflight import cluster_nodes

    res = ctx.study.spec.resources
    if res.workers <= 1:
        return []
    nodes, where = cluster_nodes(ctx)
    problems = joined_cluster_problems(res.workers)
    if nodes is not None:
        problems += workers_problems(res.workers, float(res.cpu), float(res.gpu), nodes, where)
    return problems


# ----------------------------------------------------------------------------- the trial (driver)
class TrialWorkerError(RuntimeError):
    """A multi-worker trial failed: one line naming the rank and its error."""


def run_trial(config: dict[str, Any], ctx: TrialContext, resources: dict[str, Any], storage: str,
              max_failures: int = 0) -> None:
    """The Tune trainable of a multi-worker trial (a driver holding one ``trial_driver``)."""
    from . import tune as tunemod

    def fit(cfg: RunConfig, resume: Mapping[str, Any] | None, logger: tracking.RunLogger | None,
            trial_id: str) -> None:
        train_fit(cfg, resume, logger, trial_id, ctx, resources, storage, max_failures)

    tunemod.run_trial(config, ctx, fit=fit)


def train_fit(cfg: RunConfig, resume: Mapping[str, Any] | None, logger: tracking.RunLogger | None, trial_id: str,
              ctx: TrialContext, resources: Mapping[str, Any], storage: str, max_failures: int = 0) -> None:
    """Train ``cfg`` on the trial's workers (``TorchTrainer.fit()`` in the Tune trial)."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    n, cpu, gpu = int(resources["workers"]), float(resources["cpu"]), float(resources["gpu"])
    os.environ.setdefault(START_TIMEOUT_ENV, f"{START_TIMEOUT_S:g}")  # propagated to the controller
    per_worker = {"CPU": cpu, **({"GPU": gpu} if gpu else {})}
    trainer = TorchTrainer(
        worker_loop,
        train_loop_config={
            "config": cfg.to_dict(), "resume": dict(resume) if resume is not None else None,
            "run_id": logger.run_id if logger is not None else None, "ctx": ctx, "cpu": cpu, "gpu": gpu,
        },
        torch_config=TorchConfig(backend="nccl" if gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(num_workers=n, use_gpu=gpu > 0, resources_per_worker=per_worker),
        run_config=ray.train.RunConfig(
            name=f"train-{trial_id}",  # V2 resumes an existing (storage, name): a retried trial continues
            storage_path=storage,
            callbacks=[TrialReportCallback(logger.run_id if logger is not None else None)],
            failure_config=ray.train.FailureConfig(
                max_failures=max_failures, controller_failure_limit=CONTROLLER_FAILURE_LIMIT
            ),
            # MLflow may lag the checkpoints by up to 3 epochs (one report waiting for Tune in
            # the callback, one in the worker's queue, one written and waiting to be queued):
            # --resume continues from the newest one MLflow has (tune.latest_checkpoint)
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=KEEP_CHECKPOINTS),
        ),
    )
    try:
        trainer.fit()
    except ray.train.WorkerGroupError as err:
        fails = err.worker_failures or {}
        rank = min(fails) if fails else None
        line = tracking.error_line(_cause(fails[rank])) if rank is not None else tracking.error_line(err)
        raise TrialWorkerError(f"worker {rank}: {line}" if rank is not None else line) from None
    except ray.train.ControllerError as err:
        raise TrialWorkerError(
            f"the trial's {n} workers (each {cpu:g} CPU, {gpu:g} GPU) could not be started: "
            + tracking.error_line(err.controller_failure)
        ) from None


def _cause(err: BaseException) -> BaseException:
    """The user's exception inside Ray's wrapper (``RayTaskError(cause)``)."""
    inner = getattr(err, "cause", None)
    return inner if isinstance(inner, BaseException) else err


# ----------------------------------------------------------------------------- reports
EPOCH_KEY = "_sweeper_step"  # the "_sweeper_" keys are dropped from outcomes (tune.public_metrics)
MLFLOW_KEY = "_sweeper_mlflow"
RUN_KEY = "_sweeper_run_id"
"""Keys of a multi-worker trial's Tune result that carry the epoch, its metrics as logged
to MLflow and the trial's run id (for :class:`EpochLogCallback`, not for Tune)."""


def _trial_report_callback_class() -> type:
    from ray.tune.integration.ray_train import TuneReportCallback

    class TrialReportCallback(TuneReportCallback):
        """``TuneReportCallback`` (rank 0's metrics of each report to the trial's Tune
        session) with the trial's MLflow run id added: the driver logs the epoch when Tune
        takes it (:class:`EpochLogCallback`)."""

        def __init__(self, run_id: str | None):
            super().__init__()
            self.run_id = run_id

        def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
            first = dict(metrics[0])
            if self.run_id is not None:
                first[RUN_KEY] = self.run_id
            super().after_report(run_context, [first, *metrics[1:]], checkpoint)

    return TrialReportCallback


def TrialReportCallback(run_id: str | None) -> Any:  # noqa: N802 (a class, built lazily)
    return _trial_report_callback_class()(run_id)


class TrainReporter(TuneReporter):
    """The trainer's Reporter on one Train worker: every rank reports each epoch to Train
    (the same number of reports on every rank, Train's contract), rank 0 with the
    checkpoint; rank 0's report carries the epoch's metrics, which the trial's
    :func:`TrialReportCallback` hands to Tune and then logs to MLflow."""

    def __init__(self, required: Mapping[str, str], rank: int):
        super().__init__(None, required)
        self.rank = rank

    def report(self, step: int, metrics: Mapping[str, Any], checkpoint: dict | None = None) -> None:
        import ray.train

        out: dict[str, Any] = {**self.tune_metrics(metrics), EPOCH_KEY: int(step),
                               MLFLOW_KEY: tracking.numeric_metrics(metrics)}
        name = f"checkpoint_{int(step):06d}" if checkpoint is not None else None
        if checkpoint is None or self.rank != 0:
            ray.train.report(out, checkpoint_dir_name=name)
            return
        from dmlcore.train import save_checkpoint

        with tempfile.TemporaryDirectory(prefix="sweeper-ckpt-") as d:
            save_checkpoint(checkpoint, Path(d) / "checkpoint.pt")
            ray.train.report(out, checkpoint=ray.train.Checkpoint.from_directory(d), checkpoint_dir_name=name)


_EPOCH_TRACKER: list[tracking.Tracker] = []


@contextlib.contextmanager
def logging_epochs(tracker: tracking.Tracker | None) -> Iterator[None]:
    """While the body runs, :class:`EpochLogCallback` logs multi-worker epochs with ``tracker``
    (held here, not in the callback: Tune pickles its callbacks into the experiment folder,
    and a tracking URI may carry a password)."""
    if tracker is not None:
        _EPOCH_TRACKER.append(tracker)
    try:
        yield
    finally:
        if tracker is not None:
            _EPOCH_TRACKER.remove(tracker)


def log_epoch(result: Mapping[str, Any]) -> None:
    """Log a multi-worker trial's epoch that Tune has just taken to the trial's MLflow run.

    Called by the driver in Tune's ``on_trial_result``, which Tune calls for every result it
    takes, the one a scheduler stops the trial at included, and for no other: the epochs a
    stopped trial's workers train on until Tune's kill reaches them never get there, and
    every epoch Tune took is in MLflow before the driver settles the runs (the driver runs
    its callbacks before ``Tuner.fit`` returns). A one-worker trial logs its epochs itself,
    before its ``tune.report``, which blocks until Tune asks for the next epoch."""
    run_id, step, metrics = result.get(RUN_KEY), result.get(EPOCH_KEY), result.get(MLFLOW_KEY)
    if not _EPOCH_TRACKER or not run_id or step is None or not isinstance(metrics, Mapping):
        return
    try:
        _EPOCH_TRACKER[-1].log_metrics(str(run_id), metrics, int(step))
    except Exception as err:  # tracking trouble never stops the study
        _log.warning("could not log epoch %s of run %s: %s", step, run_id,
                                            tracking.error_line(err))


def _epoch_log_callback_class() -> type:
    from ray.tune import Callback

    class EpochLogCallback(Callback):
        """The driver's Tune callback of a multi-worker study: :func:`log_epoch` of each result."""

        def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
            log_epoch(result)

    return EpochLogCallback


def EpochLogCallback() -> Any:  # noqa: N802 (a class, built lazily)
    return _epoch_log_callback_class()()


# ----------------------------------------------------------------------------- the workers
def setup_process(ctx: TrialContext, cpus: float) -> None:
    """What a trial process needs before it builds its config: the user's plug-ins, the
    driver's MLflow settings, its working directory and its CPU share."""
    if ctx.plugins:
        from dmlcore import plugins

        plugins.load(ctx.plugins, "plugins", ctx.plugin_paths)
    if ctx.env:
        os.environ.update(ctx.env)
    if ctx.cwd and os.path.isdir(ctx.cwd):
        os.chdir(ctx.cwd)
    os.environ["DMLCORE_NUM_CPUS"] = f"{cpus:g}"


def worker_loop(conf: dict[str, Any]) -> None:
    """``train_loop_per_worker``: the trial's Trainer on one rank."""
    import ray.train

    from dmlcore.train import Trainer, load_checkpoint

    ctx: TrialContext = conf["ctx"]
    setup_process(ctx, conf["cpu"])
    rank = ray.train.get_context().get_world_rank()
    cfg = RunConfig.model_validate(conf["config"])
    resume = conf.get("resume")
    ckpt = ray.train.get_checkpoint()  # a retried worker group: the latest checkpoint of this run
    if ckpt is not None:
        with ckpt.as_directory() as d:
            resume = dict(load_checkpoint(Path(d) / "checkpoint.pt"))
        if rank == 0 and conf.get("run_id") and ctx.tracking_uri:
            tracking.Tracker(ctx.tracking_uri).set_tags(conf["run_id"], {"resumed_from_epoch": int(resume.get("epoch", 0))})
    if conf.get("gpu"):
        import torch
        from ray.train.torch import get_device

        torch.cuda.set_device(get_device())
    trainer = Trainer(cfg, reporter=TrainReporter(ctx.required, rank), progress=False)
    result = trainer.fit(resume=resume)
    if rank == 0 and conf.get("run_id") and ctx.tracking_uri:  # as a one-worker trial does, from rank 0
        import contextlib

        from .models import log_selected_model
        from .pictures import log_pictures

        logger = tracking.RunLogger(tracking.Tracker(ctx.tracking_uri), conf["run_id"])
        from .conventions import log_split

        try:  # the split as the run's dataset inputs, as a one-worker trial logs them
            log_split(logger.tracker, logger.run_id, trainer.data)
        except Exception as err:  # never fails a trained trial
            print(f"warning: could not log the split as dataset inputs: {tracking.error_line(err)}", file=sys.stderr)
        alone = trainer.dp.local_embedding() if trainer.dp is not None else contextlib.nullcontext()
        with alone:  # nothing here may wait for the other ranks
            log_selected_model(logger, trainer, result)  # never fails the trial
            log_pictures(trainer, result, logger)  # never raises

