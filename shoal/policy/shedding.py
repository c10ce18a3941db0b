"""Load shedding and graceful degradation: what to do with a new request when the queue is long.

Two signals, each with a threshold: the number of requests waiting for the engine
(`--max-waiting-requests` or `shedding.max_waiting_requests`) and an estimate of how long a new request
would wait (`shedding.max_queue_wait_s`). The estimate is the waiting requests, in batches of
`max_num_seqs`, times the recent mean request latency (Little's law, with the batch as the servers).

The lowest priority is shed first: a request whose priority value is above `shedding.protected_priority`
(a larger value is less urgent, as vLLM's `priority`) is shed at `low_priority_share` of either
threshold; every request is shed past the full threshold. With priority classes, the share is graded
between them: the least urgent class is shed at `low_priority_share`, classes between it and
`protected_priority` proportionally later. Shed requests get 503 with `Retry-After` (Google SRE book,
"Handling Overload": shed early, cheaply, and by criticality).

Degraded mode ("simplified responses"): past `degrade_at_share` of the thresholds (below the shedding
point), low-priority requests are not refused but get `max_tokens` capped at `degraded_max_tokens`, and
the response says so in the header `x-shoal-degraded: max_tokens=N`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

DEGRADED_HEADER = "x-shoal-degraded"


class SheddingPolicy(BaseModel):
    """The `shedding` section of the policy file."""

    model_config = ConfigDict(extra="forbid")
    max_waiting_requests: int | None = Field(None, ge=0, description="--max-waiting-requests wins.")
    max_queue_wait_s: float | None = Field(None, gt=0, description="Estimated queue wait that sheds.")
    protected_priority: int = Field(0, description="Priority values at or below this are high priority.")
    low_priority_share: float = Field(0.5, gt=0, le=1, description="Low priority is shed at this share.")
    degrade_at_share: float | None = Field(
        None, gt=0, le=1, description="Degraded mode for low priority past this share (off when null)."
    )
    degraded_max_tokens: int = Field(16, ge=1, description="max_tokens of low priority in degraded mode.")
    retry_after_s: int = Field(2, ge=1, description="Retry-After of a shed request.")

    @model_validator(mode="after")
    def _degrade_before_shed(self) -> SheddingPolicy:
        if self.degrade_at_share is not None and self.degrade_at_share >= self.low_priority_share:
            raise ValueError("degrade_at_share must be below low_priority_share (degrade before shedding)")
        return self


@dataclass(frozen=True)
class Load:
    waiting: int  # requests waiting for the engine, including this server's not yet seen by it
    est_wait_s: float  # estimated queue wait of a new request


Verdict = Literal["admit", "degrade", "shed"]


def shed_share(policy: SheddingPolicy, priority: int, least_urgent: int | None = None) -> float:
    """The share of the thresholds at which a request of this priority is shed: 1 for high priority,
    `low_priority_share` for the least urgent class (or for every low priority without classes), and
    in between, in proportion, for the classes between."""
    protected = policy.protected_priority
    if priority <= protected:
        return 1.0
    if least_urgent is None or least_urgent <= protected or priority >= least_urgent:
        return policy.low_priority_share
    urgency = (least_urgent - priority) / (least_urgent - protected)  # 1 at protected, 0 at least urgent
    return policy.low_priority_share + (1.0 - policy.low_priority_share) * urgency


def verdict(
    policy: SheddingPolicy,
    max_waiting: int | None,
    load: Load,
    priority: int,
    least_urgent: int | None = None,
) -> tuple[Verdict, str]:
    """What to do with a request of this priority at this load, and why (for the error message).
    least_urgent: the largest priority value of the policy's classes, if any."""
    low = priority > policy.protected_priority
    share = shed_share(policy, priority, least_urgent)
    over = _over(max_waiting, policy.max_queue_wait_s, load, share)
    if over is not None:
        return "shed", over
    if low and policy.degrade_at_share is not None:
        if _over(max_waiting, policy.max_queue_wait_s, load, policy.degrade_at_share) is not None:
            return "degrade", ""
    return "admit", ""


def _over(max_waiting: int | None, max_wait_s: float | None, load: Load, share: float) -> str | None:
    if max_waiting is not None and load.waiting >= max_waiting * share:
        return f"{load.waiting} requests are waiting (limit {max_waiting * share:g} at this priority)"
    if max_wait_s is not None and load.est_wait_s > max_wait_s * share:
        return f"the estimated queue wait is {load.est_wait_s:.1f} s (limit {max_wait_s * share:g} s)"
    return None
