"""Authentication middleware: `Authorization: Bearer <credential>` or 401 in OpenAI's error shape.

A pure ASGI middleware (not a FastAPI dependency) so that it runs before the body is read or parsed:
an unauthenticated client cannot make the server parse 8 MiB of JSON. What a credential is (the single
`--api-key`, a key-file key, a JWT) and which paths need one is decided in shoal/policy/auth.py; this
layer puts the caller's Identity on the request context, or, for a refusal, the reason (never the
credential), which the audit log records.
"""

from __future__ import annotations

import anyio
from starlette.types import ASGIApp, Receive, Scope, Send

from shoal.policy.auth import Authenticator, AuthFailure, needs_auth
from shoal.server.errors import error_response
from shoal.server.request_context import RequestContext


class AuthMiddleware:
    def __init__(self, app: ASGIApp, authenticator: Authenticator):
        self.app = app
        self.authenticator = authenticator

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not needs_auth(
            scope.get("path", ""), self.authenticator.protect_metrics
        ):
            await self.app(scope, receive, send)
            return
        ctx: RequestContext | None = scope.get("state", {}).get("ctx")
        header = dict(scope.get("headers") or []).get(b"authorization")
        try:
            identity = await self._authenticate(header)
        except AuthFailure as e:
            if ctx is not None:
                ctx.auth_failure = e.reason
                ctx.error_kind = "authentication_error"
            response = error_response(
                e.status,
                f"Incorrect or missing API key: {e.reason}",
                code="invalid_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )
            await response(scope, receive, send)
            return
        if ctx is not None:
            ctx.identity = identity
        await self.app(scope, receive, send)

    async def _authenticate(self, header: bytes | None):
        if self.authenticator.may_block:  # a JWKS fetch: keep the event loop free
            return await anyio.to_thread.run_sync(self.authenticator.authenticate, header)
        return self.authenticator.authenticate(header)
