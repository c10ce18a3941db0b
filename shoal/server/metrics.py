"""Prometheus metrics with vLLM's names, so that vLLM dashboards and alerts work unchanged.

Three sources: the engine's EngineStats (read at scrape time: gauges and the engine's own counters), the
engine's step listener (the `shoal:batch_size` histogram: sequences per step, the number that shows
continuous batching at work), and the request path (tokens, time to first token, latency, outcomes).
Each app gets its own CollectorRegistry, so that several apps (tests) never collide.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from shoal.engine.outputs import RequestOutput

# vLLM's buckets for the request-time histograms.
_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
_E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class _EngineStatsCollector:
    """Reads engine.stats when scraped: no thread needs to push gauges."""

    def __init__(self, engine: Any, model_name: str):
        self._engine = engine
        self._labels = [model_name]

    def _family(self, cls: type, name: str, doc: str, value: float) -> Metric:
        family = cls(name, doc, labels=["model_name"])
        family.add_metric(self._labels, value)
        return family

    def collect(self) -> Iterator[Metric]:
        s = self._engine.stats
        usage = float(getattr(s, "kv_cache_usage", 0.0))
        yield self._family(
            GaugeMetricFamily,
            "vllm:num_requests_running",
            "Requests in the running batch.",
            getattr(s, "num_running", 0),
        )
        yield self._family(
            GaugeMetricFamily,
            "vllm:num_requests_waiting",
            "Requests waiting to be scheduled.",
            getattr(s, "num_waiting", 0),
        )
        yield self._family(
            GaugeMetricFamily,
            "vllm:gpu_cache_usage_perc",
            "KV cache usage (0 to 1; on CPU too, under vLLM's name).",
            usage,
        )
        yield self._family(GaugeMetricFamily, "vllm:kv_cache_usage_perc", "KV cache usage (0 to 1).", usage)
        yield self._family(
            CounterMetricFamily,
            "vllm:prefix_cache_queries",
            "Prompt tokens looked up in the prefix cache.",
            getattr(s, "prefix_cache_queries", 0),
        )
        yield self._family(
            CounterMetricFamily,
            "vllm:prefix_cache_hits",
            "Prompt tokens found in the prefix cache.",
            getattr(s, "prefix_cache_hits", 0),
        )
        yield self._family(
            CounterMetricFamily,
            "vllm:num_preemptions",
            "Sequences preempted (KV cache full).",
            getattr(s, "num_preemptions", 0),
        )


class ServerMetrics:
    """All metrics of one app; `track` follows one engine request, `on_step` is the engine step listener."""

    def __init__(self, engine: Any, model_name: str):
        self.registry = CollectorRegistry()
        r, labels = self.registry, ["model_name"]
        self._prompt_tokens = Counter("vllm:prompt_tokens", "Prompt tokens processed.", labels, registry=r)
        self._generation_tokens = Counter("vllm:generation_tokens", "Tokens generated.", labels, registry=r)
        self._ttft = Histogram(
            "vllm:time_to_first_token_seconds",
            "Time from arrival to the first token.",
            labels,
            buckets=_TTFT_BUCKETS,
            registry=r,
        )
        self._e2e = Histogram(
            "vllm:e2e_request_latency_seconds",
            "Time from arrival to the end of a request.",
            labels,
            buckets=_E2E_BUCKETS,
            registry=r,
        )
        self._success = Counter(
            "vllm:request_success",
            "Finished sequences (choices) by finish reason.",
            ["model_name", "finished_reason"],
            registry=r,
        )
        self._batch_size = Histogram(
            "shoal:batch_size", "Sequences per engine step.", labels, buckets=_BATCH_BUCKETS, registry=r
        )
        self._step_seconds = Histogram(
            "shoal:step_duration_seconds", "Duration of one engine step.", labels, registry=r
        )
        r.register(_EngineStatsCollector(engine, model_name))
        self.model_name = model_name

    def on_step(self, step: Any) -> None:
        """Engine step listener (called from the engine thread; prometheus_client is thread-safe)."""
        self._batch_size.labels(self.model_name).observe(step.batch_size)
        self._step_seconds.labels(self.model_name).observe(step.step_seconds)

    def track(self) -> RequestTracker:
        return RequestTracker(self)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class RequestTracker:
    """Turns the snapshots of one engine request into token counts, TTFT, latency and outcome."""

    def __init__(self, metrics: ServerMetrics):
        self._m = metrics
        self._start = time.monotonic()
        self._tokens = 0
        self._first = False
        self._done = False

    def observe(self, out: RequestOutput) -> None:
        name = self._m.model_name
        tokens = sum(len(o.token_ids) for o in out.outputs)
        if not self._first and tokens:
            self._first = True
            self._ttft().observe(time.monotonic() - self._start)
            self._m._prompt_tokens.labels(name).inc(len(out.prompt_token_ids))
        if tokens > self._tokens:
            self._m._generation_tokens.labels(name).inc(tokens - self._tokens)
            self._tokens = tokens
        if out.finished and not self._done:
            self._done = True
            self._m._e2e.labels(name).observe(time.monotonic() - self._start)
            for o in out.outputs:
                self._m._success.labels(name, o.finish_reason or "abort").inc()

    def aborted(self, num_choices: int) -> None:
        """The request ended before its last snapshot (client gone, engine error)."""
        if not self._done:
            self._done = True
            self._m._e2e.labels(self._m.model_name).observe(time.monotonic() - self._start)
            self._m._success.labels(self._m.model_name, "abort").inc(num_choices)

    def _ttft(self):
        return self._m._ttft.labels(self._m.model_name)
