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
    assert list(scheduler.waiting)[: len(victims)] == victims
    for victim in victims:
        assert victim.status == Status.WAITING and victim.block_table == [] and victim.num_computed == 0
        assert victim not in batch.seqs
    assert list(scheduler.running.values()) == running_before[: -len(victims)]
    while scheduler.has_work():
        check_batch(scheduler, run_step(scheduler))
    assert all(s.finished and s.num_output_tokens == 12 for s in seqs)
    assert scheduler.blocks.num_free == scheduler.blocks.num_blocks


# ---- --scheduling-policy priority -------------------------------------------------------------------
def _classed(prefix: str, n: int, priority: int, first_token: int, max_tokens: int = 3) -> list[Sequence]:
    return [
        Sequence(
            f"{prefix}{i}",
            0,
            [first_token + i] + [7] * 5,
            SamplingParams(max_tokens=max_tokens),
            None,
            priority,
        )
        for i in range(n)
    ]


def _premium_after_a_low_backlog(policy: str) -> tuple[dict[str, int], dict[str, set[str]]]:
    """max_num_seqs 2 and 40 low-priority requests queued; then 10 premium ones arrive, one a step.
    Returns each request's place in the order of first admission (two may be admitted in one step),
    and for each premium request the low-priority requests still waiting when it arrived."""
    scheduler = Scheduler(BlockManager(512, BLOCK), max_num_seqs=2, max_num_batched_tokens=64, policy=policy)
    for seq in _classed("low", 40, priority=1, first_token=100):
        scheduler.add(seq)
    premium = _classed("premium", 10, priority=0, first_token=300)
    admitted: dict[str, int] = {}
    waiting_at_arrival: dict[str, set[str]] = {}
    step = 0
    while scheduler.has_work() or premium:
        if premium and step >= 3:
            seq = premium.pop(0)
            # Never admitted yet (a preempted one waits again, but was admitted before the premium came).
            waiting_at_arrival[seq.request_id] = {
                s.request_id for s in scheduler.waiting if s.priority == 1 and s.request_id not in admitted
            }
            scheduler.add(seq)
        for seq in run_step(scheduler).admitted:
            admitted.setdefault(seq.request_id, len(admitted))
        step += 1
    return admitted, waiting_at_arrival


def test_priority_policy_schedules_premium_before_every_low_request_waiting_at_its_arrival() -> None:
    admitted, waiting_at_arrival = _premium_after_a_low_backlog("priority")
    assert len(waiting_at_arrival) == 10 and all(len(w) > 20 for w in waiting_at_arrival.values())
    for premium, waiting in waiting_at_arrival.items():
        assert all(admitted[premium] < admitted[low] for low in waiting), premium
    # The same arrivals under fcfs: every premium request waits behind the whole backlog.
    admitted, waiting_at_arrival = _premium_after_a_low_backlog("fcfs")
    for premium, waiting in waiting_at_arrival.items():
        assert all(admitted[premium] > admitted[low] for low in waiting), premium


def test_priority_policy_preempts_the_lowest_priority_newest_first() -> None:
    """KV pressure with both classes running: every victim is low priority, the newest low one first."""
    scheduler = Scheduler(
        BlockManager(24, BLOCK), max_num_seqs=16, max_num_batched_tokens=64, policy="priority"
    )
    low = _classed("low", 6, priority=5, first_token=100, max_tokens=12)
    high = _classed("high", 2, priority=0, first_token=300, max_tokens=12)
    for seq in [low[0], high[0], *low[1:], high[1]]:  # a premium request arrives first and last
        scheduler.add(seq)
    victims: list[Sequence] = []
    while scheduler.has_work():
        batch = run_step(scheduler)
        running_lows = [s for s in scheduler.running.values() if s.priority == 5]
        for victim in batch.preempted:
            assert victim.priority == 5, victim.request_id
            newer = [s for s in running_lows if s.arrival_time > victim.arrival_time]
            assert not newer, f"{victim.request_id} preempted while newer low-priority ones ran: {newer}"
        victims += batch.preempted
    assert victims, "the cache was meant to run out"
    assert all(s.finished for s in low + high)


def test_priority_policy_gives_a_more_urgent_arrival_the_seat_of_the_least_urgent_running() -> None:
    """Every seat taken by low-priority sequences: a premium arrival preempts the newest of the least
    urgent class on the next step and is admitted in that same step; an equal arrival preempts nothing."""
    scheduler = Scheduler(
        BlockManager(512, BLOCK), max_num_seqs=2, max_num_batched_tokens=64, policy="priority"
    )
    lows = _classed("low", 3, priority=5, first_token=100, max_tokens=20)
    scheduler.add(lows[0])
    scheduler.add(lows[1])
    run_step(scheduler)
    scheduler.add(lows[2])  # as urgent as the running ones: waits for a free seat
    batch = run_step(scheduler)
    assert not batch.preempted and not batch.admitted
    premium = _classed("premium", 1, priority=0, first_token=300)[0]
    scheduler.add(premium)
    batch = run_step(scheduler)
    assert [s.request_id for s in batch.preempted] == ["low1"]  # the newest of the least urgent
    assert [s.request_id for s in batch.admitted] == ["premium0"]
    assert set(scheduler.running) == {lows[0].seq_id, premium.seq_id}
    # The same arrivals under fcfs: the premium request waits for a seat.
    scheduler = Scheduler(BlockManager(512, BLOCK), max_num_seqs=2, max_num_batched_tokens=64)
    for seq in _classed("low", 2, priority=5, first_token=100, max_tokens=20):
        scheduler.add(seq)
    run_step(scheduler)
    scheduler.add(_classed("premium", 1, priority=0, first_token=300)[0])
    batch = run_step(scheduler)
    assert not batch.preempted and not batch.admitted


def _rows(batch: ScheduledBatch) -> list[tuple[str, int]]:
    return sorted((s.request_id, n) for s, n in zip(batch.seqs, batch.num_tokens, strict=True))


def test_priority_policy_runs_a_more_urgent_prompt_without_the_less_urgent_rows() -> None:
    """Under `priority`, a step computing a premium prompt (every chunk of it, up to its first token)
    carries no low-priority row: running low decodes sit it out, low arrivals are admitted after it. Once
    premium decodes, low rows share its steps again; under fcfs every step batches them all."""
    scheduler = Scheduler(
        BlockManager(512, BLOCK), max_num_seqs=4, max_num_batched_tokens=8, policy="priority"
    )
    lows = _classed("low", 3, priority=5, first_token=100, max_tokens=20)
    for seq in lows[:2]:
        scheduler.add(seq)
    run_step(scheduler)  # both low prompts (6 tokens each) take 8 tokens of budget: low0 whole, low1 a chunk
    run_step(scheduler)
    premium = Sequence("premium0", 0, [300] + [7] * 13, SamplingParams(max_tokens=3), None, 0)  # 14 tokens
    scheduler.add(premium)
    scheduler.add(lows[2])  # a low arrival behind it
    steps = [_rows(run_step(scheduler)) for _ in range(3)]
    assert steps[0] == [("premium0", 8)]  # its first chunk alone: low0 and low1 decode later
    assert steps[1] == [("premium0", 6)]  # its last chunk alone: its first token
    # Premium decodes: all share the step again (low2's prompt takes the 5 tokens of budget left).
    assert steps[2] == [("low0", 1), ("low1", 1), ("low2", 5), ("premium0", 1)]
    while scheduler.has_work():
        run_step(scheduler)
    assert all(s.finished for s in [*lows, premium])
    # The same arrivals under fcfs: the low decodes run in every step, beside the premium prompt.
    scheduler = Scheduler(BlockManager(512, BLOCK), max_num_seqs=4, max_num_batched_tokens=8)
    for seq in _classed("low", 2, priority=5, first_token=100, max_tokens=20):
        scheduler.add(seq)
    run_step(scheduler)
    run_step(scheduler)
    scheduler.add(Sequence("premium0", 0, [300] + [7] * 13, SamplingParams(max_tokens=3), None, 0))
    assert _rows(run_step(scheduler)) == [("low0", 1), ("low1", 1), ("premium0", 6)]


def test_waiting_queues_remove_and_readd_at_scale() -> None:
    """Removal (aborts) from the middle of the priority heap, and re-adding (preemption), keep the order."""
    from shoal.engine.waiting_queue import PriorityQueue

    queue = PriorityQueue()
    seqs = _classed("s", 3000, priority=0, first_token=10) + _classed("t", 3000, priority=-1, first_token=10)
    random.Random(0).shuffle(seqs)
    for seq in seqs:
        queue.add(seq)
    removed = set(range(0, 6000, 3))
    for i in removed:
        queue.remove(seqs[i])
    queue.readd_preempted(seqs[1])
    queue.readd_preempted(seqs[1])  # twice: still one entry
    popped = [queue.pop() for _ in range(len(queue))]
    kept = [s for i, s in enumerate(seqs) if i not in removed]
    assert popped == sorted(kept, key=lambda s: (s.priority, s.arrival_time, s.seq_id))
