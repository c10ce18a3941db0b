"""Request and response schemas of the OpenAI API (and the vLLM extras shoal honours).

Requests forbid unknown fields: a parameter shoal does not implement is a 400 naming it, never silently
ignored (a client asking for `tools` or `response_format` must learn it did not get them). Harmless
OpenAI client fields are accepted on purpose and documented on their field:
`user`, `metadata`, `store` (false only), `service_tier` ("auto"/"default"), `parallel_tool_calls`
(no effect without tools), `prompt_cache_key`, `safety_identifier`, `stream_options`. Parameters that
are unsupported except for their no-op value (`tools: []`, `tool_choice: "none"`,
`response_format: {"type": "text"}`, `modalities: ["text"]`, `suffix: ""`, `best_of == n`) are accepted
with that value only.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, field_validator, model_validator
from pydantic_core import PydanticCustomError

# ----------------------------------------------------------------------------------------------------
# Requests


def _unsupported(name: str, why: str = "") -> PydanticCustomError:
    return PydanticCustomError(
        "unsupported_parameter",
        "Unsupported parameter: '{param}' is not supported by this server{why}",
        {"param": name, "why": f" ({why})" if why else ""},
    )


def _check_unsupported(data: Any, rules: dict[str, tuple[Any, str]]) -> Any:
    """Drop parameters that carry their no-op value; reject them otherwise.

    rules: name -> (predicate accepting the no-op values, explanation)."""
    if not isinstance(data, dict):
        return data
    for name, (is_noop, why) in rules.items():
        if name in data:
            if not is_noop(data[name]):
                raise _unsupported(name, why)
            data = {k: v for k, v in data.items() if k != name}
    return data


_LONE_SURROGATE = (
    "invalid Unicode: the string holds a lone UTF-16 surrogate (\\ud800-\\udfff), which cannot be "
    "encoded as UTF-8"
)
_NUL = "the NUL character (U+0000) is not allowed"


def _text_problem(text: str) -> str | None:
    """Why a string cannot go on: JSON may escape a lone UTF-16 surrogate ("\\ud800"), which no UTF-8
    encoder accepts; a NUL is taken for the end of the string by C libraries, logs and tokenizers."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return _LONE_SURROGATE
    return _NUL if "\x00" in text else None


def _bad_text_at(value: Any, path: str) -> tuple[str | None, str] | None:
    """(path, problem) of the first string (or key) under value that is not acceptable text, e.g.
    ("messages.0.content", ...)."""
    if isinstance(value, str):
        problem = _text_problem(value)
        return None if problem is None else (path or None, problem)
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, list):
        items = enumerate(value)
    else:
        return None
    for key, item in items:
        where = f"{path}.{key}" if path else str(key)
        bad_key = _text_problem(key) if isinstance(key, str) else None
        if bad_key is not None:
            return where.encode("utf-8", errors="backslashreplace").decode(), bad_key
        found = _bad_text_at(item, where)
        if found is not None:
            return found
    return None


class _Strict(BaseModel):
    # NaN or Infinity (which Python's JSON accepts) would reach the sampler's arithmetic: refuse them here.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data: Any) -> Any:
        """Every string of a request must be encodable: it reaches the tokenizer, the chat template, the
        stop-string matcher or an error message. The outermost model names the full path."""
        found = _bad_text_at(data, "")
        if found is not None:
            where, problem = found
            raise PydanticCustomError(
                "shoal_invalid_unicode", "{param}: {problem}", {"param": where, "problem": problem}
            )
        return data


class StreamOptions(_Strict):
    include_usage: bool | None = Field(None, description="Send a last chunk with the usage and no choices.")
    continuous_usage_stats: bool | None = Field(
        None, description="vLLM extra: with include_usage, every chunk carries the usage so far."
    )
    include_obfuscation: bool | None = Field(None, description="Accepted; shoal never pads stream chunks.")


# vLLM and OpenAI fields that would change the result if ignored: refused unless they hold their no-op.
_COMMON_UNSUPPORTED: dict[str, tuple[Any, str]] = {
    "response_format": (
        lambda v: v is None or v == {"type": "text"},
        "only {'type': 'text'}: structured output is not supported",
    ),
    "structured_outputs": (lambda v: v is None, "structured output is not supported"),
    "guided_json": (lambda v: v is None, "guided decoding is not supported"),
    "guided_regex": (lambda v: v is None, "guided decoding is not supported"),
    "guided_choice": (lambda v: v is None, "guided decoding is not supported"),
    "guided_grammar": (lambda v: v is None, "guided decoding is not supported"),
    "guided_decoding_backend": (lambda v: v is None, "guided decoding is not supported"),
    "guided_whitespace_pattern": (lambda v: v is None, "guided decoding is not supported"),
    "logits_processors": (lambda v: not v, "custom logits processors are not supported"),
}


class CommonRequest(_Strict):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model: str | None = Field(None, description="The served model name (see GET /v1/models); optional.")
    n: int = Field(1, ge=1, le=128, description="Choices to generate per prompt.")
    temperature: float | None = None
    top_p: float | None = None
    stop: str | Annotated[list[str], Field(max_length=64)] | None = Field(
        None, description="Up to 64 stop strings (each is checked at every step)."
    )
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = Field(
        None, description="Token id (as a string) -> bias in [-100, 100]."
    )
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, description="Accepted for compatibility; logged at debug level.")
    metadata: dict[str, Any] | None = Field(
        None, description="Accepted for compatibility; ignored (nothing is stored)."
    )
    store: Literal[False] | None = Field(None, description="Only false: shoal stores no completions.")
    service_tier: Literal["auto", "default"] | None = Field(None, description="Accepted; shoal has one tier.")
    prompt_cache_key: str | None = Field(None, description="Accepted; prefix caching is automatic.")
    safety_identifier: str | None = Field(None, description="Accepted for compatibility; not used.")
    # vLLM extras
    priority: int | None = Field(
        None,
        ge=-(2**31),
        le=2**31 - 1,
        description="Lower is served earlier; needs --scheduling-policy priority (otherwise only 0), as vLLM. "
        "Omitted: the caller's priority class's value (or 0); a class is also a floor no request goes below.",
    )
    cache_salt: str | None = Field(
        None,
        min_length=1,
        max_length=256,
        description="Prefix-cache blocks are shared only between requests with the same salt (vLLM).",
    )
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int = 0
    ignore_eos: bool = False
    stop_token_ids: list[StrictInt] | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = Field(
        True, description="With skip_special_tokens false: false writes adjacent added tokens bare."
    )
    return_tokens_as_token_ids: bool | None = Field(
        None, description="Logprob token strings as 'token_id:<id>' (vLLM)."
    )
    truncate_prompt_tokens: int | None = Field(
        None, ge=-1, description="Keep only the last k prompt tokens (-1: max_model_len), as vLLM."
    )
    add_special_tokens: bool | None = Field(
        None,
        description="Add the tokenizer's special tokens (BOS) to the prompt; default true for "
        "completions, false for chat (the template writes them).",
    )

    @model_validator(mode="before")
    @classmethod
    def _reject_common_unsupported(cls, data: Any) -> Any:
        return _check_unsupported(data, _COMMON_UNSUPPORTED)

    @field_validator("truncate_prompt_tokens")
    @classmethod
    def _truncate_not_zero(cls, value: int | None) -> int | None:
        if value == 0:
            raise ValueError("must be -1 (max_model_len) or at least 1")
        return value

    @field_validator("logit_bias", mode="before")
    @classmethod
    def _logit_bias_keys(cls, value: Any) -> Any:
        if isinstance(value, dict):
            for key, bias in value.items():
                try:
                    int(key)
                except (TypeError, ValueError):
                    raise ValueError(f"logit_bias keys must be token ids, got {key!r}") from None
                if isinstance(bias, bool) or not isinstance(bias, int | float):
                    raise ValueError(f"logit_bias values must be numbers, got {bias!r} for token {key}")
                if not -100 <= bias <= 100:
                    raise ValueError(f"logit_bias values must be in [-100, 100], got {bias} for token {key}")
        return value

    @model_validator(mode="after")
    def _stream_options_need_stream(self) -> CommonRequest:
        if self.stream_options is not None and not self.stream:
            raise PydanticCustomError(
                "shoal_invalid",
                "stream_options is only allowed when stream is true",
                {"param": "stream_options"},
            )
        return self

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def continuous_usage(self) -> bool:
        """vLLM: usage on every chunk needs both include_usage and continuous_usage_stats."""
        return self.include_usage and bool(self.stream_options.continuous_usage_stats)

    def logit_bias_ids(self) -> dict[int, float] | None:
        return {int(k): float(v) for k, v in self.logit_bias.items()} if self.logit_bias else None

    def explicitly_set(self) -> set[str]:
        """Fields the client gave a non-null value, for SamplingParams.with_defaults."""
        return {name for name in self.model_fields_set if getattr(self, name) is not None}


Prompt = str | list[str] | list[StrictInt] | list[list[StrictInt]]


class CompletionRequest(CommonRequest):
    """POST /v1/completions."""

    prompt: Prompt = Field(
        description="A string, a list of strings, a list of token ids, or a list of such lists."
    )
    max_tokens: int | None = Field(16, description="Tokens to generate per choice (0 only with echo).")
    echo: bool = False
    logprobs: int | None = Field(
        None, description="Top logprobs per token (0-20); with echo, for the prompt too."
    )
    prompt_logprobs: int | None = Field(None, description="vLLM extra: top logprobs per prompt token (0-20).")
    best_of: int | None = Field(
        None, description="Only equal to n (or null): shoal does not rank candidates."
    )
    suffix: str | None = Field(None, description="Only empty or null: insertion is not supported.")

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt_shape(cls, value: Any) -> Any:
        message = (
            "prompt must be a string, a list of strings, a list of token ids, or a list of lists of token ids"
        )

        def is_int(x: Any) -> bool:
            return isinstance(x, int) and not isinstance(x, bool)

        if isinstance(value, str):
            return value
        if not isinstance(value, list):
            raise ValueError(message)
        if not value:
            raise ValueError("prompt must not be empty")
        if all(isinstance(x, str) for x in value) or all(is_int(x) for x in value):
            return value
        if all(isinstance(x, list) and all(is_int(t) for t in x) for x in value):
            if any(not x for x in value):
                raise ValueError("prompt must not contain an empty list of token ids")
            return value
        raise ValueError(message)

    @model_validator(mode="after")
    def _check_unsupported_values(self) -> CompletionRequest:
        if self.suffix:
            raise _unsupported("suffix", "insertion is not supported")
        if self.best_of is not None and self.best_of != self.n:
            raise _unsupported("best_of", "only best_of equal to n is supported")
        return self


class TextContentPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: str = Field(description="system, developer (treated as system), user or assistant.")
    content: str | list[TextContentPart]
    name: str | None = Field(None, description="Passed to the chat template.")

    @field_validator("role")
    @classmethod
    def _known_role(cls, role: str) -> str:
        if role in ("tool", "function"):
            raise ValueError(f"role '{role}' is not supported: this server does not support tool calling")
        if role not in ("system", "developer", "user", "assistant"):
            raise ValueError(f"unknown role '{role}': expected system, developer, user or assistant")
        return role

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts_only(cls, content: Any) -> Any:
        if content is None:
            raise ValueError("content must be a string or a list of text parts")
        if isinstance(content, list):
            for part in content:
                kind = part.get("type") if isinstance(part, dict) else None
                if kind != "text":
                    raise ValueError(f"content part type {kind!r} is not supported: only 'text' parts")
        return content

    def template_dict(self) -> dict[str, Any]:
        """The message as chat templates expect it: developer -> system, text parts joined by newlines."""
        content = self.content if isinstance(self.content, str) else "\n".join(p.text for p in self.content)
        message: dict[str, Any] = {
            "role": "system" if self.role == "developer" else self.role,
            "content": content,
        }
        if self.name is not None:
            message["name"] = self.name
        return message


_CHAT_UNSUPPORTED: dict[str, tuple[Any, str]] = {
    "tools": (lambda v: not v, "tool calling is not supported"),
    "tool_choice": (lambda v: v in (None, "none"), "tool calling is not supported"),
    "functions": (lambda v: not v, "function calling is not supported"),
    "function_call": (lambda v: v in (None, "none"), "function calling is not supported"),
    "modalities": (lambda v: v is None or v == ["text"], "only ['text']"),
    "audio": (lambda v: v is None, "audio output is not supported"),
    "prediction": (lambda v: v is None, "predicted outputs are not supported"),
    "reasoning_effort": (lambda v: v is None, "not a reasoning model"),
    "web_search_options": (lambda v: v is None, "web search is not supported"),
}


class ChatCompletionRequest(CommonRequest):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage]
    max_tokens: int | None = Field(None, description="Deprecated alias of max_completion_tokens.")
    max_completion_tokens: int | None = Field(None, description="Default: the rest of the context window.")
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, description="0-20; needs logprobs: true.")
    parallel_tool_calls: bool | None = Field(None, description="Accepted; no effect without tools.")
    add_generation_prompt: bool = Field(True, description="vLLM: end the prompt with the assistant's turn.")
    continue_final_message: bool = Field(
        False, description="vLLM: leave the final (assistant) message open for the model to continue."
    )
    chat_template_kwargs: dict[str, Any] | None = Field(
        None, description="vLLM: extra variables for the chat template (e.g. enable_thinking)."
    )

    @model_validator(mode="before")
    @classmethod
    def _reject_unsupported(cls, data: Any) -> Any:
        return _check_unsupported(data, _CHAT_UNSUPPORTED)

    @field_validator("messages")
    @classmethod
    def _not_empty(cls, messages: list[ChatMessage]) -> list[ChatMessage]:
        if not messages:
            raise ValueError("messages must not be empty")
        return messages

    @model_validator(mode="after")
    def _template_options(self) -> ChatCompletionRequest:
        check_template_options(self)
        return self

    @model_validator(mode="after")
    def _top_logprobs_need_logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and self.top_logprobs > 0 and not self.logprobs:
            raise PydanticCustomError(
                "shoal_invalid", "top_logprobs requires logprobs to be true", {"param": "top_logprobs"}
            )
        if self.max_tokens is not None and self.max_completion_tokens is not None:
            if self.max_tokens != self.max_completion_tokens:
                raise PydanticCustomError(
                    "shoal_invalid",
                    "give max_completion_tokens or max_tokens, not both with different values",
                    {"param": "max_tokens"},
                )
        return self

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


# Variables the chat template gets from shoal itself: chat_template_kwargs may not replace them.
RESERVED_TEMPLATE_VARIABLES = frozenset(
    {"messages", "add_generation_prompt", "continue_final_message", "bos_token", "eos_token"}
)


def check_template_options(body: Any) -> None:
    """vLLM's rules for add_generation_prompt, continue_final_message and chat_template_kwargs."""
    if body.messages and body.continue_final_message:
        if "add_generation_prompt" not in body.model_fields_set:
            body.add_generation_prompt = False  # implied: a continued message gets no new turn after it
        elif body.add_generation_prompt:
            raise PydanticCustomError(
                "shoal_invalid",
                "continue_final_message and add_generation_prompt cannot both be true",
                {"param": "continue_final_message"},
            )
        if body.messages[-1].role != "assistant":
            raise PydanticCustomError(
                "shoal_invalid",
                "continue_final_message needs the last message to be the assistant's",
                {"param": "continue_final_message"},
            )
    reserved = sorted(RESERVED_TEMPLATE_VARIABLES & set(body.chat_template_kwargs or {}))
    if reserved:
        raise PydanticCustomError(
            "shoal_invalid",
            "chat_template_kwargs may not set {names}: use the request fields",
            {"param": "chat_template_kwargs", "names": ", ".join(reserved)},
        )


class TokenizeRequest(_Strict):
    """POST /tokenize (vLLM): either a prompt or chat messages."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool | None = Field(None, description="Default: true for prompt, false for messages.")
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None
    return_token_strs: bool = False

    @model_validator(mode="after")
    def _template_options(self) -> TokenizeRequest:
        check_template_options(self)
        return self

    @model_validator(mode="after")
    def _one_input(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise PydanticCustomError(
                "shoal_invalid", "give exactly one of prompt or messages", {"param": "prompt"}
            )
        if self.messages is not None and not self.messages:
            raise PydanticCustomError("shoal_invalid", "messages must not be empty", {"param": "messages"})
        return self


class DetokenizeRequest(_Strict):
    model: str | None = None
    tokens: list[StrictInt]


# ----------------------------------------------------------------------------------------------------
# Responses


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(BaseModel):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = Field(None, description="vLLM extra: the stop token id or string.")
    prompt_logprobs: list[dict[str, dict[str, Any]] | None] | None = Field(None, description="vLLM extra.")


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    system_fingerprint: str | None = None
    usage: Usage | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatChoiceLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None = None
    refusal: list[ChatTokenLogprob] | None = None


class ChatMessageOut(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    refusal: str | None = None


class ChatChoice(BaseModel):
    index: int
    message: ChatMessageOut
    logprobs: ChatChoiceLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    system_fingerprint: str | None = None
    usage: Usage | None = None


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChatChoiceLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    system_fingerprint: str | None = None
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "shoal"
    root: str | None = None
    parent: str | None = None
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeResponse(BaseModel):
    prompt: str
