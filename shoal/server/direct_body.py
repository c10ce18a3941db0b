"""Streamed body chunks go straight to the HTTP server's `send`, past the middlewares' send wrappers.

Every pure-ASGI middleware that looks at the response wraps `send` in a function of its own; a streamed
chunk then runs through all of them (Starlette's ServerErrorMiddleware and ExceptionMiddleware, the route's
exception wrapper, the request context, the unexpected-error guard, the traffic headers: six Python calls
per token of each stream). All of them only need the response's start and its end: they set a flag,
record the status or add headers. So the outermost layer (`DirectBodyOffer`, put around the whole app
by `offer_direct_body`) stores the server's own `send` in the scope, and `SSEResponse` sends

- the start (`http.response.start`) through the full chain, so every layer sees it, headers and all;
- each body chunk with `more_body` straight to the server's `send`;
- the last body message (`more_body: false`) through the full chain again, so every layer sees the end.

A layer that needs every chunk (the response cache records the body) calls `needs_every_chunk(scope)`
before it calls the app; its stream then goes through the chain as before. A layer that buffers or
reorders messages must do the same. An exception while sending propagates exactly as before: a chunk
that fails to send raises in the route, and every layer has already seen the start.

ASGI: https://asgi.readthedocs.io/en/latest/specs/www.html (a body message may follow the start message
from any caller of the server's `send`; the server orders them as they are called).
"""

from __future__ import annotations

from collections.abc import Callable

from starlette.responses import StreamingResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

SCOPE_KEY = "shoal.direct_send"


class DirectBodyOffer:
    """The outermost ASGI layer: puts the server's `send` into the scope of each HTTP request."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            scope[SCOPE_KEY] = send
        await self.app(scope, receive, send)


def offer_direct_body(app) -> None:  # app: FastAPI (typed loosely: Starlette apps work the same way)
    """Wrap the app's middleware stack (built lazily at the first request) in DirectBodyOffer."""
    build: Callable[[], ASGIApp] = app.build_middleware_stack

    def build_with_offer() -> ASGIApp:
        return DirectBodyOffer(build())

    app.build_middleware_stack = build_with_offer


def needs_every_chunk(scope: Scope) -> None:
    """Called by a layer that must see every body message of this response: withdraws the offer."""
    scope.pop(SCOPE_KEY, None)


class SSEResponse(StreamingResponse):
    """A StreamingResponse (text/event-stream by default) whose body chunks skip the send wrappers when
    the outermost layer offered the server's `send` and no layer withdrew it."""

    media_type = "text/event-stream"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self._direct: Send | None = scope.get(SCOPE_KEY)
        await super().__call__(scope, receive, send)

    async def stream_response(self, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        direct = self._direct or send
        async for chunk in self.body_iterator:
            if not isinstance(chunk, bytes | memoryview):
                chunk = chunk.encode(self.charset)
            message: Message = {"type": "http.response.body", "body": chunk, "more_body": True}
            await direct(message)
        await send({"type": "http.response.body", "body": b"", "more_body": False})
