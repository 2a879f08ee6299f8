"""What this machine gives the process."""

from __future__ import annotations

import math
import os
from pathlib import Path

__all__ = ["cpu_quota", "usable_cpus"]

_PROC_CGROUP = Path("/proc/self/cgroup")
_CGROUP_ROOT = Path("/sys/fs/cgroup")
# cgroup v1 mounts the cpu controller alone or together with cpuacct, under either order of names.
_V1_CPU_MOUNTS = ("cpu", "cpu,cpuacct", "cpuacct,cpu")


def usable_cpus() -> int:
    """The CPUs this process may use: its affinity (``taskset``, a cluster scheduler's cgroup cpuset),
    not every CPU of the machine (``os.cpu_count``), which on a shared node can be many times more, and
    no more than its CPU quota (``docker --cpus``, a Kubernetes CPU limit) allows, rounded down: threads
    beyond a quota are throttled, not run. At least 1."""
    try:
        cpus = max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        cpus = max(1, os.cpu_count() or 1)
    quota = cpu_quota()
    if quota is not None:
        cpus = min(cpus, max(1, math.floor(quota)))
    return cpus


def cpu_quota(proc_cgroup: Path = _PROC_CGROUP, root: Path = _CGROUP_ROOT) -> float | None:
    """The process's CFS CPU quota in CPUs (quota over period, e.g. 1.5), the tightest of its cgroup and
    the cgroups above it, in cgroup v2 (``cpu.max``) and v1 (``cpu.cfs_quota_us`` over
    ``cpu.cfs_period_us``); None where there is none, or where it cannot be read (not Linux, no cgroup
    file system). A cgroup path the process's mount namespace does not show (a container that sees its
    own cgroup as the root) is skipped, and the levels it does show are read."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None
    limits: list[float] = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        hierarchy, controllers, path = parts
        if hierarchy == "0" and controllers == "":  # cgroup v2
            limits += _levels(path, [root], _v2_limit)
        elif "cpu" in controllers.split(","):  # cgroup v1
            limits += _levels(path, [root / name for name in _V1_CPU_MOUNTS], _v1_limit)
    return min(limits) if limits else None


def _levels(path: str, mounts: list[Path], read) -> list[float]:
    """The limits ``read`` finds in the cgroup at ``path`` and each cgroup above it, under each mount."""
    parts = [part for part in path.split("/") if part]
    limits = []
    for mount in mounts:
        for depth in range(len(parts), -1, -1):
            limit = read(mount.joinpath(*parts[:depth]))
            if limit is not None:
                limits.append(limit)
    return limits


def _v2_limit(folder: Path) -> float | None:
    """cgroup v2 ``cpu.max``: "QUOTA PERIOD" in microseconds, QUOTA "max" for no limit."""
    try:
        quota, period = (folder / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else _ratio(int(quota), int(period))
    except (OSError, ValueError):
        return None


def _v1_limit(folder: Path) -> float | None:
    """cgroup v1: ``cpu.cfs_quota_us`` over ``cpu.cfs_period_us``, a quota of -1 for no limit."""
    try:
        quota = int((folder / "cpu.cfs_quota_us").read_text())
        period = int((folder / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return _ratio(quota, period)


def _ratio(quota: int, period: int) -> float | None:
    return quota / period if quota > 0 and period > 0 else None
