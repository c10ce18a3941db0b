"""The gateway's ASGI app and its background loops: health/load probes and the canary controller, both every
second. POST /v1/* goes straight to the proxy, a plain ASGI app (no routing table, middleware or request
object per request: the proxied path is the one whose CPU counts); the rest (GET /v1/models, /ready,
/health, /admin/*, /metrics, the lifespan) is a Starlette app (which FastAPI is built on)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from shoal.gateway.admin import admin_routes
from shoal.gateway.config import ConfigError, GatewayConfig
from shoal.gateway.health import HealthChecker, unserved_models
from shoal.gateway.proxy import Proxy
from shoal.gateway.state import GatewayState


async def _canary_loop(state: GatewayState) -> None:
    while True:
        await asyncio.sleep(1.0)
        for model in state.models.values():
            if model.canary:
                model.canary.tick()


class GatewayApp:
    """ASGI: POST /v1/* to `proxy`, everything else to `app`."""

    def __init__(self, proxy: Proxy, app: Starlette):
        self.proxy, self.app, self.state = proxy, app, app.state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"].startswith("/v1/"):
            await self.proxy(scope, receive, send)
        else:
            await self.app(scope, receive, send)


def build_app(config: GatewayConfig) -> GatewayApp:
    state = GatewayState(config)
    proxy = Proxy(state)
    health = HealthChecker(state.backends, state.settings, state.metrics)

    @contextlib.asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        problems = await unserved_models(state.served_pairs(), state.settings.health_timeout_s)
        if problems:  # an unknown model fails at start, like the rest of a bad config
            raise ConfigError("; ".join(problems))
        await proxy.start()
        await health.start()  # one probe round first: the gateway never routes to an unknown backend
        canary = asyncio.create_task(_canary_loop(state))
        yield
        canary.cancel()
        await health.stop()
        for model in state.models.values():
            if model.shadow:
                await model.shadow.close()
        await proxy.close()

    async def list_models(_: Request) -> Response:
        data = [{"id": name, "object": "model", "owned_by": "shoal-gateway"} for name in state.models]
        return JSONResponse({"object": "list", "data": data})

    async def ready(_: Request) -> Response:
        up = any(b.healthy for b in state.backends.values())
        return JSONResponse({"ready": up}, status_code=200 if up else 503)

    async def health_route(_: Request) -> Response:
        return Response(status_code=200)

    routes = [
        Route("/v1/models", list_models),
        # never reached by a POST (GatewayApp sends those to the proxy first); answers other methods 405
        Route("/v1/{path:path}", proxy, methods=["POST"]),
        Route("/ready", ready),
        Route("/health", health_route),
        *admin_routes(state),
    ]
    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.gateway = state
    return GatewayApp(proxy, app)
