"""Forwarding one OpenAI request: pick the version and replica, send, retry once on another replica after a
connection error or a 502/503 (both come before any byte reaches the user), answer 504 past
`upstream_timeout_s`, and pass streams through chunk by chunk as they arrive (never buffered).

The upstream client is aiohttp's (its HTTP parser is C): against httpx it roughly halves the gateway's
CPU per request, which on a machine it shares with its backends is throughput they keep."""

from __future__ import annotations

import asyncio
import json
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


def error(status: int, message: str, type_: str, code: str | None = None) -> JSONResponse:
    """OpenAI's error shape, as shoal serve answers it."""
    return JSONResponse(
        {"error": {"message": message, "type": type_, "param": None, "code": code}}, status_code=status
    )


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
        for attempt in range(2):
            backend = self._pick(routed, prefix, tried)
            if backend is None:
                return self._done(routed, "none", 503, start, error(
                    503, f"no healthy backend for {routed.model.name}@{routed.version}", "service_unavailable"))  # fmt: skip
            tried.add(backend.url)
            outcome = await self._try(backend, routed, headers)
            if outcome == "timeout":
                return self._done(routed, backend.url, 504, start, self._timeout_error())
            if isinstance(outcome, aiohttp.ClientResponse) and (
                attempt or outcome.status not in RETRYABLE_STATUS
            ):
                return await self._respond(routed, backend, outcome, start)
            if isinstance(outcome, aiohttp.ClientResponse):  # a 502/503: nothing has reached the user yet
                outcome.release()
                backend.in_flight -= 1
            elif attempt:
                return self._done(routed, backend.url, 502, start, error(
                    502, f"backend error: {outcome}", "bad_gateway"))  # fmt: skip
            self.state.metrics.retries.labels(routed.model.name).inc()
        raise AssertionError("unreachable: the second attempt always returns")

    def _pick(self, routed: Routed, prefix: str | None, tried: set[str]) -> Backend | None:
        """Another replica than those tried; the same one again when it is the only one."""
        replicas, picker = routed.model.replicas[routed.version], routed.model.picker
        return picker.pick(replicas, prefix, tried) or (
            picker.pick(replicas, prefix, set()) if tried else None
        )

    async def _try(self, backend: Backend, routed: Routed, headers: dict) -> aiohttp.ClientResponse | str:
        """The response at its headers (the backend still counts it in flight), "timeout", or the error's name."""
        backend.in_flight += 1
        try:
            return await asyncio.wait_for(
                self.session.post(backend.url + routed.path, data=routed.raw, headers=headers), self.timeout
            )
        except asyncio.TimeoutError:
            backend.in_flight -= 1
            return "timeout"
        except aiohttp.ClientError as e:
            backend.in_flight -= 1
            return type(e).__name__

    def _timeout_error(self) -> JSONResponse:
        return error(
            504, f"the backend did not answer within {self.timeout:g} s", "timeout", "upstream_timeout"
        )

    async def _respond(
        self, routed: Routed, backend: Backend, resp: aiohttp.ClientResponse, start: float
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
            content = await asyncio.wait_for(resp.read(), max(0.001, self.timeout - latency))
        except (asyncio.TimeoutError, aiohttp.ClientError):
            return self._done(routed, backend.url, 504, start, self._timeout_error())
        finally:
            backend.in_flight -= 1
            resp.release()
        self._record(routed, backend.url, resp.status, latency)
        if shadowed and resp.status == 200:
            self._shadow(routed, content, latency)
        return Response(content, status_code=resp.status, headers=headers)

    async def _relay(self, routed: Routed, backend: Backend, resp: aiohttp.ClientResponse, latency: float,
                     shadowed: bool) -> AsyncIterator[bytes]:  # fmt: skip
        kept: list[bytes] = []
        try:
            async for chunk in resp.content.iter_any():
                if shadowed:
                    kept.append(chunk)
                yield chunk
        finally:
            backend.in_flight -= 1
            resp.release()
        if shadowed and resp.status == 200:
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
