"""What the recommender needs to know about this machine: CPU features, cores, RAM, and the GPU if any.

Read from /proc/cpuinfo and /proc/meminfo (Linux; elsewhere the fields are empty or None) and from
torch.cuda. FP8 counts as native where the GPU's compute capability is at least 8.9 (Ada, Hopper and
later: the E4M3 tensor-core instructions); below that FP8 checkpoints can only be emulated.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8")


@dataclass
class Gpu:
    name: str
    memory_bytes: int
    capability: tuple[int, int]

    @property
    def fp8(self) -> bool:
        """Native FP8 (E4M3) matmul: compute capability >= 8.9."""
        return self.capability >= (8, 9)


@dataclass
class Hardware:
    cpu: str = ""
    cpu_flags: list[str] = field(default_factory=list)  # those of CPU_FLAGS the CPU has
    cores: int = 0  # usable by this process
    ram_bytes: int | None = None  # MemTotal
    ram_available_bytes: int | None = None  # MemAvailable
    gpus: list[Gpu] = field(default_factory=list)

    def has(self, flag: str) -> bool:
        return flag in self.cpu_flags

    def to_json(self) -> dict:
        d = asdict(self)
        for g, gd in zip(self.gpus, d["gpus"], strict=True):
            gd["fp8"] = g.fp8
        return d


def _cpuinfo(path: Path = Path("/proc/cpuinfo")) -> tuple[str, list[str]]:
    """(model name, the CPU_FLAGS present) from the first processor of /proc/cpuinfo."""
    name, flags = "", set()
    try:
        for line in path.read_text().splitlines():
            if line.startswith("model name") and not name:
                name = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return name, [f for f in CPU_FLAGS if f in flags]


def _meminfo(path: Path = Path("/proc/meminfo")) -> tuple[int | None, int | None]:
    """(MemTotal, MemAvailable) in bytes, None where unreadable."""
    values: dict[str, int] = {}
    try:
        for line in path.read_text().splitlines():
            key, _, rest = line.partition(":")
            values[key] = int(rest.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return values.get("MemTotal"), values.get("MemAvailable")


def _gpus() -> list[Gpu]:
    """The CUDA devices torch sees (none without CUDA)."""
    import torch

    if not torch.cuda.is_available():
        return []
    out = []
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        out.append(Gpu(p.name, int(p.total_memory), (p.major, p.minor)))
    return out


def detect() -> Hardware:
    """This machine's CPU, RAM and GPUs."""
    name, flags = _cpuinfo()
    total, available = _meminfo()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 0
    return Hardware(name, flags, cores, total, available, _gpus())
