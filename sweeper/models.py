"""The selected model of a run: logged as an MLflow 3 LoggedModel, loaded back anywhere.

At the epoch ``eval.select_on`` selects (``val``/``test``: the best ``select_metric``;
``last``: the last evaluation) the trainer keeps a CPU copy of the weights
(``Trainer.best_state``, also carried in its checkpoints as ``best_model`` so a restored
trial still has them). When the trial has finished, :func:`log_selected_model` logs them
from the Ray worker through the client API (the trials have no fluent "active run"):

* ``MlflowClient.create_logged_model`` in the run's experiment (``source_run_id`` = the
  child run, the run's params, tags ``selected_epoch``/``select_on``/``select_metric``),
  then ``mlflow.pytorch.log_model(model, name=, step=<selected epoch>, model_id=, run_id=)``:
  MLflow links the run's metrics of that step (``test/recall_at_1`` of the selected epoch,
  ...) to the model; the run's ``best/...`` metrics are linked too (logged again with
  ``model_id``). The flavor is MLflow's pickled module (``mlflow.pytorch.load_model`` works
  where dmlcore is installed) with an input example (one eval-transformed test image) and
  its signature; beside it, as extra files, ``config.yaml`` (the resolved run config) and
  ``selected_state.pt`` (the plain state dict).
* :func:`load_selected` is what ``sweeper embed``/``sweeper retrieve`` use: it finds the
  model by run id (or a ``models:/`` URI), downloads the two extra files only, rebuilds the
  network from the config through dmlcore's registries (``model.pretrained`` dropped: the
  weights come from the state dict) and loads the weights with ``torch.load(weights_only=True,
  map_location=...)``: no unpickling of code, any machine, CPU by default.

A failure to log the model never fails a finished trial: one warning line and the run
tag ``model_error``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

from . import tracking

MODEL_NAME = "selected_model"
"""The LoggedModel's name (one per run)."""
STATE_FILE = "selected_state.pt"
CONFIG_FILE = "config.yaml"
TAG_MODEL_ID = "model_id"
TAG_MODEL_ERROR = "model_error"
_log = logging.getLogger(__name__)


class ModelNotFound(ValueError):
    """A run id / URI that names no logged model (one line for the user)."""


# ----------------------------------------------------------------------------- logging
@contextlib.contextmanager
def _tracking_uri(uri: str) -> Iterator[None]:
    """MLflow's fluent helpers (``mlflow.pytorch.log_model``) read the global tracking URI."""
    try:
        from mlflow.tracking._tracking_service.utils import _use_tracking_uri
    except ImportError:  # pragma: no cover (older/newer MLflow): set it for the process
        import mlflow

        mlflow.set_tracking_uri(uri)
        yield
        return
    # MLflow's set_tracking_uri also sets $MLFLOW_TRACKING_URI, and restoring an unset URI
    # unsets it: keep the user's own value (a resume reads the password from it)
    saved = os.environ.get("MLFLOW_TRACKING_URI")
    try:
        with _use_tracking_uri(uri):
            yield
    finally:
        if saved is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = saved


@contextlib.contextmanager
def _quiet(*names: str) -> Iterator[None]:
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def selected_state(trainer: Any) -> tuple[dict | None, int | None]:
    """The selected epoch's weights and epoch the trainer kept (``None`` when it has none)."""
    state = getattr(trainer, "best_state", None)
    return (state, getattr(trainer, "best_state_epoch", None)) if state is not None else (None, None)


def rebuild_model(cfg: Any, state: Mapping[str, Any] | None = None) -> Any:
    """The run's network from its config (dmlcore's registries), weights from ``state``.

    ``model.pretrained`` is dropped (nothing to find on another machine: the weights are in
    ``state``); ``freeze_bn`` only matters in train mode, so it is dropped too."""
    from dmlcore.models.embedding import build_model

    mc = cfg.model.model_copy(update={"pretrained": None, "freeze_bn": False})
    model = build_model(mc)
    if state is not None:
        model.load_state_dict(state)
    return model.eval()


def input_example(trainer: Any) -> Any:
    """One test image as the model sees it (eval transform applied): float32 ``1 x 3 x S x S``."""
    import torch

    from dmlcore.data.images import stack_images

    ds = trainer.data.test
    x = stack_images([ds.uint8()[0][0]])
    with torch.no_grad():
        return trainer.eval_tf(x.to(trainer.device)).float().cpu().numpy()


def log_selected_model(logger: tracking.RunLogger | None, trainer: Any, result: Any) -> str | None:
    """Log the selected weights of a finished run as its LoggedModel; the model id, or None.

    Never raises: a failure is one warning line and the run tag ``model_error``."""
    if logger is None or not getattr(trainer.cfg.eval, "log_model", True):
        return None
    try:
        state, epoch = selected_state(trainer)
        if state is None:
            raise RuntimeError("the trainer kept no selected weights (a checkpoint written before they were saved)")
        return _log_model(logger, trainer, result, state, int(epoch))
    except Exception as err:
        line = tracking.error_line(err)
        _log.warning("run %s: the selected model was not logged: %s", logger.run_id, line)
        with contextlib.suppress(Exception):
            logger.tracker.set_tags(logger.run_id, {TAG_MODEL_ERROR: line})
        return None


def _log_model(logger: tracking.RunLogger, trainer: Any, result: Any, state: dict, epoch: int) -> str:
    import torch
    from mlflow.entities import Metric

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # log_model reads the model back once
    tracker, run_id = logger.tracker, logger.run_id
    client = tracker.client
    cfg = trainer.cfg
    model = rebuild_model(cfg, state)
    x = input_example(trainer)
    with torch.no_grad():
        y = model(torch.from_numpy(x)).numpy()
    run = tracker.get_run(run_id)
    ev = cfg.eval
    tags = {"selected_epoch": str(epoch), "select_on": ev.select_on, "select_metric": ev.select_metric,
            "dmlcore_version": tracking.version_tags()["dmlcore_version"]}
    params = {k: tracking.stringify(v) for k, v in run.data.params.items()}
    lm = tracking._retry(lambda: client.create_logged_model(
        experiment_id=run.info.experiment_id, name=MODEL_NAME, source_run_id=run_id,
        params=params, tags=tags, model_type="embedding",
    ))
    try:
        _log_files(tracker, run_id, lm.model_id, model, state, cfg, x, y, epoch)
    except BaseException:
        with contextlib.suppress(Exception):  # never left PENDING: sweeper embed looks for READY models only
            from mlflow.entities import LoggedModelStatus

            client.finalize_logged_model(lm.model_id, LoggedModelStatus.FAILED)
        raise
    # log_model linked the run's metrics of step ``epoch``; ``best/...`` (logged at the last step)
    # are linked the same way: the same rows again with model_id (same timestamp: no new history rows)
    step = int(max((h.get("epoch", 0) for h in result.history), default=epoch))
    linked = []
    for key in (f"best/{k}" for k in (result.best or {})) if step != epoch else ():
        hist = tracking._retry(lambda: client.get_metric_history(run_id, key))
        linked += [Metric(m.key, m.value, m.timestamp, m.step, model_id=lm.model_id) for m in hist
                   if m.step == step and m.model_id is None]
    for i in range(0, len(linked), 1000):
        chunk = linked[i : i + 1000]
        tracking._retry(lambda: client.log_batch(run_id, metrics=chunk, synchronous=True))
    tracker.set_tags(run_id, {TAG_MODEL_ID: lm.model_id, "selected_epoch": epoch})
    if TAG_MODEL_ERROR in run.data.tags:  # an earlier attempt of a retried trial failed to log it
        tracking._retry(lambda: client.delete_tag(run_id, TAG_MODEL_ERROR))
    return lm.model_id


def _log_files(tracker: tracking.Tracker, run_id: str, model_id: str, model: Any, state: dict, cfg: Any,
               x: Any, y: Any, epoch: int) -> None:
    import mlflow
    import torch
    from mlflow.models import infer_signature

    with tempfile.TemporaryDirectory(prefix="sweeper-model-") as d:
        state_path, cfg_path = Path(d) / STATE_FILE, Path(d) / CONFIG_FILE
        torch.save(state, state_path)
        cfg_path.write_text(tracking.redact(cfg.to_yaml()))
        with _tracking_uri(tracker.uri), _quiet("mlflow.pytorch", "mlflow.models.model"):
            # (its warning about pickle: sweeper never unpickles, it loads selected_state.pt)
            mlflow.pytorch.log_model(
                model, name=MODEL_NAME, model_id=model_id, run_id=run_id, step=epoch,
                input_example=x, signature=infer_signature(x, y), serialization_format="pickle",
                pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
                extra_files=[str(state_path), str(cfg_path)],
            )


# ----------------------------------------------------------------------------- loading
_MODELS_URI = re.compile(r"^models:/(?P<rest>.+)$")


@dataclass
class SelectedModel:
    """A loaded selected model: the rebuilt network, its run config, where it came from."""

    model: Any
    config: Any
    model_id: str
    run_id: str | None
    epoch: int | None


def find_model(tracker: tracking.Tracker, ref: str) -> Any:
    """The LoggedModel of ``ref``: a run id, ``models:/<model id>`` or ``models:/<name>/<version>``."""
    from mlflow.exceptions import MlflowException

    client = tracker.client
    m = _MODELS_URI.match(ref)
    try:
        if m is not None:
            rest = m["rest"].strip("/")
            if "/" in rest:  # a registered model version
                name, version = rest.rsplit("/", 1)
                mv = client.get_model_version(name, version)
                if not getattr(mv, "model_id", None):
                    raise ModelNotFound(f"{ref}: this model version has no LoggedModel")
                rest = mv.model_id
            return client.get_logged_model(rest)
        run = client.get_run(ref)
    except MlflowException as err:
        if "RESOURCE_DOES_NOT_EXIST" in str(getattr(err, "error_code", "")) or "not found" in str(err).lower():
            what = "model" if m is not None else "run"
            raise ModelNotFound(f"{ref}: no such {what} in {tracking.redact_uri(tracker.uri)}") from None
        raise
    models = tracking._retry(lambda: client.search_logged_models(
        experiment_ids=[run.info.experiment_id], filter_string=f"source_run_id = '{run.info.run_id}'",
    ))
    models = [lm for lm in models if lm.name == MODEL_NAME and str(lm.status).endswith("READY")]
    if not models:
        why = run.data.tags.get(TAG_MODEL_ERROR)
        raise ModelNotFound(
            f"run {ref} has no selected model" + (f" (logging it failed: {why})" if why else
                                                   " (a run of an older version, not finished, or --no-mlflow)")
        )
    return max(models, key=lambda lm: lm.creation_timestamp or 0)


def load_selected(ref: str, tracking_uri: str | None = None, device: str = "cpu",
                  overrides: Mapping[str, Any] | None = None) -> SelectedModel:
    """Load the selected model of a run id / ``models:/`` URI onto ``device`` (CPU by default)."""
    import mlflow
    import torch

    from dmlcore.config import load_config

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    tracker = tracking.Tracker(tracking_uri)
    lm = find_model(tracker, ref)
    base = lm.artifact_location.rstrip("/")
    with tempfile.TemporaryDirectory(prefix="sweeper-load-") as d, _tracking_uri(tracker.uri):
        cfg_file = mlflow.artifacts.download_artifacts(artifact_uri=f"{base}/extra_files/{CONFIG_FILE}", dst_path=d)
        state_file = mlflow.artifacts.download_artifacts(artifact_uri=f"{base}/extra_files/{STATE_FILE}", dst_path=d)
        cfg = load_config(cfg_file, dict(overrides or {}))
        state = torch.load(state_file, map_location=device, weights_only=True)
    model = rebuild_model(cfg, state).to(device)
    epoch = lm.tags.get("selected_epoch")
    return SelectedModel(model, cfg, lm.model_id, lm.source_run_id, int(epoch) if epoch else None)
