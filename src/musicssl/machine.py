"""What this machine gives the process."""

from __future__ import annotations

import os

__all__ = ["usable_cpus"]


def usable_cpus() -> int:
    """The CPUs this process may run on: its affinity (``taskset``, a cluster scheduler's cgroup
    cpuset), not every CPU of the machine (``os.cpu_count``), which on a shared node can be many times
    more. At least 1. A CPU quota without a cpuset (``docker --cpus``) is not seen: pass the counts
    (``--workers``, ``--threads``) there."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)
