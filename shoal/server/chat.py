"""POST /v1/chat/completions: messages rendered with the model's chat template, then generated.

The prompt is `tokenizer.apply_chat_template(messages, add_generation_prompt=True)` encoded without
special tokens (the template writes them). Without max_tokens a reply may use the rest of the context
window, as in vLLM.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import Response

from shoal.engine.outputs import CompletionOutput, RequestOutput
from shoal.model.tokenizer import ChatTemplateError
from shoal.server.errors import APIError, generation_responses
from shoal.server.generation import (
    EngineJob,
    Stream,
    StreamChunks,
    merge,
    run_jobs,
    sse,
    stream_error_event,
)
from shoal.server.logprobs import chat_logprobs
from shoal.server.offload import messages_size, prepare
from shoal.server.params import (
    build_sampling_params,
    check_context_length,
    check_max_tokens,
    truncate_prompt,
)
from shoal.server.protocol import (
    ChatChoice,
    ChatChoiceLogprobs,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatMessageOut,
    TokenizeRequest,
    Usage,
)
from shoal.server.state import ServerState, get_state
from shoal.server.traffic import apply_caps, capped_default

router = APIRouter()
logger = logging.getLogger("shoal.server")


def render_chat(state: ServerState, body: ChatCompletionRequest | TokenizeRequest) -> list[int]:
    """Token ids of the chat prompt, rendered with the request's template options (vLLM's
    add_generation_prompt, continue_final_message, chat_template_kwargs, add_special_tokens: false by
    default, since the template writes them). A model without a chat template, or a template that fails
    on these messages, is a 400."""
    tokenizer = state.engine.tokenizer
    try:
        text = tokenizer.apply_chat_template(
            [m.template_dict() for m in body.messages],
            add_generation_prompt=body.add_generation_prompt,
            continue_final_message=body.continue_final_message,
            **(body.chat_template_kwargs or {}),
        )
    except ChatTemplateError as e:
        code = None if tokenizer.has_chat_template else "chat_template_missing"
        raise APIError(str(e), param="messages", code=code) from e
    except Exception as e:  # noqa: BLE001 - a template that breaks on these messages is the request's problem
        raise APIError(f"chat template failed: {type(e).__name__}: {e}", param="messages") from e
    return tokenizer.encode(text, add_special_tokens=bool(body.add_special_tokens))


def _excludes_last_token(o: CompletionOutput, body: ChatCompletionRequest) -> bool:
    """Whether the output's last token is the stop token that ended it and is not in its text (EOS or
    a stop_token_id, without include_stop_str_in_output): its logprob entry is left out too, so that
    the entries spell the message, as OpenAI's do."""
    stopped_by_token = o.finish_reason == "stop" and not isinstance(o.stop_reason, str)
    return stopped_by_token and not body.include_stop_str_in_output


def _logprobs(
    state: ServerState, body: ChatCompletionRequest, o: CompletionOutput, first: int, last: int
) -> ChatChoiceLogprobs | None:
    if not body.logprobs:
        return None
    if o.finished and _excludes_last_token(o, body):
        last = min(last, len(o.token_ids) - 1)
    texts = state.texts.for_request(bool(body.return_tokens_as_token_ids))
    entries = (o.logprobs or [])[first:last]
    content = chat_logprobs(texts, o.token_ids[first:last], entries, body.top_logprobs or 0)
    return ChatChoiceLogprobs(content=content)


@router.post(
    "/v1/chat/completions",
    response_model=None,
    responses=generation_responses(ChatCompletionResponse),
)
async def create_chat_completion(body: ChatCompletionRequest, request: Request) -> Response:
    """OpenAI's chat completions (text only: no tools, no structured output), with vLLM's sampling extras."""
    state = get_state(request)
    state.check_model(body.model)
    state.check_ready()
    param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    check_max_tokens(body.requested_max_tokens, echo=False, param=param)
    apply_caps(state.caps, body)
    prompt_ids = await prepare(render_chat, state, body, size=messages_size(body.messages))
    prompt_ids = truncate_prompt(prompt_ids, body.truncate_prompt_tokens, state.max_model_len)
    max_tokens = body.requested_max_tokens
    if max_tokens is None:
        max_tokens = capped_default(state.caps, max(state.max_model_len - len(prompt_ids), 1))
    params = build_sampling_params(
        body,
        max_tokens=max_tokens,
        logprobs=(body.top_logprobs or 0) if body.logprobs else None,
        prompt_logprobs=None,
        generation_config=state.engine.generation_config,
        vocab_size=state.vocab_size,
        param_names={"max_tokens": param, "logprobs": "top_logprobs"},
    )
    check_context_length(len(prompt_ids), max_tokens, state.max_model_len, param)
    request_id = f"chatcmpl-{uuid.uuid4().hex}"
    logger.debug("%s: %d prompt tokens x n=%d, user=%s", request_id, len(prompt_ids), body.n, body.user)
    jobs = [EngineJob(request_id, prompt_ids, params, body.priority, body.cache_salt)]
    created = int(time.time())
    events = (
        (lambda streams: _stream(body, state, request_id, created, prompt_ids, streams))
        if body.stream
        else None
    )
    finals = await run_jobs(request, state.engine, state.metrics, jobs, events)
    if isinstance(finals, Response):
        return finals
    out = finals[0]
    choices = [
        ChatChoice(
            index=o.index,
            message=ChatMessageOut(content=o.text),
            logprobs=_logprobs(state, body, o, 0, len(o.token_ids)),
            finish_reason=o.finish_reason,
            stop_reason=o.stop_reason,
        )
        for o in out.outputs
    ]
    response = ChatCompletionResponse(
        id=request_id, created=created, model=state.model_name, choices=choices, usage=_usage(out)
    )
    return Response(response.model_dump_json(), media_type="application/json")


def _usage(out: RequestOutput) -> Usage:
    prompt = len(out.prompt_token_ids)
    completion = sum(len(o.token_ids) for o in out.outputs)
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


def _choice(index: int, delta: dict, logprobs=None, finish_reason=None, stop_reason=None) -> dict:
    return {
        "index": index,
        "delta": delta,
        "logprobs": logprobs.model_dump() if logprobs is not None else None,
        "finish_reason": finish_reason,
        "stop_reason": stop_reason,
    }


async def _stream(
    body: ChatCompletionRequest,
    state: ServerState,
    request_id: str,
    created: int,
    prompt_ids: list[int],
    streams: list[Stream],
) -> AsyncIterator[bytes]:
    """A role chunk per choice, content deltas as the text grows, then a chunk with the finish_reason."""
    sent_text = [0] * body.n
    sent_tokens = [0] * body.n
    finished = [False] * body.n
    chunk = StreamChunks(
        request_id,
        "chat.completion.chunk",
        created,
        state.model_name,
        body.include_usage,
        body.continuous_usage,
    )
    usage = Usage(prompt_tokens=len(prompt_ids), completion_tokens=0, total_tokens=len(prompt_ids))
    continuous = body.continuous_usage  # a property: read once, not per token
    last: RequestOutput | None = None
    try:
        for i in range(body.n):
            yield chunk([_choice(i, {"role": "assistant", "content": ""})], usage)
        async for _, out in merge(streams):
            last = out
            if continuous:  # otherwise only the final chunk carries it: built once, after the loop
                usage = _usage(out)
            for o in out.outputs:
                i = o.index
                if finished[i]:
                    continue
                delta = o.text[sent_text[i] :]
                if delta or (o.finished and len(o.token_ids) > sent_tokens[i]):
                    logprobs = _logprobs(state, body, o, sent_tokens[i], len(o.token_ids))
                    sent_text[i], sent_tokens[i] = len(o.text), len(o.token_ids)
                    yield chunk([_choice(i, {"content": delta}, logprobs)], usage)
                if o.finished:
                    finished[i] = True
                    yield chunk([_choice(i, {}, None, o.finish_reason, o.stop_reason)], usage)
        if body.include_usage:
            yield chunk([], usage if last is None else _usage(last), final=True)
    except Exception as e:  # noqa: BLE001 - the 200 is sent: report in-band
        yield stream_error_event(e)
    yield sse("[DONE]")
