"""Whether an engine front's engine is alive: the bookkeeping behind liveness (`/health`).

Both fronts (the thread engine and the core-process client) feed it the same events: a step went
through, a step failed, work arrived. From them it answers the one question a liveness probe asks:
is this engine broken in a way only a restart fixes?

- **Broken**: `max_consecutive_step_failures` steps in a row raised. One failed step only fails its own
  requests (the engine goes on); a run of them means the engine cannot make progress.
- **Hung**: work is pending and no step has finished (or failed) for `hang_timeout_s` seconds: a stuck
  kernel or device. vLLM's `/health` stays 200 in that state (vllm-project/vllm#36960); ours fails.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

DEFAULT_HANG_TIMEOUT_S = 120.0
DEFAULT_MAX_CONSECUTIVE_STEP_FAILURES = 5


@dataclass
class HealthPolicy:
    """hang_timeout_s: seconds without a finished step while work is pending (None: never hung).
    max_consecutive_step_failures: failed steps in a row after which the engine is broken (>= 1)."""

    hang_timeout_s: float | None = DEFAULT_HANG_TIMEOUT_S
    max_consecutive_step_failures: int = DEFAULT_MAX_CONSECUTIVE_STEP_FAILURES

    def __post_init__(self) -> None:
        if self.hang_timeout_s is not None and self.hang_timeout_s <= 0:
            raise ValueError(f"engine hang timeout must be positive, got {self.hang_timeout_s}")
        if self.max_consecutive_step_failures < 1:
            raise ValueError(
                f"max consecutive step failures must be at least 1, got {self.max_consecutive_step_failures}"
            )


class EngineHealth:
    """Step outcomes and progress times of one engine (monotonic clock). Not thread-safe by design: each
    front updates it from one thread, and the probe only reads two numbers."""

    def __init__(self, policy: HealthPolicy | None = None):
        self.policy = policy or HealthPolicy()
        self.consecutive_failures = 0
        self.last_progress = time.monotonic()

    def step_succeeded(self) -> None:
        self.consecutive_failures = 0
        self.last_progress = time.monotonic()

    def step_failed(self) -> bool:
        """Record a failed step; True once the engine counts as broken."""
        self.consecutive_failures += 1
        self.last_progress = time.monotonic()
        return self.broken

    def work_arrived(self, was_idle: bool) -> None:
        """An idle engine that gets work starts its hang clock now, not at its last step long ago."""
        if was_idle:
            self.last_progress = time.monotonic()

    @property
    def broken(self) -> bool:
        return self.consecutive_failures >= self.policy.max_consecutive_step_failures

    def problem(self, error: BaseException | None, serving: bool, pending: bool) -> str | None:
        """Why liveness should fail, or None. error: what killed the engine (None while alive);
        serving: loaded and started (a load is not a hang); pending: requests are waiting on it."""
        if error is not None:
            return f"engine failed: {error}"
        stalled = self.hung_for(pending) if serving else None
        if stalled is not None:
            return f"no engine step has finished for {stalled:.0f} s with requests pending (hung)"
        return None

    def hung_for(self, pending: bool) -> float | None:
        """Seconds without progress while work is pending, once past the hang timeout; else None."""
        timeout = self.policy.hang_timeout_s
        if not pending or timeout is None:
            return None
        stalled = time.monotonic() - self.last_progress
        return stalled if stalled > timeout else None
