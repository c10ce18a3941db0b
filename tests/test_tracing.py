"""Tracing (issue 19, acceptance 5): in process, a real stories260K engine behind build_app, with
OpenTelemetry's InMemorySpanExporter. One HTTP request yields one SERVER span and, under it, the engine
request's queue, prefill and decode spans (then response), nested, in time order, with token counts."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

pytest.importorskip("opentelemetry.sdk")

from opentelemetry import trace  # noqa: E402
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider  # noqa: E402
from opentelemetry.sdk.trace.export import SimpleSpanProcessor  # noqa: E402
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter  # noqa: E402
from opentelemetry.trace import SpanKind  # noqa: E402

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN_ID = "00f067aa0ba902b7"
PHASES = ("queue", "prefill", "decode", "response")


@pytest.fixture(scope="module")
def traced(stories_dir):
    """(exporter, run) where run(coro_fn) drives requests against an app whose spans land in exporter."""
    from shoal.engine.async_engine import AsyncEngine
    from shoal.engine.config import EngineConfig
    from shoal.server.app import build_app
    from shoal.server.settings import ServerSettings

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    # Also the global provider (when nobody set one): FastAPI 0.165 would then emit its own HTTP span for
    # each request into the same exporter, so a duplicate parent would fail the test below.
    if type(trace.get_tracer_provider()).__name__ == "ProxyTracerProvider":
        trace.set_tracer_provider(provider)
    config = EngineConfig(model=str(stories_dir), dtype="float32", device="cpu", kv_cache_memory=4 << 20)

    def run(fn, traced: bool = True):
        # A fresh engine per run: an AsyncEngine's loop is bound to the event loop it started in.
        engine = AsyncEngine.from_config(config)
        app = build_app(
            engine, ServerSettings(served_model_name="stories"), tracer_provider=provider if traced else None
        )
        run.listeners = app.state.shoal.end_listeners

        async def main():
            await engine.start()
            try:
                transport = httpx.ASGITransport(app=app)
                async with httpx.AsyncClient(transport=transport, base_url="http://t", timeout=60) as client:
                    return await fn(client)
            finally:
                await engine.shutdown()

        exporter.clear()
        return asyncio.run(main())

    return exporter, run


def _by_name(spans: tuple[ReadableSpan, ...]) -> dict[str, list[ReadableSpan]]:
    out: dict[str, list[ReadableSpan]] = {}
    for span in spans:
        out.setdefault(span.name, []).append(span)
    return out


@pytest.mark.timeout(60)
def test_one_request_yields_parent_and_phase_children_in_order(traced):
    exporter, run = traced
    headers = {"X-Request-Id": "trace-me-1", "traceparent": f"00-{TRACE_ID}-{CALLER_SPAN_ID}-01"}
    body = {"model": "stories", "prompt": "Once upon a time", "max_tokens": 6, "temperature": 0}

    r = run(lambda c: c.post("/v1/completions", json=body, headers=headers))

    assert r.status_code == 200, r.text
    usage = r.json()["usage"]
    spans = _by_name(exporter.get_finished_spans())
    servers = [s for group in spans.values() for s in group if s.kind == SpanKind.SERVER]
    assert len(servers) == 1, f"one HTTP parent expected, got {[s.name for s in servers]}"
    parent = servers[0]
    assert parent.name == "POST /v1/completions"
    # Joined to the caller's trace (W3C traceparent).
    assert format(parent.context.trace_id, "032x") == TRACE_ID
    assert format(parent.parent.span_id, "016x") == CALLER_SPAN_ID
    attrs = parent.attributes
    assert attrs["http.request.method"] == "POST" and attrs["http.route"] == "/v1/completions"
    assert attrs["http.response.status_code"] == 200 and attrs["gen_ai.request.id"] == "trace-me-1"
    assert attrs["gen_ai.request.model"] == "stories"
    assert attrs["gen_ai.usage.input_tokens"] == usage["prompt_tokens"]
    assert attrs["gen_ai.usage.output_tokens"] == usage["completion_tokens"] == 6
    assert list(attrs["gen_ai.response.finish_reasons"]) == ["length"]

    children = [spans[name][0] for name in PHASES]
    assert sorted(spans) == sorted([parent.name, *PHASES]), sorted(spans)
    for child in children:
        assert (
            child.parent.span_id == parent.context.span_id
            and child.context.trace_id == parent.context.trace_id
        )
    queue, prefill, decode, response = children
    assert prefill.attributes["gen_ai.usage.input_tokens"] == usage["prompt_tokens"]
    assert decode.attributes["gen_ai.usage.output_tokens"] == 6
    # Back to back, in order, inside the parent.
    assert parent.start_time <= queue.start_time <= queue.end_time == prefill.start_time
    assert prefill.start_time < prefill.end_time == decode.start_time < decode.end_time
    assert decode.end_time == response.start_time <= response.end_time == parent.end_time


@pytest.mark.timeout(60)
def test_streamed_batch_has_phases_per_engine_request(traced):
    """Two prompts are two engine requests: two sets of phases under one parent, streamed or not."""
    exporter, run = traced
    body = {"prompt": ["Once upon a time", "The cat"], "max_tokens": 3, "temperature": 0, "stream": True}

    async def stream(client: httpx.AsyncClient) -> str:
        async with client.stream("POST", "/v1/completions", json=body) as r:
            return "".join([line async for line in r.aiter_lines()])

    assert "[DONE]" in run(stream)
    spans = _by_name(exporter.get_finished_spans())
    (parent,) = spans["POST /v1/completions"]
    assert parent.attributes["gen_ai.usage.output_tokens"] == 6
    for name in ("queue", "prefill", "decode"):
        assert len(spans[name]) == 2, name
        assert {s.parent.span_id for s in spans[name]} == {parent.context.span_id}
    assert {s.attributes["gen_ai.request.id"] for s in spans["decode"]} == {
        s.attributes["gen_ai.request.id"] for s in spans["queue"]
    }


@pytest.mark.timeout(30)
def test_tracing_off_emits_nothing_and_registers_nothing(traced):
    """Off (the default): no tracer, no end listener building spans, and no span from FastAPI either,
    although a global tracer provider exists in this process (set by the fixture)."""
    exporter, run = traced
    body = {"prompt": "Once upon a time", "max_tokens": 2}

    r = run(lambda c: c.post("/v1/completions", json=body), traced=False)

    assert r.status_code == 200, r.text
    assert exporter.get_finished_spans() == ()
    names = [getattr(fn, "__qualname__", "") for fn in run.listeners]
    assert not any(name.startswith("RequestTracer") for name in names), names


@pytest.mark.timeout(60)
def test_shoal_serve_exports_over_otlp_http():
    """A real `shoal serve --otlp-traces-endpoint` exports the same spans to an OTLP/HTTP receiver."""
    from shoal.bench.otlp_sink import OtlpSink

    try:
        from server_fixture import launch_own_server, wait_ready
    except ImportError:  # tests/ became a package
        from tests.server_fixture import launch_own_server, wait_ready  # type: ignore[no-redef]

    with OtlpSink() as sink:
        # Thread mode: one process less to start; the batch processor flushes every 50 ms.
        server = launch_own_server(
            "traced",
            ["--otlp-traces-endpoint", sink.endpoint, "--engine-mode", "thread"],
            env={"OTEL_BSP_SCHEDULE_DELAY": "50", "OTEL_SERVICE_NAME": "shoal-test"},
        )
        try:
            wait_ready(server)
            body = {"prompt": "Once upon a time", "max_tokens": 4, "temperature": 0}
            r = httpx.post(f"{server.url}/v1/completions", json=body, headers={"X-Request-Id": "otlp-1"})
            assert r.status_code == 200, r.text
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and not _otlp_trace(sink.spans(), "otlp-1"):
                time.sleep(0.05)
        finally:
            server.proc.terminate()  # drains (nothing left) and exits; the fixture reaps it at exit
        spans = _otlp_trace(sink.spans(), "otlp-1")

    assert spans, f"no trace for otlp-1 received:\n{server.log_tail()}"
    parent = spans["POST /v1/completions"]
    assert parent.resource["service.name"] == "shoal-test"
    assert parent.attributes["gen_ai.usage.output_tokens"] == 4
    assert parent.attributes["gen_ai.usage.input_tokens"] == r.json()["usage"]["prompt_tokens"]
    for name in PHASES:
        assert spans[name].parent_span_id == parent.span_id and spans[name].trace_id == parent.trace_id
    assert parent.start_ns <= spans["queue"].start_ns <= spans["decode"].end_ns <= parent.end_ns


def _otlp_trace(received, request_id: str) -> dict:
    """name -> span of the trace whose parent carries request_id, once all its spans have arrived."""
    parents = [
        s for s in received if s.attributes.get("gen_ai.request.id") == request_id and not s.parent_span_id
    ]
    if not parents:
        return {}
    spans = {s.name: s for s in received if s.trace_id == parents[0].trace_id}
    return spans if all(name in spans for name in PHASES) else {}
