"""`shoal serve --threads`: the default follows the cgroup CPU quota (fake cgroup v1/v2 files in a temp dir)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from shoal.cpu_quota import ThreadChoice, apply_threads, cgroup_cpu_quota, choose_threads

pytestmark = pytest.mark.timeout(60)


def cgroup_v2(tmp_path, cpu_max: str, nested: str | None = None):
    root = tmp_path / "cgroup"
    (root / "kubepods" / "pod1").mkdir(parents=True)
    (root / "cpu.max").write_text("max 100000\n")
    (root / "kubepods" / "pod1" / "cpu.max").write_text(cpu_max + "\n")
    if nested is not None:
        (root / "kubepods" / "cpu.max").write_text(nested + "\n")
    proc = tmp_path / "proc_self_cgroup"
    proc.write_text("0::/kubepods/pod1\n")
    return root, proc


def test_cgroup_v2_quota(tmp_path):
    root, proc = cgroup_v2(tmp_path, "250000 100000")
    assert cgroup_cpu_quota(root, proc) == 2.5
    usable = len(os.sched_getaffinity(0))
    choice = choose_threads(None, root, proc, environ={})
    assert choice == ThreadChoice(min(2, usable), "cgroup CPU quota 2.5")
    # The tightest limit along the path applies (a parent's 1.5 CPUs).
    root, proc = cgroup_v2(tmp_path / "b", "400000 100000", nested="150000 100000")
    assert cgroup_cpu_quota(root, proc) == 1.5
    assert choose_threads(None, root, proc, environ={}).threads == 1


def test_no_quota_keeps_torch_default(tmp_path):
    root, proc = cgroup_v2(tmp_path, "max 100000")
    assert cgroup_cpu_quota(root, proc) is None
    assert choose_threads(None, root, proc, environ={}) == ThreadChoice(None, "torch default")
    assert cgroup_cpu_quota(tmp_path / "absent", tmp_path / "absent-proc") is None


def test_cgroup_v1_quota(tmp_path):
    cpu = tmp_path / "cpu,cpuacct"
    cpu.mkdir()
    (cpu / "cpu.cfs_quota_us").write_text("50000\n")  # half a CPU: one thread
    (cpu / "cpu.cfs_period_us").write_text("100000\n")
    assert cgroup_cpu_quota(tmp_path, tmp_path / "none") == 0.5
    assert choose_threads(None, tmp_path, tmp_path / "none", environ={}).threads == 1
    (cpu / "cpu.cfs_quota_us").write_text("-1\n")
    assert cgroup_cpu_quota(tmp_path, tmp_path / "none") is None


def test_flag_and_environment_take_precedence(tmp_path):
    root, proc = cgroup_v2(tmp_path, "200000 100000")
    assert choose_threads(3, root, proc, environ={"OMP_NUM_THREADS": "5"}) == ThreadChoice(3, "--threads")
    assert choose_threads(None, root, proc, environ={"OMP_NUM_THREADS": "5"}) == ThreadChoice(
        5, "OMP_NUM_THREADS"
    )
    with pytest.raises(ValueError):
        choose_threads(0, root, proc, environ={})


def test_apply_sets_torch_and_the_environment_a_spawned_core_inherits():
    """In a fresh interpreter (torch's pool is per process): the count and the exported variables."""
    code = (
        "import os, torch\n"
        "from shoal.cpu_quota import ThreadChoice, apply_threads\n"
        "env = {}\n"
        "print(apply_threads(ThreadChoice(1, '--threads'), env), env['OMP_NUM_THREADS'], torch.get_num_threads())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=50, check=True)
    assert out.stdout.split() == ["1", "1", "1"]
    import torch

    assert apply_threads(ThreadChoice(None, "torch default"), {}) == torch.get_num_threads()


def test_apply_does_not_import_torch_into_the_http_process():
    """The HTTP process of `shoal serve` only exports the count for its engine core: no torch import
    (~4 s and ~250 MB at every start)."""
    code = (
        "import sys\n"
        "from shoal.cpu_quota import ThreadChoice, apply_threads\n"
        "env = {}\n"
        "print(apply_threads(ThreadChoice(2, '--threads'), env), env['OMP_NUM_THREADS'], 'torch' in sys.modules)\n"
        "print(apply_threads(ThreadChoice(None, 'torch default'), {}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=50, check=True)
    assert out.stdout.split() == ["2", "2", "False", "None"]


def test_serve_logs_the_effective_thread_count_at_start(tmp_path):
    """`shoal serve --threads 1` logs it before loading (a missing model then ends the run with exit 1)."""
    out = subprocess.run(
        [sys.executable, "-m", "shoal.cli", "serve", "--model", str(tmp_path / "absent"), "--threads", "1",
         "--port", "0", "--engine-mode", "thread"],
        capture_output=True, text=True, timeout=50,
    )  # fmt: skip
    assert out.returncode == 1
    assert "engine threads: 1 (--threads)" in out.stderr
