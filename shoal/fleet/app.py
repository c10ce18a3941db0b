"""The server of `shoal serve --models models.yaml`: its own routes (the model list with states, the
admin API, probes, one /metrics), and everything else routed by `model` to that model's app
(shoal/fleet/routing.py), which a single-model server would be (shoal/server/app.py)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

import shoal
from shoal.fleet.console import add_console
from shoal.fleet.manager import LoadFailed, ModelManager, NoRoom, Slot
from shoal.fleet.routing import Router
from shoal.policy.auth import Authenticator
from shoal.server.auth import AuthMiddleware
from shoal.server.errors import SERVER_ERROR, error_body, error_response
from shoal.server.protocol import ModelCard
from shoal.server.settings import ServerSettings


class FleetModelCard(ModelCard):
    """An OpenAI model object, plus its state here (Ollama's `ollama ps` shows the loaded ones)."""

    state: str  # loaded | loading | unloaded


class FleetLifecycle:
    """What launch's DrainingServer needs: drain every loaded model at once; ready once the preloaded
    models are loaded."""

    def __init__(self, manager: ModelManager):
        self.manager = manager
        self.draining = False
        self.load_error: str | None = None
        self.on_fatal: Callable[[], None] | None = None  # set by launch: stop the server, exit 1

    @property
    def ready(self) -> bool:
        preload = [s for s in self.manager.slots.values() if s.entry.preload]
        return not self.draining and all(s.state == "loaded" for s in preload)

    def preload_done(self, task: asyncio.Task) -> None:
        """A pre-loaded model that cannot load stops the server (exit 1), as one model's server does:
        the pod's main model is missing, and a restart or a rollback is what helps."""
        if not task.cancelled() and task.exception() is not None:
            self.load_error = str(task.exception())
            if self.on_fatal is not None:
                self.on_fatal()

    async def drain(self) -> None:
        self.draining = True
        await asyncio.gather(*(app.state.shoal.lifecycle.drain() for app in self.manager.loaded_apps()))


OWN_PATHS = frozenset({"/health", "/ready", "/version", "/metrics", "/docs", "/openapi.json"})
OWN_PREFIXES = ("/v1/models", "/v1/admin/", "/ui")  # /ui: the console (shoal/fleet/console.py)


class FleetApp:
    """The ASGI app: the fleet's own routes, else the router (`model` decides)."""

    def __init__(self, own: FastAPI, router: Any):
        self.own = own
        self.router = router
        self.state = own.state  # launch reads app.state.fleet

    async def __call__(self, scope, receive, send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or path in OWN_PATHS or path.startswith(OWN_PREFIXES):
            await self.own(scope, receive, send)
        else:
            await self.router(scope, receive, send)


def build_fleet_app(manager: ModelManager, settings: ServerSettings) -> Any:
    """The app; its lifespan pre-loads the `preload` models, runs the keep-alive reaper, and unloads
    every model at shutdown."""
    lifecycle = FleetLifecycle(manager)
    created = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        preloads = [manager.start_load(s.entry) for s in manager.slots.values() if s.entry.preload]
        for task in preloads:
            task.add_done_callback(lifecycle.preload_done)
        reaper = asyncio.ensure_future(manager.reap_idle())
        try:
            yield
        finally:
            reaper.cancel()
            for task in preloads:
                task.cancel()
            await manager.close()

    app = FastAPI(title="shoal", version=shoal.__version__, lifespan=lifespan)
    app.state.fleet = lifecycle
    _add_info_routes(app, manager, lifecycle, created)
    _add_admin_routes(app, manager)
    add_console(app, manager, settings)
    router = Router(manager, settings.request_timeout_s, settings.max_request_bytes)
    fleet = FleetApp(app, _gate(router, lifecycle))
    if not (settings.api_key or (settings.policy and settings.policy.auth)):
        return fleet
    policy = settings.policy
    classes = set(policy.classes) if policy else None
    authenticator = Authenticator(policy.auth if policy else None, settings.api_key, classes)
    guarded = AuthMiddleware(fleet, authenticator=authenticator)
    guarded.state = app.state  # type: ignore[attr-defined]
    return guarded


def _gate(router: Router, lifecycle: FleetLifecycle):
    """While draining, new requests get 503 + Connection: close, as a single server's AdmissionGate
    answers (and no model starts loading); those in flight go on in their models' apps."""

    async def app(scope, receive, send) -> None:
        if lifecycle.draining:
            response = error_response(503, "the server is draining", type=SERVER_ERROR, code="server_draining",
                                      headers={"Connection": "close"})  # fmt: skip
            await response(scope, receive, send)
            return
        await router(scope, receive, send)

    return app


def _card(slot: Slot, created: int) -> FleetModelCard:
    app = slot.app
    max_len = app.state.shoal.max_model_len if app is not None else None
    return FleetModelCard(id=slot.entry.ref, created=created, root=slot.entry.source, max_model_len=max_len,
                          state=slot.state)  # fmt: skip


def _add_info_routes(app: FastAPI, manager: ModelManager, lifecycle: FleetLifecycle, created: int) -> None:
    @app.get("/v1/models")
    async def list_models() -> dict:
        """Every registered model with its state: loaded, loading or unloaded."""
        return {"object": "list", "data": [_card(s, created).model_dump() for s in manager.slots.values()]}

    @app.get("/health")
    async def health() -> Response:
        """Alive: one model failing to load does not make a restart useful."""
        return Response(status_code=200)

    @app.get("/ready")
    async def ready() -> Response:
        if lifecycle.ready:
            return JSONResponse({"status": "ready"})
        status = "draining" if lifecycle.draining else "loading"
        return JSONResponse({"status": status, **error_body(f"the server is {status}", SERVER_ERROR)}, 503)

    @app.get("/v1/models/{model:path}")
    async def retrieve_model(model: str) -> Response:
        entry = manager.registry.lookup(model)
        if entry is None:
            return error_response(404, f"The model '{model}' does not exist", param="model",
                                  code="model_not_found")  # fmt: skip
        return JSONResponse(_card(manager.slot(entry), created).model_dump())

    @app.get("/version")
    async def version() -> dict[str, str]:
        return {"version": shoal.__version__}

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(await manager.metrics.render(), media_type=CONTENT_TYPE_LATEST)


def _admin_view(slot: Slot) -> dict[str, Any]:
    entry = slot.entry
    return {
        **entry.model_dump(),
        "id": entry.ref,
        "state": slot.state,
        "keep_alive": slot.keep_alive,
        "in_flight": slot.busy,
        "load_seconds": slot.load_seconds,
        "last_error": slot.last_error,
    }


def _add_admin_routes(app: FastAPI, manager: ModelManager) -> None:
    """GET /v1/admin/models, POST /v1/admin/models/{name}/load and /unload (`name` or `name@version`).
    Authenticated like /v1/* whenever the server has keys (shoal/policy/auth.py: deny by default)."""

    def slot_of(name: str) -> Slot:
        entry = manager.registry.lookup(name)
        if entry is None:
            raise _AdminError(404, f"no registered model {name!r}")
        return manager.slot(entry)

    @app.get("/v1/admin/models")
    async def admin_models() -> dict:
        return {"models": [_admin_view(s) for s in manager.slots.values()], "budget": _budget(manager)}

    @app.post("/v1/admin/models/{name}/load")
    async def admin_load(name: str) -> dict:
        slot = slot_of(name)
        try:
            await manager.start_load(slot.entry)
        except LoadFailed as e:
            raise _AdminError(507 if isinstance(e, NoRoom) else 500, str(e)) from None
        return _admin_view(slot)

    @app.post("/v1/admin/models/{name}/unload")
    async def admin_unload(name: str) -> dict:
        slot = slot_of(name)
        if slot.busy:
            raise _AdminError(409, f"{slot.entry.ref} has {slot.busy} request(s) in flight")
        await manager.unload(slot.entry, reason="admin")
        return _admin_view(slot)

    @app.exception_handler(_AdminError)
    async def admin_error(_: Request, e: _AdminError) -> Response:
        return error_response(e.status, e.message, code="admin_error")


class _AdminError(Exception):
    def __init__(self, status: int, message: str):
        self.status, self.message = status, message


def _budget(manager: ModelManager) -> dict[str, Any]:
    budget = manager.budget
    return {"total": budget.total, "used": budget.used, "reserved": dict(budget.reserved)}
