"""The host pool that swap preemption (`--preemption-mode swap`, vLLM's flag) moves KV blocks into.

Bookkeeping only: which host blocks are free and which a swapped-out sequence holds. The runner owns
the host tensors and does the copies (ModelRunner.swap_blocks). A host block holds exactly one device
block (block_size tokens of K and V for every layer); its size is `--swap-space` GiB divided by
ModelRunner.kv_bytes_per_block. A sequence is swapped whole or not at all: when the pool cannot hold all
of its computed blocks, the scheduler recomputes it instead (see engine/scheduler.py).
"""

from __future__ import annotations


class SwapSpace:
    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        self.free: list[int] = list(range(num_blocks - 1, -1, -1))  # a stack: pop() hands out 0, 1, ...
        self.tables: dict[int, list[int]] = {}  # seq_id -> its host blocks, in block-table order

    @property
    def num_free(self) -> int:
        return len(self.free)

    @property
    def usage(self) -> float:
        """Share of host blocks in use, 0..1 (vLLM V0's cpu_cache_usage_perc); 0 for an empty pool."""
        return 1.0 - self.num_free / self.num_blocks if self.num_blocks else 0.0

    def can_hold(self, num_blocks: int) -> bool:
        return num_blocks <= self.num_free

    def take(self, seq_id: int, num_blocks: int) -> list[int]:
        """num_blocks host blocks for seq_id (ValueError if it already holds some or they do not fit)."""
        if seq_id in self.tables or not self.can_hold(num_blocks):
            raise ValueError(f"cannot swap out sequence {seq_id}: {num_blocks} blocks, {self.num_free} free")
        table = [self.free.pop() for _ in range(num_blocks)]
        self.tables[seq_id] = table
        return table

    def release(self, seq_id: int) -> list[int]:
        """Give back seq_id's host blocks (after swap-in or abort) and return them; [] if it has none."""
        table = self.tables.pop(seq_id, [])
        self.free.extend(reversed(table))
        return table
