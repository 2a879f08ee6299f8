"""What the machine gives the process: affinity and the cgroup CPU quota."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from musicssl import machine
from musicssl.machine import cpu_quota, usable_cpus


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def _proc(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "proc-self-cgroup"
    path.write_text(text)
    return path


def test_cgroup_v2_quota_is_quota_over_period_of_the_process_cgroup(tmp_path):
    root = tmp_path / "cgroup"
    _write(root / "cpu.max", "max 100000\n")
    _write(root / "kubepods" / "pod1" / "cpu.max", "150000 100000\n")
    proc = _proc(tmp_path, "0::/kubepods/pod1\n")
    assert cpu_quota(proc, root) == pytest.approx(150000 / 100000)


def test_cgroup_v2_the_tightest_level_above_the_process_counts(tmp_path):
    root = tmp_path / "cgroup"
    _write(root / "a" / "cpu.max", "50000 100000\n")   # the parent: half a CPU
    _write(root / "a" / "b" / "cpu.max", "max 100000\n")
    proc = _proc(tmp_path, "0::/a/b\n")
    assert cpu_quota(proc, root) == pytest.approx(0.5)
    # Two limits: the smaller, whichever level holds it.
    _write(root / "a" / "b" / "cpu.max", "150000 100000\n")
    assert cpu_quota(proc, root) == pytest.approx(0.5)
    _write(root / "a" / "cpu.max", "250000 100000\n")
    assert cpu_quota(proc, root) == pytest.approx(1.5)


def test_cgroup_v2_without_a_limit_is_none(tmp_path):
    root = tmp_path / "cgroup"
    _write(root / "cpu.max", "max 100000\n")
    assert cpu_quota(_proc(tmp_path, "0::/\n"), root) is None


def test_a_container_that_sees_its_cgroup_as_the_root_reads_the_root(tmp_path):
    """/proc/self/cgroup names the host's path (/docker/ID), the container's mount holds only its own
    cgroup at the root."""
    root = tmp_path / "cgroup"
    _write(root / "cpu.max", "200000 100000\n")
    assert cpu_quota(_proc(tmp_path, "0::/docker/0123abcd\n"), root) == pytest.approx(2.0)


def test_cgroup_v1_quota_from_cfs_files_under_either_mount_name(tmp_path):
    root = tmp_path / "cgroup"
    _write(root / "cpu,cpuacct" / "job" / "cpu.cfs_quota_us", "300000\n")
    _write(root / "cpu,cpuacct" / "job" / "cpu.cfs_period_us", "100000\n")
    _write(root / "cpu,cpuacct" / "cpu.cfs_quota_us", "-1\n")
    _write(root / "cpu,cpuacct" / "cpu.cfs_period_us", "100000\n")
    proc = _proc(tmp_path, "4:memory:/job\n3:cpu,cpuacct:/job\n0::/\n")
    assert cpu_quota(proc, root) == pytest.approx(3.0)


def test_cgroup_v1_without_a_quota_and_unreadable_files_are_none(tmp_path):
    root = tmp_path / "cgroup"
    _write(root / "cpu" / "cpu.cfs_quota_us", "-1\n")
    _write(root / "cpu" / "cpu.cfs_period_us", "100000\n")
    assert cpu_quota(_proc(tmp_path, "1:cpu:/\n"), root) is None
    _write(root / "cpu" / "cpu.cfs_quota_us", "garbled\n")
    assert cpu_quota(_proc(tmp_path, "1:cpu:/\n"), root) is None
    assert cpu_quota(tmp_path / "no-such-file", root) is None


@pytest.mark.parametrize("quota, expected", [(0.5, 1), (1.0, 1), (1.99, 1), (2.0, 2), (6.5, 6), (64.0, 8),
                                             (None, 8)])
def test_usable_cpus_is_the_quota_rounded_down_within_the_affinity(monkeypatch, quota, expected):
    """Eight CPUs in the affinity; a quota of q CPUs allows floor(q) threads that are not throttled."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    monkeypatch.setattr(machine, "cpu_quota", lambda: quota)
    assert usable_cpus() == expected


@pytest.mark.skipif(shutil.which("taskset") is None or not hasattr(os, "sched_getaffinity"),
                    reason="needs taskset (Linux)")
def test_usable_cpus_follows_taskset():
    """A real process pinned to one CPU counts one, whatever the machine has."""
    cpu = sorted(os.sched_getaffinity(0))[0]
    out = subprocess.run(["taskset", "-c", str(cpu), sys.executable, "-c",
                          "from musicssl.machine import usable_cpus; print(usable_cpus())"],
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "1"
