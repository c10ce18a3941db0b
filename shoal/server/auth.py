"""API-key check for /v1/*: `Authorization: Bearer <key>` or 401 in OpenAI's error shape.

A pure ASGI middleware (not a FastAPI dependency) so that it runs before the body is read or parsed:
an unauthenticated client cannot make the server parse 8 MiB of JSON.
"""

from __future__ import annotations

import secrets

from starlette.types import ASGIApp, Receive, Scope, Send

from shoal.server.errors import error_response


class APIKeyMiddleware:
    def __init__(self, app: ASGIApp, api_key: str, prefix: str = "/v1"):
        self.app = app
        self._expected = f"Bearer {api_key}".encode()
        self._prefix = prefix

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and _under(scope.get("path", ""), self._prefix):
            given = dict(scope.get("headers") or []).get(b"authorization", b"")
            if not secrets.compare_digest(given, self._expected):
                response = error_response(
                    401,
                    "Incorrect or missing API key: send the header 'Authorization: Bearer <key>'",
                    code="invalid_api_key",
                    headers={"WWW-Authenticate": "Bearer"},
                )
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _under(path: str, prefix: str) -> bool:
    return path == prefix or path.startswith(prefix + "/")
