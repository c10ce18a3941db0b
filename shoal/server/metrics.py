"""Prometheus metrics at GET /metrics, with vLLM's names (declared in shoal/metric_names.py).

Three sources:
- the request path: a RequestTracker per engine request counts prompt tokens at admission and output
  tokens as they are returned, and when the request ends observes its latency histograms, once per
  choice, from the engine's own timestamps (RequestOutput.metrics and CompletionOutput.token_times:
  a slow consumer sees collapsed snapshots, the engine's clock does not);
- the engine's step listener: tokens per step, sequences per step, step time;
- scrape time: the engine's stats (refreshed by a call into the engine first), readiness, GPU and
  process resources (shoal/server/metrics_collectors.py), prometheus-client's process collector.
And the end of each HTTP request (a RequestContext end listener): errors and timeouts.

Definitions follow vLLM (vllm/v1/metrics/loggers.py, stats.py): TTFT from arrival to the first token,
inter-token latency per token after the first, TPOT = decode time / (tokens - 1) and 0 for one token,
queue time from arrival to the first schedule, prefill from the first schedule to the first token,
decode from the first token to the last. Arrival is the HTTP request's arrival, before templating.

`--disable-log-stats` (ServerSettings.disable_log_stats) turns the request and step observation off in
one place, `ServerMetrics.enabled`; the scrape-time series stay. Each app has its own CollectorRegistry,
so that several apps (tests) never collide.
"""

from __future__ import annotations

import itertools
import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, generate_latest

from shoal import metric_names as mn
from shoal.engine.outputs import CompletionOutput, RequestOutput
from shoal.engine.stats import StepStats
from shoal.server.metrics_collectors import (
    EngineStatsCollector,
    GpuCollector,
    ProcessResourcesCollector,
    StateCollector,
)
from shoal.server.recent import RecentActivity
from shoal.server.request_context import RequestContext
from shoal.server.settings import ServerSettings

# vLLM's buckets (vllm/v1/metrics/loggers.py), so that its dashboards read the same resolution, with
# the request-time ones used for every request latency (vLLM's E2E buckets start at 0.3 s: too coarse for
# GPU-fast short requests) and the per-token ones extended below 10 ms for fast decoders. Roughly a factor
# 2 apart at the low end: percentiles are good to one bucket, and the series stay few.
LATENCY_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
    40.0, 80.0, 160.0, 640.0, 2560.0,
)  # fmt: skip
TOKEN_LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5,
    5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
)  # fmt: skip
ITERATION_TOKEN_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)  # vLLM's
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
STEP_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# vLLM stops its length buckets at max_model_len; the app exists before the model is loaded (the server
# listens while loading), so shoal stops at a length no model reaches.
LENGTH_BUCKETS_LIMIT = 10_000_000
COST_BUCKETS = tuple(m * 10.0**e for e in range(-8, 0) for m in (1, 3)) + (1.0,)  # dollars per request
# A status >= 400 that no error handler named (middlewares answer these themselves).
_DEFAULT_ERROR_KINDS = {401: "invalid_api_key", 413: "request_too_large", 499: "client_disconnected"}


def _one_two_five(limit: int) -> tuple[int, ...]:
    """1, 2, 5, 10, 20, 50, ... up to limit (vLLM's build_1_2_5_buckets, for lengths in tokens)."""
    buckets, scale = [], 1
    while True:
        for m in (1, 2, 5):
            if m * scale > limit:
                return tuple(buckets)
            buckets.append(m * scale)
        scale *= 10


def _histogram(registry: CollectorRegistry, name: str, buckets: tuple[float, ...]) -> Histogram:
    spec = mn.BY_NAME[name]
    return Histogram(spec.name, spec.help, list(spec.labels), buckets=buckets, registry=registry)


def _counter(registry: CollectorRegistry, name: str) -> Counter:
    spec = mn.BY_NAME[name]
    return Counter(spec.name, spec.help, list(spec.labels), registry=registry)


class ServerMetrics:
    """All metrics of one app. `attach` wires them to the app's state; `track` follows one engine
    request; `render` answers a scrape."""

    def __init__(self, engine: Any, settings: ServerSettings):
        self.enabled = not settings.disable_log_stats
        self.model_name = model = settings.served_model_name
        self._engine = engine
        self._slo_ttft = settings.slo_ttft_ms / 1000 if settings.slo_ttft_ms else None
        self._slo_tpot = settings.slo_tpot_ms / 1000 if settings.slo_tpot_ms else None
        self._cost_per_second = settings.cost_per_hour / 3600 if settings.cost_per_hour else None
        self.registry = r = CollectorRegistry()
        self.recent = RecentActivity()  # the console's last minutes, from the same observations
        ProcessCollector(registry=r)
        for collector in (
            EngineStatsCollector(engine, model),
            GpuCollector(model),
            ProcessResourcesCollector(engine, model),
        ):
            r.register(collector)
        self._make_request_series(r)
        self._make_step_series(r)
        self._make_business_series(r)

    def _make_request_series(self, r: CollectorRegistry) -> None:
        m = self.model_name
        self.ttft = _histogram(r, mn.TIME_TO_FIRST_TOKEN, LATENCY_BUCKETS).labels(m)
        self.itl = _histogram(r, mn.INTER_TOKEN_LATENCY, TOKEN_LATENCY_BUCKETS).labels(m)
        self.tpot = _histogram(r, mn.TIME_PER_OUTPUT_TOKEN, TOKEN_LATENCY_BUCKETS).labels(m)
        self.e2e = _histogram(r, mn.E2E_LATENCY, LATENCY_BUCKETS).labels(m)
        self.queue = _histogram(r, mn.QUEUE_TIME, LATENCY_BUCKETS).labels(m)
        self.prefill = _histogram(r, mn.PREFILL_TIME, LATENCY_BUCKETS).labels(m)
        self.decode = _histogram(r, mn.DECODE_TIME, LATENCY_BUCKETS).labels(m)
        self.success = _counter(r, mn.REQUEST_SUCCESS)
        self.prompt_tokens = _counter(r, mn.PROMPT_TOKENS).labels(m)
        self.generation_tokens = _counter(r, mn.GENERATION_TOKENS).labels(m)
        length_buckets = _one_two_five(LENGTH_BUCKETS_LIMIT)
        self.request_prompt_tokens = _histogram(r, mn.REQUEST_PROMPT_TOKENS, length_buckets).labels(m)
        self.request_generation_tokens = _histogram(r, mn.REQUEST_GENERATION_TOKENS, length_buckets).labels(m)

    def _make_step_series(self, r: CollectorRegistry) -> None:
        m = self.model_name
        self.iteration_tokens = _histogram(r, mn.ITERATION_TOKENS, ITERATION_TOKEN_BUCKETS).labels(m)
        self.batch_size = _histogram(r, mn.BATCH_SIZE, BATCH_BUCKETS).labels(m)
        self.step_seconds = _histogram(r, mn.STEP_DURATION, STEP_BUCKETS).labels(m)

    def _make_business_series(self, r: CollectorRegistry) -> None:
        m = self.model_name
        self.errors = _counter(r, mn.REQUEST_ERRORS)
        self.timeouts = _counter(r, mn.REQUEST_TIMEOUTS).labels(m)
        self.busy = _counter(r, mn.ENGINE_BUSY).labels(m)
        self.slo_requests = self.slo_good = None
        if self._slo_ttft is not None or self._slo_tpot is not None:
            self.slo_requests = _counter(r, mn.SLO_REQUESTS).labels(m)
            self.slo_good = _counter(r, mn.SLO_GOOD_REQUESTS).labels(m)
        self.request_cost = None
        self._cost_total = self._costed_tokens = 0.0
        if self._cost_per_second is not None:
            self.request_cost = _histogram(r, mn.REQUEST_COST, COST_BUCKETS).labels(m)
            spec = mn.BY_NAME[mn.COST_PER_MILLION_TOKENS]
            gauge = Gauge(spec.name, spec.help, list(spec.labels), registry=r).labels(m)
            gauge.set_function(
                lambda: self._cost_total / self._costed_tokens * 1e6 if self._costed_tokens else 0
            )

    def attach(self, state: Any) -> None:
        """Wire to the app: readiness gauges always; the step and end-of-request observers unless
        --disable-log-stats. state is the app's ServerState."""
        self.registry.register(
            StateCollector(lambda: state.ready, lambda: state.engine_healthy, self.model_name)
        )
        if self.enabled:
            self._engine.add_step_listener(self.on_step)
            state.end_listeners.append(self.on_request_end)

    def on_step(self, step: StepStats) -> None:
        """Engine step listener (the engine thread, or the core client's reader; prometheus_client is
        thread-safe). An interrupted step computed nothing: it counts in
        shoal:engine_steps_interrupted_total only (from EngineStats)."""
        if step.interrupted:
            return
        self.iteration_tokens.observe(step.num_prefill_tokens + step.num_decode_tokens)
        self.batch_size.observe(step.batch_size)
        self.step_seconds.observe(step.step_seconds)
        self.recent.on_step(step)

    def on_request_end(self, ctx: RequestContext) -> None:
        """After an HTTP response is sent: its error status and timeout."""
        if ctx.status is not None and ctx.status >= 400:
            kind = ctx.error_kind or _DEFAULT_ERROR_KINDS.get(ctx.status, "http_error")
            self.errors.labels(self.model_name, str(ctx.status), kind).inc()
        if ctx.timed_out:
            self.timeouts.inc()

    def track(self, prompt_len: int, n: int, arrival_time: float, hidden_output: bool = False) -> Any:
        """A tracker for one engine request of prompt_len tokens and n choices (a no-op one when
        metrics are off). hidden_output: the generated tokens are not returned (echo, max_tokens 0)."""
        if not self.enabled:
            return _NULL_TRACKER
        return RequestTracker(self, prompt_len, n, arrival_time, hidden_output)

    def judge_slo(self, ttft: float | None, tpot: float | None, finished: bool) -> None:
        """Goodput: a choice is good when it finished (stop or length) within every configured target."""
        if self.slo_requests is None:
            return
        self.slo_requests.inc()
        good = finished and ttft is not None
        good = good and (self._slo_ttft is None or ttft <= self._slo_ttft)
        good = good and (self._slo_tpot is None or (tpot is not None and tpot <= self._slo_tpot))
        if good:
            self.slo_good.inc()

    def charge(self, busy_seconds: float, tokens: int) -> None:
        """An engine request's share of step time, and its cost with --cost-per-hour."""
        self.busy.inc(busy_seconds)
        if self.request_cost is not None:
            cost = busy_seconds * self._cost_per_second
            self.request_cost.observe(cost)
            self._cost_total += cost
            self._costed_tokens += tokens

    async def render(self, names: list[str] | None = None) -> bytes:
        """The text exposition, after fresh engine stats (refresh). names: only these series (sample names,
        e.g. vllm:num_requests_waiting), as prometheus_client's `name[]` query filter; None or [] for all."""
        await self.refresh()
        return generate_latest(self.registry.restricted_registry(names) if names else self.registry)

    async def refresh(self) -> None:
        """Ask the engine for fresh stats (queue gauges move on adds and aborts, not only at steps); an
        engine that does not answer in time leaves the last ones."""
        refresh = getattr(self._engine, "refresh_stats", None)
        if refresh is not None:
            await refresh()


class RequestTracker:
    """One engine request: prompt tokens at admission (its first output, or its end if none came),
    output tokens as they are returned, and at its end one observation per choice in each histogram."""

    def __init__(self, m: ServerMetrics, prompt_len: int, n: int, arrival_time: float, hidden_output: bool):
        self._m = m
        self._prompt_len = prompt_len
        self._n = n
        self._arrival = arrival_time
        self._hidden = hidden_output
        self._admitted = False
        self._tokens = 0

    def _admit(self) -> None:
        if not self._admitted:
            self._admitted = True
            self._m.prompt_tokens.inc(self._prompt_len * self._n)

    def observe(self, out: RequestOutput) -> None:
        """Each snapshot of the request (cumulative)."""
        self._admit()
        if self._hidden:
            return
        tokens = sum(len(o.token_ids) for o in out.outputs)
        if tokens > self._tokens:
            self._m.generation_tokens.inc(tokens - self._tokens)
            self._tokens = tokens

    def end(self, last: RequestOutput | None) -> None:
        """The request is over (finished, aborted or failed); last is its last output, if any came."""
        self._admit()
        ended_at = time.monotonic()  # only for a choice the engine did not finish (aborted, failed)
        if last is None:  # aborted or failed before any output: n empty, unfinished choices
            last = RequestOutput("", [], [CompletionOutput(i, "", []) for i in range(self._n)])
        else:
            self.observe(last)  # the core client extends a snapshot in place: it may have grown since
        timestamps = last.metrics or {}
        for o in last.outputs:
            self._observe_choice(o, timestamps, ended_at)
        self._m.charge(timestamps.get("busy_seconds") or 0.0, self._prompt_len * self._n + self._tokens)

    def _observe_choice(self, o: CompletionOutput, timestamps: dict, ended_at: float) -> None:
        m = self._m
        arrival = timestamps.get("arrival_time") or self._arrival
        scheduled = timestamps.get("first_scheduled_time")
        times = o.token_times
        # A choice that ran its course ends with its last token; an aborted one when it was aborted.
        completed = o.finish_reason in ("stop", "length") and times
        end = times[-1] if completed else (timestamps.get("finished_time") or ended_at)
        m.e2e.observe(end - arrival)
        m.success.labels(m.model_name, o.finish_reason or "abort").inc()
        m.request_prompt_tokens.observe(self._prompt_len)
        m.request_generation_tokens.observe(0 if self._hidden else len(o.token_ids))
        if scheduled is not None:
            m.queue.observe(scheduled - arrival)
        ttft = tpot = None
        if times:
            ttft, decode = times[0] - arrival, times[-1] - times[0]
            tpot = decode / (len(times) - 1) if len(times) > 1 else 0.0
            m.ttft.observe(ttft)
            m.decode.observe(decode)
            m.tpot.observe(tpot)
            if scheduled is not None:
                m.prefill.observe(times[0] - scheduled)
            for earlier, later in itertools.pairwise(times):
                m.itl.observe(later - earlier)
        m.judge_slo(ttft, tpot, o.finish_reason in ("stop", "length"))
        m.recent.on_choice(ttft, tpot, o.finish_reason in ("stop", "length"))


class _NullTracker:
    """What track() returns with --disable-log-stats: observes nothing."""

    def observe(self, out: RequestOutput) -> None:
        pass

    def end(self, last: RequestOutput | None) -> None:
        pass


_NULL_TRACKER = _NullTracker()
