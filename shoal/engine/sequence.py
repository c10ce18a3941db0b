"""One sequence (one of a request's n choices): its tokens, KV blocks and progress."""

from __future__ import annotations

import itertools
import time
from enum import Enum, auto

import torch

from shoal.engine.outputs import TokenLogprobs
from shoal.engine.sampling_params import SamplingParams

_ids = itertools.count()


class Status(Enum):
    WAITING = auto()
    RUNNING = auto()
    SWAPPED = auto()  # preempted with its KV blocks in the host pool (engine/swap_space.py)
    FINISHED = auto()


class Sequence:
    def __init__(
        self,
        request_id: str,
        index: int,
        prompt_token_ids: list[int],
        params: SamplingParams,
        arrival_time: float | None = None,
        priority: int = 0,
        cache_salt: str | None = None,
    ):
        self.seq_id = next(_ids)
        self.request_id = request_id
        self.index = index  # choice index within the request
        self.token_ids = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.params = params
        self.priority = (
            priority  # lower is served earlier (vLLM's request field; --scheduling-policy priority)
        )
        self.cache_salt = cache_salt  # mixed into the prefix-cache hash of the first block
        self.status = Status.WAITING
        self.block_table: list[int] = []
        self.num_computed = 0  # tokens whose K/V are in the cache
        self.num_cached_prompt_tokens = 0  # prompt tokens served from the prefix cache at admission
        self.generator: torch.Generator | None = None
        self.logprobs: list[TokenLogprobs] | None = [] if params.logprobs is not None else None
        self.prompt_logprobs: list[TokenLogprobs | None] | None = (
            [None] if params.prompt_logprobs is not None else None
        )
        self.captured_logits: list[torch.Tensor] | None = None  # teacher-forcing tests only
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self.detokenizer = None  # set by the engine
        # Timestamps (time.monotonic() seconds, comparable across processes of one host): the server's
        # metrics and traces are built from these, not from when a consumer happened to read an output.
        self.arrival_time = time.monotonic() if arrival_time is None else arrival_time
        self.first_scheduled_time: float | None = None
        self.first_token_time: float | None = None
        self.finished_time: float | None = None
        self.token_times: list[float] = []  # when each output token was sampled
        self.busy_seconds = 0.0  # this sequence's share of engine step time (by tokens computed)

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def num_uncomputed(self) -> int:
        return len(self.token_ids) - self.num_computed

    @property
    def in_prompt(self) -> bool:
        """Still computing prompt tokens (prompt logprobs are collected only then)."""
        return self.num_computed < self.num_prompt_tokens

    @property
    def finished(self) -> bool:
        return self.status == Status.FINISHED
