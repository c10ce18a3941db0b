"""What the access log and the traces say about one finished HTTP request, derived once from its context.

Every number comes from the engine's timestamps and token lists in `ctx.outputs` (each engine request's
last RequestOutput, however it ended), so a streamed, aborted or timed-out request is described by what
was actually generated, not by what was asked for.
"""

from __future__ import annotations

from dataclasses import dataclass

from shoal.server.request_context import RequestContext


@dataclass(frozen=True)
class RequestSummary:
    """Token counts, times (seconds) and finish reasons of one HTTP request, over all its choices."""

    prompt_tokens: int
    completion_tokens: int
    ttft: float | None  # HTTP arrival -> first token of any choice (None when none was generated)
    queue: float | None  # HTTP arrival -> the start of its first engine step (None when never scheduled)
    latency: float | None  # HTTP arrival -> response fully sent
    finish_reasons: list[str | None]


def summarize(ctx: RequestContext) -> RequestSummary:
    """The summary of `ctx`, once its response has been sent (called by the end listeners)."""
    first_tokens = [t for out in ctx.outputs if (t := out.metrics.get("first_token_time")) is not None]
    scheduled = [t for out in ctx.outputs if (t := out.metrics.get("first_scheduled_time")) is not None]
    return RequestSummary(
        prompt_tokens=sum(len(out.prompt_token_ids) for out in ctx.outputs),
        # echo with max_tokens 0 generates one token it never returns: not a completion token
        completion_tokens=0
        if ctx.hidden_output
        else sum(len(c.token_ids) for out in ctx.outputs for c in out.outputs),
        ttft=min(first_tokens) - ctx.arrival_time if first_tokens else None,
        queue=min(scheduled) - ctx.arrival_time if scheduled else None,
        latency=ctx.latency,
        finish_reasons=[c.finish_reason for out in ctx.outputs for c in out.outputs],
    )
