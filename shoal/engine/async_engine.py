"""The async front many HTTP requests share: one engine thread steps the batch; asyncio awaits results.

Requests and aborts are handed to the engine thread through a queue and applied between steps, so the
engine itself is only ever touched by its own thread. Each step's outputs are pushed to the per-request
asyncio queues with call_soon_threadsafe. A consumer that stops iterating (client gone) aborts its
request, which frees its KV blocks at the next step.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable

from shoal.engine.config import EngineConfig
from shoal.engine.llm_engine import LLMEngine
from shoal.engine.outputs import RequestOutput
from shoal.engine.sampling_params import SamplingParams
from shoal.engine.stats import EngineStats, StepStats

log = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The engine thread failed; requests in flight get this error."""


class AsyncEngine:
    def __init__(self, engine: LLMEngine, model_name: str | None = None):
        self.engine = engine
        self.config: EngineConfig = engine.config
        self.tokenizer = engine.tokenizer
        self.generation_config = engine.generation_config
        self.model_name = model_name or engine.config.model
        self.ready = False
        self._inbox: queue.Queue = queue.Queue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._wakeup = threading.Event()
        self.error: BaseException | None = None

    @classmethod
    def from_config(cls, config: EngineConfig) -> AsyncEngine:
        engine = LLMEngine(config)
        engine.warm_up()
        return cls(engine)

    @property
    def stats(self) -> EngineStats:
        return self.engine.stats

    def add_step_listener(self, fn: Callable[[StepStats], None]) -> None:
        self.engine.step_listeners.append(fn)

    async def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="shoal-engine", daemon=True)
            self._thread.start()
        self.ready = True

    async def shutdown(self) -> None:
        self.ready = False
        self._stopping.set()
        self._wakeup.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 10)

    # ---- the engine thread --------------------------------------------------------------------------
    def _loop(self) -> None:
        try:
            while not self._stopping.is_set():
                self._drain_inbox()
                if not self.engine.has_unfinished():
                    self._wakeup.wait(0.5)
                    self._wakeup.clear()
                    continue
                for out in self.engine.step():
                    self._deliver(out.request_id, out)
        except BaseException as e:  # noqa: BLE001 - every waiter must learn the engine died
            log.exception("engine thread failed")
            self.error = e
            self.ready = False
            for request_id in list(self._streams):
                self._deliver(request_id, EngineDeadError(f"engine failed: {e}"))

    def _drain_inbox(self) -> None:
        while True:
            try:
                kind, request_id, payload = self._inbox.get_nowait()
            except queue.Empty:
                return
            if kind == "add":
                prompt, params = payload
                try:
                    self.engine.add_request(request_id, prompt, params)
                except Exception as e:  # noqa: BLE001 - one bad request must not stop the engine
                    self._deliver(request_id, e)
            else:
                self.engine.abort_request(request_id)
                self._streams.pop(request_id, None)
            self.engine.refresh_stats()

    def _deliver(self, request_id: str, item: RequestOutput | BaseException) -> None:
        target = self._streams.get(request_id)
        if target is None:
            return
        loop, q = target
        if isinstance(item, BaseException) or item.finished:
            self._streams.pop(request_id, None)
        loop.call_soon_threadsafe(q.put_nowait, item)

    # ---- the asyncio side ---------------------------------------------------------------------------
    async def generate(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams
    ) -> AsyncIterator[RequestOutput]:
        """Yield cumulative snapshots until the request finishes; invalid requests raise ValueError."""
        if self.error is not None:
            raise EngineDeadError(f"engine failed: {self.error}")
        params.validate(self.engine.model_config.vocab_size)
        self.engine.check_prompt(prompt_token_ids, params)
        q: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = (asyncio.get_running_loop(), q)
        self._inbox.put(("add", request_id, (list(prompt_token_ids), params)))
        self._wakeup.set()
        finished = False
        try:
            while True:
                item = await q.get()
                while not q.empty() and isinstance(item, RequestOutput) and not item.finished:
                    item = q.get_nowait()  # a slow consumer only needs the newest snapshot
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                yield item
                if item.finished:
                    finished = True
                    return
        finally:
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        self._inbox.put(("abort", request_id, None))
        self._wakeup.set()
