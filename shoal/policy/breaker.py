"""A circuit breaker in front of the engine (Nygard, "Release It!", 2007; Fowler, "CircuitBreaker", 2014,
https://martinfowler.com/bliki/CircuitBreaker.html).

- **closed**: requests pass; it opens when `failure_threshold` requests in a row fail in the engine (a
  failed step fails its requests), when at least `timeout_ratio` of the last `window` requests timed out,
  or when the engine reports itself unhealthy (liveness: dead, broken or hung).
- **open**: requests fail fast with 503 and `Retry-After` instead of queueing behind a failing engine;
  after `open_seconds` it goes half-open.
- **half-open**: up to `half_open_probes` requests pass as probes; `half_open_probes` successes close it,
  one failure opens it again.

The state is exported as the gauge `shoal:circuit_breaker_state` (0 closed, 1 open, 2 half-open).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from enum import IntEnum

from pydantic import BaseModel, ConfigDict, Field


class BreakerPolicy(BaseModel):
    """The `breaker` section of the policy file."""

    model_config = ConfigDict(extra="forbid")
    failure_threshold: int = Field(5, ge=1, description="Engine failures in a row that open it.")
    timeout_ratio: float = Field(0.5, gt=0, le=1, description="Share of timed-out requests that opens it.")
    window: int = Field(20, ge=1, description="Recent requests the timeout ratio is taken over.")
    min_requests: int = Field(10, ge=1, description="Requests in the window before the ratio counts.")
    open_seconds: float = Field(10.0, gt=0, description="How long it stays open before probing.")
    half_open_probes: int = Field(1, ge=1, description="Probes let through; this many successes close it.")


class State(IntEnum):
    CLOSED = 0
    OPEN = 1
    HALF_OPEN = 2


class CircuitBreaker:
    """The state machine; `unhealthy` says why the engine is unhealthy, or None (polled on each check)."""

    def __init__(
        self,
        policy: BreakerPolicy,
        unhealthy: Callable[[], str | None] = lambda: None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.policy = policy
        self.unhealthy = unhealthy
        self.clock = clock
        self.state = State.CLOSED
        self.reason: str | None = None
        self.opened_at = 0.0
        self.failures = 0
        self.recent: deque[bool] = deque(maxlen=policy.window)  # True: timed out
        self.probes = 0
        self.probe_successes = 0

    def allow(self) -> float | None:
        """None if a request may pass; otherwise the seconds until the breaker will probe again."""
        problem = self.unhealthy()
        if problem is not None and self.state != State.OPEN:
            self._open(f"the engine is unhealthy: {problem}")
        if self.state == State.OPEN:
            left = self.opened_at + self.policy.open_seconds - self.clock()
            if left > 0 or problem is not None:
                return max(left, 1.0)
            self.state, self.probes, self.probe_successes = State.HALF_OPEN, 0, 0
        if self.state == State.HALF_OPEN:
            if self.probes >= self.policy.half_open_probes:
                return 1.0  # the probes are under way
            self.probes += 1
        return None

    def succeeded(self, timed_out: bool = False) -> None:
        """A request passed through the engine (timed_out: it was ended at its deadline)."""
        self.failures = 0
        self.recent.append(timed_out)
        if self.state == State.HALF_OPEN:
            if timed_out:
                self._open("a probe timed out")
                return
            self.probe_successes += 1
            if self.probe_successes >= self.policy.half_open_probes:
                self.state, self.reason = State.CLOSED, None
                self.recent.clear()
            return
        timeouts = sum(self.recent)
        if (
            len(self.recent) >= self.policy.min_requests
            and timeouts / len(self.recent) >= self.policy.timeout_ratio
        ):
            self._open(f"{timeouts} of the last {len(self.recent)} requests timed out")

    def abstain(self) -> None:
        """A request that was let through never reached the engine (invalid, shed): no verdict, but a
        probe's place is given back."""
        if self.state == State.HALF_OPEN and self.probes > 0:
            self.probes -= 1

    def failed(self) -> None:
        """A request failed in the engine (a failed step, a dead engine)."""
        self.failures += 1
        if self.state == State.HALF_OPEN:
            self._open("a probe failed")
        elif self.state == State.CLOSED and self.failures >= self.policy.failure_threshold:
            self._open(f"{self.failures} requests in a row failed in the engine")

    def _open(self, reason: str) -> None:
        self.state, self.reason, self.opened_at = State.OPEN, reason, self.clock()
        self.failures = 0
        self.recent.clear()
