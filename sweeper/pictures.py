"""Log a trained run's pictures (:mod:`dmlcore.pictures`) as artifacts of its MLflow run.

Called once at the end of a trial (:func:`sweeper.tune._run_trial`) and of ``sweeper
train``, after ``Trainer.fit`` and before the run is marked FINISHED. The files go under
``pictures/`` of the run; the time the pictures took is the metric ``time/pictures_s``
(each picture's: ``time/pictures/<name>_s``);
pictures that failed are named in the tag ``pictures_failed`` (each also logged as one
warning). Nothing here raises: a picture (or the logging of one) never fails a trial.
``eval.pictures: false`` turns it all off.
"""

from __future__ import annotations

import logging
import tempfile
import time
from typing import Any

from . import tracking

ARTIFACT_DIR = "pictures"
TAG_FAILED = "pictures_failed"
METRIC_SECONDS = "time/pictures_s"
_log = logging.getLogger(__name__)


def log_pictures(trainer: Any, result: Any, logger: tracking.RunLogger | None) -> list[str]:
    """Draw and log the pictures of ``trainer``'s selected epoch; the artifact paths logged."""
    if logger is None or not trainer.cfg.eval.pictures:
        return []
    from dmlcore import pictures

    t0 = time.perf_counter()
    logged: list[str] = []
    failed: dict[str, str] = {}
    timings: dict[str, float] = {}
    try:
        inputs = pictures.from_trainer(trainer, result)
        with tempfile.TemporaryDirectory(prefix="sweeper-pictures-") as d:
            rendered = pictures.render(inputs, d)
            failed.update(rendered.failed)
            timings.update(rendered.timings)
            if rendered.files:
                logger.tracker.log_artifacts(logger.run_id, d, ARTIFACT_DIR)
                logged += [f"{ARTIFACT_DIR}/{f.name}" for f in rendered.files]
        if rendered.skipped:
            _log.info("pictures not drawn: %s", "; ".join(f"{k}: {v}" for k, v in rendered.skipped.items()))
    except Exception as err:  # the run's own results are logged already: never fail it here
        failed["pictures"] = tracking.error_line(err)
        _log.warning("the run's pictures could not be logged: %s", failed["pictures"])
    try:
        step = int(result.history[-1].get("epoch", 0)) if result.history else 0
        per_picture = {f"time/pictures/{k}_s": v for k, v in timings.items()}
        logger.tracker.log_metrics(logger.run_id, {METRIC_SECONDS: time.perf_counter() - t0, **per_picture}, step)
        if failed:
            text = "; ".join(f"{k}: {v}" for k, v in failed.items())
            logger.tracker.set_tags(logger.run_id, {TAG_FAILED: text})
    except Exception as err:
        _log.warning("could not record the pictures' time or failures: %s", tracking.error_line(err))
    return logged
