"""Start serving: open the port at once, load the engine behind it, drain on SIGTERM, exit.

The HTTP server listens while the model loads, so that probes answer from the first second (`/health`
200, `/ready` 503 "loading" / "warming up"). SIGTERM and SIGINT start the drain (server/lifecycle.py)
instead of uvicorn's default, which stops accepting at once; a second SIGINT stops without draining.
The process exits 0 after a drain, 1 if the engine cannot start.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
import ssl
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import uvicorn

from shoal.cpu_quota import ThreadChoice, apply_threads
from shoal.engine.config import EngineConfig
from shoal.engine.health import HealthPolicy
from shoal.logging_config import LOG_FORMAT_ENV, configure_logging
from shoal.server.app import build_app
from shoal.server.lifecycle import Lifecycle
from shoal.server.settings import ServerSettings

logger = logging.getLogger("shoal.server")


@dataclass(frozen=True)
class TLSOptions:
    """HTTPS, and mutual TLS (vLLM's flags): cert_reqs 0 asks no client certificate, 1 verifies one if
    sent, 2 requires one signed by a CA in ca_certs (ssl.CERT_NONE/OPTIONAL/REQUIRED)."""

    certfile: str | None = None
    keyfile: str | None = None
    ca_certs: str | None = None
    cert_reqs: int = ssl.CERT_NONE

    def __post_init__(self) -> None:
        if self.certfile is None and (self.keyfile or self.ca_certs or self.cert_reqs):
            raise ValueError("--ssl-keyfile, --ssl-ca-certs and --ssl-cert-reqs need --ssl-certfile")
        if self.cert_reqs not in (ssl.CERT_NONE, ssl.CERT_OPTIONAL, ssl.CERT_REQUIRED):
            raise ValueError(f"--ssl-cert-reqs must be 0, 1 or 2, got {self.cert_reqs}")
        if self.cert_reqs != ssl.CERT_NONE and not self.ca_certs:
            raise ValueError("--ssl-cert-reqs 1 or 2 needs --ssl-ca-certs to verify client certificates")

    @property
    def enabled(self) -> bool:
        return self.certfile is not None

    def uvicorn_kwargs(self) -> dict[str, Any]:
        if not self.enabled:
            return {}
        return {
            "ssl_certfile": self.certfile,
            "ssl_keyfile": self.keyfile,
            "ssl_ca_certs": self.ca_certs,
            "ssl_cert_reqs": self.cert_reqs,
        }


class DrainingServer(uvicorn.Server):
    """uvicorn.Server whose SIGTERM/SIGINT drain the lifecycle before stopping, and which does not
    re-raise the signal afterwards (uvicorn does, which would make the exit code 143, not 0)."""

    def __init__(self, config: uvicorn.Config, lifecycle: Lifecycle):
        super().__init__(config)
        self.lifecycle = lifecycle
        self.exit_code = 0
        self._drain: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def serve(self, sockets=None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        handled = (signal.SIGTERM, signal.SIGINT)
        original = {sig: signal.signal(sig, self._on_signal) for sig in handled}
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)

    def _on_signal(self, sig: int, frame) -> None:
        if self._drain is not None or self._loop is None:
            if sig == signal.SIGINT:  # a second Ctrl-C: stop now
                self.should_exit = self.force_exit = True
            return
        logger.info("received %s: draining", signal.Signals(sig).name)
        self._loop.call_soon_threadsafe(self._start_drain)

    def _start_drain(self) -> None:
        self._drain = asyncio.ensure_future(self._drain_then_exit())

    async def _drain_then_exit(self) -> None:
        try:
            await self.lifecycle.drain()
        finally:
            self.should_exit = True

    def fatal(self) -> None:
        """The engine could not start: stop serving, exit 1."""
        self.exit_code = 1
        self.should_exit = True


def serve(
    engine_config: EngineConfig,
    settings: ServerSettings,
    host: str = "127.0.0.1",
    port: int = 8000,
    log_level: str = "info",
    engine_mode: str = "process",
    health: HealthPolicy | None = None,
    tls: TLSOptions | None = None,
    log_format: str = "text",
    threads: ThreadChoice | None = None,
) -> int:
    """Blocking: listen on host:port, load and warm up the model behind it, serve until drained.
    Returns the process exit code (0 after a drain, 1 if the engine could not start).

    engine_mode "process" runs the engine core in its own process (shoal/engine/core_process.py);
    "thread" runs it on a thread of this one (shoal/engine/async_engine.py)."""
    configure_logging(log_level, log_format)
    os.environ[LOG_FORMAT_ENV] = log_format  # the engine core process, spawned below, formats alike
    if threads is not None:  # before the engine core is spawned: it inherits OMP_NUM_THREADS
        logger.info("engine threads: %s (%s)", apply_threads(threads) or "torch's default", threads.source)
    engine_config = _local_model(engine_config)
    logger.info("loading %s (the port opens now; /ready turns 200 once loaded)", engine_config.model)
    engine = _start_engine(engine_config, settings, engine_mode, health)
    app = build_app(engine, settings, load_in_background=True, freeze_heap=True)
    lifecycle = app.state.shoal.lifecycle
    tls = tls or TLSOptions()
    # log_config=None: uvicorn's loggers propagate to the handler configured above (same format);
    # access_log=False: shoal's access log (shoal/server/access_log.py) replaces uvicorn's.
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level.lower(),
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=10,
        **tls.uvicorn_kwargs(),
    )
    server = DrainingServer(config, lifecycle)
    lifecycle.on_fatal = server.fatal
    logger.info(
        "serving '%s' on %s://%s:%d (engine in a %s, drain timeout %.0f s)",
        settings.served_model_name,
        "https" if tls.enabled else "http",
        host,
        port,
        engine_mode,
        settings.drain_timeout_s,
    )
    server.run()
    if lifecycle.load_error is not None:
        print(f"shoal serve: error: {lifecycle.load_error}", file=sys.stderr)
    return server.exit_code


def _local_model(engine_config: EngineConfig) -> EngineConfig:
    """A model on shared storage (s3://, gs://, file://, a network mount) is copied into the local cache
    here, in the HTTP process, before the engine core is spawned: the engine only ever sees a local
    directory and never imports shoal.fleet, and storage that cannot be reached fails the start at once
    (exit 1, the source named). The port opens after the copy. Local directories and Hub ids are left to
    the engine, as before."""
    from shoal.fleet.storage import is_shared_source, resolve_source

    if not is_shared_source(engine_config.model):
        return engine_config
    logger.info("fetching %s into the local model cache", engine_config.model)
    return dataclasses.replace(engine_config, model=str(resolve_source(engine_config.model)))


def _start_engine(
    engine_config: EngineConfig, settings: ServerSettings, engine_mode: str, health: HealthPolicy | None
):
    """The engine front, not loaded yet: its start() loads the model."""
    from shoal.engine.faults import FaultInjector, plan_from_env

    plan = plan_from_env() if settings.enable_fault_injection else None
    if plan is not None:
        logger.warning("fault injection is ENABLED (POST /debug/faults): never in production")
    if engine_mode == "process":
        from shoal.engine.core_client import EngineCoreClient

        return EngineCoreClient(engine_config, plan, model_name=engine_config.model, health=health)
    if engine_mode != "thread":
        raise ValueError(f"engine_mode must be process or thread, got {engine_mode!r}")
    from shoal.engine.async_engine import AsyncEngine  # torch import deferred until we actually serve

    faults = FaultInjector.from_env() if plan is not None else None
    return AsyncEngine.deferred(engine_config, faults=faults, health=health)
