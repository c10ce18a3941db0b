"""Device and dtype choice: what runs fast where."""

from __future__ import annotations

import logging
from functools import lru_cache
from pathlib import Path

import torch

log = logging.getLogger(__name__)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' was asked for but torch sees no CUDA device")
    return torch.device(device)


@lru_cache
def cpu_has_fast_bf16() -> bool:
    """AVX512-BF16 or AMX: torch's `get_cpu_capability()` only says "AVX512", so read the CPU flags."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(f in flags for f in (" avx512_bf16", " amx_bf16"))


def resolve_dtype(dtype: str, checkpoint_dtype: str, device: torch.device) -> torch.dtype:
    """`auto` keeps a 16-bit checkpoint in 16 bits where the hardware runs it fast, else float32."""
    if dtype != "auto":
        if dtype == "float16" and device.type == "cpu":
            raise ValueError(
                "dtype float16 on CPU runs 12-120x slower than float32 in torch; use bfloat16 or float32"
            )
        return DTYPES[dtype]
    if checkpoint_dtype not in ("bfloat16", "float16"):
        return torch.float32
    if device.type == "cuda":
        if checkpoint_dtype == "bfloat16" and not torch.cuda.is_bf16_supported():
            return torch.float16
        return DTYPES[checkpoint_dtype]
    return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32


def mmap_dtype(dtype: str, checkpoint_dtype: str, device: torch.device) -> tuple[torch.dtype, str | None]:
    """`--load-format mmap` serves the checkpoint's own dtype (a cast would copy every weight); returns it
    and, where this hardware runs it slowly, the warning to print at start."""
    if device.type != "cpu":
        raise ValueError("--load-format mmap is for CPU (weights copied to a GPU are not mapped anyway)")
    if checkpoint_dtype not in DTYPES:
        raise ValueError(f"--load-format mmap: checkpoint dtype {checkpoint_dtype!r} is not served")
    if dtype not in ("auto", checkpoint_dtype):
        raise ValueError(
            f"--load-format mmap serves the checkpoint's dtype ({checkpoint_dtype}), not --dtype {dtype}"
        )
    slow = None
    if checkpoint_dtype == "float16":
        slow = "float16 on CPU runs 12-120x slower than float32 in torch"
    elif checkpoint_dtype == "bfloat16" and not cpu_has_fast_bf16():
        slow = "bfloat16 on a CPU without AVX512-BF16 or AMX runs about 10x slower than float32"
    if slow:
        slow = (
            f"--load-format mmap serves the checkpoint's {checkpoint_dtype}: {slow} (drop mmap for float32)"
        )
    return DTYPES[checkpoint_dtype], slow


def available_ram() -> int:
    """MemAvailable from /proc/meminfo (bytes); 4 GiB where it cannot be read."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 4 << 30
