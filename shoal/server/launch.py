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
) -> None:
    """Blocking: load the model, warm up, then serve HTTP on host:port."""
    from shoal.engine.async_engine import AsyncEngine  # torch import deferred until we actually serve

    configure_logging(log_level)
    logger.info("loading %s", engine_config.model)
    faults = None
    if settings.enable_fault_injection:
        from shoal.engine.faults import FaultInjector

        faults = FaultInjector.from_env()
        logger.warning("fault injection is ENABLED (POST /debug/faults): never in production")
    engine = AsyncEngine.from_config(engine_config, faults=faults)
    app = build_app(engine, settings)
    logger.info(
        "serving %s as '%s' on http://%s:%d (max_model_len=%s)",
        engine.model_name,
        settings.served_model_name,
        host,
        port,
        engine.config.max_model_len,
    )
    uvicorn.run(app, host=host, port=port, log_level=log_level.lower(), timeout_graceful_shutdown=10)
