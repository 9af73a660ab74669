"""How much of the machine a run may use (CPU share, loader workers)."""

from __future__ import annotations

import os


def available_cpus() -> int:
    """CPUs this run may use: ``DMLCORE_NUM_CPUS`` (set by the sweeper from the trial's
    resources), else the CPUs of this process's affinity mask."""
    env = os.environ.get("DMLCORE_NUM_CPUS")
    if env:
        return max(1, int(float(env)))
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def resolve_workers(n: int) -> int:
    """``data.num_workers``: -1 = the CPU share minus the training process (at most 8)."""
    return min(8, max(0, available_cpus() - 1)) if n < 0 else n
