"""Interruptible steps: abandon the step in flight, between decoder layers, when a more urgent request arrives.

Why: with the engine never idle, a premium request's time to first token is the rest of the step already
running when it arrives (up to a whole step) plus its own prompt step, about twice its unloaded TTFT at
P95 whatever the queue order (docs/benchmarks.md, "where premium's wait goes"). Abandoning that step
removes the first part.

The rule (`--scheduling-policy priority` only; under `fcfs` nothing here runs): between two decoder
layers of a step's forward, and after the last before the lm_head (a fifth of a SmolLM2-135M step's
weight bytes, which an arrival would otherwise wait for), the engine core reads its inbox without
blocking (`Inbox.urgent_arrival`).
If a request has arrived whose `priority` is lower (more urgent) than that of the step's least urgent
row, the forward raises `StepInterrupted` and the engine drops the step (`LLMEngine.step`): the core
applies the messages held meanwhile, in order, and the next step is scheduled as usual, so the urgent
request's prompt runs next and only rows at least as urgent run with it (engine/scheduler.py); the
other rows run again after it. An arrival no more urgent than every row of the step waits for the step
to end, as before: interrupting would not change who runs with its prompt.

Why the least urgent row and not every row: a premium request decodes for many steps, during which
those steps carry its decode beside the standard rows; were only an arrival more urgent than every row
to interrupt, a premium arrival would almost never find a step to interrupt (measured: 3 steps of 294
under the spike of docs/benchmarks.md). The premium rows of the abandoned step lose the part of it that
ran, and run in the next step with the new prompt (a step of premium rows only, shorter than the one
abandoned).

What an abandoned step leaves behind, and why it is harmless:
- Tokens, logits, sampling: nothing. No row's `num_computed` moves, no prompt logprob is collected, and
  the sampler never runs, so a seeded request's generator is not advanced: its tokens are those of an
  uninterrupted run.
- Scheduling: the step's scheduling stands, as if every row had been given zero tokens: admitted
  sequences keep their seats, blocks allocated for the step's tokens stay with their sequences (the next
  step needs them again), preemptions and swap copies done before the forward are done. This is a state
  the scheduler produces anyway (a step whose rows sit out a more urgent prompt, engine/scheduler.py),
  so no rollback is needed. `first_scheduled_time` is only set by a step that completes.
- KV cache: the layers that ran wrote K/V at the slots of positions `num_computed` onward of each row.
  Those slots lie in blocks the row owns alone: a shared (prefix-cached) block is always full and wholly
  computed (engine/block_manager.py `match_prefix`), and a block is registered as a cached full block
  only by `register_computed` after a completed step, from `num_computed`, which the abandoned step did not
  move. Attention never reads a slot of position `num_computed` or later before the step computing that
  position writes it (each layer writes its tokens' K/V before attending), so the stale values are
  overwritten unread when the rows run again (with the same tokens at the same positions, hence the
  same values up to batch-shape rounding), or never read if the blocks are freed first.
- Stats: the step is not counted in `num_steps` nor handed to the token and step-time histograms; it
  counts in `EngineStats.num_steps_interrupted` (`shoal:engine_steps_interrupted_total`), and step
  listeners get its StepStats with `interrupted=True` (the schedule record shows it).

The one-call native decode step (kernels/decode_step.c) makes the same call between its layers through a
ctypes callback (measured in docs/benchmarks.md). Where a step is not interruptible: a compiled forward,
tensor parallelism (the workers run the forward in lockstep),
and the in-process thread engine (its adds wait for the step anyway). The check costs one poll(2) of the
core's stream per layer when nothing has arrived (measured in docs/benchmarks.md).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from shoal.engine.messages import AddRequest, ClientMessage

if TYPE_CHECKING:  # the engine imports StepInterrupted alone
    import msgspec

    from shoal.engine.core_stream import CoreEnd


class StepInterrupted(Exception):
    """Raised between decoder layers to abandon the step in flight (caught by LLMEngine.step)."""


class Inbox:
    """The engine core's inbox: the requests on its stream from the server (engine/core_stream.py).
    Between steps `take` returns every waiting message; during a step, `urgent_arrival` moves what has
    arrived into a hold (returned first by the next `take`, so the order of messages is kept) and says
    whether it holds a more urgent request. `closed`: the server's end is gone."""

    def __init__(self, stream: CoreEnd, decoder: msgspec.msgpack.Decoder):
        self._stream = stream
        self._decoder = decoder
        self._held: list[ClientMessage] = []
        self._most_urgent: int | None = None  # the lowest priority among held AddRequests

    @property
    def closed(self) -> bool:
        return self._stream.closed

    def wait(self, timeout_ms: int) -> bool:
        """Whether a message (or the end of the stream) is ready, waiting up to timeout_ms for one."""
        return bool(self._held) or self._stream.readable(timeout_ms)

    def take(self) -> list[ClientMessage]:
        """Every message received so far, held ones first, in arrival order."""
        self._receive()
        messages, self._held, self._most_urgent = self._held, [], None
        return messages

    def urgent_arrival(self, least_urgent: int) -> bool:
        """Whether a request with priority < least_urgent (the step's least urgent row's) has arrived."""
        self._receive()
        return self._most_urgent is not None and self._most_urgent < least_urgent

    def _receive(self) -> None:
        for payload in self._stream.receive():
            message = self._decoder.decode(payload)
            self._held.append(message)
            if isinstance(message, AddRequest) and (
                self._most_urgent is None or message.priority < self._most_urgent
            ):
                self._most_urgent = message.priority
