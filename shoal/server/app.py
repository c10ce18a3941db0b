"""build_app: the one place where routes, error handling, metrics and guards are composed.

None of the pieces knows about the others; tests build apps in-process from any engine that has the
AsyncEngine surface (config, tokenizer, generation_config, model_name, ready, start, shutdown, generate,
abort, stats, add_step_listener).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI
from prometheus_client import Gauge

import shoal
from shoal.policy.audit import AuditLog, AuditPolicy, request_record
from shoal.policy.auth import Authenticator, needs_auth
from shoal.policy.config import PolicyConfig
from shoal.policy.content_filter import ContentFilter
from shoal.policy.response_cache import ResponseCache
from shoal.server import chat, completions, console, debug, info, tokens
from shoal.server.access_log import AccessLog
from shoal.server.auth import AuthMiddleware
from shoal.server.body_limit import BodyLimitMiddleware
from shoal.server.cached_responses import ResponseCacheMiddleware
from shoal.server.direct_body import offer_direct_body
from shoal.server.errors import UnexpectedErrorMiddleware, install_error_handlers
from shoal.server.lifecycle import AdmissionGate, Lifecycle
from shoal.server.metrics import ServerMetrics
from shoal.server.request_context import RequestContext, RequestContextMiddleware
from shoal.server.settings import ServerSettings
from shoal.server.state import ServerState
from shoal.server.traffic import TrafficGuard, TrafficMiddleware, caps_of

if TYPE_CHECKING:
    from opentelemetry.trace import TracerProvider


def build_app(
    engine: Any,
    settings: ServerSettings,
    load_in_background: bool = False,
    tracer_provider: TracerProvider | None = None,
    freeze_heap: bool = False,
) -> FastAPI:
    """The FastAPI app serving `engine`; its lifespan starts the engine and shuts it down.

    load_in_background: the server listens while the engine loads and warms up (probes answer, /v1/*
    is 503 + Retry-After); otherwise the app starts only once the engine has.
    Traces go to `tracer_provider` when given (tests pass one with an in-memory exporter), else to an
    OTLP exporter when settings.otlp_traces_endpoint is set; otherwise tracing costs nothing.
    freeze_heap: once the engine has started, freeze the process's heap (shoal/gc_heap.py); only for a
    process that serves this one app for its whole life (`shoal serve`): frozen objects are never
    collected, so an app that is later dropped (a fleet's unloaded model, a test's) would leak."""
    lifecycle = Lifecycle(engine, settings.drain_timeout_s, freeze_heap)
    owned_provider = None
    if tracer_provider is None and settings.otlp_traces_endpoint:
        from shoal.server.tracing import otlp_tracer_provider  # the OpenTelemetry SDK, only when used

        tracer_provider = owned_provider = otlp_tracer_provider(settings.otlp_traces_endpoint)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        loading = asyncio.ensure_future(lifecycle.start_engine()) if load_in_background else None
        if loading is None:
            await engine.start()
            lifecycle.engine_started()
        try:
            yield
        finally:
            if loading is not None and not loading.done():
                loading.cancel()
            await engine.shutdown()
            if state.traffic is not None:
                await state.traffic.close()
            if owned_provider is not None:
                owned_provider.shutdown()  # flushes the spans still batched

    app = FastAPI(
        title="shoal",
        version=shoal.__version__,
        description="OpenAI-compatible LLM inference server (paged KV cache, continuous batching).",
        lifespan=lifespan,
        # shoal builds the HTTP server span itself (shoal/server/tracing.py): FastAPI's own would be a
        # second parent for the same request whenever a global tracer provider is configured.
        telemetry={"tracing": False, "operation_spans": False},
    )
    metrics = ServerMetrics(engine, settings)
    state = ServerState(engine=engine, settings=settings, metrics=metrics, lifecycle=lifecycle)
    metrics.attach(state)
    app.state.shoal = state
    if settings.policy is not None and settings.policy.content_filter is not None:
        state.content_filter = ContentFilter(settings.policy.content_filter)
    if settings.record_schedule:
        state.schedule_record = debug.ScheduleRecord()
        engine.add_step_listener(state.schedule_record.on_step)
    state.caps = caps_of(settings.policy, settings.max_tokens_cap, settings.max_n)
    state.traffic = _traffic_guard(engine, settings, lifecycle, metrics)
    _add_request_logs_and_traces(state, tracer_provider)
    install_error_handlers(app)
    for module in (completions, chat, info, tokens, debug):
        app.include_router(module.router)
    if settings.ui:
        state.console_history = console.ScrapeHistory()
        app.include_router(console.router)
        console.mount_static(app)
    # Starlette wraps the last one added outermost: the key check runs before the body is read, and
    # unexpected errors are answered innermost, inside every other middleware.
    app.add_middleware(UnexpectedErrorMiddleware)
    policy = settings.policy
    if policy is not None and policy.response_cache is not None:
        cache = ResponseCache(policy.response_cache)
        app.add_middleware(ResponseCacheMiddleware, cache=cache, served_model_name=settings.served_model_name)
    app.add_middleware(AdmissionGate, lifecycle=lifecycle)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_request_bytes)
    if state.traffic is not None:  # inside authentication (it needs the identity), before the body is read
        app.add_middleware(TrafficMiddleware, guard=state.traffic)
    if settings.api_key or (policy and policy.auth):
        classes = set(policy.classes) if policy else None
        authenticator = Authenticator(policy.auth if policy else None, settings.api_key, classes)
        app.add_middleware(AuthMiddleware, authenticator=authenticator)
    if policy and policy.audit:
        state.end_listeners.append(_audit_listener(policy.audit, engine, metrics))
    # Outermost: the context exists before anything else runs, and sees every response, 401/413 included.
    app.add_middleware(RequestContextMiddleware, listeners=state.end_listeners)
    # Around all of them, even Starlette's own: streamed chunks skip the send wrappers (direct_body.py).
    offer_direct_body(app)
    _document_400_not_422(app)
    return app


def _audit_listener(
    policy: AuditPolicy, engine: Any, metrics: ServerMetrics
) -> Callable[[RequestContext], None]:
    """One chained line per request (probes and unprotected /metrics scrapes aside), failed
    authentications included. The line count is exported (shoal:audit_log_lines) so that a scraper
    keeps an off-box record of the head: a log cut shorter than a scraped count was truncated."""
    log = AuditLog.from_policy(policy)
    Gauge(
        "shoal:audit_log_lines", "Lines in the audit log (its head).", registry=metrics.registry
    ).set_function(lambda: log.seq)

    def decode(ids: list[int]) -> str:
        return engine.tokenizer.decode(ids)

    def on_end(ctx: RequestContext) -> None:
        if needs_auth(ctx.path, protect_metrics=False):
            log.append(request_record(ctx, decode if policy.include_text else None))

    return on_end


def _traffic_guard(
    engine: Any, settings: ServerSettings, lifecycle: Lifecycle, metrics: ServerMetrics
) -> TrafficGuard | None:
    """The rate limits, shedding and breaker, or None when none is configured (all are off by default)."""
    policy = settings.policy or PolicyConfig()
    parts = (policy.rate_limits, policy.shedding, policy.breaker, settings.max_waiting_requests)
    if all(part is None for part in parts):
        return None
    guard = TrafficGuard(engine, policy, settings.max_waiting_requests, lifecycle.liveness_problem)
    guard.register_metrics(metrics.registry)
    return guard


def _add_request_logs_and_traces(state: ServerState, tracer_provider: TracerProvider | None) -> None:
    settings = state.settings
    access_log = AccessLog(settings.served_model_name, state.engine, settings.log_prompts)
    state.end_listeners.append(access_log.on_end)
    if tracer_provider is not None:
        from shoal.server.tracing import RequestTracer

        state.end_listeners.append(RequestTracer(tracer_provider, settings.served_model_name).on_end)


def _document_400_not_422(app: FastAPI) -> None:
    """Validation errors are answered 400 with ErrorResponse; drop FastAPI's 422 from the schema."""
    original = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = original()
        for path in schema.get("paths", {}).values():
            for operation in path.values():
                if isinstance(operation, dict):
                    operation.get("responses", {}).pop("422", None)
        schemas = schema.get("components", {}).get("schemas", {})
        for name in ("HTTPValidationError", "ValidationError"):
            schemas.pop(name, None)
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
