"""Server-side settings: what the HTTP layer needs that the engine does not know about."""

from __future__ import annotations

from dataclasses import dataclass

from shoal.policy.config import PolicyConfig

DEFAULT_MAX_REQUEST_BYTES = 8 * 1024 * 1024


@dataclass
class ServerSettings:
    """Knobs of the HTTP layer, kept apart from EngineConfig so that the engine knows nothing of HTTP."""

    served_model_name: str
    # When set, every /v1/* route requires `Authorization: Bearer <api_key>`.
    api_key: str | None = None
    # Request bodies above this size get 413 before they are parsed (protects memory and the event loop).
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    # POST /debug/faults makes engine steps fail or hang (shoal/engine/faults.py): tests and drills only.
    enable_fault_injection: bool = False
    # GET /debug/schedule: who ran in each recent step (the engine records it: EngineConfig.record_schedule).
    record_schedule: bool = False
    # --policy: keys, limits, priority classes, ... (shoal/policy); None: only the built-in input limits.
    policy: PolicyConfig | None = None
    # SIGTERM: running requests get this long to finish; the rest end with their partial output.
    drain_timeout_s: float = 30.0
    # Every request ends (partial output, finish_reason "abort") this long after it arrived; a request may
    # ask for less or more with the X-Request-Timeout header. None: no limit.
    request_timeout_s: float | None = None
    # Cost caps that win over the policy's `limits` (shoal/policy/caps.py): max_tokens per choice, and n.
    max_tokens_cap: int | None = None
    max_n: int | None = None
    # Load shedding (shoal/policy/shedding.py): requests waiting for the engine past which new ones get 503.
    max_waiting_requests: int | None = None
    # vLLM's --disable-log-stats: no per-request or per-step metric observation (the scrape-time gauges
    # stay). The one switch the overhead benchmark flips.
    disable_log_stats: bool = False
    # SLO targets (milliseconds) behind the goodput counters; None: not judged.
    slo_ttft_ms: float | None = None
    slo_tpot_ms: float | None = None
    # The instance's price in dollars per hour, behind the cost metrics; None: no cost metrics.
    cost_per_hour: float | None = None
    # OTLP/HTTP endpoint of a trace collector (vLLM's --otlp-traces-endpoint); None: tracing off.
    otlp_traces_endpoint: str | None = None
    # Put each request's prompt text in its access log line (off: prompts may hold personal data).
    log_prompts: bool = False
    # The operator console at /ui (shoal/server/console.py); --no-ui turns it off.
    ui: bool = True
    # --gateway-url: where the console reads the gateway's deployments (its /admin/* endpoints).
    gateway_url: str | None = None

    def __post_init__(self) -> None:
        if not self.served_model_name:
            raise ValueError("served_model_name must not be empty")
        if self.max_request_bytes < 1:
            raise ValueError(f"max_request_bytes must be positive, got {self.max_request_bytes}")
        if self.drain_timeout_s < 0:
            raise ValueError(f"drain timeout must be >= 0 seconds, got {self.drain_timeout_s}")
        if self.request_timeout_s is not None and self.request_timeout_s <= 0:
            raise ValueError(f"request timeout must be positive, got {self.request_timeout_s}")
        for name in ("max_tokens_cap", "max_n"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.max_n is not None and self.max_n > 128:
            raise ValueError(f"--max-n must be at most 128, got {self.max_n}")
        if self.max_waiting_requests is not None and self.max_waiting_requests < 0:
            raise ValueError(f"--max-waiting-requests must be >= 0, got {self.max_waiting_requests}")
        for name in ("slo_ttft_ms", "slo_tpot_ms", "cost_per_hour"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be positive, got {value}")
        if self.api_key == "":
            self.api_key = None
