"""The operator console of `shoal serve --models`: the same page and JSON as one model's server
(shoal/server/console.py), over the registry.

- /ui/api/models: every registered model with its state, memory reservation and keep-alive left; the
  page's load and unload buttons call the admin API (/v1/admin/models/{name}/load and /unload);
- /ui/api/live?model=REF: the live view of one loaded model (default: the first loaded one), read from
  that model's own app, as its /metrics would be;
- quant_eval files from a model's local source directory; deployments from --gateway-url.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from fastapi import APIRouter, FastAPI
from fastapi.responses import Response

import shoal
from shoal.fleet.manager import ModelManager, Slot
from shoal.server import console
from shoal.server.errors import error_response
from shoal.server.settings import ServerSettings


def _keep_alive_left(slot: Slot) -> float | None:
    if slot.state != "loaded" or slot.entry.pinned or slot.keep_alive < 0:
        return None
    return max(0.0, slot.keep_alive - (time.monotonic() - slot.last_used))


def _source_dir(slot: Slot) -> Path | None:
    path = Path(slot.entry.source).expanduser()
    return path if path.is_dir() else None


def _model_view(slot: Slot, manager: ModelManager) -> dict[str, Any]:
    entry = slot.entry
    source = _source_dir(slot)
    return {
        "id": entry.ref,
        "source": entry.source,
        "state": slot.state,
        "dtype": entry.dtype,
        "quantization": entry.quantization,
        "memory_bytes": manager.budget.reserved.get(entry.ref),
        "keep_alive": slot.keep_alive,
        "keep_alive_left_s": _keep_alive_left(slot),
        "pinned": entry.pinned,
        "in_flight": slot.busy,
        "last_error": slot.last_error,
        "quant_eval": source is not None and (source / "quant_eval.json").exists(),
    }


def add_console(app: FastAPI, manager: ModelManager, settings: ServerSettings) -> None:
    """The /ui/api routes of the fleet and the page itself (nothing with --no-ui)."""
    if not settings.ui:
        return
    histories: dict[str, console.ScrapeHistory] = {}
    router = APIRouter(prefix="/ui/api", include_in_schema=False)

    def slot_named(name: str) -> Slot | None:
        entry = manager.registry.lookup(name)
        return manager.slot(entry) if entry is not None else None

    @router.get("/info")
    async def info() -> dict[str, Any]:
        return {"version": shoal.__version__, "kind": "fleet", "models": list(manager.slots),
                "gateway": settings.gateway_url, "max_model_len": None}  # fmt: skip

    @router.get("/models")
    async def models() -> dict[str, Any]:
        return {"models": [_model_view(s, manager) for s in manager.slots.values()], "admin": True}

    @router.get("/live")
    async def live(model: str | None = None) -> Any:
        loaded = [s for s in manager.slots.values() if s.state == "loaded"]
        slot = slot_named(model) if model else (loaded[0] if loaded else None)
        if slot is None or slot.state != "loaded":
            return error_response(409, f"{model or 'no model'} is not loaded: load it on the Models page",
                                  code="model_not_loaded")  # fmt: skip
        history = histories.setdefault(slot.entry.ref, console.ScrapeHistory())
        return await console.live_snapshot(slot.app.state.shoal, history)

    @router.get("/models/{name:path}/quant_eval{suffix}")
    async def quant_eval(name: str, suffix: str) -> Response:
        slot = slot_named(name)
        return console.quant_eval_response(_source_dir(slot) if slot else None, name, suffix)

    @router.get("/deployments")
    async def deployments() -> Response:
        return await console.gateway_view(settings.gateway_url)

    app.include_router(router)
    console.mount_static(app)
