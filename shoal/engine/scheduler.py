"""Continuous batching: decide, every step, which sequences run and how many tokens each computes.

One token budget per step (max_num_batched_tokens) shared by everything: running decodes first (one
token each), then unfinished prompt chunks, then new requests from the waiting queue (chunked prefill:
a long prompt takes what budget is left and continues next step, so decodes never stall behind it).
When KV blocks run out, a running sequence is preempted: its blocks are freed and it goes back to the
waiting queue to be recomputed later (its full blocks usually come back as prefix hits). Under `fcfs`
the newest running sequence is the victim, and it goes back to the front; under `priority` the least
urgent (highest priority value), newest first within a class (vLLM's policy; engine/waiting_queue.py).
Under `priority` a waiting sequence more urgent than a running one also takes its seat when all
`max_num_seqs` seats are taken (vLLM V0's `_schedule_priority_preemption`): a premium request waits one
step, not until a low-priority one finishes. And a step that computes a prompt toward its first token
runs only rows at least as urgent as that prompt: less urgent decodes and prompt chunks sit that step out
(keeping their seats and blocks), and less urgent arrivals are admitted after it. A premium request's
first token then costs a step of premium rows only, not a step batched with every standard decode; the
price is one step of progress for the less urgent rows per such step (a steady stream of urgent prompts
starves them, as strict priority does anyway).

Swap preemption (`preemption_mode="swap"`, vLLM V0's policy): the victim's computed KV blocks are copied
to the host pool (engine/swap_space.py) instead of being dropped, and it waits in the swapped queue with
its progress kept. When the pool cannot hold them all, the victim is recomputed as above. A step that
preempted nobody swaps sequences back in, oldest first, before it admits anything new; new requests wait
while any sequence is swapped out, so swapped ones are never starved. The block copies a step needs are
listed in its ScheduledBatch (swap_out, swap_in) and must run before its forward: a block freed by a
swap-out may be handed to another sequence in the same step. Swap-outs and swap-ins never share a step.
Blocks shared through the prefix cache are copied like any other (the host copy is the sequence's own);
the device block only loses this sequence's reference. A victim preempted for its seat (not for blocks)
is always recomputed: swapped, it would hold back the very admission its seat was freed for.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from shoal.engine.block_manager import BlockManager
from shoal.engine.sequence import Sequence, Status
from shoal.engine.swap_space import SwapSpace
from shoal.engine.waiting_queue import make_waiting_queue, priority_key


@dataclass
class ScheduledBatch:
    seqs: list[Sequence]  # decodes (1 token) first, then prefill chunks
    num_tokens: list[int]  # tokens each computes this step
    preempted: list[Sequence] = field(default_factory=list)  # sent back to the waiting queue this step
    admitted: list[Sequence] = field(default_factory=list)  # taken from the waiting queue, in that order
    swap_out: list[tuple[int, int]] = field(default_factory=list)  # (device block, host block) to copy
    swap_in: list[tuple[int, int]] = field(default_factory=list)  # (host block, device block) to copy
    # Under `priority`, when the step computes a prompt toward its first token: that prompt's priority, and
    # every row is at least as urgent (an urgent step). None otherwise.
    first_token_priority: int | None = None

    @property
    def num_preempted(self) -> int:
        return len(self.preempted)

    @property
    def empty(self) -> bool:
        return not self.seqs


class Scheduler:
    """The queues are insertion-ordered dicts keyed by seq_id: every add, removal, membership test and
    look at either end is O(1), so a step costs O(running + admitted) whatever the queue lengths."""

    def __init__(
        self,
        block_manager: BlockManager,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        enable_chunked_prefill: bool = True,
        policy: str = "fcfs",
        swap_space: SwapSpace | None = None,
    ):
        self.blocks = block_manager
        self.policy = policy
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.enable_chunked_prefill = enable_chunked_prefill
        self.waiting = make_waiting_queue(policy)
        self.running: dict[int, Sequence] = {}  # oldest first
        self.swap = swap_space  # None: preemption recomputes
        self.swapped: dict[int, Sequence] = {}  # swapped out, oldest first
        self.num_preemptions = 0
        self.num_swapped_out = 0  # sequences swapped out (counted per swap, so a sequence may count twice)
        self.num_swapped_in = 0
        self._swap_out: list[tuple[int, int]] = []  # copies for the step being scheduled
        # Keep a little room when admitting new prompts so running decodes are not preempted at once.
        self.watermark_blocks = max(1, block_manager.num_blocks // 100)

    def add(self, seq: Sequence) -> None:
        self.waiting.add(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self.swapped)

    def remove(self, seq: Sequence) -> None:
        if self.swapped.pop(seq.seq_id, None) is not None:
            self.swap.release(seq.seq_id)
        elif self.running.pop(seq.seq_id, None) is None:
            self.waiting.remove(seq)
        self.blocks.free_sequence(seq)

    def _victim(self) -> Sequence:
        if self.policy == "priority":
            return max(
                self.running.values(), key=priority_key
            )  # O(running), only when seats or blocks run out
        return next(reversed(self.running.values()))  # the newest: a dict keeps insertion order

    def _preempt(self, swap: bool = True) -> Sequence:
        """Free the victim's blocks: swap them out where allowed and the host pool holds them all, else
        put the victim back in the waiting queue, to be recomputed."""
        seq = self._victim()
        del self.running[seq.seq_id]
        self.num_preemptions += 1
        if swap and self._try_swap_out(seq):
            return seq
        self.blocks.free_sequence(seq)
        seq.status = Status.WAITING
        if seq.prompt_logprobs is not None:  # recomputed from scratch: collect them afresh
            seq.prompt_logprobs = [None]
        if seq.captured_logits is not None:
            seq.captured_logits = []
        self.waiting.readd_preempted(seq)
        return seq

    def _seats_for_urgent(self) -> list[Sequence]:
        """Under `priority`, with every seat taken: preempt the least urgent running sequences while the
        most urgent waiting one is strictly more urgent (so equals never preempt each other)."""
        preempted: list[Sequence] = []
        if self.policy != "priority":
            return preempted
        while self.waiting and self.running and len(self.running) >= self.max_num_seqs:
            if self.waiting.peek().priority >= self._victim().priority:
                break
            preempted.append(self._preempt(swap=False))
        return preempted

    def _first_token_priority(self, rows, floor: int | None = None) -> int | None:
        """Under `priority`: the most urgent priority among `rows` ((seq, tokens) pairs) still computing
        toward their first output token, and `floor`; None under fcfs or when there is none. A step runs
        only rows at least this urgent: the less urgent ones (decodes included) sit it out, so a premium
        prompt's first token costs a step of its own class only, not one batched with standard rows."""
        if self.policy != "priority":
            return None
        for seq, _ in rows:
            if seq.num_output_tokens == 0 and (floor is None or seq.priority < floor):
                floor = seq.priority
        return floor

    def _only_as_urgent_as(self, urgent: int, scheduled: dict) -> dict:
        """The rows of `scheduled` at least as urgent as `urgent`; the budget the others leave goes to the
        kept prompt chunks, in order, where blocks allow (the others keep their blocks for next step)."""
        kept = {i: (seq, n) for i, (seq, n) in scheduled.items() if seq.priority <= urgent}
        budget = self.max_num_batched_tokens - sum(n for _, n in kept.values())
        for i, (seq, n) in kept.items():
            more = min(seq.num_uncomputed - n, budget)
            if more > 0 and self.blocks.allocate(seq, n + more):
                kept[i] = (seq, n + more)
                budget -= more
        return kept

    def _try_swap_out(self, seq: Sequence) -> bool:
        """Move seq's computed blocks to the host pool, keeping its progress; False (nothing done) without
        a pool, with nothing computed, or when the pool cannot hold them all."""
        num = -(-seq.num_computed // self.blocks.block_size)
        if self.swap is None or num == 0 or not self.swap.can_hold(num):
            return False
        host = self.swap.take(seq.seq_id, num)
        self._swap_out.extend(zip(seq.block_table[:num], host, strict=True))
        computed = seq.num_computed
        self.blocks.free_sequence(seq)
        seq.num_computed = computed
        seq.status = Status.SWAPPED
        self.swapped[seq.seq_id] = seq
        self.num_swapped_out += 1
        return True

    def _swap_in(self, budget: int, scheduled: dict) -> list[tuple[int, int]]:
        """Bring swapped sequences back, oldest first, while blocks, budget and max_num_seqs allow; they
        join `scheduled` with their next tokens. Returns the (host, device) block copies."""
        copies: list[tuple[int, int]] = []
        while self.swapped and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = next(iter(self.swapped.values()))
            n = min(seq.num_uncomputed, budget)
            room = self.blocks.num_free - self.blocks.blocks_needed(seq, n)
            if room < self.watermark_blocks and self.running or not self.blocks.allocate(seq, n):
                if not self.running and not scheduled:
                    raise MemoryError(f"KV cache too small to swap in one sequence of {len(seq)} tokens")
                break
            del self.swapped[seq.seq_id]
            host = self.swap.release(seq.seq_id)
            copies.extend(zip(host, seq.block_table, strict=False))  # the new blocks past them are empty
            self.blocks.register_computed(seq, 0)  # its full blocks become prefix hits again
            seq.status = Status.RUNNING
            self.running[seq.seq_id] = seq
            scheduled[seq.seq_id] = (seq, n)
            budget -= n
            self.num_swapped_in += 1
        return copies

    def schedule(self) -> ScheduledBatch:
        budget = self.max_num_batched_tokens
        scheduled: dict[int, tuple[Sequence, int]] = {}  # seq_id -> (seq, tokens this step), in order
        preempted: list[Sequence] = self._seats_for_urgent()
        admitted: list[Sequence] = []
        # Running sequences, oldest first; decodes before unfinished prompt chunks.
        decodes = [seq for seq in self.running.values() if seq.num_uncomputed <= 1]
        chunks = [seq for seq in self.running.values() if seq.num_uncomputed > 1]
        for seq in decodes + chunks:
            if seq.seq_id not in self.running or budget == 0:
                continue
            n = min(seq.num_uncomputed, budget)
            while not self.blocks.allocate(seq, n):
                victim = self._preempt()
                preempted.append(victim)
                if victim.seq_id in scheduled:  # already scheduled this step: give its tokens back
                    budget += scheduled.pop(victim.seq_id)[1]
                if victim is seq:
                    break
            if seq.status != Status.RUNNING:
                continue
            scheduled[seq.seq_id] = (seq, n)
            budget -= n
        swap_in = [] if preempted else self._swap_in(budget, scheduled)
        budget = self.max_num_batched_tokens - sum(n for _, n in scheduled.values())
        urgent = self._first_token_priority(scheduled.values())
        # New sequences, in the waiting queue's order (none while any is swapped out).
        while not self.swapped and self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting.peek()
            if urgent is not None and seq.priority > urgent:
                break  # it would sit this step out (below): admitted next step
            if not seq.block_table:
                self.blocks.match_prefix(seq)
            n = seq.num_uncomputed
            if n > budget and not self.enable_chunked_prefill and scheduled:
                break
            n = min(n, budget)
            room = self.blocks.num_free - self.blocks.blocks_needed(seq, n)
            if room < self.watermark_blocks and self.running or not self.blocks.allocate(seq, n):
                if not self.running and not scheduled:
                    self.blocks.free_sequence(seq)  # nothing else to wait for: the cache is too small for it
                    raise MemoryError(
                        f"KV cache too small for one sequence of {len(seq)} tokens "
                        f"({self.blocks.num_blocks} blocks of {self.blocks.block_size})"
                    )
                self.blocks.free_sequence(seq)  # do not hold cached blocks while waiting
                break
            self.waiting.pop()
            admitted.append(seq)
            self.blocks.count_admission(seq)
            seq.status = Status.RUNNING
            self.running[seq.seq_id] = seq
            scheduled[seq.seq_id] = (seq, n)
            budget -= n
            urgent = self._first_token_priority([(seq, n)], urgent)
        if urgent is not None:
            scheduled = self._only_as_urgent_as(urgent, scheduled)
        batch = _decodes_first(list(scheduled.values()))
        batch.preempted, batch.admitted, batch.first_token_priority = preempted, admitted, urgent
        batch.swap_out, batch.swap_in, self._swap_out = self._swap_out, swap_in, []
        return batch


def _decodes_first(scheduled: list[tuple[Sequence, int]]) -> ScheduledBatch:
    """The batch with decodes first, sorted by context length so the runner can batch similar lengths."""
    pairs = sorted(scheduled, key=lambda p: (p[1] > 1, len(p[0])))
    return ScheduledBatch([p[0] for p in pairs], [p[1] for p in pairs])
