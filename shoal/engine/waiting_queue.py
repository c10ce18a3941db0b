"""The scheduler's waiting queue, in one of vLLM's two orders (`--scheduling-policy`).

- `fcfs`: arrival order; a preempted sequence goes back to the front (it was running, so it arrived
  before everything still waiting).
- `priority`: by (priority, arrival time), lower priority values first, as vLLM's `priority` request
  field; a preempted sequence goes back by its own key, which puts it ahead of later arrivals of its
  class and behind any more urgent class.

Both give O(1) membership and removal (aborts) and O(log n) or better add and pop, so a step costs the
same whatever the queue length.
"""

from __future__ import annotations

import heapq
import itertools
from collections import OrderedDict
from collections.abc import Iterator

from shoal.engine.sequence import Sequence

POLICIES = ("fcfs", "priority")


def priority_key(seq: Sequence) -> tuple[int, float, int]:
    """(priority, arrival time, seq_id): smaller is served first; larger is preempted first."""
    return (seq.priority, seq.arrival_time, seq.seq_id)


class FcfsQueue:
    def __init__(self) -> None:
        self._seqs: OrderedDict[int, Sequence] = OrderedDict()

    def add(self, seq: Sequence) -> None:
        self._seqs[seq.seq_id] = seq

    def readd_preempted(self, seq: Sequence) -> None:
        self._seqs[seq.seq_id] = seq
        self._seqs.move_to_end(seq.seq_id, last=False)

    def remove(self, seq: Sequence) -> bool:
        return self._seqs.pop(seq.seq_id, None) is not None

    def peek(self) -> Sequence:
        return next(iter(self._seqs.values()))

    def pop(self) -> Sequence:
        return self._seqs.popitem(last=False)[1]

    def __len__(self) -> int:
        return len(self._seqs)

    def __iter__(self) -> Iterator[Sequence]:
        return iter(self._seqs.values())


class PriorityQueue:
    """A heap with lazy deletion: removing marks the entry stale; stale entries are dropped at the top."""

    def __init__(self) -> None:
        self._heap: list[tuple[tuple[int, float, int], int, Sequence]] = []
        self._live: dict[int, int] = {}  # seq_id -> the token of its one live heap entry
        self._tokens = itertools.count()

    def add(self, seq: Sequence) -> None:
        token = next(self._tokens)
        self._live[seq.seq_id] = token
        heapq.heappush(self._heap, (priority_key(seq), token, seq))

    readd_preempted = add

    def remove(self, seq: Sequence) -> bool:
        return self._live.pop(seq.seq_id, None) is not None

    def _drop_stale(self) -> None:
        while self._heap and self._live.get(self._heap[0][2].seq_id) != self._heap[0][1]:
            heapq.heappop(self._heap)

    def peek(self) -> Sequence:
        self._drop_stale()
        return self._heap[0][2]

    def pop(self) -> Sequence:
        self._drop_stale()
        _, _, seq = heapq.heappop(self._heap)
        del self._live[seq.seq_id]
        return seq

    def __len__(self) -> int:
        return len(self._live)

    def __iter__(self) -> Iterator[Sequence]:
        return (seq for _, token, seq in sorted(self._heap) if self._live.get(seq.seq_id) == token)


def make_waiting_queue(policy: str) -> FcfsQueue | PriorityQueue:
    """The queue for a --scheduling-policy (ValueError for an unknown one)."""
    if policy == "fcfs":
        return FcfsQueue()
    if policy == "priority":
        return PriorityQueue()
    raise ValueError(f"scheduling_policy must be one of {', '.join(POLICIES)}, got {policy!r}")
