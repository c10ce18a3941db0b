"""Input validation and cost caps: the most one request may ask for (the policy's `limits` section).

On by default, unlike every other policy: a client must not be able to make one engine step expensive
for everyone. Stop strings are matched against the held-back tail of every step's text (cost grows with
their count and length), `logit_bias` adds one entry per token to every step's logits, `top_logprobs`
sorts the vocabulary per token, `n` and `max_tokens` multiply the work. Each cap has a policy value
(`limits.<name>`); `max_tokens` and `n` also have server flags (`--max-tokens-cap`, `--max-n`), which win.
A request over a cap gets a 400 whose message names the cap and where it is set (OWASP API Security
Top 10, API4:2023 "Unrestricted Resource Consumption").

A NUL character is always refused (server/protocol.py: it truncates strings in C libraries and logs);
other control characters (C0 and DEL, except tab, newline and carriage return) are allowed, refused or stripped as
`limits.control_chars` says.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

_CONTROL = re.compile(r"[\x01-\x08\x0b\x0c\x0e-\x1f\x7f]")


class CapExceeded(ValueError):
    """A request over a cap: a 400 naming the parameter and the cap."""

    def __init__(self, message: str, param: str, code: str = "limit_exceeded"):
        super().__init__(message)
        self.param = param
        self.code = code


class InputLimits(BaseModel):
    """The `limits` section of the policy file; every cap is per request."""

    model_config = ConfigDict(extra="forbid")
    max_messages: int = Field(1024, ge=1, description="Chat messages.")
    max_prompt_tokens: int = Field(
        262_144, ge=1, description="Prompt tokens, summed over a completions batch."
    )
    max_tokens: int | None = Field(None, ge=1, description="max_tokens per choice (--max-tokens-cap).")
    max_n: int = Field(128, ge=1, le=128, description="Choices per prompt (--max-n).")
    max_stop: int = Field(64, ge=0, le=64, description="Stop strings.")
    max_stop_length: int = Field(1024, ge=1, description="Characters in each stop string.")
    max_logit_bias: int = Field(1024, ge=0, description="logit_bias entries.")
    max_top_logprobs: int = Field(20, ge=0, le=20, description="top_logprobs (logprobs for completions).")
    control_chars: Literal["allow", "refuse", "strip"] = Field(
        "allow", description="Control characters other than tab, newline and carriage return."
    )


@dataclass(frozen=True)
class Caps:
    """The caps in force: the policy's `limits`, with the server flags applied over them."""

    limits: InputLimits
    max_tokens_flag: int | None = None
    max_n_flag: int | None = None

    @property
    def max_tokens(self) -> int | None:
        return self.max_tokens_flag if self.max_tokens_flag is not None else self.limits.max_tokens

    @property
    def max_n(self) -> int:
        return self.max_n_flag if self.max_n_flag is not None else self.limits.max_n

    def _where(self, name: str, flag: str | None = None, flag_value: int | None = None) -> str:
        return flag if flag is not None and flag_value is not None else f"policy limits.{name}"

    def check_request(
        self,
        *,
        n: int,
        max_tokens: int | None,
        max_tokens_param: str,
        stop: Sequence[str],
        logit_bias: int,
        top_logprobs: int | None,
        top_logprobs_param: str,
        messages: int | None = None,
    ) -> None:
        """Raise CapExceeded for the first cap the request goes over."""
        _at_most(n, self.max_n, "n", self._where("max_n", "--max-n", self.max_n_flag))
        if max_tokens is not None and self.max_tokens is not None:
            where = self._where("max_tokens", "--max-tokens-cap", self.max_tokens_flag)
            _at_most(max_tokens, self.max_tokens, max_tokens_param, where)
        if messages is not None:
            _at_most(messages, self.limits.max_messages, "messages", "policy limits.max_messages")
        _at_most(len(stop), self.limits.max_stop, "stop", "policy limits.max_stop", what="stop strings")
        longest = max((len(s) for s in stop), default=0)
        _at_most(
            longest, self.limits.max_stop_length, "stop", "policy limits.max_stop_length", what="characters"
        )
        _at_most(logit_bias, self.limits.max_logit_bias, "logit_bias", "policy limits.max_logit_bias")
        if top_logprobs is not None:
            where = "policy limits.max_top_logprobs"
            _at_most(top_logprobs, self.limits.max_top_logprobs, top_logprobs_param, where)

    def check_prompt_tokens(self, total: int, param: str) -> None:
        _at_most(total, self.limits.max_prompt_tokens, param, "policy limits.max_prompt_tokens", "tokens")

    def clean_text(self, text: str, param: str) -> str:
        """The text with control characters handled as the policy says (NUL is refused earlier, always:
        shoal/server/protocol.py)."""
        mode = self.limits.control_chars
        if mode == "allow" or not _CONTROL.search(text):
            return text
        if mode == "strip":
            return _CONTROL.sub("", text)
        bad = _CONTROL.search(text).group()
        raise CapExceeded(
            f"{param}: control character U+{ord(bad):04X} is not allowed (policy limits.control_chars)",
            param,
            "invalid_value",
        )


def _at_most(value: int, cap: int, param: str, where: str, what: str | None = None) -> None:
    if value > cap:
        unit = f" {what}" if what else ""
        raise CapExceeded(f"{param}: {value}{unit} is over this server's cap of {cap} ({where})", param)
