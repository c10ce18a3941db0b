"""Running engine requests for an HTTP request: start, collect, merge, and abort when the client leaves.

One HTTP request may hold several engine requests (a completions batch of prompts). They are started
together and each is primed (its first snapshot awaited) before any byte of the answer is sent, so that
an engine ValueError is still a 400 and not an error event inside a 200 stream. Whatever way an engine
request ends early (client gone, a sibling failed, cancellation) it is aborted, so its KV blocks are freed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import anyio
import msgspec
from starlette.requests import Request
from starlette.responses import Response

from shoal.engine.outputs import RequestOutput
from shoal.engine.sampling_params import SamplingParams
from shoal.policy.config import PolicyConfig
from shoal.policy.content_filter import ContentFilter
from shoal.policy.identity import ANONYMOUS, Identity
from shoal.server.content_guard import check_prompts, guarded
from shoal.server.direct_body import SSEResponse
from shoal.server.errors import SERVER_ERROR, APIError, error_body
from shoal.server.metrics import ServerMetrics
from shoal.server.protocol import Usage
from shoal.server.request_context import RequestContext, request_context
from shoal.server.traffic import admit_jobs, evictable

logger = logging.getLogger("shoal.server")
T = TypeVar("T")


@dataclass
class EngineJob:
    """One engine request: a prompt and its sampling parameters."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    priority: int | None = None  # None: the caller's class's priority (resolved by run_jobs), or 0
    cache_salt: str | None = None
    # The generated tokens are not returned (echo with max_tokens 0): not counted as generation tokens.
    hidden_output: bool = False


class EngineFailure(Exception):
    """A ValueError from the engine after it accepted the request: too late for a 400, so a 500."""


async def _tracked(
    engine: Any, metrics: ServerMetrics, job: EngineJob, ctx: RequestContext
) -> AsyncIterator[RequestOutput]:
    """engine.generate with metrics, and an abort whenever it ends before the last snapshot. The last
    output seen, however the request ended, goes to ctx.outputs (for metrics, logs and traces)."""
    tracker = metrics.track(len(job.prompt_ids), job.params.n, ctx.arrival_time, job.hidden_output)
    agen = engine.generate(
        job.request_id, job.prompt_ids, job.params, ctx.arrival_time, job.priority, job.cache_salt
    )
    started = finished = rejected = False
    last: RequestOutput | None = None
    try:
        async for out in agen:
            started = True
            last = out
            tracker.observe(out)
            finished = out.finished
            yield out
            if finished:
                return
    except ValueError:
        rejected = not started  # an invalid request, not an aborted one
        raise
    finally:
        if last is not None:
            ctx.outputs.append(last)
        if not rejected:
            tracker.end(last)
        if not finished:
            with anyio.CancelScope(shield=True):
                await agen.aclose()  # the engine aborts an unfinished request when its generator closes


class Stream:
    """An engine request whose first snapshot has arrived (so it was accepted)."""

    def __init__(self, job: EngineJob, agen: AsyncIterator[RequestOutput], first: RequestOutput):
        self.job = job
        self._agen = agen
        self._first: RequestOutput | None = first

    async def __aiter__(self) -> AsyncIterator[RequestOutput]:
        if self._first is not None:
            first, self._first = self._first, None
            yield first
            if first.finished:
                return
        try:
            async for out in self._agen:
                yield out
        except ValueError as e:
            raise EngineFailure(str(e)) from e

    async def aclose(self) -> None:
        with anyio.CancelScope(shield=True):
            await self._agen.aclose()


async def start(
    engine: Any,
    metrics: ServerMetrics,
    jobs: list[EngineJob],
    ctx: RequestContext,
    content_filter: ContentFilter | None = None,
) -> list[Stream]:
    """Submit all jobs and wait until each is accepted. ValueError -> 400; every job aborted on failure.
    With a content filter that checks outputs, every job's outputs pass through it."""
    agens = [_tracked(engine, metrics, job, ctx) for job in jobs]
    if content_filter is not None and content_filter.policy.output:
        agens = [guarded(agen, content_filter) for agen in agens]

    async def prime(agen: AsyncIterator[RequestOutput]) -> RequestOutput:
        try:
            return await agen.__anext__()
        except StopAsyncIteration:
            raise EngineFailure("the engine ended a request without output") from None

    try:
        firsts = await _gather_or_cancel([prime(a) for a in agens])
    except BaseException as e:
        for agen in agens:
            with anyio.CancelScope(shield=True):
                await agen.aclose()
        if isinstance(e, ValueError):
            raise APIError(str(e)) from e
        raise
    return [Stream(job, agen, first) for job, agen, first in zip(jobs, agens, firsts, strict=True)]


async def collect(streams: list[Stream]) -> list[RequestOutput]:
    """The final snapshot of every stream (all run concurrently; one failing aborts the others)."""

    async def last(stream: Stream) -> RequestOutput:
        final = None
        try:
            async for out in stream:
                final = out
        finally:
            await stream.aclose()
        assert final is not None
        return final

    return await _gather_or_cancel([last(s) for s in streams])


async def merge(streams: list[Stream]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Snapshots of all streams as they come, tagged with the stream's index; closes them all at the end.

    Snapshots are cumulative, so an unread one is replaced by the next: a slow client holds at most one
    snapshot per stream, not every step's."""
    if len(streams) == 1:
        try:
            async for out in streams[0]:
                yield 0, out
        finally:
            await streams[0].aclose()
        return
    newest: dict[int, RequestOutput] = {}
    ended: set[int] = set()
    errors: list[BaseException] = []
    wake = asyncio.Event()

    async def pump(i: int, stream: Stream) -> None:
        try:
            async for out in stream:
                newest[i] = out
                wake.set()
        except Exception as e:  # noqa: BLE001 - handed to the consumer
            errors.append(e)
        finally:
            ended.add(i)
            wake.set()

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        while True:
            await wake.wait()
            wake.clear()
            ready = sorted(newest.items(), key=lambda item: item[0])
            newest.clear()
            for item in ready:
                yield item
            if errors:
                raise errors[0]
            if len(ended) == len(streams) and not newest:
                return
    finally:
        for task in tasks:
            task.cancel()
        with anyio.CancelScope(shield=True):
            await asyncio.gather(*tasks, return_exceptions=True)
            for s in streams:
                await s.aclose()


async def _gather_or_cancel(coros: list[Awaitable[T]]) -> list[T]:
    """asyncio.gather that cancels the siblings when one fails (Python 3.10 has no TaskGroup)."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for task in tasks:
            task.cancel()
        with anyio.CancelScope(shield=True):
            await asyncio.gather(*tasks, return_exceptions=True)
        raise


class ClientGone(Exception):
    """The client disconnected before the answer was ready."""


async def unless_disconnected(request: Request, work: Callable[[], Awaitable[T]]) -> T:
    """Run work(), cancelling it (and so aborting its engine requests) if the client disconnects."""
    task = asyncio.ensure_future(work())

    async def watch() -> None:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                task.cancel()
                return

    watcher = asyncio.ensure_future(watch())
    try:
        return await task
    except asyncio.CancelledError:
        if watcher.done() and not watcher.cancelled():
            raise ClientGone() from None
        raise
    finally:
        watcher.cancel()


_json = msgspec.json.Encoder()


def sse(payload: dict | str) -> bytes:
    """One server-sent event; payloads are JSON objects (msgspec: about 10x json.dumps), except the final
    `[DONE]`. Logprobs are finite by then (logprobs.clean), so no NaN/Infinity reaches the encoder."""
    data = payload.encode() if isinstance(payload, str) else _json.encode(payload)
    return b"data: " + data + b"\n\n"


@dataclass(frozen=True)
class StreamChunks:
    """Builds the chunk events of one streamed response.

    /v1/completions and /v1/chat/completions stream the same envelope and differ only in its `object`
    name and in the shape of their choices, so both endpoints encode chunks here.
    """

    request_id: str
    object_name: str  # "text_completion" or "chat.completion.chunk"
    created: int
    model: str
    include_usage: bool  # stream_options.include_usage: every chunk carries a usage key, null until the last
    continuous_usage: bool = False  # vLLM's continuous_usage_stats: every chunk carries the usage so far

    def __call__(self, choices: list[dict], usage: Usage | None = None, final: bool = False) -> bytes:
        """One chunk; usage is the usage so far (sent on every chunk when continuous, else only final)."""
        payload = {
            "id": self.request_id,
            "object": self.object_name,
            "created": self.created,
            "model": self.model,
            "choices": choices,
            "system_fingerprint": None,
        }
        if self.include_usage:
            send = usage is not None and (final or self.continuous_usage)
            payload["usage"] = usage.model_dump() if send else None
        return sse(payload)


def stream_error_event(exc: BaseException) -> bytes:
    """An error inside a stream that already answered 200: an OpenAI error object as an event."""
    if isinstance(exc, APIError):
        return sse(exc.body())
    logger.error("engine failure during a stream: %r", exc, exc_info=exc)
    return sse(error_body(f"engine failure: {exc}", type=SERVER_ERROR))


def engine_failure(exc: BaseException) -> APIError:
    """A 500 in OpenAI's shape for an engine exception (logged)."""
    logger.error("engine failure: %r", exc, exc_info=exc)
    return APIError(f"engine failure: {exc}", 500, type=SERVER_ERROR)


async def run_jobs(
    request: Request,
    engine: Any,
    metrics: ServerMetrics,
    jobs: list[EngineJob],
    stream_events: Callable[[list[Stream]], AsyncIterator[bytes]] | None,
) -> list[RequestOutput] | Response:
    """The one way an endpoint runs its engine requests: with stream_events, answer with their SSE stream;
    otherwise return the final snapshots. A client gone is a 499 (its requests aborted), an invalid request
    stays an APIError, any other engine failure becomes a 500."""
    ctx = request_context(request)
    settings = request.app.state.shoal.settings
    ctx.model = settings.served_model_name
    ctx.hidden_output = all(job.hidden_output for job in jobs)
    _apply_identity(settings.policy, ctx.identity or ANONYMOUS, jobs)
    _check_priority(engine, jobs)
    content_filter = getattr(request.app.state.shoal, "content_filter", None)
    if content_filter is not None:
        wants_logprobs = any(
            j.params.logprobs is not None or j.params.prompt_logprobs is not None for j in jobs
        )
        await check_prompts(
            request, engine.tokenizer, [j.prompt_ids for j in jobs], content_filter, wants_logprobs
        )
    await admit_jobs(request, jobs)  # caps on the prompt's tokens, shedding, token rate limits
    _arm_timeout(request, ctx, engine, [job.request_id for job in jobs])
    try:
        if stream_events is not None:
            ctx.streamed = True
            streams = await unless_disconnected(
                request, lambda: evictable(request, start(engine, metrics, jobs, ctx, content_filter))
            )
            return SSEResponse(stream_events(streams))
        return await unless_disconnected(
            request, lambda: _start_and_collect(request, engine, metrics, jobs, ctx, content_filter)
        )
    except ClientGone:
        return Response(status_code=499)  # nobody reads it; the engine requests are aborted
    except APIError:
        raise
    except Exception as e:  # EngineFailure, EngineDeadError, ...
        raise engine_failure(e) from e


def _apply_identity(policy: PolicyConfig | None, identity: Identity, jobs: list[EngineJob]) -> None:
    """The caller's class sets each job's default priority and a floor it cannot go below; its tenant
    sets the cache salt, so tenants never share prefix-cache blocks (shoal/policy/tenancy.py)."""
    for job in jobs:
        if policy is None:
            job.priority = job.priority or 0
            continue
        job.priority = policy.job_priority(identity.priority_class, job.priority)
        job.cache_salt = policy.tenants.cache_salt(identity.tenant, job.cache_salt)


def _check_priority(engine: Any, jobs: list[EngineJob]) -> None:
    """A priority the scheduler would ignore is a 400 naming the field (vLLM's rule)."""
    policy = getattr(engine.config, "scheduling_policy", "fcfs")
    if policy != "priority" and any(job.priority for job in jobs):
        raise APIError(
            "priority is only honoured with --scheduling-policy priority; this server schedules fcfs",
            param="priority",
            code="priority_not_enabled",
        )


TIMEOUT_HEADER = "x-request-timeout"
MAX_TIMEOUT_S = 24 * 3600.0
TIMEOUT_RECHECK_S = 0.1


def request_timeout(request: Request) -> float | None:
    """Seconds this request may take from its arrival: the X-Request-Timeout header (a positive number
    of seconds; a 400 otherwise), else --request-timeout, else None (no limit)."""
    raw = request.headers.get(TIMEOUT_HEADER)
    if raw is None:
        return request.app.state.shoal.settings.request_timeout_s
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not 0 < value <= MAX_TIMEOUT_S:  # also false for NaN
        raise APIError(
            f"X-Request-Timeout must be a number of seconds in (0, {MAX_TIMEOUT_S:g}], got {raw!r}",
            param="X-Request-Timeout",
            code="invalid_timeout",
        )
    return value


def _arm_timeout(request: Request, ctx: RequestContext, engine: Any, request_ids: list[str]) -> None:
    """At the deadline, end the requests that are still running with their partial output and
    finish_reason "abort": the response (or stream) then completes normally, marked as timed out."""
    timeout = request_timeout(request)
    if timeout is None:
        return
    loop = asyncio.get_running_loop()
    deadline = ctx.arrival_time + timeout

    def expire() -> None:
        if ctx.end_time is not None:
            return
        early = deadline - time.monotonic()
        if early > 0:  # uvloop's timers have millisecond granularity and may fire a little early
            loop.call_later(early, expire)
            return
        if engine.finish(request_ids):
            ctx.timed_out = True
        # Again shortly: a request may not have reached the engine yet (it is sent on run_jobs' first
        # await), and the response is not over until its last byte is sent.
        loop.call_later(TIMEOUT_RECHECK_S, expire)

    loop.call_later(max(deadline - time.monotonic(), 0.0), expire)


async def _start_and_collect(
    request: Request,
    engine: Any,
    metrics: ServerMetrics,
    jobs: list[EngineJob],
    ctx: RequestContext,
    content_filter: ContentFilter | None,
) -> list[RequestOutput]:
    return await collect(await evictable(request, start(engine, metrics, jobs, ctx, content_filter)))
