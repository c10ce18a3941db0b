"""Loads and unloads the registered models, each an engine core in its own process behind its own app.

Strategies (Ollama's lazy loading and keep_alive; vLLM has one model per server):
- pre-load at start (`preload: true`);
- lazy load on the first request; the request waits for it, other models go on being served;
- keep-alive: a model idle for `keep_alive` seconds is unloaded; a request's own `keep_alive` field sets
  it for that model from then on (Ollama's per-request keep_alive; 0 unloads right after the request);
- LRU: when a load would exceed the memory budget, idle models are unloaded, least recently used first
  (lowest `priority` first); pinned models and models with requests in flight are never chosen.

Each loaded model is a full single-model app (shoal/server/app.py build_app) whose lifespan starts and
stops its engine: routes, guards and metrics are the single-model server's, unchanged.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shoal.fleet.budget import MemoryBudget, estimate
from shoal.fleet.registry import ModelEntry, Registry

logger = logging.getLogger("shoal.fleet")

REAP_INTERVAL_S = 0.5  # how often idle models are checked against their keep_alive
# After a failed load, requests skip the model (to its fallbacks) this long instead of each paying for
# another failing load; the admin API's load retries at once.
RETRY_FAILED_LOAD_S = 30.0
# (entry, local model directory, KV cache bytes) -> an app whose lifespan loads the engine
AppFactory = Callable[[ModelEntry, Path, int], Any]


class LoadFailed(Exception):
    """A model could not be loaded (its error, or no room in the budget)."""


class NoRoom(LoadFailed):
    """The budget cannot hold the model besides the pinned and busy ones."""


@dataclass
class Slot:
    """One registered model's runtime state."""

    entry: ModelEntry
    keep_alive: float
    state: str = "unloaded"  # unloaded | loading | loaded
    app: Any = None
    stack: contextlib.AsyncExitStack | None = None
    loading: asyncio.Task | None = None
    last_used: float = field(default_factory=time.monotonic)
    busy: int = 0  # requests routed to it and not yet answered
    last_error: str | None = None
    failed_at: float = float("-inf")
    load_seconds: float | None = None

    @property
    def unloadable(self) -> bool:
        return self.state == "loaded" and not self.entry.pinned and self.busy == 0


def resolve_model_dir(source: str) -> Path:
    """Where the engine loads from: a local directory or hub id as is; a remote URL through the
    shared-storage cache (shoal/fleet/storage.py, imported only for one: fsspec stays optional)."""
    if "://" in source:
        from shoal.fleet.storage import resolve_source

        return resolve_source(source)
    return Path(source).expanduser()


class ModelManager:
    def __init__(self, registry: Registry, budget: MemoryBudget, make_app: AppFactory, metrics: Any = None):
        self.registry = registry
        self.budget = budget
        self.make_app = make_app
        self.metrics = metrics  # shoal.fleet.metrics.FleetMetrics, or None
        self.slots = {e.ref: Slot(e, e.keep_alive) for e in registry.entries}
        self._budget_lock = asyncio.Lock()

    def slot(self, entry: ModelEntry) -> Slot:
        return self.slots[entry.ref]

    # ---- loading ------------------------------------------------------------------------------------
    async def acquire(self, entry: ModelEntry, timeout: float) -> Any:
        """The model's app once loaded, loading it if needed; LoadFailed, or TimeoutError after timeout
        seconds (the load goes on: a later request finds it loaded)."""
        slot = self.slot(entry)
        if slot.state == "unloaded" and time.monotonic() - slot.failed_at < RETRY_FAILED_LOAD_S:
            raise LoadFailed(f"{entry.ref} failed to load: {slot.last_error}")
        deadline = time.monotonic() + timeout
        while slot.state != "loaded":  # a loop: keep_alive 0 may unload it before this request resumes
            await asyncio.wait_for(
                asyncio.shield(self.start_load(entry)), max(deadline - time.monotonic(), 0)
            )
        slot.busy += 1
        return slot.app

    def release(self, entry: ModelEntry, keep_alive: float | None = None) -> None:
        """A request is answered: the model's idle clock restarts; a request keep_alive replaces its own."""
        slot = self.slot(entry)
        slot.busy -= 1
        slot.last_used = time.monotonic()
        if keep_alive is not None:
            slot.keep_alive = keep_alive

    def start_load(self, entry: ModelEntry) -> asyncio.Task:
        """The load in progress, or a new one (one per model however many requests wait)."""
        slot = self.slot(entry)
        if slot.loading is None or slot.loading.done():
            slot.loading = asyncio.ensure_future(self._load(slot))
        return slot.loading

    async def _load(self, slot: Slot) -> None:
        if slot.state == "loaded":
            return
        entry = slot.entry
        model_dir = resolve_model_dir(entry.source)
        need, kv_bytes = estimate(entry.memory, model_dir)
        await self._make_room(entry, need)
        slot.state, slot.last_error = "loading", None
        t0 = time.monotonic()
        logger.info("loading %s from %s (%d MiB reserved, KV cache %d MiB)", entry.ref, model_dir,
                    need >> 20, kv_bytes >> 20)  # fmt: skip
        app = self.make_app(entry, model_dir, kv_bytes)
        stack = contextlib.AsyncExitStack()
        try:
            await stack.enter_async_context(app.router.lifespan_context(app))
        except BaseException as e:
            await _shutdown_quietly(app)
            self.budget.release(entry.ref)
            slot.state, slot.last_error = "unloaded", f"{type(e).__name__}: {e}"
            slot.failed_at = time.monotonic()
            logger.error("%s failed to load: %s", entry.ref, slot.last_error)
            if isinstance(e, asyncio.CancelledError):
                raise
            raise LoadFailed(f"{entry.ref} failed to load: {slot.last_error}") from None
        slot.app, slot.stack, slot.state = app, stack, "loaded"
        slot.load_seconds = time.monotonic() - t0
        slot.last_used = time.monotonic()
        logger.info("%s loaded in %.1f s", entry.ref, slot.load_seconds)
        if self.metrics is not None:
            self.metrics.on_load(entry.ref, slot.load_seconds)

    async def _make_room(self, entry: ModelEntry, need: int) -> None:
        """Reserve `need` bytes, unloading idle models least recently used first (LRU)."""
        async with self._budget_lock:
            if need > self.budget.total:
                raise NoRoom(f"{entry.ref} needs {need >> 20} MiB, more than the whole budget")
            while not self.budget.fits(need):
                victims = [s for s in self.slots.values() if s.unloadable]
                if not victims:
                    raise NoRoom(
                        f"{entry.ref} needs {need >> 20} MiB; {self.budget.used >> 20} of "
                        f"{self.budget.total >> 20} MiB are held by pinned or busy models"
                    )
                victim = min(victims, key=lambda s: (s.entry.priority, s.last_used))
                await self.unload(victim.entry, reason="lru")
            self.budget.reserve(entry.ref, need)

    # ---- unloading ----------------------------------------------------------------------------------
    async def unload(self, entry: ModelEntry, reason: str) -> bool:
        """Stop the model's engine and free its budget; False if it was not loaded."""
        slot = self.slot(entry)
        if slot.state != "loaded":
            return False
        logger.info("unloading %s (%s)", entry.ref, reason)
        stack, slot.stack, slot.app, slot.state = slot.stack, None, None, "unloaded"
        self.budget.release(entry.ref)
        if self.metrics is not None:  # before the engine stops: /v1/models already says "unloaded"
            self.metrics.on_unload(entry.ref, reason)
        if stack is not None:
            await stack.aclose()
        return True

    async def reap_idle(self) -> None:
        """Forever: unload the models idle past their keep_alive (never pinned ones)."""
        while True:
            await asyncio.sleep(REAP_INTERVAL_S)
            now = time.monotonic()
            for slot in list(self.slots.values()):
                expired = slot.keep_alive >= 0 and now - slot.last_used >= slot.keep_alive
                if slot.unloadable and expired:
                    await self.unload(slot.entry, reason="keep_alive")

    async def close(self) -> None:
        for slot in self.slots.values():
            if slot.loading is not None and not slot.loading.done():
                slot.loading.cancel()
            if slot.state == "loaded":
                await self.unload(slot.entry, reason="shutdown")

    def loaded_apps(self) -> list[Any]:
        return [s.app for s in self.slots.values() if s.state == "loaded"]


async def _shutdown_quietly(app: Any) -> None:
    """A failed load may leave an engine process behind; stop it."""
    with contextlib.suppress(Exception):
        await app.state.shoal.engine.shutdown()
