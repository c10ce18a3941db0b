"""Canary rollout with automatic promotion and rollback, judged the way Argo Rollouts' analysis and
Netflix/Google's Kayenta judge a canary: against the stable version over the same interval, not against a
fixed threshold, and only once enough canary requests have been seen.

At each step (e.g. 5 -> 25 -> 50 -> 100 percent) the controller, ticked every second:
- rolls back (all traffic to stable) as soon as the canary, over at least `min_requests` requests, has an
  error rate more than `max_error_rate_increase` above stable's, or a P95 latency more than
  `max_p95_latency_ratio` times stable's;
- advances to the next step after `interval_s` without a failed gate (and at least `min_requests`);
- at 100 percent the canary is promoted. Every decision is logged and counted in
  `shoal:gateway_canary_steps_total{action}`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from shoal.gateway.config import Canary
from shoal.gateway.metrics import GatewayMetrics
from shoal.gateway.routing import WeightedSplit

logger = logging.getLogger("shoal.gateway")


@dataclass
class Window:
    """Outcomes of one version since the current step began."""

    requests: int = 0
    errors: int = 0
    latencies: list[float] = field(default_factory=list)

    def record(self, ok: bool, latency_s: float) -> None:
        self.requests += 1
        self.errors += 0 if ok else 1
        if ok:  # a failure's latency says nothing about serving speed
            self.latencies.append(latency_s)

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0

    def p95(self) -> float | None:
        if not self.latencies:
            return None
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))]


class CanaryController:
    def __init__(self, model: str, spec: Canary, split: WeightedSplit, metrics: GatewayMetrics):
        self.model, self.spec, self.split, self.metrics = model, spec, split, metrics
        self.step = 0
        self.state = "progressing"  # then promoted, rolled_back, or stopped (a manual switch)
        self.history: list[dict] = []
        self._new_step()
        self._log("start", f"{spec.canary} at {spec.steps[0]}%")

    def _new_step(self) -> None:
        self.stable_window, self.canary_window = Window(), Window()
        self.step_started = time.monotonic()

    def _log(self, action: str, detail: str) -> None:
        logger.warning("canary %s: %s (%s)", self.model, action, detail)
        self.history.append(
            {"time": time.time(), "action": action, "detail": detail, "weights": self.split.weights}
        )
        self.metrics.canary_steps.labels(self.model, action).inc()

    def record(self, version: str, ok: bool, latency_s: float) -> None:
        if self.state != "progressing":
            return
        if version == self.spec.canary:
            self.canary_window.record(ok, latency_s)
        elif version == self.spec.stable:
            self.stable_window.record(ok, latency_s)

    def failed_gate(self) -> str | None:
        """The first gate the canary fails, or None (also while too few requests have been seen)."""
        c, s = self.canary_window, self.stable_window
        if c.requests < self.spec.min_requests:
            return None
        increase = c.error_rate - s.error_rate
        self.metrics.canary_gate.labels(self.model, "error_rate_increase").set(increase)
        if increase > self.spec.max_error_rate_increase:
            return f"error rate {c.error_rate:.3f} vs stable {s.error_rate:.3f} over {c.requests} requests"
        cp, sp = c.p95(), s.p95()
        if cp is not None and sp:
            self.metrics.canary_gate.labels(self.model, "p95_latency_ratio").set(cp / sp)
            if cp / sp > self.spec.max_p95_latency_ratio:
                return f"P95 {cp * 1000:.1f} ms vs stable {sp * 1000:.1f} ms"
        return None

    def tick(self) -> None:
        if self.state != "progressing":
            return
        failure = self.failed_gate()
        if failure:
            self.split.set({self.spec.stable: 100, self.spec.canary: 0})
            self.state = "rolled_back"
            self._log("rollback", failure)
        elif (
            time.monotonic() - self.step_started >= self.spec.interval_s
            and self.canary_window.requests >= self.spec.min_requests
        ):
            self._advance()

    def _advance(self) -> None:
        self.step += 1
        weight = self.spec.steps[self.step]
        self.split.set({self.spec.stable: 100 - weight, self.spec.canary: weight})
        self._new_step()
        if weight == 100:
            self.state = "promoted"
            self._log("promote", f"{self.spec.canary} serves all traffic")
        else:
            self._log("step", f"{self.spec.canary} at {weight}%")

    def stop(self, reason: str) -> None:
        if self.state == "progressing":
            self.state = "stopped"
            self._log("stop", reason)

    def describe(self) -> dict:
        c, s = self.canary_window, self.stable_window
        return {
            "state": self.state,
            "step": self.step,
            "steps": self.spec.steps,
            "gates": {
                "min_requests": self.spec.min_requests,
                "max_error_rate_increase": self.spec.max_error_rate_increase,
                "max_p95_latency_ratio": self.spec.max_p95_latency_ratio,
            },
            "canary": {"requests": c.requests, "error_rate": c.error_rate, "p95_s": c.p95()},
            "stable": {"requests": s.requests, "error_rate": s.error_rate, "p95_s": s.p95()},
            "history": self.history,
        }
