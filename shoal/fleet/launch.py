"""`shoal serve --models models.yaml`: the registry validated, the budget set, the port opened; models
load as the registry says (pre-load, or on their first request). SIGTERM drains every loaded model."""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
from pathlib import Path

import uvicorn

from shoal.engine.config import EngineConfig
from shoal.engine.health import HealthPolicy
from shoal.fleet.app import build_fleet_app
from shoal.fleet.budget import MemoryBudget
from shoal.fleet.manager import ModelManager
from shoal.fleet.metrics import FleetMetrics
from shoal.fleet.registry import ModelEntry, Registry
from shoal.logging_config import LOG_FORMAT_ENV, configure_logging
from shoal.server.app import build_app
from shoal.server.launch import DrainingServer, TLSOptions, _start_engine
from shoal.server.settings import ServerSettings

logger = logging.getLogger("shoal.fleet")


def app_factory(base: EngineConfig, settings: ServerSettings, engine_mode: str, health: HealthPolicy | None):
    """Per model: its EngineConfig (source, dtype, a KV cache sized from the budget), its settings
    (served as its ref), and a single-model app whose lifespan loads it (in its own engine process)."""

    def make(entry: ModelEntry, model_dir: Path, kv_bytes: int):
        dtype = entry.dtype if entry.dtype != "auto" else base.dtype
        config = dataclasses.replace(base, model=str(model_dir), dtype=dtype, kv_cache_memory=kv_bytes)
        config.validate()
        model_settings = dataclasses.replace(settings, served_model_name=entry.ref)
        engine = _start_engine(config, model_settings, engine_mode, health)
        return build_app(engine, model_settings, load_in_background=False)

    return make


def serve_fleet(
    registry: Registry,
    base: EngineConfig,
    settings: ServerSettings,
    memory_budget: int,
    host: str,
    port: int,
    log_level: str,
    engine_mode: str,
    health: HealthPolicy | None,
    tls: TLSOptions,
    log_format: str,
) -> int:
    """Blocking, like shoal.server.launch.serve; returns the exit code (0 after a drain)."""
    configure_logging(log_level, log_format)
    os.environ[LOG_FORMAT_ENV] = log_format
    budget = MemoryBudget(memory_budget)
    refs = [e.ref for e in registry.entries]
    manager = ModelManager(registry, budget, app_factory(base, settings, engine_mode, health))
    manager.metrics = FleetMetrics(refs, budget, manager.loaded_apps)
    app = build_fleet_app(manager, settings)
    config = uvicorn.Config(
        app, host=host, port=port, log_level=log_level.lower(), log_config=None, access_log=False,
        timeout_graceful_shutdown=10, **tls.uvicorn_kwargs(),
    )  # fmt: skip
    lifecycle = app.state.fleet
    server = DrainingServer(config, lifecycle)
    lifecycle.on_fatal = server.fatal
    logger.info("serving %s on %s:%d (memory budget %d MiB)", ", ".join(refs), host, port, budget.total >> 20)
    server.run()
    if lifecycle.load_error is not None:
        print(f"shoal serve: error: {lifecycle.load_error}", file=sys.stderr)
    return server.exit_code
