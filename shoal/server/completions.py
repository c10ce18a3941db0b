"""POST /v1/completions: prompts (text or token ids, one or a batch) to text, streamed or not.

The batch form with `echo`, `logprobs` and `max_tokens: 0|1` is how lm-evaluation-harness scores text
through `local-completions`, so the prompt-logprobs path here is a first-class citizen: the answer holds,
in one list, the prompt's tokens (the first with a null logprob) followed by the generated ones.

The engine always generates at least one token, so `max_tokens: 0` (allowed only with echo) runs with
max_tokens=1 and the generated token is dropped from the answer and from usage.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

from fastapi import APIRouter, Request
from fastapi.responses import Response

from shoal.engine.outputs import CompletionOutput, RequestOutput
from shoal.server.errors import APIError, generation_responses
from shoal.server.generation import (
    EngineJob,
    StreamChunks,
    merge,
    run_jobs,
    sse,
    stream_error_event,
)
from shoal.server.logprobs import completion_logprobs, prompt_logprobs_extra
from shoal.server.offload import prepare, prompt_size
from shoal.server.params import (
    build_sampling_params,
    check_context_length,
    check_max_tokens,
    check_token_ids,
    truncate_prompt,
)
from shoal.server.protocol import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    Usage,
)
from shoal.server.state import ServerState, get_state
from shoal.server.traffic import apply_caps, capped_default

router = APIRouter()
logger = logging.getLogger("shoal.server")
# Prompts x n per request: bounds the work and memory one request can ask of the engine.
MAX_CHOICES = 4096


@dataclass
class _Prompt:
    ids: list[int]
    text: str | None  # the prompt as given, when it was text


def _prompts(body: CompletionRequest, state: ServerState) -> list[_Prompt]:
    """Tokenize the prompt field (string, strings, token ids, lists of token ids) into engine prompts."""
    p = body.prompt
    tokenizer = state.engine.tokenizer
    if isinstance(p, str):
        raw: list = [p]
    elif p and isinstance(p[0], int):
        raw = [p]
    else:
        raw = list(p)
    add_special = body.add_special_tokens is not False
    prompts = []
    for i, item in enumerate(raw):
        if isinstance(item, str):
            ids = tokenizer.encode(item, add_special_tokens=add_special)
            if not ids:
                raise APIError("prompt is empty after tokenization", param="prompt")
            prompt = _Prompt(ids, item)
        else:
            check_token_ids(item, state.vocab_size, "prompt" if len(raw) == 1 else f"prompt.{i}")
            prompt = _Prompt(list(item), None)
        kept = truncate_prompt(prompt.ids, body.truncate_prompt_tokens, state.max_model_len)
        prompts.append(prompt if len(kept) == len(prompt.ids) else _Prompt(kept, None))
    return prompts


class _ChoiceBuilder:
    """Text and logprobs of the choices of one prompt, in the /v1/completions shape."""

    def __init__(self, body: CompletionRequest, state: ServerState, prompt: _Prompt, drop_generated: bool):
        self.body = body
        self.state = state
        self.prompt = prompt
        self.drop_generated = drop_generated
        self.texts = state.texts.for_request(bool(body.return_tokens_as_token_ids))

    def prompt_text(self) -> str:
        if self.prompt.text is not None:
            return self.prompt.text
        return self.state.engine.tokenizer.decode(
            self.prompt.ids, skip_special_tokens=self.body.skip_special_tokens
        )

    def generated(self, o: CompletionOutput) -> tuple[str, list[int]]:
        return ("", []) if self.drop_generated else (o.text, o.token_ids)

    def prompt_logprobs(self, out: RequestOutput) -> tuple[CompletionLogprobs, int]:
        entries = out.prompt_logprobs or [None] * len(self.prompt.ids)
        return completion_logprobs(self.texts, self.prompt.ids, 0, entries[: len(self.prompt.ids)], 0)

    def token_logprobs(
        self, o: CompletionOutput, first: int, last: int, offset: int
    ) -> tuple[CompletionLogprobs, int]:
        _, ids = self.generated(o)
        entries = (o.logprobs or [])[first:last]
        return completion_logprobs(
            self.texts, self.prompt.ids + ids, len(self.prompt.ids) + first, entries, offset
        )

    def final_choice(self, index: int, out: RequestOutput, o: CompletionOutput) -> CompletionChoice:
        text, ids = self.generated(o)
        logprobs = None
        if self.body.logprobs is not None:
            logprobs, offset = self.prompt_logprobs(out) if self.body.echo else (CompletionLogprobs(), 0)
            generated, _ = self.token_logprobs(o, 0, len(ids), offset)
            _extend(logprobs, generated)
        if self.body.echo:
            text = self.prompt_text() + text
        extra = None
        if self.body.prompt_logprobs is not None and out.prompt_logprobs is not None:
            extra = prompt_logprobs_extra(self.texts, out.prompt_logprobs)
        return CompletionChoice(
            index=index,
            text=text,
            logprobs=logprobs,
            finish_reason=o.finish_reason,
            stop_reason=o.stop_reason,
            prompt_logprobs=extra,
        )


def _extend(into: CompletionLogprobs, more: CompletionLogprobs) -> None:
    into.tokens += more.tokens
    into.token_logprobs += more.token_logprobs
    into.top_logprobs += more.top_logprobs
    into.text_offset += more.text_offset


def _usage(prompts: list[_Prompt], builders: list[_ChoiceBuilder], finals: dict[int, RequestOutput]) -> Usage:
    prompt_tokens = sum(len(p.ids) for p in prompts)
    completion_tokens = sum(
        len(b.generated(o)[1]) for i, b in enumerate(builders) if i in finals for o in finals[i].outputs
    )
    return Usage(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        total_tokens=prompt_tokens + completion_tokens,
    )


@router.post(
    "/v1/completions",
    response_model=None,
    responses=generation_responses(CompletionResponse),
)
async def create_completion(body: CompletionRequest, request: Request) -> Response:
    """OpenAI's legacy completions, with vLLM's sampling extras."""
    state = get_state(request)
    state.check_model(body.model)
    state.check_ready()
    check_max_tokens(body.max_tokens, echo=body.echo, param="max_tokens")
    apply_caps(state.caps, body)
    explicit = body.max_tokens is not None and "max_tokens" in body.model_fields_set
    max_tokens = body.max_tokens if explicit else capped_default(state.caps, 16)
    prompt_logprobs = body.prompt_logprobs
    if body.echo and body.logprobs is not None:
        prompt_logprobs = max(prompt_logprobs or 0, body.logprobs)
    params = build_sampling_params(
        body,
        max_tokens=max(max_tokens, 1),
        logprobs=body.logprobs,
        prompt_logprobs=prompt_logprobs,
        generation_config=state.engine.generation_config,
        vocab_size=state.vocab_size,
    )
    prompts = await prepare(_prompts, body, state, size=prompt_size(body.prompt))
    if len(prompts) * body.n > MAX_CHOICES:
        raise APIError(
            f"{len(prompts)} prompts x n={body.n} is {len(prompts) * body.n} choices; at most {MAX_CHOICES} "
            "per request",
            param="prompt" if len(prompts) > 1 else "n",
        )
    for p in prompts:
        check_context_length(len(p.ids), params.max_tokens, state.max_model_len)
    request_id = f"cmpl-{uuid.uuid4().hex}"
    logger.debug("%s: %d prompt(s) x n=%d, user=%s", request_id, len(prompts), body.n, body.user)
    jobs = [
        EngineJob(
            f"{request_id}-{i}",
            p.ids,
            params,
            body.priority,
            body.cache_salt,
            hidden_output=max_tokens == 0,
        )
        for i, p in enumerate(prompts)
    ]
    builders = [_ChoiceBuilder(body, state, p, drop_generated=max_tokens == 0) for p in prompts]
    created = int(time.time())
    events = (
        (lambda streams: _stream(body, state, request_id, created, prompts, builders, streams))
        if body.stream
        else None
    )
    finals = await run_jobs(request, state.engine, state.metrics, jobs, events)
    if isinstance(finals, Response):
        return finals

    def render() -> str:
        """Token strings for a batch of echoed prompts take a while: built off the event loop."""
        choices = [
            builders[p].final_choice(p * body.n + o.index, out, o)
            for p, out in enumerate(finals)
            for o in out.outputs
        ]
        usage = _usage(prompts, builders, dict(enumerate(finals)))
        response = CompletionResponse(
            id=request_id, created=created, model=state.model_name, choices=choices, usage=usage
        )
        return response.model_dump_json()

    return Response(
        await prepare(render, size=_render_size(body, prompts, finals)), media_type="application/json"
    )


def _render_size(body: CompletionRequest, prompts: list[_Prompt], finals: list[RequestOutput]) -> int:
    """The work of rendering the response, for offload.prepare: token strings and top logprobs for each
    token when asked for (echo, logprobs, prompt_logprobs), else a few fields a choice."""
    if body.logprobs is None and body.prompt_logprobs is None and not body.echo:
        return len(finals)
    tokens = sum(len(p.ids) for p in prompts) + sum(len(o.token_ids) for f in finals for o in f.outputs)
    return tokens * (1 + max(body.logprobs or 0, body.prompt_logprobs or 0))


@dataclass
class _ChoiceProgress:
    text_len: int = 0
    num_tokens: int = 0
    offset: int = 0
    started: bool = False
    finished: bool = False


async def _stream(
    body: CompletionRequest,
    state: ServerState,
    request_id: str,
    created: int,
    prompts: list[_Prompt],
    builders: list[_ChoiceBuilder],
    streams: list,
) -> AsyncIterator[bytes]:
    """Server-sent events: a chunk per choice whenever its text grows, the last with its finish_reason."""
    progress: dict[int, _ChoiceProgress] = {}
    latest: dict[int, RequestOutput] = {}  # the newest snapshot of each prompt, for the usage so far
    chunk = StreamChunks(
        request_id, "text_completion", created, state.model_name, body.include_usage, body.continuous_usage
    )

    continuous = body.continuous_usage  # a property: read once, not per token
    try:
        async for p, out in merge(streams):
            latest[p] = out
            usage = _usage(prompts, builders, latest) if continuous else None
            builder = builders[p]
            for o in out.outputs:
                index = p * body.n + o.index
                st = progress.setdefault(index, _ChoiceProgress())
                if st.finished:
                    continue
                text, ids = builder.generated(o)
                delta = text[st.text_len :]
                if not delta and not o.finished and st.started:
                    continue
                logprobs = None
                if body.logprobs is not None:
                    logprobs = CompletionLogprobs()
                    if body.echo and not st.started:
                        logprobs, st.offset = builder.prompt_logprobs(out)
                    more, st.offset = builder.token_logprobs(o, st.num_tokens, len(ids), st.offset)
                    _extend(logprobs, more)
                if body.echo and not st.started:
                    delta = builder.prompt_text() + delta
                st.started = True
                st.text_len, st.num_tokens = len(text), len(ids)
                st.finished = o.finished
                choice = {
                    "index": index,
                    "text": delta,
                    "logprobs": logprobs.model_dump() if logprobs is not None else None,
                    "finish_reason": o.finish_reason,
                    "stop_reason": o.stop_reason,
                }
                yield chunk([choice], usage)
        if body.include_usage:
            yield chunk([], _usage(prompts, builders, latest), final=True)
    except Exception as e:  # noqa: BLE001 - the 200 is sent: report in-band
        yield stream_error_event(e)
    yield sse("[DONE]")
