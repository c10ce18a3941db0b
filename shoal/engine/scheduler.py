"""Continuous batching: decide, every step, which sequences run and how many tokens each computes.

One token budget per step (max_num_batched_tokens) shared by everything: running decodes first (one
token each), then unfinished prompt chunks, then new requests from the waiting queue (chunked prefill:
a long prompt takes what budget is left and continues next step, so decodes never stall behind it).
When KV blocks run out, the newest running sequence is preempted: its blocks are freed and it goes back
to the front of the waiting queue to be recomputed later (its full blocks usually come back as prefix hits).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from shoal.engine.block_manager import BlockManager
from shoal.engine.sequence import Sequence, Status


@dataclass
class ScheduledBatch:
    seqs: list[Sequence]  # decodes (1 token) first, then prefill chunks
    num_tokens: list[int]  # tokens each computes this step
    num_preempted: int = 0

    @property
    def empty(self) -> bool:
        return not self.seqs


class Scheduler:
    def __init__(
        self,
        block_manager: BlockManager,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        enable_chunked_prefill: bool = True,
    ):
        self.blocks = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.enable_chunked_prefill = enable_chunked_prefill
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        # Keep a little room when admitting new prompts so running decodes are not preempted at once.
        self.watermark_blocks = max(1, block_manager.num_blocks // 100)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def remove(self, seq: Sequence) -> None:
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.free_sequence(seq)

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.free_sequence(seq)
        seq.status = Status.WAITING
        if seq.prompt_logprobs is not None:  # recomputed from scratch: collect them afresh
            seq.prompt_logprobs = [None]
        if seq.captured_logits is not None:
            seq.captured_logits = []
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def schedule(self) -> ScheduledBatch:
        budget = self.max_num_batched_tokens
        batch = ScheduledBatch([], [])
        # Running sequences, oldest first; decodes before unfinished prompt chunks.
        ordered = sorted(self.running, key=lambda s: s.num_uncomputed > 1)
        for seq in ordered:
            if seq not in self.running or budget == 0:
                continue
            n = min(seq.num_uncomputed, budget)
            while not self.blocks.allocate(seq, n):
                victim = self.running[-1]
                self._preempt(victim)
                batch.num_preempted += 1
                if victim in batch.seqs:  # already scheduled this step: give its tokens back
                    i = batch.seqs.index(victim)
                    budget += batch.num_tokens.pop(i)
                    batch.seqs.pop(i)
                if victim is seq:
                    break
            if seq.status != Status.RUNNING:
                continue
            batch.seqs.append(seq)
            batch.num_tokens.append(n)
            budget -= n
        # New sequences, in arrival order.
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if not seq.block_table:
                self.blocks.match_prefix(seq)
            n = seq.num_uncomputed
            if n > budget and not self.enable_chunked_prefill and batch.seqs:
                break
            n = min(n, budget)
            room = self.blocks.num_free - self.blocks.blocks_needed(seq, n)
            if room < self.watermark_blocks and self.running or not self.blocks.allocate(seq, n):
                if not self.running and not batch.seqs:
                    self.blocks.free_sequence(seq)  # nothing else to wait for: the cache is too small for it
                    raise MemoryError(
                        f"KV cache too small for one sequence of {len(seq)} tokens "
                        f"({self.blocks.num_blocks} blocks of {self.blocks.block_size})"
                    )
                self.blocks.free_sequence(seq)  # do not hold cached blocks while waiting
                break
            self.waiting.popleft()
            self.blocks.count_admission(seq)
            seq.status = Status.RUNNING
            self.running.append(seq)
            batch.seqs.append(seq)
            batch.num_tokens.append(n)
            budget -= n
        self._order_decodes_first(batch)
        return batch

    @staticmethod
    def _order_decodes_first(batch: ScheduledBatch) -> None:
        # Decodes sorted by context length let the runner batch similar lengths together.
        pairs = sorted(zip(batch.seqs, batch.num_tokens, strict=True), key=lambda p: (p[1] > 1, len(p[0])))
        batch.seqs = [p[0] for p in pairs]
        batch.num_tokens = [p[1] for p in pairs]
