"""The gateway's Prometheus metrics (`shoal:gateway_*`), in a registry of its own so that two gateways in
one process (tests, benchmarks) never share series."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class GatewayMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter(
            "shoal:gateway_requests",
            "Requests proxied.",
            ["model", "version", "backend", "status"],
            registry=r,
        )
        self.retries = Counter(
            "shoal:gateway_retries", "Requests retried on another backend.", ["model"], registry=r
        )
        self.latency = Histogram(
            "shoal:gateway_request_duration_seconds",
            "Time to the backend's response headers.",
            ["model", "version"],
            registry=r,
        )
        self.backend_up = Gauge(
            "shoal:gateway_backend_up", "1 when /ready answers 200 in time.", ["backend"], registry=r
        )
        self.backend_waiting = Gauge(
            "shoal:gateway_backend_requests_waiting",
            "Scraped vllm:num_requests_waiting.",
            ["backend"],
            registry=r,
        )
        self.backend_kv = Gauge(
            "shoal:gateway_backend_kv_cache_usage_perc",
            "Scraped vllm:kv_cache_usage_perc.",
            ["backend"],
            registry=r,
        )
        self.backend_saturated = Gauge(
            "shoal:gateway_backend_saturated", "1 past the saturation thresholds.", ["backend"], registry=r
        )
        self.weight = Gauge(
            "shoal:gateway_version_weight", "Traffic share (percent).", ["model", "version"], registry=r
        )
        self.canary_steps = Counter(
            "shoal:gateway_canary_steps", "Canary decisions.", ["model", "action"], registry=r
        )
        self.canary_gate = Gauge(
            "shoal:gateway_canary_gate_value",
            "The canary gates' last measured values.",
            ["model", "gate"],
            registry=r,
        )
        self.shadow_requests = Counter(
            "shoal:gateway_shadow_requests", "Shadow requests by outcome.", ["model", "outcome"], registry=r
        )
        self.shadow_exact = Counter(
            "shoal:gateway_shadow_exact_matches",
            "Shadow answers equal to the primary's.",
            ["model"],
            registry=r,
        )
        self.shadow_agreement = Histogram(
            "shoal:gateway_shadow_token_agreement",
            "Share of positions where shadow and primary words agree.",
            ["model"],
            buckets=(0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0),
            registry=r,
        )
        self.shadow_length_diff = Histogram(
            "shoal:gateway_shadow_length_diff_chars",
            "Shadow answer length minus the primary's (characters).",
            ["model"],
            buckets=(-256, -64, -16, -4, 0, 4, 16, 64, 256),
            registry=r,
        )
        self.shadow_latency_diff = Histogram(
            "shoal:gateway_shadow_latency_diff_seconds",
            "Shadow latency minus the primary's.",
            ["model"],
            buckets=(-1, -0.1, -0.01, 0, 0.01, 0.1, 1, 10),
            registry=r,
        )
