"""What every route needs: the engine, the settings, the metrics, and the checks shared by all routes."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from starlette.requests import Request

from shoal.policy.caps import Caps, InputLimits
from shoal.server.errors import SERVER_ERROR, APIError
from shoal.server.lifecycle import RETRY_AFTER_S, Lifecycle
from shoal.server.logprobs import TokenTexts
from shoal.server.metrics import ServerMetrics
from shoal.server.request_context import EndListener
from shoal.server.settings import ServerSettings


@dataclass
class ServerState:
    engine: Any  # shoal.engine.async_engine.AsyncEngine (duck-typed so tests can pass a stand-in)
    settings: ServerSettings
    metrics: ServerMetrics
    lifecycle: Lifecycle
    created: int = field(default_factory=lambda: int(time.time()))
    # Called with each RequestContext once its response is sent (metrics, access log, traces).
    end_listeners: list[EndListener] = field(default_factory=list)
    schedule_record: Any = None  # debug.ScheduleRecord with --record-schedule
    content_filter: Any = None  # policy.content_filter.ContentFilter with a content_filter policy
    caps: Caps = field(default_factory=lambda: Caps(InputLimits()))  # input limits: always on
    traffic: Any = None  # traffic.TrafficGuard when a rate limit, shedding or the breaker is configured
    console_history: Any = None  # console.ScrapeHistory: the live view's recent registry reads

    @property
    def model_name(self) -> str:
        return self.settings.served_model_name

    @property
    def max_model_len(self) -> int:
        return int(self.engine.config.max_model_len)

    @property
    def vocab_size(self) -> int:
        return int(self.engine.tokenizer.vocab_size)

    @property
    def ready(self) -> bool:
        """Readiness (/ready, shoal:ready): loaded, warmed up, not draining, engine healthy."""
        return self.lifecycle.ready

    @property
    def engine_healthy(self) -> bool:
        """Liveness of the engine (/health, shoal:engine_healthy): false once it is dead, broken or hung."""
        return self.lifecycle.liveness_problem() is None

    @cached_property
    def texts(self) -> TokenTexts:
        """Token strings for logprobs; built on first use, since the tokenizer exists only once loaded."""
        return TokenTexts(self.engine.tokenizer)

    def check_model(self, name: str | None) -> None:
        """404 for a model this server does not serve (a missing name means the served one)."""
        if name is not None and name != self.model_name:
            raise APIError(
                f"The model '{name}' does not exist; this server serves '{self.model_name}'",
                404,
                param="model",
                code="model_not_found",
            )

    def check_ready(self) -> None:
        """503 while the engine is not ready (still starting, shutting down, or dead)."""
        if not self.engine.ready:
            raise APIError(
                "the engine is not ready",
                503,
                type=SERVER_ERROR,
                code="engine_not_ready",
                headers={"Retry-After": str(RETRY_AFTER_S)},
            )


def get_state(request: Request) -> ServerState:
    return request.app.state.shoal
