"""OpenTelemetry traces of HTTP requests, built after the fact from the engine's timestamps.

Each HTTP request becomes one SERVER span (the parent), and each of its engine requests three children:
`queue` (arrival -> first scheduled), `prefill` (first scheduled -> first token) and `decode` (first
token -> finished); a last `response` child covers what follows the engine's finish (the tail of the
answer being sent). Every span is created in `RequestTracer.on_end`, an end listener of
`RequestContextMiddleware`, with explicit start and end times: nothing runs on the request path, and
`shoal/engine` never imports OpenTelemetry (tests/test_layering.py).

Attributes follow the OpenTelemetry semantic conventions:
- HTTP server spans, https://opentelemetry.io/docs/specs/semconv/http/http-spans/#http-server-span
  (`http.request.method`, `http.route`, `url.path`, `http.response.status_code`, `error.type`);
- GenAI spans, https://opentelemetry.io/docs/specs/semconv/gen-ai/gen-ai-spans/
  (`gen_ai.request.model`, `gen_ai.usage.input_tokens`, `gen_ai.usage.output_tokens`,
  `gen_ai.response.finish_reasons`);
- and vLLM's own names where the conventions have none (vllm/tracing.py, `SpanAttributes`):
  `gen_ai.request.id`, `gen_ai.latency.time_to_first_token`, `gen_ai.latency.e2e`,
  `gen_ai.latency.time_in_queue`.

Tracing is off unless an OTLP endpoint is given (`--otlp-traces-endpoint`, vLLM's flag, or the standard
`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`); the exporter and the batch processor read the other standard
`OTEL_*` variables (headers, timeout, `OTEL_BSP_*`, `OTEL_TRACES_SAMPLER`, `OTEL_SERVICE_NAME`).
FastAPI 0.165's own HTTP spans are switched off in build_app, so that each request has one parent.
"""

from __future__ import annotations

from typing import Any

from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import SpanKind, StatusCode

import shoal
from shoal.engine.outputs import RequestOutput
from shoal.server.request_context import RequestContext
from shoal.server.request_summary import summarize

# The engine's phases of one engine request: (span name, start timestamp key, end timestamp key).
PHASES = (
    ("queue", "arrival_time", "first_scheduled_time"),
    ("prefill", "first_scheduled_time", "first_token_time"),
    ("decode", "first_token_time", "finished_time"),
)


def otlp_tracer_provider(endpoint: str) -> TracerProvider:
    """A provider exporting over OTLP/HTTP (protobuf) to `endpoint` (e.g. http://collector:4318/v1/traces),
    in batches on a background thread; the resource and sampler come from the standard OTEL_* variables."""
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    resource = Resource.create()
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: "shoal"}))  # OTEL_SERVICE_NAME unset
    provider = TracerProvider(resource=resource, shutdown_on_exit=False)
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
    return provider


class RequestTracer:
    """The end listener that turns a finished RequestContext into its spans."""

    def __init__(self, provider: trace.TracerProvider, model_name: str):
        self.tracer = provider.get_tracer("shoal", shoal.__version__)
        self.model_name = model_name
        # The headers the configured propagator reads (W3C traceparent, tracestate, baggage by default;
        # OTEL_PROPAGATORS may choose others): only those are copied out of each request.
        self.propagated = {name.lower().encode("latin-1") for name in propagate.get_global_textmap().fields}

    def on_end(self, ctx: RequestContext) -> None:
        end_ns = ctx.to_unix_ns(ctx.end_time if ctx.end_time is not None else ctx.arrival_time)
        parent = self.tracer.start_span(
            f"{ctx.method} {ctx.route}" if ctx.route else ctx.method,
            context=self._incoming_context(ctx),
            kind=SpanKind.SERVER,
            start_time=ctx.arrival_unix_ns,
            attributes=self._http_attributes(ctx),
        )
        if ctx.status is not None and ctx.status >= 500:
            parent.set_status(StatusCode.ERROR)
        under_parent = trace.set_span_in_context(parent)
        for out in ctx.outputs:
            self._phases(out, ctx, under_parent, end_ns)
        finished = [t for out in ctx.outputs if (t := out.metrics.get("finished_time")) is not None]
        if finished:
            self._span("response", ctx.to_unix_ns(max(finished)), end_ns, under_parent, {})
        parent.end(end_time=end_ns)

    def _incoming_context(self, ctx: RequestContext) -> Any:
        """The caller's trace (W3C traceparent), so shoal's spans join a gateway's; else a new trace."""
        carrier = {
            name.decode("latin-1"): value.decode("latin-1")
            for name, value in ctx.headers
            if name in self.propagated
        }
        return propagate.extract(carrier) if carrier else Context()  # not whatever is current

    def _http_attributes(self, ctx: RequestContext) -> dict[str, Any]:
        attributes: dict[str, Any] = {
            "http.request.method": ctx.method,
            "url.path": ctx.path,
            "gen_ai.request.id": ctx.request_id,
        }
        if ctx.route:
            attributes["http.route"] = ctx.route
        if ctx.status is not None:
            attributes["http.response.status_code"] = ctx.status
            if ctx.status >= 500:
                attributes["error.type"] = str(ctx.status)
        if not ctx.outputs:
            return attributes
        summary = summarize(ctx)
        attributes.update(
            {
                "gen_ai.request.model": ctx.model or self.model_name,
                "gen_ai.usage.input_tokens": summary.prompt_tokens,
                "gen_ai.usage.output_tokens": summary.completion_tokens,
                "gen_ai.response.finish_reasons": [r or "" for r in summary.finish_reasons],
            }
        )
        if summary.ttft is not None:
            attributes["gen_ai.latency.time_to_first_token"] = summary.ttft
        if summary.latency is not None:
            attributes["gen_ai.latency.e2e"] = summary.latency
        return attributes

    def _phases(self, out: RequestOutput, ctx: RequestContext, under_parent: Any, end_ns: int) -> None:
        """queue, prefill and decode of one engine request; a phase it never reached has no span, and
        the phase it was in when it ended (an abort, a timeout) ends with the HTTP request."""
        times = out.metrics
        engine_id = {"gen_ai.request.id": out.request_id}
        attributes = {
            "queue": engine_id,
            "prefill": {
                **engine_id,
                "gen_ai.usage.input_tokens": len(out.prompt_token_ids),
                "shoal.cached_tokens": out.num_cached_tokens,
            },
            "decode": {**engine_id, "gen_ai.usage.output_tokens": sum(len(c.token_ids) for c in out.outputs)},
        }
        for name, start_key, end_key in PHASES:
            start = times.get(start_key)
            if start is None:
                return
            end = times.get(end_key)
            self._span(
                name,
                ctx.to_unix_ns(start),
                ctx.to_unix_ns(end) if end is not None else end_ns,
                under_parent,
                attributes[name],
            )
            if end is None:
                return

    def _span(self, name: str, start_ns: int, end_ns: int, under_parent: Any, attributes: dict) -> None:
        span = self.tracer.start_span(name, context=under_parent, start_time=start_ns, attributes=attributes)
        span.end(end_time=max(start_ns, end_ns))
