"""Start serving: load the engine (before the port opens, so /health only answers a loaded server), build
the app, run uvicorn until SIGINT/SIGTERM."""

from __future__ import annotations

import logging

import uvicorn

from shoal.engine.config import EngineConfig
from shoal.server.app import build_app
from shoal.server.settings import ServerSettings

logger = logging.getLogger("shoal.server")


def configure_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def serve(
    engine_config: EngineConfig,
    settings: ServerSettings,
    host: str = "127.0.0.1",
    port: int = 8000,
    log_level: str = "info",
    engine_mode: str = "process",
) -> None:
    """Blocking: load the model, warm up, then serve HTTP on host:port.

    engine_mode "process" runs the engine core in its own process (shoal/engine/core_process.py);
    "thread" runs it on a thread of this one (shoal/engine/async_engine.py)."""
    configure_logging(log_level)
    logger.info("loading %s", engine_config.model)
    engine = _start_engine(engine_config, settings, engine_mode)
    app = build_app(engine, settings)
    logger.info(
        "serving %s as '%s' on http://%s:%d (max_model_len=%s, engine in a %s)",
        engine.model_name,
        settings.served_model_name,
        host,
        port,
        engine.config.max_model_len,
        engine_mode,
    )
    uvicorn.run(app, host=host, port=port, log_level=log_level.lower(), timeout_graceful_shutdown=10)


def _start_engine(engine_config: EngineConfig, settings: ServerSettings, engine_mode: str):
    from shoal.engine.faults import FaultInjector, plan_from_env

    plan = plan_from_env() if settings.enable_fault_injection else None
    if plan is not None:
        logger.warning("fault injection is ENABLED (POST /debug/faults): never in production")
    if engine_mode == "process":
        from shoal.engine.core_client import EngineCoreClient

        return EngineCoreClient(engine_config, plan, model_name=engine_config.model)
    if engine_mode != "thread":
        raise ValueError(f"engine_mode must be process or thread, got {engine_mode!r}")
    from shoal.engine.async_engine import AsyncEngine  # torch import deferred until we actually serve

    return AsyncEngine.from_config(
        engine_config, faults=FaultInjector.from_env() if plan is not None else None
    )
