"""One memory budget for the weights and KV caches of every loaded model (`--memory-budget`).

Each engine otherwise sizes its KV cache from whatever RAM is free when it loads, so the outcome depends
on load order. Here each model reserves its estimate (`memory` in models.yaml) out of one budget, and
its KV cache gets what its weights leave of that estimate (EngineConfig.kv_cache_memory).
"""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_BUDGET_SHARE = 0.5  # of physical RAM, leaving the rest to the OS, the HTTP process and Python
DEFAULT_KV_BYTES = 64 * 2**20  # KV cache of an entry without a `memory` estimate
MIN_KV_BYTES = 2**20  # below this a KV cache holds too few blocks to serve anything


def default_budget() -> int:
    """A share of physical RAM (os.sysconf: no psutil needed)."""
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") * DEFAULT_BUDGET_SHARE)


def weights_bytes(model_dir: Path) -> int:
    """Size of the checkpoint's weight files (0 for a hub id not yet on disk)."""
    if not model_dir.is_dir():
        return 0
    return sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))


def estimate(memory: int | None, model_dir: Path) -> tuple[int, int]:
    """(bytes reserved in the budget, KV cache bytes) for one model."""
    weights = weights_bytes(model_dir)
    total = memory if memory is not None else weights + DEFAULT_KV_BYTES
    return total, max(total - weights, MIN_KV_BYTES)


class MemoryBudget:
    """Bytes reserved per loaded model ref, against one total."""

    def __init__(self, total: int):
        if total < 1:
            raise ValueError(f"--memory-budget must be positive, got {total}")
        self.total = total
        self.reserved: dict[str, int] = {}

    @property
    def used(self) -> int:
        return sum(self.reserved.values())

    def fits(self, nbytes: int) -> bool:
        return self.used + nbytes <= self.total

    def reserve(self, ref: str, nbytes: int) -> None:
        self.reserved[ref] = nbytes

    def release(self, ref: str) -> None:
        self.reserved.pop(ref, None)
