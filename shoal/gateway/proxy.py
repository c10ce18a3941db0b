"""Forwarding one OpenAI request: pick the version and replica, send, retry once on another replica after a
connection error or a 502/503 (both come before any byte reaches the user), answer 504 past
`upstream_timeout_s`, and pass streams through chunk by chunk as they arrive (never buffered).

`upstream_timeout_s` bounds what a client waits for, whatever the backend does (dies, or stops without
closing its connections, as a SIGSTOPped or partitioned one does): the answer's headers, retry included,
and then a non-streamed body; a stream, once its 200 is sent, may not stay silent that long. A failure
after the 200 of a stream ends it in-band, as shoal serve reports an engine failure: an OpenAI error
event (`upstream_timeout` 504, or `backend_error` 502 when the connection dropped), then `data: [DONE]`.
A client that disconnects from a stream closes the upstream connection, so the backend aborts the request.

The proxy is a plain ASGI app (`Proxy.__call__`, mounted in front of the Starlette app for POST /v1/*), the
upstream client aiohttp's (its HTTP parser is C): on a machine the gateway shares with its backends, its
CPU per request and per streamed chunk is throughput they keep. So the request body is parsed once (the
client's bytes go upstream unchanged unless the model name changes), headers stay ASGI byte pairs, a
stream's chunks go to the server's `send` as they came (no copy unless an event is split across reads),
and a stream's silence is watched by one timer per `upstream_timeout_s`, not one per chunk (`StreamWatch`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
from dataclasses import dataclass

import aiohttp
from starlette.responses import JSONResponse
from starlette.types import Receive, Scope, Send

from shoal.gateway.health import Backend
from shoal.gateway.routing import prompt_prefix
from shoal.gateway.state import GatewayState, ModelState

if sys.version_info >= (3, 11):  # a deadline without wait_for's extra task per call
    from asyncio import timeout as within
else:  # aiohttp requires async-timeout below 3.11
    from async_timeout import timeout as within

RETRYABLE_STATUS = (502, 503)
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "te", "trailer", "upgrade"}
NOT_FORWARDED = {"host", "accept-encoding"}  # plain bodies upstream: the shadow compares their text
_REQUEST_DROPPED = {n.encode() for n in HOP_BY_HOP | NOT_FORWARDED | {"content-type"}}
_RESPONSE_DROPPED = {n.encode() for n in HOP_BY_HOP}
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


async def read_body(receive: Receive) -> bytes | None:
    """The request's body from ASGI messages; None when the client disconnected first."""
    chunks = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def upstream_headers(scope: Scope) -> dict[str, str]:
    """The client's headers (API key, X-Request-Timeout, ...) but not those of its own connection."""
    headers = {
        k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"] if k not in _REQUEST_DROPPED
    }
    headers["content-type"] = "application/json"
    return headers


class StreamWatch:
    """Ends a relayed stream from outside its read loop: when the backend stays silent for `limit_s` while
    the loop waits on it, or when the client disconnects, it records why (`reason`: "silent" or
    "client_gone") and closes the upstream response, so the pending read fails at once (and the backend,
    its connection closed, aborts the request). Silence is checked lazily: one timer per `limit_s`, re-armed
    from the current read's start, rather than a timer set and cancelled for every chunk."""

    def __init__(self, resp: aiohttp.ClientResponse, limit_s: float, receive: Receive):
        self.loop = asyncio.get_running_loop()
        self.resp, self.limit_s = resp, limit_s
        self.reason: str | None = None
        self.reading_since: float | None = None  # loop time the pending read began; None between reads
        self._timer = self.loop.call_at(self.loop.time() + limit_s, self._check)
        self._client = asyncio.ensure_future(receive())  # after the whole body: only the disconnect is left
        self._client.add_done_callback(self._client_message)

    async def read(self) -> bytes:
        """The next chunk of the upstream body (b"" at its end); aiohttp.ClientError once ended."""
        self.reading_since = self.loop.time()
        try:
            return await self.resp.content.readany()
        finally:
            self.reading_since = None

    def _check(self) -> None:
        since, now = self.reading_since, self.loop.time()
        if since is not None and now - since >= self.limit_s:
            self._end("silent")
        else:
            self._timer = self.loop.call_at((now if since is None else since) + self.limit_s, self._check)

    def _client_message(self, message: asyncio.Future) -> None:
        if (
            not message.cancelled()
            and message.exception() is None
            and message.result()["type"] == "http.disconnect"
        ):
            self._end("client_gone")

    def _end(self, reason: str) -> None:
        if self.reason is None:
            self.reason = reason
            self.resp.close()

    def close(self) -> None:
        self._timer.cancel()
        self._client.remove_done_callback(self._client_message)
        self._client.cancel()


class Proxy:
    def __init__(self, state: GatewayState):
        self.state = state
        self.timeout = state.settings.upstream_timeout_s
        self.session: aiohttp.ClientSession | None = None
        self._counters: dict[tuple, tuple] = {}  # the metrics' children, by labels (labels() is not cheap)

    async def start(self) -> None:
        """In the serving loop: an aiohttp session belongs to the loop it was made in."""
        connector = aiohttp.TCPConnector(limit=1024, limit_per_host=0, keepalive_timeout=30)
        self.session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=None),
            auto_decompress=False,
            cookie_jar=aiohttp.DummyCookieJar(),  # a proxy keeps no cookies: none stored, none sent
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """ASGI: POST /v1/... forwarded to a backend."""
        raw = await read_body(receive)
        if raw is None:
            return
        routed = route(self.state, scope["path"], raw)
        if isinstance(routed, JSONResponse):
            return await routed(scope, receive, send)
        headers = upstream_headers(scope)
        prefix = prompt_prefix(routed.body, self.state.settings.prefix_block_chars)
        start, tried = time.monotonic(), set()
        deadline = start + self.timeout  # one budget for both attempts: a retry does not restart the clock
        for attempt in range(2):
            backend = self._pick(routed, prefix, tried)
            if backend is None:
                answer = self._done(routed, "none", 503, start, error(
                    503, f"no healthy backend for {routed.model.name}@{routed.version}", "service_unavailable"))  # fmt: skip
                return await answer(scope, receive, send)
            tried.add(backend.url)
            outcome = await self._try(backend, routed, headers, deadline - time.monotonic())
            if outcome == "timeout":
                return await self._failed(routed, backend, start, 504, self._timeout_body())(
                    scope, receive, send
                )
            if isinstance(outcome, aiohttp.ClientResponse) and (
                attempt or outcome.status not in RETRYABLE_STATUS
            ):
                return await self._respond(routed, backend, outcome, start, deadline, scope, receive, send)
            if isinstance(outcome, aiohttp.ClientResponse):  # a 502/503: nothing has reached the user yet
                outcome.release()
                backend.in_flight -= 1
            elif attempt:
                answer = self._failed(routed, backend, start, 502, self._backend_error_body(outcome))
                return await answer(scope, receive, send)
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
            async with within(budget_s):
                return await self.session.post(backend.url + routed.path, data=routed.raw, headers=headers)
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

    def _failed(
        self, routed: Routed, backend: Backend, start: float, status: int, body: dict
    ) -> JSONResponse:
        """An error the gateway answers for a backend: it names the backend, as a success would."""
        headers = {"x-shoal-backend": backend.url, "x-shoal-version": routed.version}
        return self._done(routed, backend.url, status, start, JSONResponse(body, status, headers))

    async def _respond(self, routed: Routed, backend: Backend, resp: aiohttp.ClientResponse, start: float,
                       deadline: float, scope: Scope, receive: Receive, send: Send) -> None:  # fmt: skip
        headers = [(k.lower(), v) for k, v in resp.raw_headers if k.lower() not in _RESPONSE_DROPPED]
        headers += [(b"x-shoal-backend", backend.url.encode()), (b"x-shoal-version", routed.version.encode())]
        latency = time.monotonic() - start
        shadow = routed.model.shadow
        shadowed = shadow is not None and routed.version != shadow.spec.version and shadow.sampled()
        if routed.body.get("stream"):
            self._record(routed, backend.url, resp.status, latency)
            return await self._relay(routed, backend, resp, headers, latency, shadowed, receive, send)
        try:
            async with within(max(0.001, deadline - time.monotonic())):
                content = await resp.read()
        except asyncio.TimeoutError:
            return await self._failed(routed, backend, start, 504, self._timeout_body())(scope, receive, send)
        except aiohttp.ClientError as e:  # the backend died or dropped the connection mid-body
            answer = self._failed(routed, backend, start, 502, self._backend_error_body(type(e).__name__))
            return await answer(scope, receive, send)
        finally:
            backend.in_flight -= 1
            resp.release()
        self._record(routed, backend.url, resp.status, latency)
        headers.append((b"content-length", str(len(content)).encode()))
        await send({"type": "http.response.start", "status": resp.status, "headers": headers})
        await send({"type": "http.response.body", "body": content})
        if shadowed and resp.status == 200:
            self._shadow(routed, content, latency)

    async def _relay(self, routed: Routed, backend: Backend, resp: aiohttp.ClientResponse, headers: list,
                     latency: float, shadowed: bool, receive: Receive, send: Send) -> None:  # fmt: skip
        """Chunks as they arrive. In a stream of events, only whole events pass (the incomplete tail waits
        for its end), so that an error event after a failure never lands inside a half-sent one."""
        events = resp.headers.get("content-type", "").startswith("text/event-stream")
        kept: list[bytes] = []
        pending, failure = b"", None
        watch = StreamWatch(resp, self.timeout, receive)
        try:
            await send({"type": "http.response.start", "status": resp.status, "headers": headers})
            while True:
                try:
                    chunk = await watch.read()
                except aiohttp.ClientError as e:
                    if watch.reason == "client_gone":
                        return
                    failure = (
                        self._timeout_body("sent nothing for")  # a stream may take long, not stay silent
                        if watch.reason == "silent"
                        else self._backend_error_body(type(e).__name__)
                    )
                    break
                if not chunk:
                    break
                if shadowed:
                    kept.append(chunk)
                if not pending and (not events or chunk.endswith(EVENT_ENDS)):
                    out = chunk  # whole events (the usual case): passed on as they came
                else:
                    pending += chunk
                    cut = complete_events(pending) if events else len(pending)
                    if not cut:
                        continue
                    out, pending = pending[:cut], pending[cut:]
                await send({"type": "http.response.body", "body": out, "more_body": True})
            if failure is None:
                await send({"type": "http.response.body", "body": pending, "more_body": False})
            elif events:
                logger.warning(
                    "stream from %s failed after its 200: %s", backend.url, failure["error"]["message"]
                )
                await send({"type": "http.response.body", "body": error_event(failure), "more_body": False})
            else:  # not events: no in-band way to say it, so the connection drops (the client sees a short body)
                raise ConnectionError(failure["error"]["message"])
        finally:
            watch.close()
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
        key = (routed.model.name, routed.version, backend, status)
        children = self._counters.get(key)
        if children is None:
            m = self.state.metrics
            children = self._counters[key] = (
                m.requests.labels(routed.model.name, routed.version, backend, str(status)),
                m.latency.labels(routed.model.name, routed.version),
            )
        children[0].inc()
        children[1].observe(latency)
        if routed.model.canary:
            routed.model.canary.record(routed.version, status < 500, latency)

    def _done(
        self, routed: Routed, backend: str, status: int, start: float, response: JSONResponse
    ) -> JSONResponse:
        self._record(routed, backend, status, time.monotonic() - start)
        return response

    async def close(self) -> None:
        if self.session:
            await self.session.close()
