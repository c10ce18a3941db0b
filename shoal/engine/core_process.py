"""The engine core in its own process: receive requests, step the LLMEngine, send deltas back, both over
one Unix stream socket to the server (engine/core_stream.py).

Why a process: in one process the engine thread and the HTTP event loop share the GIL, and every
small torch op the engine runs releases and re-takes it, so the loop's JSON and socket work stalls the
step (a convoy). Here the core owns a whole interpreter; the HTTP process only tokenizes, encodes and
streams. Measured in docs/performance.md.

The loop: take every waiting message (blocking only while idle), apply adds, aborts and control calls,
run one step (fault plan first), and send one StepUpdate with each touched request's delta. A step that
raises fails every request in flight (each gets an error) and the loop goes on. The loop ends on a
"shutdown" call, or when the parent process dies (its stream closes). Under
`--scheduling-policy priority` the inbox is also read between the decoder layers of a step, and a more
urgent arrival abandons the step (engine/interrupt.py); what was read then is applied before the next
step, in order.
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict

import msgspec

from shoal.engine.config import EngineConfig
from shoal.engine.core_stream import CoreEnd
from shoal.engine.faults import FaultInjector, FaultPlan
from shoal.engine.interrupt import Inbox
from shoal.engine.llm_engine import LLMEngine
from shoal.engine.messages import (
    AbortRequests,
    AddRequest,
    ClientMessage,
    Control,
    ControlReply,
    Loaded,
    Ready,
    RequestDelta,
    RequestError,
    SeqDelta,
    StartupFailed,
    StepUpdate,
)
from shoal.engine.outputs import RequestOutput
from shoal.engine.sampling_params import SamplingParams
from shoal.engine.stats import StepStats
from shoal.gc_heap import freeze_startup_heap
from shoal.logging_config import LOG_FORMAT_ENV, configure_logging

log = logging.getLogger(__name__)
IDLE_POLL_MS = 500


class _Sent:
    """How much of one sequence's output the client already has."""

    __slots__ = ("text", "tokens")

    def __init__(self) -> None:
        self.text = 0
        self.tokens = 0


class EngineCore:
    """Owns the LLMEngine, turns its cumulative outputs into deltas, applies client messages."""

    def __init__(self, engine: LLMEngine, faults: FaultInjector | None, inbox: Inbox | None = None):
        self.engine = engine
        self.faults = faults
        self._sent: dict[str, list[_Sent]] = {}
        self._step: StepStats | None = None
        self._running = True
        engine.step_listeners.append(self._on_step)
        self._inbox = inbox if engine.config.scheduling_policy == "priority" else None
        if self._inbox is not None or faults is not None:  # fcfs without faults: no call at all
            engine.between_layers = self._between_layers

    def _between_layers(self, least_urgent: int) -> bool:
        """Between two decoder layers: the fault plan's layer delay, then whether a request more urgent
        than the step's least urgent row (priority least_urgent) has arrived (engine/interrupt.py)."""
        if self.faults is not None:
            self.faults.between_layers()
        return self._inbox is not None and self._inbox.urgent_arrival(least_urgent)

    def _on_step(self, step: StepStats) -> None:
        self._step = step

    # ---- client messages ----------------------------------------------------------------------------
    def apply(self, message: ClientMessage, update: StepUpdate) -> None:
        if isinstance(message, AddRequest):
            self._add(message, update)
        elif isinstance(message, AbortRequests):
            for request_id in message.request_ids:
                self._abort(request_id, message.keep_output, update)
        elif isinstance(message, Control):
            update.replies.append(self._control(message))

    def _add(self, message: AddRequest, update: StepUpdate) -> None:
        try:
            params = SamplingParams(**message.params)
            self.engine.add_request(
                message.request_id,
                message.prompt_token_ids,
                params,
                message.arrival_time,
                message.priority,
                message.cache_salt,
            )
        except (TypeError, ValueError) as e:
            update.errors.append(RequestError(message.request_id, "invalid", str(e)))
            return
        self._sent[message.request_id] = [_Sent() for _ in range(params.n)]

    def _abort(self, request_id: str, keep_output: bool, update: StepUpdate) -> None:
        out = self.engine.abort_request(request_id)
        if out is not None and keep_output and request_id in self._sent:
            update.deltas.append(self._delta(out))  # its last delta: the rest of its text, "abort"
        self._sent.pop(request_id, None)

    def _control(self, call: Control) -> ControlReply:
        try:
            if call.op == "shutdown":
                self._running = False
                return ControlReply(call.call_id, True)
            if call.op == "stats":  # the reply's StepUpdate carries fresh stats (a /metrics scrape)
                return ControlReply(call.call_id, True)
            if self.faults is None:
                return ControlReply(call.call_id, False, "fault injection is disabled")
            if call.op == "faults_set":
                return ControlReply(call.call_id, True, self.faults.set(call.payload))
            if call.op == "faults_get":
                return ControlReply(call.call_id, True, self.faults.current())
        except ValueError as e:
            return ControlReply(call.call_id, False, str(e))
        return ControlReply(call.call_id, False, f"unknown control call {call.op!r}")

    # ---- the step -----------------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self._running

    def step(self, update: StepUpdate) -> None:
        self._step = None
        try:
            if self.faults is not None:
                self.faults.before_step()
            outputs = self.engine.step()
        except Exception as e:  # noqa: BLE001 - the requests fail, the core goes on
            self._fail_in_flight(e, update)
            return
        update.deltas.extend(self._delta(out) for out in outputs)
        if self._step is not None:
            update.step = _shallow_fields(self._step)

    def _fail_in_flight(self, error: Exception, update: StepUpdate) -> None:
        update.failed_step = f"{type(error).__name__}: {error}"
        for request_id in self.engine.abort_all(error):
            self._sent.pop(request_id, None)
            update.errors.append(RequestError(request_id, "step", f"engine step failed: {error}"))

    def _delta(self, out: RequestOutput) -> RequestDelta:
        sent = self._sent[out.request_id]
        first = all(s.tokens == 0 and s.text == 0 for s in sent)
        seqs = [self._seq_delta(o, sent[o.index]) for o in out.outputs]
        if out.finished:
            self._sent.pop(out.request_id, None)
        delta = RequestDelta(out.request_id, seqs, out.finished, out.metrics, first=first)
        if first:
            delta.prompt_token_ids = out.prompt_token_ids
            delta.prompt_logprobs = out.prompt_logprobs
            delta.num_cached_tokens = out.num_cached_tokens
        return delta

    @staticmethod
    def _seq_delta(o, sent: _Sent) -> SeqDelta:
        text, ids = o.text[sent.text :], o.token_ids[sent.tokens :]
        logprobs = o.logprobs[sent.tokens :] if o.logprobs is not None else None
        times = o.token_times[sent.tokens :]
        sent.text, sent.tokens = len(o.text), len(o.token_ids)
        return SeqDelta(o.index, text, ids, logprobs, o.finish_reason, o.stop_reason, times)

    def stats(self) -> dict:
        """The engine's stats, refreshed: adds and aborts change the queue gauges without a step."""
        self.engine.refresh_stats()
        return _shallow_fields(self.engine.stats)


def _shallow_fields(stats: object) -> dict:
    """A stats dataclass's fields as a dict, sharing its lists: dataclasses.asdict deep-copies, 12-16 us for
    StepStats or EngineStats (28 us of every step's serial time in this process). The dict is encoded into
    the step's message at once, before the engine touches the object again."""
    return dict(vars(stats))


def run_core(config: EngineConfig, stream_path: str, fault_plan: dict | None, parent: int) -> None:
    """Process entry point (spawned): connect to the server's stream at stream_path, load, report Ready
    (or StartupFailed), then loop until shutdown or until the server process (pid parent, given by the
    server: it may be gone before this process reads its own parent) is no longer this process's parent."""
    configure_logging(
        os.environ.get("SHOAL_CORE_LOG_LEVEL", "WARNING"), os.environ.get(LOG_FORMAT_ENV, "text")
    )
    stream = CoreEnd(stream_path)
    try:
        faults = FaultInjector(FaultPlan.parse(fault_plan)) if fault_plan is not None else None
        if faults is not None:
            faults.before_load()
        engine = LLMEngine(config)
        stream.send(Loaded())
        if faults is not None:
            faults.before_warmup()
        engine.warm_up()
        frozen = freeze_startup_heap()  # full collections would otherwise walk the model's objects
    except Exception as e:  # noqa: BLE001 - the parent reports it and exits
        log.exception("engine core failed to start")
        stream.send(StartupFailed(f"{type(e).__name__}: {e}"))
        return
    stream.send(
        Ready(
            asdict(engine.config),
            engine.generation_config,
            engine.model_config.vocab_size,
            engine.describe() | {"gc_frozen_objects": frozen},
        )
    )
    messages = Inbox(stream, msgspec.msgpack.Decoder(ClientMessage))
    _loop(EngineCore(engine, faults, messages), messages, stream, parent)
    engine.close()
    stream.close()


def _loop(core: EngineCore, inbox: Inbox, outbox: CoreEnd, parent: int) -> None:
    """Serve the client until shutdown, or until the server process (pid parent) is gone (its stream
    closed, or this process reparented)."""
    while core.running:
        update = StepUpdate()
        busy = core.engine.has_unfinished()
        applied = False
        if busy or inbox.wait(IDLE_POLL_MS):
            for message in inbox.take():
                core.apply(message, update)
                applied = True
            if inbox.closed:
                return  # the server is gone: nobody will read what is left
            if update.replies:  # answered before the step: a step told to hang or die must not hold them
                # Fresh stats ride along: a /metrics scrape's "stats" call is answered by them.
                if not outbox.send(StepUpdate(replies=update.replies, stats=core.stats())):
                    return
                update.replies = []
        elif os.getppid() != parent:
            return  # the server died without a shutdown call: do not outlive it
        if core.running and core.engine.has_unfinished():
            core.step(update)
        # After adds or aborts the client gets fresh stats even without a step (an abort that empties the
        # batch would otherwise leave vllm:num_requests_running stale until the next request).
        if applied or update.deltas or update.errors or update.replies or update.step or update.failed_step:
            update.stats = core.stats()
            if not outbox.send(update):
                return
