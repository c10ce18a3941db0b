"""Perplexity on held-out text by issue 18's protocol, so that shoal's numbers compare with transformers'.

The protocol: tokenize the whole file as `tokenizer(text)` does by default (special tokens added by the
tokenizer's post-processor, as `Tokenizer.encode` does); take the first N tokens; cut them into
non-overlapping windows of `window` tokens (the last may be shorter; one of a single token scores
nothing); score every token of a window after its first; report exp(mean NLL) over all scored tokens.
The logits come from `LLMEngine.prompt_logits`, the engine's real paged, chunked forward, so a quantized
model is scored through the same layers that serve it.

The window is min(1024, max_model_len): scoring generates nothing, so prompt_logits lets a window fill
the whole context.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F

CUT_MARGIN = 64  # tokens past the ones kept, so that a cut of the text cannot reach them


def eval_tokens(tokenizer, text_file: Path, n_tokens: int) -> list[int]:
    """The first n_tokens token ids of the whole file, tokenized with special tokens as by default.

    Only a prefix of the text is tokenized (wikitext2-test is 1.3 MB: 1.4 s for the whole file on a 2-core
    EPYC), cut at a line end and grown until it gives CUT_MARGIN tokens more than asked for, so the ids
    kept are those of the whole file: a cut can only change the tokens at its own end. ValueError for a
    file of fewer than 2 tokens."""
    text = Path(text_file).read_text(encoding="utf-8")
    chars = max(4096, n_tokens * 8)
    while True:
        cut = text.find("\n", chars)
        prefix = text if cut < 0 else text[: cut + 1]
        ids = tokenizer.encode(prefix)
        if cut < 0 or len(ids) >= n_tokens + CUT_MARGIN:
            break
        chars *= 2
    if len(ids) < 2:
        raise ValueError(f"{text_file}: fewer than 2 tokens, nothing to score")
    return ids[:n_tokens]


def window_size(max_model_len: int, cap: int = 1024) -> int:
    """Tokens per scoring window: min(cap, max_model_len) (see the module docstring)."""
    return max(2, min(cap, max_model_len))


def windows(token_ids: list[int], size: int) -> list[list[int]]:
    """Non-overlapping windows of size tokens; windows of one token (nothing to score) are dropped."""
    return [w for i in range(0, len(token_ids), size) if len(w := token_ids[i : i + size]) > 1]


def window_nll(logits: torch.Tensor, token_ids: list[int]) -> tuple[float, int]:
    """Summed NLL (nats, float64) of tokens 1.. of a window given logits [len, vocab], and their count."""
    targets = torch.tensor(token_ids[1:], dtype=torch.long)
    logp = F.log_softmax(logits[: len(token_ids) - 1].float(), dim=-1)
    nll = -logp.gather(1, targets[:, None]).squeeze(1)
    return float(nll.double().sum()), len(targets)


def perplexity(engine, token_ids: list[int], size: int) -> float:
    """exp(mean NLL) over every scored token of token_ids' windows, through engine.prompt_logits."""
    total, count = 0.0, 0
    for w in windows(token_ids, size):
        nll, n = window_nll(engine.prompt_logits(w), w)
        total, count = total + nll, count + n
    if count == 0:
        raise ValueError("no token to score: need at least 2 tokens")
    return math.exp(total / count)
