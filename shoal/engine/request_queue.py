"""One request's outputs on the asyncio side of an engine, and the one way they are consumed."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator, Callable

from shoal.engine.outputs import RequestOutput


class RequestQueue:
    """Outputs (cumulative snapshots) and errors of one request, in order; put from the event loop.

    A deque and the one consumer's waiting future, not asyncio.Queue: an item is put for every token of
    every stream, and asyncio.Queue's bookkeeping (getter and putter queues, task counts) is most of the
    cost of handing it over."""

    def __init__(self) -> None:
        self._items: deque[RequestOutput | BaseException] = deque()
        self._waiter: asyncio.Future | None = None

    def put(self, item: RequestOutput | BaseException) -> None:
        self._items.append(item)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def _get(self) -> RequestOutput | BaseException:
        while not self._items:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self._items.popleft()

    async def drain(self, on_early_exit: Callable[[], None]) -> AsyncIterator[RequestOutput]:
        """Yield snapshots until the finished one; raise an error item. A slow consumer gets only the
        newest snapshot. If the consumer stops first (client gone), on_early_exit aborts the request."""
        finished = False
        items = self._items
        try:
            while True:
                item = await self._get()
                while items and isinstance(item, RequestOutput) and not item.finished:
                    item = items.popleft()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                # Set before the yield: a consumer that stops once it has the last snapshot (closing this
                # generator at the yield, or leaving it to be finalized) must not abort a finished request,
                # which would cost a message to the engine and its reply for nothing.
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            if not finished:
                on_early_exit()
