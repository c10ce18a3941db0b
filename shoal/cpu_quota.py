"""How many CPU threads the engine should use: `shoal serve --threads`, else the cgroup CPU quota.

torch (and OpenMP) size their thread pools to the host's cores and ignore a container's CPU limit, so a
pod limited to 4 CPUs on a 64-core node would run 64 threads and be throttled by the CFS quota. The quota is
read from cgroup v2 (`cpu.max`: "<quota> <period>" or "max <period>", the smallest along the process's
cgroup path) or cgroup v1 (`cpu.cfs_quota_us` / `cpu.cfs_period_us`; -1 is no quota). Standard library only.
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_SELF_CGROUP = Path("/proc/self/cgroup")
THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _v2_dirs(root: Path, proc_cgroup: Path) -> list[Path]:
    """The process's cgroup v2 directory and its ancestors up to root (root alone when unknown)."""
    relative = None
    for line in (_read(proc_cgroup) or "").splitlines():
        if line.startswith("0::"):
            relative = line[3:].strip("/")
    dirs = [root]
    if relative:
        parts = relative.split("/")
        dirs += [root.joinpath(*parts[:i]) for i in range(1, len(parts) + 1)]
    return dirs


def cgroup_cpu_quota(root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_SELF_CGROUP) -> float | None:
    """The CPU quota in CPUs (2.5 for "250000 100000"), or None when there is none or no cgroup."""
    quotas = []
    for directory in _v2_dirs(root, proc_cgroup):  # cgroup v2: the tightest limit on the path applies
        text = _read(directory / "cpu.max")
        if text:
            quota, _, period = text.partition(" ")
            if quota != "max" and period and float(period) > 0:
                quotas.append(float(quota) / float(period))
    if quotas:
        return min(quotas)
    for controller in ("cpu", "cpu,cpuacct", "cpuacct,cpu"):  # cgroup v1
        quota = _read(root / controller / "cpu.cfs_quota_us")
        period = _read(root / controller / "cpu.cfs_period_us")
        if quota and period:
            if int(quota) > 0 and int(period) > 0:
                return int(quota) / int(period)
            return None
    return None


@dataclass(frozen=True)
class ThreadChoice:
    threads: int | None  # None: leave torch's default
    source: str  # "--threads", "OMP_NUM_THREADS", "cgroup CPU quota 2.5" or "torch default"


def choose_threads(
    requested: int | None, root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_SELF_CGROUP, environ=None
) -> ThreadChoice:
    """--threads first, then an OMP_NUM_THREADS the operator set, then the cgroup quota (rounded down, at
    least 1, at most the CPUs this process may run on)."""
    environ = os.environ if environ is None else environ
    if requested is not None:
        if requested < 1:
            raise ValueError(f"--threads must be at least 1, got {requested}")
        return ThreadChoice(requested, "--threads")
    if environ.get("OMP_NUM_THREADS", "").isdigit() and int(environ["OMP_NUM_THREADS"]) > 0:
        return ThreadChoice(int(environ["OMP_NUM_THREADS"]), "OMP_NUM_THREADS")
    quota = cgroup_cpu_quota(root, proc_cgroup)
    if quota is None:
        return ThreadChoice(None, "torch default")
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return ThreadChoice(max(1, min(math.floor(quota), usable)), f"cgroup CPU quota {quota:g}")


def apply_threads(choice: ThreadChoice, environ=None) -> int | None:
    """Set the thread count for this process and for processes it spawns (the engine core, and torch in
    this process if imported later, read OMP_NUM_THREADS when they import torch). Returns the effective
    count, or None for torch's default where torch is not imported yet.

    torch is not imported here: the HTTP process of `shoal serve` never needs it (its engine core is another
    process), and importing it costs that process ~4 s and ~250 MB at start."""
    environ = os.environ if environ is None else environ
    if choice.threads is not None:
        for name in THREAD_ENV:
            environ[name] = str(choice.threads)
    torch = sys.modules.get("torch")
    if torch is None:
        return choice.threads
    if choice.threads is not None:
        torch.set_num_threads(choice.threads)
    return torch.get_num_threads()
