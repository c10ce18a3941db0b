"""Request preparation (templating, tokenization, rendering) on the event loop when it is small, in a
worker thread when it is not.

Why: a worker thread keeps a long prompt's tokenization (about 0.16 ms per 500 characters with the
`tokenizers` backend, 0.8 ms per 5,000) from stalling every other stream on the event loop. But the hop
itself costs about 70 us on an idle 2-core machine (a thread woken, then the event loop woken back), and
more under load, when the worker waits for a core that the engine's threads hold: more than the work for
a short chat turn or a prompt given as token ids (19 us to encode 50 characters, 17 us for a chat
template). Each such hop is in every request's time to first token. So the work goes to the thread only
past INLINE_CHARS characters of text (or token ids) to prepare. vLLM offloads every tokenization
(`AsyncMicrobatchTokenizer`'s executor); measured in docs/benchmarks.md.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TypeVar

import anyio

T = TypeVar("T")

# About 80 us of encoding at the rate above: no longer than the hop it saves, so the event loop is never held
# much longer than the hop would have held it.
INLINE_CHARS = 256


async def prepare(fn: Callable[..., T], *args: object, size: int) -> T:
    """fn(*args), run on the event loop when size (characters of text or token ids it works on) is at most
    INLINE_CHARS, else in anyio's worker threads. Raises what fn raises."""
    if size <= INLINE_CHARS:
        return fn(*args)
    return await anyio.to_thread.run_sync(fn, *args)


def prompt_size(prompt: str | list) -> int:
    """Characters (or token ids) in a prompt field: a string, token ids, or a list of either (lists are
    all of one kind, as the request's schema has them, so token ids are counted without a loop)."""
    if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
        return len(prompt)
    return sum(prompt_size(item) for item in prompt)


# A message costs the chat template a loop iteration whatever its length: counted as at least this many
# characters, so that a thousand empty messages still go to the thread.
MESSAGE_CHARS = 32


def messages_size(messages: Iterable) -> int:
    """Characters of content in chat messages (ChatMessage: a string or text parts each), at least
    MESSAGE_CHARS a message."""
    total = 0
    for m in messages:
        chars = len(m.content) if isinstance(m.content, str) else sum(len(p.text) for p in m.content)
        total += max(chars, MESSAGE_CHARS)
    return total
