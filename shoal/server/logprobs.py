"""Engine logprobs ({token id: logprob} per position) in the two OpenAI shapes.

A token's string is what its raw bytes spell where it stands (`Tokenizer.token_bytes`): a sentencepiece
"▁Paris" reads " Paris" and a byte-level "ĠParis" reads " Paris", as OpenAI and vLLM show them. A token
that holds only part of a UTF-8 character (an emoji split over three byte tokens) follows OpenAI's
convention: its valid leading characters stay text and every remaining byte is written `\\xNN`, so
b"\\xf0\\x9f" reads "\\\\xf0\\\\x9f", never U+FFFD. The chat shape's `bytes` are the token's own bytes,
so that the `bytes` of a message's entries, concatenated, are the UTF-8 of its content.
With vLLM's `return_tokens_as_token_ids`, token strings are "token_id:<id>" instead.
Logprobs of -inf (masked tokens) are not valid JSON: they become -9999.0 as in vLLM.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from shoal.engine.outputs import TokenLogprobs
from shoal.model.tokenizer import Tokenizer
from shoal.server.protocol import ChatTokenLogprob, CompletionLogprobs, TopLogprob

_FLOOR = -9999.0
_CHAR_CONTEXT = 3  # a UTF-8 character spans at most 4 bytes, so at most 3 earlier tokens


def clean(logprob: float) -> float:
    return logprob if math.isfinite(logprob) else _FLOOR


def render_bytes(data: bytes) -> str:
    """b" caf\\xc3\\xa9" -> " café"; b"\\xf0\\x9f" -> "\\\\xf0\\\\x9f": the longest valid UTF-8 prefix as
    text, then each remaining byte as \\xNN (OpenAI's rendering of partial-character tokens)."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        head = data[: e.start].decode("utf-8")
        return head + "".join(f"\\x{b:02x}" for b in data[e.start :])


def _complete_chars(data: bytes) -> int:
    """Characters fully present in data (an incomplete or stray byte sequence counts for nothing)."""
    return len(data.decode("utf-8", errors="ignore"))


class TokenTexts:
    """Token strings and bytes for logprobs, per request (`as_ids`: vLLM's return_tokens_as_token_ids)."""

    def __init__(self, tokenizer: Tokenizer, as_ids: bool = False):
        self._tokenizer = tokenizer
        self.as_ids = as_ids

    def for_request(self, as_ids: bool) -> TokenTexts:
        return self if as_ids == self.as_ids else TokenTexts(self._tokenizer, as_ids)

    def bytes(self, token_id: int) -> bytes:
        return self._tokenizer.token_bytes(token_id)

    def string(self, token_id: int) -> str:
        return f"token_id:{token_id}" if self.as_ids else render_bytes(self.bytes(token_id))

    def chars_added(self, all_ids: Sequence[int], pos: int) -> int:
        """How many characters of the text the token at pos completes (0 for a partial token's bytes)."""
        before = b"".join(self.bytes(t) for t in all_ids[max(0, pos - _CHAR_CONTEXT) : pos])
        return _complete_chars(before + self.bytes(all_ids[pos])) - _complete_chars(before)


def _ranked(entry: TokenLogprobs) -> list[tuple[int, float]]:
    return sorted(entry.items(), key=lambda kv: -kv[1])


def completion_logprobs(
    texts: TokenTexts,
    all_ids: Sequence[int],
    start: int,
    entries: Sequence[TokenLogprobs | None],
    text_offset: int,
) -> tuple[CompletionLogprobs, int]:
    """Logprobs of positions start.. of all_ids (entries[i] belongs to all_ids[start + i]).

    Returns the /v1/completions logprobs object and the text offset after its last token. A None entry
    (a prompt's first token, which nothing predicts) has a null logprob and null top_logprobs."""
    result = CompletionLogprobs()
    for i, entry in enumerate(entries):
        pos = start + i
        chosen = all_ids[pos]
        result.tokens.append(texts.string(chosen))
        result.text_offset.append(text_offset)
        text_offset += texts.chars_added(all_ids, pos)
        if entry is None:
            result.token_logprobs.append(None)
            result.top_logprobs.append(None)
            continue
        result.token_logprobs.append(clean(entry.get(chosen, -math.inf)))
        ids = [t for t, _ in _ranked(entry) if t != chosen] + [chosen]
        # The chosen token last, so that a different id with the same text cannot hide its logprob.
        result.top_logprobs.append({texts.string(t): clean(entry.get(t, -math.inf)) for t in ids})
    return result, text_offset


def chat_logprobs(
    texts: TokenTexts, token_ids: Sequence[int], entries: Sequence[TokenLogprobs | None], top_n: int
) -> list[ChatTokenLogprob]:
    """Logprobs of generated tokens in the chat shape (top_n alternatives each); entries[i] belongs to
    token_ids[i]."""
    content = []
    for chosen, entry in zip(token_ids, entries, strict=True):
        entry = entry or {}
        content.append(
            ChatTokenLogprob(
                token=texts.string(chosen),
                logprob=clean(entry.get(chosen, -math.inf)),
                bytes=list(texts.bytes(chosen)),
                top_logprobs=[
                    TopLogprob(token=texts.string(t), logprob=clean(lp), bytes=list(texts.bytes(t)))
                    for t, lp in _ranked(entry)[:top_n]
                ],
            )
        )
    return content


def prompt_logprobs_extra(
    texts: TokenTexts, entries: Sequence[TokenLogprobs | None]
) -> list[dict[str, dict] | None]:
    """vLLM's `prompt_logprobs` choice field: per prompt position {token id: {logprob, decoded_token}}."""
    return [
        None
        if entry is None
        else {str(t): {"logprob": clean(lp), "decoded_token": texts.string(t)} for t, lp in _ranked(entry)}
        for entry in entries
    ]
