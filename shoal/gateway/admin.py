"""Admin endpoints (read by the console, and by `shoal gateway switch`) and the Prometheus endpoint.

- GET  /admin/backends: each backend's health, scraped load and saturation;
- GET  /admin/models: per model its weights, versions, canary state and gates, shadow agreement;
- POST /admin/models/{name}/switch {"version": v}: blue-green, all new traffic to v at once;
- GET  /metrics: `shoal:gateway_*`.

With `admin_token` set, /admin/* needs `Authorization: Bearer <token>`.
"""

from __future__ import annotations

import hmac

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from shoal.gateway.proxy import error
from shoal.gateway.state import GatewayState


def _denied(state: GatewayState, request: Request) -> JSONResponse | None:
    token = state.settings.admin_token
    given = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
    if token and not hmac.compare_digest(given, token):
        return error(401, "admin endpoints need the gateway's admin token", "authentication_error")
    return None


def admin_routes(state: GatewayState) -> list[Route]:
    limits = state.settings.saturation

    async def backends(request: Request) -> Response:
        return _denied(state, request) or JSONResponse(
            {"backends": [b.describe(limits) for b in state.backends.values()]}
        )

    async def models(request: Request) -> Response:
        return _denied(state, request) or JSONResponse(
            {"models": {name: m.describe(limits) for name, m in state.models.items()}}
        )

    async def switch(request: Request) -> Response:
        if denied := _denied(state, request):
            return denied
        model = state.models.get(request.path_params["name"])
        if model is None:
            return error(404, f"unknown model {request.path_params['name']!r}", "invalid_request_error")
        try:
            version = (await request.json()).get("version")
            weights = model.switch(version)
        except (ValueError, AttributeError, KeyError):
            return error(400, f"unknown version {version!r} (versions: {sorted(model.replicas)})",
                         "invalid_request_error")  # fmt: skip
        state.export_weights()
        return JSONResponse({"model": model.name, "weights": weights})

    async def metrics(_: Request) -> Response:
        state.export_weights()
        return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return [
        Route("/admin/backends", backends),
        Route("/admin/models", models),
        Route("/admin/models/{name}/switch", switch, methods=["POST"]),
        Route("/metrics", metrics),
    ]
