"""Answering repeated deterministic requests from the response cache (shoal/policy/response_cache.py).

A pure ASGI middleware around the two generation routes. It reads the body (already size-checked by
BodyLimitMiddleware), and for a cacheable request either replays the stored answer with
`x-shoal-cache: hit` (no engine work at all), or runs the route, marks its answer `x-shoal-cache: miss`
and stores it if it was a complete 200 (a stream that ended with `[DONE]` and carried no error event).
The entry is stored before the answer's last message is sent, so a client that repeats the request as soon
as it has the whole answer finds it.
Anything it cannot parse goes to the route untouched, which answers it as it would without a cache.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from shoal.policy.response_cache import CachedResponse, ResponseCache
from shoal.server.body_limit import replaying
from shoal.server.direct_body import needs_every_chunk

CACHED_ROUTES = ("/v1/completions", "/v1/chat/completions")
CACHE_HEADER = b"x-shoal-cache"
logger = logging.getLogger("shoal.server")


class ResponseCacheMiddleware:
    def __init__(self, app: ASGIApp, cache: ResponseCache, served_model_name: str):
        self.app = app
        self.cache = cache
        self.served_model_name = served_model_name

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] not in CACHED_ROUTES:
            await self.app(scope, receive, send)
            return
        messages, body = await _read_body(receive)
        replay = replaying(messages, receive)
        key = self._key(scope, body)
        if key is None:
            await self.app(scope, replay, send)
            return
        cached = await self.cache.get(key)
        if cached is not None:
            _context(scope, "cache_hit", True)
            await _send_cached(cached, send)
            return
        needs_every_chunk(scope)  # the recorder keeps the body: streamed chunks must pass through it

        async def store(recorder: _Recorder) -> None:
            if not recorder.complete() or _cut_short(scope):
                return
            try:
                await self.cache.put(
                    key, CachedResponse(media_type=recorder.media_type, body=recorder.body())
                )
            except Exception as e:  # noqa: BLE001 - the answer matters more than caching it
                logger.warning("response cache: could not store an entry: %r", e)

        await self.app(scope, replay, _Recorder(send, store).send)

    def _key(self, scope: Scope, body: bytes) -> str | None:
        try:
            request = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            return None
        if not isinstance(request, dict):
            return None
        identity = getattr(scope.get("state", {}).get("ctx"), "identity", None)
        tenant = getattr(identity, "tenant", None)
        model = request.get("model") or self.served_model_name
        return self.cache.key(scope["path"], str(model), tenant, request)


async def _read_body(receive: Receive) -> tuple[list[Message], bytes]:
    messages: list[Message] = []
    chunks: list[bytes] = []
    while True:
        message = await receive()
        messages.append(message)
        if message["type"] != "http.request":
            break
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            break
    return messages, b"".join(chunks)


def _cut_short(scope: Scope) -> bool:
    """Whether an engine request ended early (timeout, drain: finish reason "abort"): not a real answer."""
    ctx = scope.get("state", {}).get("ctx")
    outputs = getattr(ctx, "outputs", [])
    return any(o.finish_reason == "abort" for out in outputs for o in out.outputs)


def _context(scope: Scope, name: str, value: Any) -> None:
    ctx = scope.get("state", {}).get("ctx")
    if ctx is not None:
        setattr(ctx, name, value)


async def _send_cached(cached: CachedResponse, send: Send) -> None:
    headers = [(b"content-type", cached.media_type.encode()), (CACHE_HEADER, b"hit")]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": cached.body, "more_body": False})


class _Recorder:
    """Passes the route's answer through, adds `x-shoal-cache: miss`, and keeps a copy of a 200."""

    def __init__(self, send: Send, before_end: Callable[[_Recorder], Awaitable[None]]):
        """before_end: awaited with the recorder once the body is whole, before its last message is sent."""
        self._send = send
        self._before_end = before_end
        self.status = 0
        self.media_type = ""
        self._chunks: list[bytes] = []
        self._ended = False

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]
            headers = dict(message.get("headers", []))
            self.media_type = headers.get(b"content-type", b"application/json").decode()
            message["headers"] = [*message.get("headers", []), (CACHE_HEADER, b"miss")]
        elif message["type"] == "http.response.body" and self.status == 200:
            self._chunks.append(message.get("body", b""))
            self._ended = not message.get("more_body", False)
            if self._ended:
                await self._before_end(self)
        await self._send(message)

    def body(self) -> bytes:
        return b"".join(self._chunks)

    def complete(self) -> bool:
        if self.status != 200 or not self._ended:
            return False
        if not self.media_type.startswith("text/event-stream"):
            return True
        events = [line[6:] for line in self.body().split(b"\n") if line.startswith(b"data: ")]
        return bool(events) and events[-1] == b"[DONE]" and not any(e.startswith(b'{"error"') for e in events)
