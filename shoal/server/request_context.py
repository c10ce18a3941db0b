"""One HTTP request's context: its id, when it arrived, and what its engine requests ended with.

`RequestContextMiddleware` is the outermost layer of the app. It creates the context when the request
arrives (before the body is read, templated or tokenized, so that TTFT and queue time start there),
propagates `X-Request-Id` (the client's, or a new one) onto the response, records the status, and when
the response has been sent in full hands the context to every `on_end` listener: metrics, the access log
and tracing are all built from it, after the fact, and none of them knows about the others.

Routes reach it with `request_context(request)`; the generation path appends each engine request's last
output (finished, aborted with its partial output, or failed) to `ctx.outputs`.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from shoal.engine.outputs import RequestOutput

logger = logging.getLogger("shoal.server")

REQUEST_ID_HEADER = "x-request-id"
# A client's id is echoed into logs and headers: keep it short and printable.
_VALID_ID = re.compile(r"^[A-Za-z0-9._:/+=@-]{1,128}$")


@dataclass
class RequestContext:
    """What is known about one HTTP request; times are time.monotonic() seconds unless named _ns."""

    request_id: str
    method: str
    path: str
    arrival_time: float = field(default_factory=time.monotonic)
    arrival_unix_ns: int = field(default_factory=time.time_ns)
    status: int | None = None
    end_time: float | None = None
    model: str | None = None
    # Each engine request's last RequestOutput (n choices each); set by the generation path.
    outputs: list[RequestOutput] = field(default_factory=list)
    error_kind: str | None = None  # set by error handlers: "invalid_request_error", "timeout", ...
    timed_out: bool = False
    streamed: bool = False
    identity: Any = None  # who is calling, once authenticated (shoal/policy): key id, tenant, class
    cache_hit: bool = False  # answered from the response cache, without the engine
    hidden_output: bool = False  # the generated tokens are not returned (echo with max_tokens 0)
    auth_failure: str | None = None  # why the credential was refused (never the credential itself)
    route: str | None = None  # the matched route's path template (OpenTelemetry's http.route), once routed
    # The raw ASGI request headers (a reference, not a copy): tracing reads W3C traceparent from them.
    headers: list[tuple[bytes, bytes]] = field(default_factory=list, repr=False)

    @property
    def latency(self) -> float | None:
        return None if self.end_time is None else self.end_time - self.arrival_time

    def to_unix_ns(self, monotonic_seconds: float) -> int:
        """A time.monotonic() instant (engine timestamps are monotonic) as Unix nanoseconds."""
        return self.arrival_unix_ns + int((monotonic_seconds - self.arrival_time) * 1e9)


EndListener = Callable[[RequestContext], None]


class RequestContextMiddleware:
    """Pure ASGI (no BaseHTTPMiddleware): streaming responses pass through untouched."""

    def __init__(self, app: ASGIApp, listeners: list[EndListener]):
        self.app = app
        self.listeners = listeners

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        ctx = RequestContext(
            _request_id(scope), scope["method"], scope["path"], headers=scope.get("headers") or []
        )
        scope.setdefault("state", {})["ctx"] = ctx
        header = (REQUEST_ID_HEADER.encode(), ctx.request_id.encode())

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                ctx.status = message["status"]
                message["headers"] = [*message.get("headers", []), header]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            ctx.end_time = time.monotonic()
            # Starlette's router writes the matched route into this same scope dict.
            ctx.route = getattr(scope.get("route"), "path", None)
            if ctx.status is None:
                ctx.status = 500  # the app raised before answering (UnexpectedErrorMiddleware prevents it)
            for listener in self.listeners:
                _call(listener, ctx)


def _request_id(scope: Scope) -> str:
    for name, value in scope.get("headers") or []:
        if name == REQUEST_ID_HEADER.encode():
            candidate = value.decode("latin-1")
            if _VALID_ID.match(candidate):
                return candidate
    return uuid.uuid4().hex


def _call(listener: EndListener, ctx: RequestContext) -> None:
    try:
        listener(ctx)
    except Exception:  # noqa: BLE001 - observability must never fail a request
        logger.exception("request end listener %r failed", listener)


def request_context(request: Request) -> RequestContext:
    """The context of this request (a bare one when the middleware is absent, e.g. in unit tests)."""
    ctx = request.scope.get("state", {}).get("ctx")
    if ctx is None:
        ctx = RequestContext(uuid.uuid4().hex, request.method, request.url.path)
        request.scope.setdefault("state", {})["ctx"] = ctx
    return ctx
