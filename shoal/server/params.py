"""From an OpenAI request to the engine's SamplingParams, with the checks that need the model.

Everything the request alone can check is in protocol.py; what needs the tokenizer, the model's
generation_config or max_model_len is here, so that a bad request is a 400 before it reaches the engine.
"""

from __future__ import annotations

from shoal.engine.sampling_params import SamplingParams
from shoal.server.errors import APIError
from shoal.server.protocol import CommonRequest

# Request fields copied to SamplingParams under the same name when the client set them.
_SAME_NAME = (
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "seed",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
    "stop_token_ids",
    "include_stop_str_in_output",
    "min_tokens",
    "ignore_eos",
    "skip_special_tokens",
    "spaces_between_special_tokens",
)


def build_sampling_params(
    request: CommonRequest,
    *,
    max_tokens: int | None,
    logprobs: int | None,
    prompt_logprobs: int | None,
    generation_config: dict,
    vocab_size: int,
    param_names: dict[str, str] | None = None,
) -> SamplingParams:
    """SamplingParams for the request, completed from generation_config and validated (400 on error).

    param_names maps SamplingParams fields to the request's names where they differ (chat's
    max_completion_tokens and top_logprobs), so that errors name what the client sent."""
    kwargs = {name: getattr(request, name) for name in _SAME_NAME if getattr(request, name) is not None}
    if request.stop is not None:
        kwargs["stop"] = [request.stop] if isinstance(request.stop, str) else list(request.stop)
    params = SamplingParams(
        n=request.n,
        logit_bias=request.logit_bias_ids(),
        max_tokens=max_tokens,
        logprobs=logprobs,
        prompt_logprobs=prompt_logprobs,
        **kwargs,
    )
    params = params.with_defaults(generation_config or {}, request.explicitly_set())
    try:
        params.validate(vocab_size)
    except ValueError as e:
        param = _param_of_message(str(e), params)
        raise APIError(str(e), param=(param_names or {}).get(param, param)) from e
    return params


def _param_of_message(message: str, params: SamplingParams) -> str | None:
    """SamplingParams.validate names the field first ("top_p must be ..."): recover it for `param`."""
    first = message.split(" ", 1)[0]
    if first in SamplingParams.field_names():
        return first
    if message.startswith("token id"):
        bad = message.split()[2]
        return "stop_token_ids" if bad in {str(t) for t in params.stop_token_ids} else "logit_bias"
    return None


def check_max_tokens(max_tokens: int | None, *, echo: bool, param: str) -> None:
    """max_tokens must be positive; 0 is allowed with echo (score the prompt, generate nothing)."""
    if max_tokens is None:
        return
    if max_tokens < 0 or (max_tokens == 0 and not echo):
        allowed = "at least 1 (0 only with echo)" if param == "max_tokens" else "at least 1"
        raise APIError(f"{param} must be {allowed}, got {max_tokens}", param=param)


def check_context_length(
    prompt_len: int, max_tokens: int, max_model_len: int, param: str = "max_tokens"
) -> None:
    """The prompt plus the tokens asked for must fit the context window (OpenAI's wording, both numbers)."""
    if prompt_len > max_model_len:
        raise APIError(
            f"This model's maximum context length is {max_model_len} tokens. However, your prompt has "
            f"{prompt_len} tokens. Please reduce the length of the prompt.",
            param="messages" if param == "max_completion_tokens" else "prompt",
            code="context_length_exceeded",
        )
    if prompt_len + max_tokens > max_model_len:
        raise APIError(
            f"This model's maximum context length is {max_model_len} tokens. However, you requested "
            f"{prompt_len + max_tokens} tokens ({prompt_len} in the prompt, {max_tokens} in the completion). "
            f"Please reduce the length of the prompt or of {param}.",
            param=param,
            code="context_length_exceeded",
        )


def check_token_ids(token_ids: list[int], vocab_size: int, param: str) -> None:
    bad = next((t for t in token_ids if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise APIError(
            f"token id {bad} in {param} is outside the vocabulary (size {vocab_size})", param=param
        )


def truncate_prompt(token_ids: list[int], keep: int | None, max_model_len: int) -> list[int]:
    """vLLM's truncate_prompt_tokens: keep the last `keep` tokens (-1: max_model_len; None: all)."""
    if keep is None:
        return token_ids
    if keep == -1:
        keep = max_model_len
    if keep > max_model_len:
        raise APIError(
            f"truncate_prompt_tokens ({keep}) is greater than max_model_len ({max_model_len}); "
            "request a smaller truncation size",
            param="truncate_prompt_tokens",
        )
    return token_ids[-keep:]
