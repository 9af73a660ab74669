"""MLflow's own conventions on the sweeper's experiments and runs (issue 19, item 5).

* **Experiment**: the tag ``mlflow.experimentKind = custom_model_development`` (MLflow 3's
  UI reads it to open the experiment on its runs, not on the GenAI view: the values are
  in ``mlflow/assistant/skills/mlflow-onboarding/SKILL.md`` and the UI's
  ``ExperimentKind``), and ``mlflow.note.content`` (the experiment's description) from
  the study's ``description``.
* **Source and user** on the parent and every child run: ``mlflow.source.name`` (the study
  file), ``mlflow.source.type`` (``LOCAL``), ``mlflow.user`` (who started ``sweeper run``,
  on the driver); ``mlflow.source.git.commit`` comes from :func:`sweeper.tracking.git_info`.
  ``MlflowClient.create_run`` sets none of these (only the fluent ``mlflow.start_run`` does).
* **System metrics** per child run: MLflow's ``SystemMetricsMonitor``
  (``mlflow/system_metrics/system_metrics_monitor.py``) for the run id, sampling every
  :data:`SAMPLING_INTERVAL_S` (short trials: a few points per minute; MLflow's default of
  10 s would give a quick trial none), ``system/cpu_utilization_percentage``,
  ``system/system_memory_usage_*``, disk, network, and ``system/gpu_*`` when
  ``pynvml`` (``nvidia-ml-py``) is importable and a GPU answers. They are the node's
  numbers (all its CPUs and GPUs), not the trial's alone. One sample is always logged
  when the trial ends (MLflow logs nothing for a run shorter than the interval).
  ``MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL`` overrides the interval,
  ``MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING=false`` turns them off.
* **Dataset inputs** per child run: each side of the split (``train``, ``val`` when held
  out, ``test``) is one MLflow dataset input named ``<dataset>/<side>`` with the context
  tag ``mlflow.data.context = <side>`` and the digest :func:`split_digest` of its class
  list and file list, so two runs can be checked for the same split by comparing digests.
"""

from __future__ import annotations

import contextlib
import getpass
import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
NOTE_TAG = "mlflow.note.content"
CONTEXT_TAG = "mlflow.data.context"  # mlflow.utils.mlflow_tags.MLFLOW_DATASET_CONTEXT
SAMPLING_INTERVAL_S = 2.0
DIGEST_CHARS = 32  # MLflow keeps at most 36 characters of a dataset digest

_log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- experiment, source
def experiment_tags(study: Any) -> dict[str, str]:
    """The experiment's kind and description (``study``: a ResolvedStudy)."""
    spec = study.spec
    note = spec.description or f"Study `{spec.name}` ({study.source}), run by `sweeper run`."
    return {EXPERIMENT_KIND_TAG: EXPERIMENT_KIND, NOTE_TAG: note}


def set_experiment_tags(tracker: Any, experiment_id: str, tags: Mapping[str, str]) -> None:
    from .tracking import _retry

    for k, v in tags.items():
        _retry(lambda k=k, v=v: tracker.client.set_experiment_tag(experiment_id, k, v))


def source_tags(source: str | None) -> dict[str, str]:
    """``mlflow.source.*`` and ``mlflow.user`` of a run started here (on the driver)."""
    tags = {"mlflow.source.type": "LOCAL", "mlflow.source.name": str(source or "sweeper")}
    try:
        tags["mlflow.user"] = getpass.getuser()
    except Exception:  # no user name in a container without passwd entry
        pass
    return tags


# ----------------------------------------------------------------------------- system metrics
def _monitor_class() -> type:
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    class TrialMetricsMonitor(SystemMetricsMonitor):
        """MLflow's monitor, which also logs one sample for a run shorter than the interval."""

        def finish(self) -> None:
            super().finish()
            if self._logging_step > 0:
                return
            metrics = self.aggregate_metrics()  # what the loop sampled but never logged
            if not metrics:
                self.collect_metrics()
                metrics = self.aggregate_metrics()
            if metrics:
                self.publish_metrics(metrics)
                self.mlflow_logger.flush()

    return TrialMetricsMonitor


def _enabled() -> bool:
    return os.environ.get("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "").strip().lower() not in ("false", "0", "no")


@contextlib.contextmanager
def system_metrics(run_id: str | None, tracking_uri: str | None) -> Iterator[None]:
    """System metrics of the body's duration logged to ``run_id`` (nothing without a run).
    A monitor that cannot start or stop only logs a warning: it never fails a trial."""
    monitor = None
    if run_id and _enabled():
        try:
            monitor = _monitor_class()(run_id, sampling_interval=SAMPLING_INTERVAL_S, tracking_uri=tracking_uri,
                                       resume_logging=True)
            monitor.start()
        except Exception as err:
            _log.warning("no system metrics for run %s: %s", run_id, err)
            monitor = None
    try:
        yield
    finally:
        if monitor is not None:
            try:
                monitor.finish()
            except Exception as err:
                _log.warning("system metrics of run %s: %s", run_id, err)


# ----------------------------------------------------------------------------- dataset inputs
def sample_ids(source: Any, indices: Sequence[int]) -> list[str]:
    """The file list of a split side: each file's path relative to the folder holding all
    of the dataset's files (the same split has the same list on any machine); for an
    in-memory dataset the sample numbers ``#<index>``."""
    paths = getattr(source, "paths", None)
    if not paths:
        return [f"#{int(i)}" for i in indices]
    root = os.path.commonpath([os.path.dirname(p) for p in paths]) if len(paths) > 1 else os.path.dirname(paths[0])
    return [os.path.relpath(paths[int(i)], root) for i in indices]


def split_digest(classes: Sequence[tuple[int, str]], files: Sequence[str]) -> str:
    """sha256 of ``{"classes": [[id, name], ...], "files": [...]}`` (compact JSON, keys
    sorted), first :data:`DIGEST_CHARS` hex digits."""
    payload = json.dumps({"classes": [[int(c), str(n)] for c, n in classes], "files": list(files)},
                         sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(payload.encode()).hexdigest()[:DIGEST_CHARS]


def split_sides(data: Any) -> list[dict[str, Any]]:
    """name, context, digest, profile and source of each side of a DataBundle's split."""
    source = data.source
    dataset = str(data.info.get("dataset") or getattr(source, "name", "dataset"))
    paths = getattr(source, "paths", None)
    where = (os.path.commonpath([os.path.dirname(p) for p in paths]) if paths and len(paths) > 1
             else (os.path.dirname(paths[0]) if paths else None))
    out = []
    for side, ds in (("train", data.train), ("val", data.val), ("test", data.test)):
        if ds is None:
            continue
        names = getattr(source, "class_names", {}) or {}
        classes = [(int(c), names.get(int(c), str(int(c)))) for c in ds.class_ids]
        files = sample_ids(source, ds.indices)
        out.append({
            "name": f"{dataset}/{side}",
            "context": side,
            "digest": split_digest(classes, files),
            "profile": {"num_samples": len(files), "num_classes": len(classes),
                        "split": str(data.info.get("split", ""))},
            "source_type": "local" if where else "code",
            "source": {"uri": str(Path(where).resolve())} if where else {"dataset": dataset, "in_memory": True},
        })
    return out


def log_split(tracker: Any, run_id: str, data: Any) -> None:
    """The split's sides as the run's dataset inputs (once: a resumed run has them).

    Never fails the run: concurrent trials of one experiment create the same dataset rows
    at the same time, and MLflow's check-then-insert then meets the other trial's row (a
    unique-constraint error on PostgreSQL); that is retried (the second attempt finds the
    row), anything else is one warning."""
    from .tracking import error_line

    for attempt in range(4):
        try:
            _log_split(tracker, run_id, data)
            return
        except Exception as err:  # noqa: BLE001 (a picture of the run, never its failure)
            text = str(err).lower()
            if attempt < 3 and any(w in text for w in ("unique", "duplicate", "integrity")):
                time.sleep(0.2 * (attempt + 1))
                continue
            _log.warning("could not log the split as dataset inputs: %s", error_line(err))
            return


def _log_split(tracker: Any, run_id: str, data: Any) -> None:
    from mlflow.entities import Dataset, DatasetInput, InputTag

    from .tracking import _retry

    run = tracker.get_run(run_id)
    if run.inputs is not None and run.inputs.dataset_inputs:
        return
    inputs = [
        DatasetInput(
            Dataset(s["name"], s["digest"], s["source_type"], json.dumps(s["source"], sort_keys=True),
                    profile=json.dumps(s["profile"], sort_keys=True)),
            tags=[InputTag(CONTEXT_TAG, s["context"])],
        )
        for s in split_sides(data)
    ]
    _retry(lambda: tracker.client.log_inputs(run_id, datasets=inputs))
