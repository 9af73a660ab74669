"""Pictures overhead: the time a run's pictures add to a quick trial (goal: < 5%).

The trial is trial #000 of ``sweeper run studies/quickstart.yaml --quick`` (digits, 2
epochs of 5 steps, evaluations on test, val and train), run in this process the way a Ray
worker runs it (:func:`sweeper.tune._run_trial`): an MLflow child run in a temporary SQLite
store (params, config.yaml), the split as its dataset inputs, ``Trainer.fit`` reporting
every epoch to MLflow, the selected model as its LoggedModel, then the run is set FINISHED.
With ``eval.pictures: true`` the trial also draws and logs its pictures
(:func:`sweeper.pictures.log_pictures`, timed on its own). Without Ray: Ray's own
per-trial cost would only make the trial longer and the ratio smaller.

The trial used to leave out the dataset inputs and the LoggedModel (0.3-1 s on the shared
cores), which every trial of a study logs by default (``eval.log_model: true``): that
compared the pictures with a shorter trial than the one they are part of.

One warm-up trial first (imports, faiss and torch start-up: what every trial pays in
its evaluation anyway), then ``--reps`` pairs alternating off/on. The first pictures
call in the process pays the pictures' own imports (Pillow's drawing, fonts); it is
counted (the ``max`` column). The machine is shared and its load changes within seconds:
besides wall-clock seconds the CPU seconds of this process are printed (the pictures use
one thread; the trial's CPU seconds include torch's second thread), a ratio that moves
less with the load.

    python benchmarks/pictures_overhead.py [--reps 5] [--study studies/quickstart.yaml]

Prints the trial's time with pictures off, the pictures' time, and the ratios
pictures / trial (median and worst) and (trial on - trial off) / trial off.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")


def one_trial(cfg, tracker, experiment_id: str) -> tuple[float, float, int, dict[str, float], float, float]:
    """(trial seconds, pictures seconds, files logged, seconds per picture, trial CPU seconds,
    pictures CPU seconds) of one trial as a Ray worker runs it."""
    from dmlcore.train import Trainer
    from sweeper import conventions, tracking
    from sweeper.models import log_selected_model
    from sweeper.pictures import log_pictures

    t0, c0 = time.perf_counter(), time.process_time()
    logger, _ = tracking.open_run(tracker, experiment_id, cfg.name, cfg, {tracking.TAG_ROLE: "trial"})
    with tracking.recording(logger, killed=(SystemExit,)):
        trainer = Trainer(cfg, reporter=logger, progress=False)
        conventions.log_split(logger.tracker, logger.run_id, trainer.build().data)
        result = trainer.fit()
        log_selected_model(logger, trainer, result)
        t1, c1 = time.perf_counter(), time.process_time()
        files = log_pictures(trainer, result, logger)
        pictures_s, pictures_cpu = time.perf_counter() - t1, time.process_time() - c1
    total, total_cpu = time.perf_counter() - t0, time.process_time() - c0
    metrics = tracker.get_run(logger.run_id).data.metrics
    per = {k[len("time/pictures/"):-2]: v for k, v in metrics.items() if k.startswith("time/pictures/")}
    return total, pictures_s, len(files), per, total_cpu, pictures_cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--study", default="studies/quickstart.yaml")
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()

    from sweeper import tracking
    from sweeper.study import apply_overrides, load_study

    study = load_study(args.study, quick=True)
    base = study.trials[0].config
    on = apply_overrides(base, {"eval.pictures": True}, "benchmark")
    off = apply_overrides(base, {"eval.pictures": False}, "benchmark")
    with tempfile.TemporaryDirectory(prefix="pictures-bench-") as d:
        tracker = tracking.Tracker(f"sqlite:///{Path(d) / 'mlflow.db'}")
        exp = tracker.experiment_id("pictures-overhead")
        one_trial(off, tracker, exp)  # warm-up
        t_off, t_on, t_pic, n_files, per, c_off, c_pic = [], [], [], 0, {}, [], []
        for _ in range(args.reps):
            r = one_trial(off, tracker, exp)
            t_off.append(r[0])
            c_off.append(r[4])
            total, pic, n_files, each, _, pic_cpu = one_trial(on, tracker, exp)
            t_on.append(total)
            t_pic.append(pic)
            c_pic.append(pic_cpu)
            for k, v in each.items():
                per.setdefault(k, []).append(v)
    off_s, on_s, pic_s = statistics.median(t_off), statistics.median(t_on), statistics.median(t_pic)
    off_cpu, pic_cpu = statistics.median(c_off), statistics.median(c_pic)
    print(f"trial: {args.study} --quick #000 ({base.data.dataset}, {base.train.epochs} epochs x "
          f"{base.batch.iterations_per_epoch} steps), {args.reps} pairs after one warm-up trial, cpu threads "
          f"{__import__('torch').get_num_threads()}")
    print(f"trial with pictures off     median {off_s:7.3f} s   (all: {', '.join(f'{t:.2f}' for t in t_off)})")
    print(f"trial with pictures on      median {on_s:7.3f} s   (all: {', '.join(f'{t:.2f}' for t in t_on)})")
    print(f"pictures ({n_files} files logged)   median {pic_s:7.3f} s   max {max(t_pic):.3f} s")
    print("  of which " + ", ".join(f"{k} {statistics.median(v):.3f}" for k, v in per.items()) + " s (medians)")
    print(f"ratio pictures / trial off: median {pic_s / off_s:.3f}   worst {max(t_pic) / off_s:.3f}   (goal < 0.05)")
    print(f"ratio (on - off) / off:     {(on_s - off_s) / off_s:+.3f}   (noisy: two separate trials)")
    print(f"CPU seconds: trial off median {off_cpu:.3f} s (all: {', '.join(f'{t:.2f}' for t in c_off)}), pictures "
          f"median {pic_cpu:.3f} s (all: {', '.join(f'{t:.3f}' for t in c_pic)}): ratio {pic_cpu / off_cpu:.3f}")


if __name__ == "__main__":
    main()
