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
        m = routed.model
        prefix = prompt_prefix(routed.body, self.state.settings.prefix_block_chars)
        # the client's headers (API key, X-Request-Timeout, ...) but not those of its own connection
        headers = {k: v for k, v in request.headers.items() if k not in HOP_BY_HOP and k not in NOT_FORWARDED}
        headers["content-type"] = "application/json"
        tried: set[str] = set()
        start = time.monotonic()
        for attempt in range(2):
            backend = m.picker.pick(m.replicas[routed.version], prefix, tried)
            if backend is None and tried:  # the only replica: once more there beats failing now
                backend = m.picker.pick(m.replicas[routed.version], prefix, set())
            if backend is None:
                return self._done(routed, "none", 503, start, error(
                    503, f"no healthy backend for {m.name}@{routed.version}", "service_unavailable"))  # fmt: skip
            tried.add(backend.url)
            backend.in_flight += 1
            try:
                resp = await asyncio.wait_for(self._send(backend.url, routed.path, routed.raw, headers),
                                              self.timeout)  # fmt: skip
            except asyncio.TimeoutError:
                backend.in_flight -= 1
                return self._done(routed, backend.url, 504, start, error(
                    504, f"the backend did not answer within {self.timeout:g} s", "timeout", "upstream_timeout"))  # fmt: skip
            except aiohttp.ClientError as e:
                backend.in_flight -= 1
                if attempt == 0:
                    self.state.metrics.retries.labels(m.name).inc()
                    continue
                return self._done(routed, backend.url, 502, start, error(
                    502, f"backend error: {type(e).__name__}", "bad_gateway"))  # fmt: skip
            if resp.status in RETRYABLE_STATUS and attempt == 0:
                resp.release()
                backend.in_flight -= 1
                self.state.metrics.retries.labels(m.name).inc()
                continue
            return await self._respond(routed, backend, resp, start)
        raise AssertionError("unreachable")

    async def _send(self, url: str, path: str, raw: bytes, headers: dict) -> aiohttp.ClientResponse:
        return await self.session.post(url + path, data=raw, headers=headers)  # returns at the headers

    async def _respond(self, routed: Routed, backend, resp: aiohttp.ClientResponse, start: float) -> Response:
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
            return self._done(routed, backend.url, 504, start, error(
                504, f"the backend did not answer within {self.timeout:g} s", "timeout", "upstream_timeout"))  # fmt: skip
        finally:
            backend.in_flight -= 1
            resp.release()
        self._record(routed, backend.url, resp.status, latency)
        if shadowed and resp.status == 200:
            self._shadow(routed, content, latency)
        return Response(content, status_code=resp.status, headers=headers)

    async def _relay(self, routed: Routed, backend, resp: aiohttp.ClientResponse, latency: float,
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
