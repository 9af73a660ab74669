"""Issue 20, item 1 (flat per-trial cost): the live view's tallies kept as rows change equal a
recount of every row, and a refresh draws a bounded set of rows; the digits dataset read
without scikit-learn's loader is the loader's data."""

from __future__ import annotations

import collections
import io
import math
import random
from dataclasses import dataclass, field

import numpy as np
from rich.console import Console

from sweeper import live


@dataclass
class FakeTrial:
    trial_id: str
    config: dict
    status: str = "PENDING"
    last_result: dict = field(default_factory=dict)
    error_file: str | None = None


def _recount(view: live.LiveView) -> dict[str, int]:
    """The counts written out from the rows (what LiveView.counts computed before issue 20)."""
    out = {k: 0 for k in ("pending", "running", "done", "stopped", "failed")}
    for r in view.rows.values():
        key = "running" if r.status in ("retrying", "paused") else r.status
        out[key] = out.get(key, 0) + 1
    out["pending"] += max(0, view.total - len(view.rows))
    return out


def _best(view: live.LiveView, mode: str):
    vals = [(r.best, r) for r in view.rows.values() if r.best is not None and math.isfinite(r.best)]
    if not vals:
        return None
    return (max if mode == "max" else min)(vals, key=lambda x: x[0])[0]


def _drive(mode: str, seed: int, n: int = 300, max_rows: int = 7) -> live.LiveView:
    rng = random.Random(seed)
    view = live.LiveView("m", mode, ["train.seed"], n, console=Console(file=io.StringIO(), width=200), live=False,
                         max_rows=max_rows)
    trials = [FakeTrial(str(i), {"point": {"index": i, "overrides": {"train.seed": i}}}) for i in range(n)]
    for step in range(6 * n):
        t = rng.choice(trials)
        event = rng.random()
        if event < 0.25:
            t.status = "RUNNING"
            view.on_start(t)
        elif event < 0.55:
            r = {"epoch": rng.randint(1, 5), "m": rng.random()}
            if rng.random() < 0.5:
                r["best/m"] = rng.random()
            t.last_result = r
            view.on_result(t, r)
        elif event < 0.75:
            t.status = "TERMINATED"
            if rng.random() < 0.8:
                t.last_result = {**t.last_result, "best_epoch": 1}
            view.on_complete(t)
        elif event < 0.85:
            t.status = "ERROR"
            view.on_error(t)
        elif event < 0.9:
            t.status = "PENDING"
            view.on_recover(t)
        else:
            view.sync(rng.sample(trials, 20))
        if step % 97 == 0:
            assert view.counts() == _recount(view)
    return view


def test_live_tallies_equal_a_recount_of_every_row():
    for mode in ("max", "min"):
        for seed in range(3):
            view = _drive(mode, seed)
            assert view.counts() == _recount(view)
            best = view.best_row()
            expected = _best(view, mode)
            assert (best.best if best is not None else None) == expected
            active = {r.trial_id for r in view.rows.values() if r.status not in ("done", "stopped", "failed")}
            assert set(view._active) == active
            assert set(view._failed) == {r.trial_id for r in view.rows.values() if r.status == "failed"}
            finished = sorted((r.best for r in view.rows.values() if r.status in ("done", "stopped") and r.best is not None),
                              reverse=mode == "max")
            assert [r.best for r in view._top] == finished[: view.max_rows]


def test_a_refresh_draws_at_most_max_rows_whatever_the_trials_done():
    view = _drive("max", 7, n=400, max_rows=5)
    table = view.render().renderables[0]
    assert table.row_count <= 5
    text = io.StringIO()
    Console(file=text, width=200).print(view.render())
    c = _recount(view)
    assert f"done {c['done']}" in text.getvalue() and f"failed {c['failed']}" in text.getvalue()
    assert f"{len(view.rows) - table.row_count} more trials" in text.getvalue()


def test_digits_read_without_sklearn_loader_equal_load_digits():
    from sklearn.datasets import load_digits

    from dmlcore.data.embedded import digits_arrays

    images, target = digits_arrays()
    ref = load_digits()
    assert images.shape == (1797, 8, 8) and np.array_equal(images, ref.images)
    assert np.array_equal(target, ref.target) and target.dtype == ref.target.dtype


def test_checkpoint_index_is_the_newest_checkpoint_of_every_trial(tmp_path):
    """One walk of the execution folder gives, per trial, the checkpoint with the highest
    number (any attempt's experiment folder), as a per-trial search would."""
    import os

    from sweeper.tune import checkpoint_index

    layout = {  # attempt folder -> trial id -> checkpoint numbers
        "exp": {"a": [0, 1, 2], "b": [0], "c": []},
        "resume-1/resume-1": {"a": [3], "b": [], "d": [0, 10, 9]},
    }
    for attempt, trials in layout.items():
        for tid, nums in trials.items():
            for n in nums:
                f = tmp_path / attempt / f"trial_{tid}" / f"checkpoint_{n:06d}" / "checkpoint.pt"
                f.parent.mkdir(parents=True)
                f.write_bytes(b"x")
            (tmp_path / attempt / f"trial_{tid}").mkdir(parents=True, exist_ok=True)
    (tmp_path / "exp" / "trial_b" / "checkpoint_junk").mkdir()
    expected = {}
    for attempt, trials in layout.items():  # written out: highest number wins
        for tid, nums in trials.items():
            for n in nums:
                if tid not in expected or n > expected[tid][0]:
                    expected[tid] = (n, tmp_path / attempt / f"trial_{tid}" / f"checkpoint_{n:06d}" / "checkpoint.pt")
    got = checkpoint_index(tmp_path)
    assert got == {tid: path for tid, (_, path) in expected.items()}
    assert "c" not in got and os.path.basename(str(got["d"].parent)) == "checkpoint_000010"


def test_trial_checkpoints_do_not_force_an_experiment_state_snapshot_during_a_study():
    """Tune's own manager, built as Tune builds it for ``num_to_keep=1``: a trial checkpoint
    forces a snapshot of every trial outside the sweeper's launch, not inside it."""
    from ray.tune.execution.experiment_state import _ExperimentCheckpointManager

    from sweeper.tune import no_forced_state_sync

    def manager():
        m = _ExperimentCheckpointManager.__new__(_ExperimentCheckpointManager)
        m._sync_every_n_trial_checkpoints = 1
        m._trial_num_checkpoints_since_last_sync = collections.Counter()
        m._should_force_sync_up = False
        return m

    m = manager()
    m.on_trial_checkpoint("trial")
    assert m._should_force_sync_up  # Tune's behaviour: forced
    with no_forced_state_sync() as active:
        assert active
        m = manager()
        m.on_trial_checkpoint("trial")
        assert not m._should_force_sync_up
    m = manager()
    m.on_trial_checkpoint("trial")
    assert m._should_force_sync_up  # restored afterwards
