"""Routing a request by its `model` to the model's app, through its fallback chain.

A request names `name` or `name@version`. The chain is the model, then its `fallback` entries in order.
A model is skipped when it is not loaded within the request's deadline, fails to load, or sheds the
request (a 503 before any byte of the answer). The answering model is in the response's `model` field
(its own app writes it) and, when it is a fallback, in the `x-shoal-fallback` header.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any

from starlette.types import Message, Receive, Scope, Send

from shoal.fleet.manager import LoadFailed, ModelManager
from shoal.fleet.registry import ModelEntry
from shoal.server.errors import SERVER_ERROR, error_response

FALLBACK_HEADER = b"x-shoal-fallback"
TIMEOUT_HEADER = b"x-request-timeout"
DEFAULT_LOAD_WAIT_S = 120.0  # how long a request without a deadline waits for its model to load


@dataclass
class Routed:
    """One request's body, parsed once, and why each model of its chain was skipped."""

    payload: dict
    keep_alive: float | None
    deadline: float
    skipped: list[str] = field(default_factory=list)

    def body_for(self, entry: ModelEntry) -> bytes:
        return json.dumps({**self.payload, "model": entry.ref}).encode()


class Router:
    def __init__(self, manager: ModelManager, request_timeout_s: float | None, max_bytes: int):
        self.manager = manager
        self.request_timeout_s = request_timeout_s
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        body = await _read_body(receive, self.max_bytes)
        if body is None:  # read here, before any model's BodyLimitMiddleware: the same limit
            too_large = f"request body larger than {self.max_bytes} bytes"
            await error_response(413, too_large, code="request_too_large")(scope, receive, send)
            return
        try:
            payload = json.loads(body) if body else {}
            if not isinstance(payload, dict):
                raise ValueError("not an object")
        except ValueError:
            payload = {}  # the model's own app answers the malformed body with its 400
        entry = self._entry_of(payload)
        if entry is None:
            await _not_found(payload.get("model"), self.manager)(scope, receive, send)
            return
        keep_alive = payload.pop("keep_alive", None)
        routed = Routed(payload, _seconds(keep_alive), time.monotonic() + self._wait_s(scope))
        chain = self.manager.registry.chain(entry)
        for i, candidate in enumerate(chain):
            last = i == len(chain) - 1
            if await self._try(candidate, entry, routed, last, scope, receive, send):
                return
        message = f"no model of {entry.ref}'s chain could answer: " + "; ".join(routed.skipped)
        await error_response(503, message, type=SERVER_ERROR, code="model_unavailable")(scope, receive, send)

    def _entry_of(self, payload: dict) -> ModelEntry | None:
        model = payload.get("model")
        if model is None:
            return self.manager.registry.entries[0]
        return self.manager.registry.lookup(model) if isinstance(model, str) else None

    def _wait_s(self, scope: Scope) -> float:
        """The request's deadline (X-Request-Timeout, else --request-timeout), else DEFAULT_LOAD_WAIT_S."""
        header = dict(scope.get("headers") or []).get(TIMEOUT_HEADER)
        with_header = _seconds(header.decode("latin-1")) if header else None
        return with_header or self.request_timeout_s or DEFAULT_LOAD_WAIT_S

    async def _try(
        self, candidate: ModelEntry, requested: ModelEntry, routed: Routed, last: bool,
        scope: Scope, receive: Receive, send: Send,
    ) -> bool:  # fmt: skip
        """Answer with candidate (True), or say why it was skipped (False); the last one always answers
        once loaded, shedding included."""
        try:
            app = await self.manager.acquire(candidate, max(routed.deadline - time.monotonic(), 0.0))
        except (LoadFailed, asyncio.TimeoutError) as e:
            routed.skipped.append(f"{candidate.ref}: {e or 'not loaded within the deadline'}")
            return False
        fallback = candidate.ref if candidate is not requested else None
        try:
            shed = await _call(app, scope, receive, send, routed.body_for(candidate), fallback, last)
        finally:
            self.manager.release(candidate, routed.keep_alive)
        if shed:
            routed.skipped.append(f"{candidate.ref}: shedding load (503)")
            return False
        if fallback is not None and self.manager.metrics is not None:
            self.manager.metrics.on_fallback(requested.ref, candidate.ref)
        return True


async def _call(
    app: Any, scope: Scope, receive: Receive, send: Send, body: bytes, fallback: str | None, last: bool
) -> bool:
    """Run the model's app on the request with `body`; True if it shed it (503 with a chain left)."""
    headers = [(k, v) for k, v in scope.get("headers") or [] if k != b"content-length"]
    headers.append((b"content-length", str(len(body)).encode()))
    sent_body = False
    shed = False

    async def replay() -> Message:
        nonlocal sent_body
        if not sent_body:
            sent_body = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # the client's disconnect

    async def forward(message: Message) -> None:
        nonlocal shed
        if message["type"] == "http.response.start":
            if message["status"] == 503 and not last:
                shed = True
                return
            if fallback is not None:
                message = {
                    **message,
                    "headers": [*message.get("headers", []), (FALLBACK_HEADER, fallback.encode())],
                }
        if not shed:
            await send(message)

    await app({**scope, "headers": headers}, replay, forward)
    return shed


async def _read_body(receive: Receive, max_bytes: int) -> bytes | None:
    """The whole body, or None past max_bytes (the rest is not read)."""
    chunks, size = [], 0
    while True:
        message = await receive()
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > max_bytes:
            return None
        chunks.append(chunk)
        if not message.get("more_body"):
            return b"".join(chunks)


def _seconds(value: Any) -> float | None:
    """A keep_alive or timeout in seconds (a number, or a string of one); None when absent or invalid."""
    try:
        return float(value) if value is not None else None
    except (TypeError, ValueError):
        return None


def _not_found(model: Any, manager: ModelManager):
    served = ", ".join(e.ref for e in manager.registry.entries)
    return error_response(
        404, f"The model '{model}' does not exist; this server serves {served}", param="model",
        code="model_not_found",
    )  # fmt: skip
