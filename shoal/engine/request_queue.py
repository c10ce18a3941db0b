"""One request's outputs on the asyncio side of an engine, and the one way they are consumed."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

from shoal.engine.outputs import RequestOutput


class RequestQueue:
    """Outputs (cumulative snapshots) and errors of one request, in order; put from the event loop."""

    def __init__(self) -> None:
        self._queue: asyncio.Queue = asyncio.Queue()

    def put(self, item: RequestOutput | BaseException) -> None:
        self._queue.put_nowait(item)

    async def drain(self, on_early_exit: Callable[[], None]) -> AsyncIterator[RequestOutput]:
        """Yield snapshots until the finished one; raise an error item. A slow consumer gets only the
        newest snapshot. If the consumer stops first (client gone), on_early_exit aborts the request."""
        finished = False
        try:
            while True:
                item = await self._queue.get()
                while not self._queue.empty() and isinstance(item, RequestOutput) and not item.finished:
                    item = self._queue.get_nowait()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                yield item
                if item.finished:
                    finished = True
                    return
        finally:
            if not finished:
                on_early_exit()
