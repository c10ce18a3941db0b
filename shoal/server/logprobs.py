"""Engine logprobs ({token id: logprob} per position) in the two OpenAI shapes.

Token strings are the text each token adds where it stands (decoded after a few tokens of context), so
that a sentencepiece "▁Paris" reads " Paris" as OpenAI and vLLM show it, and the tokens of a choice
concatenate to its text. Logprobs of -inf (masked tokens) are not valid JSON: they become -9999.0 as in
vLLM.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from shoal.engine.outputs import TokenLogprobs
from shoal.model.tokenizer import Tokenizer
from shoal.server.protocol import ChatTokenLogprob, CompletionLogprobs, TopLogprob

_FLOOR = -9999.0
_CONTEXT = 4  # tokens decoded before the one of interest


def clean(logprob: float) -> float:
    return logprob if math.isfinite(logprob) else _FLOOR


class TokenTexts:
    """The text a token adds after its context (decoding with special tokens shown)."""

    def __init__(self, tokenizer: Tokenizer):
        self._tokenizer = tokenizer

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=False)

    def texts(self, context: Sequence[int], token_ids: Sequence[int]) -> dict[int, str]:
        ctx = list(context[-_CONTEXT:])
        base = self._decode(ctx)
        out = {}
        for token_id in token_ids:
            full = self._decode(ctx + [token_id])
            out[token_id] = full[len(base) :] if full.startswith(base) else self._decode([token_id])
        return out


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
        ids = [chosen] if entry is None else [t for t, _ in _ranked(entry) if t != chosen] + [chosen]
        strings = texts.texts(all_ids[:pos], ids)
        result.tokens.append(strings[chosen])
        result.text_offset.append(text_offset)
        text_offset += len(strings[chosen])
        if entry is None:
            result.token_logprobs.append(None)
            result.top_logprobs.append(None)
            continue
        result.token_logprobs.append(clean(entry.get(chosen, -math.inf)))
        # The chosen token last, so that a different id with the same text cannot hide its logprob.
        result.top_logprobs.append({strings[t]: clean(entry.get(t, -math.inf)) for t in ids})
    return result, text_offset


def chat_logprobs(
    texts: TokenTexts,
    all_ids: Sequence[int],
    start: int,
    entries: Sequence[TokenLogprobs | None],
    top_n: int,
) -> list[ChatTokenLogprob]:
    """Logprobs of generated positions start.. of all_ids in the chat shape (top_n alternatives each)."""
    content = []
    for i, entry in enumerate(entries):
        pos = start + i
        chosen = all_ids[pos]
        entry = entry or {}
        top = _ranked(entry)[:top_n]
        strings = texts.texts(all_ids[:pos], [chosen] + [t for t, _ in top if t != chosen])
        content.append(
            ChatTokenLogprob(
                token=strings[chosen],
                logprob=clean(entry.get(chosen, -math.inf)),
                bytes=list(strings[chosen].encode("utf-8")),
                top_logprobs=[
                    TopLogprob(token=strings[t], logprob=clean(lp), bytes=list(strings[t].encode("utf-8")))
                    for t, lp in top
                ],
            )
        )
    return content


def prompt_logprobs_extra(
    texts: TokenTexts, prompt_ids: Sequence[int], entries: Sequence[TokenLogprobs | None]
) -> list[dict[str, dict] | None]:
    """vLLM's `prompt_logprobs` choice field: per prompt position {token id: {logprob, decoded_token}}."""
    out: list[dict[str, dict] | None] = []
    for pos, entry in enumerate(entries):
        if entry is None:
            out.append(None)
            continue
        strings = texts.texts(prompt_ids[:pos], list(entry))
        out.append({str(t): {"logprob": clean(lp), "decoded_token": strings[t]} for t, lp in _ranked(entry)})
    return out
