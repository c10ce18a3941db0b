"""What the engine hands back after each step: a snapshot per sequence, grouped per request."""

from __future__ import annotations

from dataclasses import dataclass, field

# One position's logprobs: token id -> logprob; the sampled/actual token is always a key.
TokenLogprobs = dict[int, float]


@dataclass
class CompletionOutput:
    """One of the n choices of a request, as far as it has got."""

    index: int
    text: str  # text safe to show (held back while a stop string may still be forming)
    token_ids: list[int]
    logprobs: list[TokenLogprobs] | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it
    token_times: list[float] = field(default_factory=list)  # time.monotonic() of each token's sampling

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    prompt_logprobs: list[TokenLogprobs | None] | None = None  # first entry None, as vLLM
    num_cached_tokens: int = 0
    finished: bool = False
    # Engine timestamps, time.monotonic() seconds (None until reached): arrival_time (the HTTP request's
    # arrival when the server passes it), first_scheduled_time, first_token_time, finished_time; and
    # busy_seconds, the request's share of engine step time. See request_metrics().
    metrics: dict = field(default_factory=dict)


METRIC_KEYS = ("arrival_time", "first_scheduled_time", "first_token_time", "finished_time", "busy_seconds")
