"""shoal.server.offload: small request preparation runs on the event loop, large in a worker thread, and
errors come back the same either way; the API over HTTP is covered by test_server_api.py."""

from __future__ import annotations

import threading

import anyio
import pytest

from shoal.server.offload import INLINE_CHARS, MESSAGE_CHARS, messages_size, prepare, prompt_size
from shoal.server.protocol import ChatMessage

pytestmark = pytest.mark.timeout(30)


def _thread_of(_: object) -> int:
    return threading.get_ident()


def _fail(message: str) -> None:
    raise ValueError(message)


def test_small_work_runs_on_the_event_loop_and_large_work_in_a_worker_thread():
    async def main() -> tuple[int, int, int]:
        loop_thread = threading.get_ident()
        inline = await prepare(_thread_of, None, size=INLINE_CHARS)
        offloaded = await prepare(_thread_of, None, size=INLINE_CHARS + 1)
        return loop_thread, inline, offloaded

    loop_thread, inline, offloaded = anyio.run(main)
    assert inline == loop_thread
    assert offloaded != loop_thread


@pytest.mark.parametrize("size", [1, INLINE_CHARS + 1])
def test_an_error_is_raised_to_the_caller_on_either_path(size: int):
    async def main() -> None:
        await prepare(_fail, "bad prompt", size=size)

    with pytest.raises(ValueError, match="bad prompt"):
        anyio.run(main)


def test_prompt_size_counts_characters_and_token_ids_in_every_prompt_shape():
    assert prompt_size("hello") == 5
    assert prompt_size([1, 2, 3]) == 3
    assert prompt_size(["ab", "cde"]) == 5
    assert prompt_size([[1, 2], [3, 4, 5]]) == 5


def test_messages_size_counts_text_parts_and_a_floor_per_message():
    long_text = "x" * (MESSAGE_CHARS + 10)
    messages = [
        ChatMessage(role="user", content=long_text),
        ChatMessage(
            role="user", content=[{"type": "text", "text": long_text}, {"type": "text", "text": "ab"}]
        ),
        ChatMessage(role="assistant", content=""),
    ]
    assert messages_size(messages) == len(long_text) + (len(long_text) + 2) + MESSAGE_CHARS
    # Many empty messages are still work for the template: past the inline limit.
    empty = [ChatMessage(role="user", content="")] * (INLINE_CHARS // MESSAGE_CHARS + 1)
    assert messages_size(empty) > INLINE_CHARS
