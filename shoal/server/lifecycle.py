"""A server's life: load while listening, serve, drain on SIGTERM, stop; and what the probes say of it.

Phases, as `/ready` reports them: "loading" -> "warming up" -> "ready" -> "draining" (-> exit), or
"failed" when the model cannot load or the engine dies. `/health` (liveness) fails only when the
process is broken: the load failed, the engine died, ran `--max-consecutive-step-failures` failed steps,
or made no progress for `--engine-hang-timeout` seconds with work pending (engine/health.py).

`AdmissionGate` (pure ASGI, around the OpenAI routes `/v1/*`) answers 503 with `Retry-After` while the
server loads or drains, and counts the requests in flight, which is what the drain waits for.

The drain (Kubernetes sends SIGTERM, then SIGKILL after its grace period):
1. readiness goes false at once, so the Service stops routing here; the port stays open and new
   requests get 503 + `Retry-After` + `Connection: close` (a client retries on another replica);
2. running and queued requests go on until all are answered, or `--drain-timeout` seconds pass;
3. at the deadline the rest are ended with the text generated so far and finish reason "abort"
   (vLLM's), streams with a final chunk and `[DONE]`;
4. once nothing is in flight, the server stops and the process exits 0.
vLLM's default `--shutdown-timeout 0` aborts in-flight requests on SIGTERM (vllm-project/vllm RFC #24885);
SGLang has skipped the drain (sgl-project/sglang#35202).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from starlette.types import ASGIApp, Receive, Scope, Send

from shoal.gc_heap import freeze_startup_heap
from shoal.server.errors import SERVER_ERROR, error_response

logger = logging.getLogger("shoal.server")

RETRY_AFTER_S = 5  # what a 503 tells clients while loading or draining
FINISH_GRACE_S = 5.0  # after the deadline: time for ended requests to send their last bytes
GATED_PREFIX = "/v1/"


class Lifecycle:
    """The server-side phase (loading, draining) on top of the engine's own, and in-flight requests."""

    def __init__(self, engine: Any, drain_timeout_s: float, freeze_heap: bool = False):
        self.engine = engine
        self.freeze_heap = freeze_heap  # after the engine starts (build_app's freeze_heap)
        self.drain_timeout_s = drain_timeout_s
        self.draining = False
        self.load_error: str | None = None
        self.inflight = 0
        self.on_fatal: Callable[[], None] | None = None  # set by launch: stop the server (exit 1)
        self._quiet: asyncio.Event | None = None

    # ---- start --------------------------------------------------------------------------------------
    async def start_engine(self) -> None:
        """Load (if needed) and start the engine; a failure is logged, fails liveness and calls on_fatal."""
        t0 = time.monotonic()
        try:
            await self.engine.start()
        except Exception as e:  # noqa: BLE001 - reported through the probes and the exit code
            self.load_error = f"{type(e).__name__}: {e}"
            logger.error("the engine failed to start: %s", self.load_error)
            if self.on_fatal is not None:
                self.on_fatal()
            return
        ready_s = time.monotonic() - t0
        frozen = self.engine_started()
        logger.info("engine ready after %.1f s (%d objects frozen)", ready_s, frozen)

    def engine_started(self) -> int:
        """After the engine has started: freeze the heap if asked (build_app's freeze_heap); the number of
        objects frozen in this process, 0 if not asked."""
        return freeze_startup_heap() if self.freeze_heap else 0

    # ---- what the probes say ------------------------------------------------------------------------
    def phase(self) -> str:
        """ "loading", "warming up", "ready", "draining" or "failed"."""
        if self.load_error is not None or getattr(self.engine, "error", None) is not None:
            return "failed"
        if self.draining:
            return "draining"
        engine_phase = getattr(self.engine, "phase", "ready" if self.engine.ready else "loading")
        if engine_phase == "ready" and not self.engine.ready:
            return "failed"
        return {"warming_up": "warming up", "stopped": "draining"}.get(engine_phase, engine_phase)

    def liveness_problem(self) -> str | None:
        """Why the process should be restarted, or None."""
        if self.load_error is not None:
            return f"the engine failed to start: {self.load_error}"
        probe = getattr(self.engine, "health_problem", None)
        return probe() if probe is not None else None

    @property
    def ready(self) -> bool:
        return self.phase() == "ready" and self.liveness_problem() is None

    # ---- in-flight requests -------------------------------------------------------------------------
    def enter(self) -> None:
        self.inflight += 1

    def leave(self) -> None:
        self.inflight -= 1
        if self.inflight == 0 and self._quiet is not None:
            self._quiet.set()

    async def _until_quiet(self, timeout: float) -> bool:
        """Wait until nothing is in flight (True), at most timeout seconds (False)."""
        if self.inflight == 0:
            return True
        self._quiet = asyncio.Event()
        try:
            await asyncio.wait_for(self._quiet.wait(), max(timeout, 0.0))
            return True
        except asyncio.TimeoutError:
            return self.inflight == 0
        finally:
            self._quiet = None

    # ---- drain --------------------------------------------------------------------------------------
    async def drain(self) -> None:
        """Stop taking requests, let the running ones finish until the drain timeout, then end the rest
        with their partial output. Returns once nothing is in flight (or the grace after ending is spent)."""
        if self.draining:
            return
        self.draining = True
        logger.info("draining: %d request(s) in flight, up to %.0f s", self.inflight, self.drain_timeout_s)
        if await self._until_quiet(self.drain_timeout_s):
            logger.info("drained: every request finished")
            return
        logger.warning("drain timeout: ending %d request(s) with their partial output", self.inflight)
        deadline = time.monotonic() + FINISH_GRACE_S
        while self.inflight and time.monotonic() < deadline:
            # Repeated: a request still being tokenized at the first call reaches the engine later.
            self.engine.finish_all()
            await self._until_quiet(min(0.5, deadline - time.monotonic()))
        if self.inflight:
            logger.error("%d request(s) still in flight after the drain grace period", self.inflight)


class AdmissionGate:
    """503 + Retry-After on /v1/* unless the server is ready; counts the /v1/* requests in flight."""

    def __init__(self, app: ASGIApp, lifecycle: Lifecycle):
        self.app = app
        self.lifecycle = lifecycle

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(GATED_PREFIX):
            await self.app(scope, receive, send)
            return
        phase = self.lifecycle.phase()
        if phase in ("loading", "warming up", "draining"):
            await self._unavailable(phase)(scope, receive, send)
            return
        self.lifecycle.enter()
        try:
            await self.app(scope, receive, send)
        finally:
            self.lifecycle.leave()

    @staticmethod
    def _unavailable(phase: str):
        headers = {"Retry-After": str(RETRY_AFTER_S)}
        if phase == "draining":
            headers["Connection"] = "close"  # this replica is going away: reconnect elsewhere
        return error_response(
            503,
            f"the server is {phase}; retry in {RETRY_AFTER_S} s",
            type=SERVER_ERROR,
            code="server_" + phase.replace(" ", "_"),
            headers=headers,
        )
