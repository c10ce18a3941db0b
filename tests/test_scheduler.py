"""Scheduler policy on simulated steps (no model): admission order, budgets, preemption, removal, at scale."""

from __future__ import annotations

import random

from shoal.engine.block_manager import BlockManager
from shoal.engine.sampling_params import SamplingParams
from shoal.engine.scheduler import ScheduledBatch, Scheduler
from shoal.engine.sequence import Sequence, Status

BLOCK = 4


def make_seqs(n: int, prompt_len: int = 6, max_tokens: int = 3) -> list[Sequence]:
    # Distinct first tokens: no two prompts share a cached block.
    return [
        Sequence(f"r{i}", 0, [i + 1] + [7] * (prompt_len - 1), SamplingParams(max_tokens=max_tokens))
        for i in range(n)
    ]


def make_scheduler(num_blocks: int, max_num_seqs: int, budget: int) -> Scheduler:
    return Scheduler(
        BlockManager(num_blocks, BLOCK), max_num_seqs=max_num_seqs, max_num_batched_tokens=budget
    )


def run_step(scheduler: Scheduler) -> ScheduledBatch:
    """What the engine does around the model: compute the scheduled tokens, sample, finish at max_tokens."""
    batch = scheduler.schedule()
    for seq, n in zip(batch.seqs, batch.num_tokens, strict=True):
        start = seq.num_computed
        seq.num_computed += n
        scheduler.blocks.register_computed(seq, start)
        if seq.num_computed == len(seq):
            seq.token_ids.append(3)
            if seq.num_output_tokens >= (seq.params.max_tokens or 0):
                scheduler.remove(seq)
                seq.status = Status.FINISHED
    return batch


def check_batch(scheduler: Scheduler, batch: ScheduledBatch) -> None:
    """Invariants of every step: budget, no duplicates, decodes (sorted by length) before prompt chunks."""
    assert sum(batch.num_tokens) <= scheduler.max_num_batched_tokens
    assert len({id(s) for s in batch.seqs}) == len(batch.seqs)
    kinds = [n > 1 for n in batch.num_tokens]
    assert kinds == sorted(kinds)
    decode_lengths = [len(s) for s, n in zip(batch.seqs, batch.num_tokens, strict=True) if n == 1]
    assert decode_lengths == sorted(decode_lengths)
    assert len(scheduler.running) <= scheduler.max_num_seqs


def test_two_thousand_waiting_sequences_run_in_arrival_order() -> None:
    """2,000 queued requests with room for all: one step admits them all, in order; all then decode together."""
    seqs = make_seqs(2000)
    scheduler = make_scheduler(num_blocks=2000 * 3, max_num_seqs=2000, budget=2000 * 6)
    for seq in seqs:
        scheduler.add(seq)

    first = run_step(scheduler)
    check_batch(scheduler, first)
    assert first.seqs == seqs and first.num_tokens == [6] * 2000
    assert len(scheduler.waiting) == 0 and len(scheduler.running) == 2000

    second = run_step(scheduler)
    check_batch(scheduler, second)
    assert second.num_tokens == [1] * 2000 and set(map(id, second.seqs)) == set(map(id, seqs))
    while scheduler.has_work():
        check_batch(scheduler, run_step(scheduler))
    assert all(s.finished and s.num_output_tokens == 3 for s in seqs)
    assert scheduler.blocks.num_free == scheduler.blocks.num_blocks


def test_two_thousand_waiting_sequences_respect_budget_and_max_num_seqs() -> None:
    """Admission is FIFO across steps under a token budget and a sequence cap; prompts are chunked."""
    seqs = make_seqs(2000, prompt_len=10)
    scheduler = make_scheduler(num_blocks=4000, max_num_seqs=64, budget=256)
    for seq in seqs:
        scheduler.add(seq)
    admitted: list[Sequence] = []
    while scheduler.has_work():
        batch = run_step(scheduler)
        check_batch(scheduler, batch)
        admitted += [s for s, n in zip(batch.seqs, batch.num_tokens, strict=True) if s.num_computed == n]
    assert admitted == seqs  # first computed in arrival order
    assert all(s.finished and s.num_output_tokens == 3 for s in seqs)


def test_removal_from_either_queue_at_scale() -> None:
    """Aborting many waiting and running sequences, in random order, leaves the rest to finish normally."""
    seqs = make_seqs(2000)
    scheduler = make_scheduler(num_blocks=3000, max_num_seqs=500, budget=4096)
    for seq in seqs:
        scheduler.add(seq)
    run_step(scheduler)
    aborted = random.Random(0).sample(seqs, 1000)
    assert any(s.status == Status.RUNNING for s in aborted) and any(
        s.status == Status.WAITING for s in aborted
    )
    for seq in aborted:
        scheduler.remove(seq)
    assert len(scheduler.running) + len(scheduler.waiting) == 1000
    while scheduler.has_work():
        batch = run_step(scheduler)
        check_batch(scheduler, batch)
        assert not {id(s) for s in batch.seqs} & {id(s) for s in aborted}
    assert sum(s.finished for s in seqs) == 1000
    assert scheduler.blocks.num_free == scheduler.blocks.num_blocks


def test_preemption_takes_the_newest_and_requeues_it_first() -> None:
    """Out of blocks, the newest running sequences are preempted and go back ahead of every waiting one."""
    seqs = make_seqs(6, prompt_len=4, max_tokens=12)  # one block each at first, up to four
    scheduler = make_scheduler(num_blocks=8, max_num_seqs=4, budget=64)
    for seq in seqs:
        scheduler.add(seq)
    run_step(scheduler)
    assert list(scheduler.running.values()) == seqs[:4]
    batch = ScheduledBatch([], [])
    while not batch.num_preempted:
        running_before = list(scheduler.running.values())
        batch = run_step(scheduler)
        check_batch(scheduler, batch)
    victims = running_before[-batch.num_preempted :]
    # Each victim went to the front in turn, the newest first: the queue now starts with them, oldest first.
    assert list(scheduler.waiting.values())[: len(victims)] == victims
    for victim in victims:
        assert victim.status == Status.WAITING and victim.block_table == [] and victim.num_computed == 0
        assert victim not in batch.seqs
    assert list(scheduler.running.values()) == running_before[: -len(victims)]
    while scheduler.has_work():
        check_batch(scheduler, run_step(scheduler))
    assert all(s.finished and s.num_output_tokens == 12 for s in seqs)
    assert scheduler.blocks.num_free == scheduler.blocks.num_blocks
