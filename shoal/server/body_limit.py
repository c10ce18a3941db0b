"""Request bodies above a size limit get 413 before anything parses them.

The body is read here, up to the limit (Content-Length is checked first, chunked bodies are counted), and
replayed to the app; afterwards `receive` passes through, so that disconnect detection still works.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from shoal.server.errors import error_response


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            await self._reject(scope, receive, send)
            return
        messages: list[Message] = []
        size = 0
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break  # the client left: let the app see the disconnect
            size += len(message.get("body", b""))
            if size > self.max_bytes:
                await self._reject(scope, receive, send)
                return
            if not message.get("more_body", False):
                break

        await self.app(scope, replaying(messages, receive), send)

    async def _reject(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = error_response(
            413,
            f"Request body too large: the limit is {self.max_bytes} bytes",
            code="request_too_large",
            headers={"Connection": "close"},
        )
        await response(scope, receive, send)


def replaying(messages: list[Message], receive: Receive) -> Receive:
    """A receive that hands out the already-read `messages` first, then passes through to `receive` (so
    the app still sees the client's disconnect)."""

    async def replay() -> Message:
        return messages.pop(0) if messages else await receive()

    return replay
