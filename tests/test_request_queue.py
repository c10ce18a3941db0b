"""shoal.engine.request_queue: a request is aborted only when its consumer leaves before the last snapshot."""

from __future__ import annotations

import asyncio

import pytest

from shoal.engine.outputs import CompletionOutput, RequestOutput
from shoal.engine.request_queue import RequestQueue

pytestmark = pytest.mark.timeout(30)


def _snapshot(tokens: int, finished: bool) -> RequestOutput:
    return RequestOutput("r", [1], [CompletionOutput(0, "", list(range(tokens)), None)], finished=finished)


async def _consume(take: int) -> tuple[list[int], list[str]]:
    """Snapshots of 1 then 2 tokens (the second the last), each put once the one before is taken; the
    consumer takes `take` of them and then closes the generator at its yield, as a consumer that stops
    does."""
    queue, aborts = RequestQueue(), []
    agen = queue.drain(on_early_exit=lambda: aborts.append("abort"))
    got = []
    for tokens in (1, 2)[:take]:
        queue.put(_snapshot(tokens, finished=tokens == 2))
        got.append(len((await agen.__anext__()).outputs[0].token_ids))
    await agen.aclose()
    return got, aborts


@pytest.mark.parametrize("take, aborted", [(1, True), (2, False)])
def test_only_a_consumer_that_leaves_before_the_last_snapshot_aborts(take: int, aborted: bool):
    got, aborts = asyncio.run(_consume(take))
    assert got == [1, 2][:take]
    assert aborts == (["abort"] if aborted else [])


def test_a_slow_consumer_gets_the_newest_snapshot_and_an_error_item_raises():
    async def main() -> tuple[list[int], list[str]]:
        queue, aborts = RequestQueue(), []
        agen = queue.drain(on_early_exit=lambda: aborts.append("abort"))
        for n in (1, 2, 3):
            queue.put(_snapshot(n, finished=False))
        got = [len((await agen.__anext__()).outputs[0].token_ids)]
        queue.put(ValueError("engine step failed"))
        with pytest.raises(ValueError, match="engine step failed"):
            await agen.__anext__()
        return got, aborts

    got, aborts = asyncio.run(main())
    assert got == [3]  # snapshots are cumulative: the older ones were skipped
    assert aborts == []  # the request ended with the error: nothing to abort
