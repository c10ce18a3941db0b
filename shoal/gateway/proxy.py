"""Forwarding one OpenAI request: pick the version and replica, send, retry once on another replica after a
connection error or a 502/503 (both come before any byte reaches the user), answer 504 past
`upstream_timeout_s`, and pass streams through chunk by chunk as they arrive (never buffered).

`upstream_timeout_s` bounds what a client waits for, whatever the backend does (dies, or stops without
closing its connections, as a SIGSTOPped or partitioned one does): the answer's headers, retry included,
and then a non-streamed body; a stream, once its 200 is sent, may not stay silent that long. A failure
after the 200 of a stream ends it in-band, as shoal serve reports an engine failure: an OpenAI error
event (`upstream_timeout` 504, or `backend_error` 502 when the connection dropped), then `data: [DONE]`.

The upstream client is aiohttp's (its HTTP parser is C): against httpx it roughly halves the gateway's
CPU per request, which on a machine it shares with its backends is throughput they keep."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from shoal.gateway.health import Backend
from shoal.gateway.routing import prompt_prefix
from shoal.gateway.state import GatewayState, ModelState

RETRYABLE_STATUS = (502, 503)
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "te", "trailer", "upgrade"}
NOT_FORWARDED = {"host", "accept-encoding"}  # plain bodies upstream: the shadow compares their text
EVENT_ENDS = (b"\n\n", b"\r\n\r\n")  # the blank line that ends a server-sent event

logger = logging.getLogger("shoal.gateway")


def error_body(message: str, type_: str, code: str | None = None) -> dict:
    """OpenAI's error object, as shoal serve answers it."""
    return {"error": {"message": message, "type": type_, "param": None, "code": code}}


def error(status: int, message: str, type_: str, code: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, type_, code), status_code=status)


def error_event(body: dict) -> bytes:
    """The end of a stream that failed after its 200: the error as an event, then [DONE]."""
    return b"data: " + json.dumps(body).encode() + b"\n\ndata: [DONE]\n\n"


def complete_events(buffer: bytes) -> int:
    """Where the last complete server-sent event of `buffer` ends (0: none is complete yet)."""
    return max((i + len(end) for end in EVENT_ENDS if (i := buffer.rfind(end)) >= 0), default=0)


@dataclass
class Routed:
    model: ModelState
    version: str
    body: dict
    raw: bytes  # what is sent upstream: the client's bytes unless the model name had to change
    path: str


def route(state: GatewayState, path: str, raw: bytes) -> Routed | JSONResponse:
    try:
        body = json.loads(raw)
    except ValueError:
        return error(400, "the body is not valid JSON", "invalid_request_error")
    name = body.get("model") if isinstance(body, dict) else None
    if not isinstance(name, str):
        return error(400, "'model' is required", "invalid_request_error")
    name, _, pinned = name.partition("@")
    model = state.models.get(name)
    if model is None or (pinned and pinned not in model.replicas):
        return error(
            404, f"the model {body['model']!r} does not exist", "invalid_request_error", "model_not_found"
        )
    version = pinned or model.split.pick()
    served = model.served_model(version)
    if served != body["model"]:
        body = {**body, "model": served}
        raw = json.dumps(body).encode()
    return Routed(model, version, body, raw, path)


class Proxy:
    def __init__(self, state: GatewayState):
        self.state = state
        self.timeout = state.settings.upstream_timeout_s
        self.session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        """In the serving loop: an aiohttp session belongs to the loop it was made in."""
        connector = aiohttp.TCPConnector(limit=1024, limit_per_host=0, keepalive_timeout=30)
        self.session = aiohttp.ClientSession(
            connector=connector, timeout=aiohttp.ClientTimeout(total=None), auto_decompress=False
        )

    async def handle(self, request: Request) -> Response:
        routed = route(self.state, request.url.path, await request.body())
        if isinstance(routed, JSONResponse):
            return routed
        # the client's headers (API key, X-Request-Timeout, ...) but not those of its own connection
        headers = {k: v for k, v in request.headers.items() if k not in HOP_BY_HOP and k not in NOT_FORWARDED}
        headers["content-type"] = "application/json"
        prefix = prompt_prefix(routed.body, self.state.settings.prefix_block_chars)
        start, tried = time.monotonic(), set()
        deadline = start + self.timeout  # one budget for both attempts: a retry does not restart the clock
        for attempt in range(2):
            backend = self._pick(routed, prefix, tried)
            if backend is None:
                return self._done(routed, "none", 503, start, error(
                    503, f"no healthy backend for {routed.model.name}@{routed.version}", "service_unavailable"))  # fmt: skip
            tried.add(backend.url)
            outcome = await self._try(backend, routed, headers, deadline - time.monotonic())
            if outcome == "timeout":
                return self._failed(routed, backend, start, 504, self._timeout_body())
            if isinstance(outcome, aiohttp.ClientResponse) and (
                attempt or outcome.status not in RETRYABLE_STATUS
            ):
                return await self._respond(routed, backend, outcome, start, deadline)
            if isinstance(outcome, aiohttp.ClientResponse):  # a 502/503: nothing has reached the user yet
                outcome.release()
                backend.in_flight -= 1
            elif attempt:
                return self._failed(routed, backend, start, 502, self._backend_error_body(outcome))
            self.state.metrics.retries.labels(routed.model.name).inc()
        raise AssertionError("unreachable: the second attempt always returns")

    def _pick(self, routed: Routed, prefix: str | None, tried: set[str]) -> Backend | None:
        """Another replica than those tried; the same one again when it is the only one."""
        replicas, picker = routed.model.replicas[routed.version], routed.model.picker
        return picker.pick(replicas, prefix, tried) or (
            picker.pick(replicas, prefix, set()) if tried else None
        )

    async def _try(
        self, backend: Backend, routed: Routed, headers: dict, budget_s: float
    ) -> aiohttp.ClientResponse | str:
        """The response at its headers (the backend still counts it in flight), "timeout" when `budget_s`
        passes first, or the connection error's name."""
        if budget_s <= 0:
            return "timeout"
        backend.in_flight += 1
        try:
            return await asyncio.wait_for(
                self.session.post(backend.url + routed.path, data=routed.raw, headers=headers), budget_s
            )
        except asyncio.TimeoutError:
            backend.in_flight -= 1
            return "timeout"
        except aiohttp.ClientError as e:
            backend.in_flight -= 1
            return type(e).__name__

    def _timeout_body(self, what: str = "did not answer within") -> dict:
        return error_body(f"the backend {what} {self.timeout:g} s", "timeout", "upstream_timeout")

    @staticmethod
    def _backend_error_body(name: str) -> dict:
        return error_body(f"backend error: {name}", "bad_gateway", "backend_error")

    def _failed(self, routed: Routed, backend: Backend, start: float, status: int, body: dict) -> Response:
        """An error the gateway answers for a backend: it names the backend, as a success would."""
        headers = {"x-shoal-backend": backend.url, "x-shoal-version": routed.version}
        return self._done(routed, backend.url, status, start, JSONResponse(body, status, headers))

    async def _respond(
        self, routed: Routed, backend: Backend, resp: aiohttp.ClientResponse, start: float, deadline: float
    ) -> Response:
        headers = {k: v for k, v in resp.headers.items() if k.lower() not in HOP_BY_HOP}
        headers["x-shoal-backend"], headers["x-shoal-version"] = backend.url, routed.version
        latency = time.monotonic() - start
        shadow = routed.model.shadow
        shadowed = shadow is not None and routed.version != shadow.spec.version and shadow.sampled()
        if routed.body.get("stream"):
            chunks = self._relay(routed, backend, resp, latency, shadowed)
            self._record(routed, backend.url, resp.status, latency)
            return StreamingResponse(chunks, status_code=resp.status, headers=headers)
        try:
            content = await asyncio.wait_for(resp.read(), max(0.001, deadline - time.monotonic()))
        except asyncio.TimeoutError:
            return self._failed(routed, backend, start, 504, self._timeout_body())
        except aiohttp.ClientError as e:  # the backend died or dropped the connection mid-body
            return self._failed(routed, backend, start, 502, self._backend_error_body(type(e).__name__))
        finally:
            backend.in_flight -= 1
            resp.release()
        self._record(routed, backend.url, resp.status, latency)
        if shadowed and resp.status == 200:
            self._shadow(routed, content, latency)
        return Response(content, status_code=resp.status, headers=headers)

    async def _relay(self, routed: Routed, backend: Backend, resp: aiohttp.ClientResponse, latency: float,
                     shadowed: bool) -> AsyncIterator[bytes]:  # fmt: skip
        """Chunks as they arrive. In a stream of events, only whole events pass (the incomplete tail waits
        for its end), so that an error event after a failure never lands inside a half-sent one."""
        events = resp.headers.get("content-type", "").startswith("text/event-stream")
        kept: list[bytes] = []
        pending, failure = b"", None
        try:
            while True:
                try:
                    chunk = await asyncio.wait_for(resp.content.readany(), self.timeout)
                except asyncio.TimeoutError:  # a stream may take long, but not stay silent that long
                    failure = self._timeout_body("sent nothing for")
                    break
                except aiohttp.ClientError as e:
                    failure = self._backend_error_body(type(e).__name__)
                    break
                if not chunk:
                    break
                if shadowed:
                    kept.append(chunk)
                pending += chunk
                cut = complete_events(pending) if events else len(pending)
                if cut:
                    yield pending[:cut]
                    pending = pending[cut:]
            if failure is None:
                if pending:
                    yield pending
            elif events:
                logger.warning(
                    "stream from %s failed after its 200: %s", backend.url, failure["error"]["message"]
                )
                yield error_event(failure)
            else:  # not events: no in-band way to say it, so the connection drops (the client sees a short body)
                raise ConnectionError(failure["error"]["message"])
        finally:
            backend.in_flight -= 1
            resp.release()
        if shadowed and resp.status == 200 and failure is None:
            self._shadow(routed, b"".join(kept), latency)

    def _shadow(self, routed: Routed, primary: bytes, latency: float) -> None:
        shadow = routed.model.shadow
        version = shadow.spec.version
        backend = routed.model.picker.pick(routed.model.replicas[version], None, set())
        if backend is None:
            shadow.count("failed")
            return
        body = {**routed.body, "model": routed.model.served_model(version)}
        shadow.submit(backend.url, routed.path, body, primary, latency)

    def _record(self, routed: Routed, backend: str, status: int, latency: float) -> None:
        m = self.state.metrics
        m.requests.labels(routed.model.name, routed.version, backend, str(status)).inc()
        m.latency.labels(routed.model.name, routed.version).observe(latency)
        if routed.model.canary:
            routed.model.canary.record(routed.version, status < 500, latency)

    def _done(self, routed: Routed, backend: str, status: int, start: float, response: Response) -> Response:
        self._record(routed, backend, status, time.monotonic() - start)
        return response

    async def close(self) -> None:
        if self.session:
            await self.session.close()
