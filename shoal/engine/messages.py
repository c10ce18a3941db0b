"""What crosses the boundary between the engine core process and its client (msgpack, via msgspec).

The client sends requests, aborts and control calls; the core answers once per step with one
`StepUpdate` holding every request's *delta* since the last one (new token ids, new text, new logprobs),
never a cumulative snapshot, so the cost of a step's message grows with the batch, not with the length
of the outputs. The same design as vLLM V1's EngineCore, which uses ZMQ and msgspec for the same reason.
"""

from __future__ import annotations

from typing import Any

import msgspec

# One position's logprobs: token id -> logprob (msgpack keeps the integer keys).
Logprobs = dict[int, float]


class AddRequest(msgspec.Struct, tag=True, array_like=True):
    request_id: str
    prompt_token_ids: list[int]
    params: dict[str, Any]  # SamplingParams fields
    arrival_time: float | None = None  # time.monotonic() when the HTTP request arrived
    priority: int = 0
    cache_salt: str | None = None


class AbortRequests(msgspec.Struct, tag=True, array_like=True):
    request_ids: list[str]
    # True: end them with what they generated so far (finish_reason "abort"), sent back as their last
    # delta (timeouts, drain); False: drop them silently (the client is gone).
    keep_output: bool = False


class Control(msgspec.Struct, tag=True, array_like=True):
    """A call answered by a ControlReply with the same call_id: "faults_set", "faults_get", "shutdown"."""

    call_id: int
    op: str
    payload: Any = None


ClientMessage = AddRequest | AbortRequests | Control


class SeqDelta(msgspec.Struct, array_like=True):
    """What one of a request's n sequences gained in a step."""

    index: int
    text: str  # new text, safe to show
    token_ids: list[int]
    logprobs: list[Logprobs] | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    token_times: list[float] = []  # time.monotonic() of each new token's sampling


class RequestDelta(msgspec.Struct, array_like=True):
    request_id: str
    outputs: list[SeqDelta]
    finished: bool
    metrics: dict[str, Any] | None = None  # RequestOutput.metrics, whole (a handful of timestamps)
    # Sent once, with a request's first delta:
    first: bool = False
    prompt_token_ids: list[int] | None = None
    prompt_logprobs: list[Logprobs | None] | None = None
    num_cached_tokens: int = 0


class RequestError(msgspec.Struct, array_like=True):
    """A request the core refused (kind "invalid": a 400) or failed (kind "step": a failed step)."""

    request_id: str
    kind: str
    message: str


class ControlReply(msgspec.Struct, array_like=True):
    call_id: int
    ok: bool
    payload: Any = None


class StepUpdate(msgspec.Struct, tag=True, array_like=True):
    """Everything one iteration of the core loop has to say."""

    deltas: list[RequestDelta] = []
    errors: list[RequestError] = []
    replies: list[ControlReply] = []
    step: dict[str, Any] | None = None  # StepStats fields, when a step ran
    failed_step: str | None = None  # the error, when a step raised (its requests are in errors)
    stats: dict[str, Any] | None = None  # EngineStats fields


class Loaded(msgspec.Struct, tag=True, array_like=True):
    """The core loaded the weights and is warming up (readiness says "warming up")."""


class Ready(msgspec.Struct, tag=True, array_like=True):
    """The core loaded the model: the resolved configuration the client needs."""

    config: dict[str, Any]
    generation_config: dict[str, Any]
    vocab_size: int
    describe: dict[str, Any]


class StartupFailed(msgspec.Struct, tag=True, array_like=True):
    message: str


CoreMessage = StepUpdate | Loaded | Ready | StartupFailed
