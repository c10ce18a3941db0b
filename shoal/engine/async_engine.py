"""The async front many HTTP requests share: one engine thread steps the batch; asyncio awaits results.

Requests and aborts are handed to the engine thread through a queue and applied between steps, so the
engine itself is only ever touched by its own thread. Each step's outputs are pushed to the per-request
asyncio queues with one call_soon_threadsafe per event loop and step (not one per request: at 64
streams that is 64 loop wake-ups a step). A consumer that stops iterating (client gone) aborts its
request, which frees its KV blocks at the next step.

A step that raises fails every request in flight (each waiting client gets the error, none hangs) and
the engine goes on with the next requests; only an error that is not an Exception stops the thread, or a
run of failed steps (HealthPolicy), after which every request, waiting or new, gets EngineDeadError.
With a FaultInjector (`--enable-fault-injection`) steps can be made to raise, hang or die on purpose.

`AsyncEngine.deferred(config)` loads the model in `start()`, off the event loop, so that the server can
listen and answer probes while it loads (`phase`: "loading" -> "warming_up" -> "ready").
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable

from shoal.engine.config import EngineConfig
from shoal.engine.errors import EngineDeadError, EngineStepError
from shoal.engine.faults import FaultInjector
from shoal.engine.health import EngineHealth, HealthPolicy
from shoal.engine.llm_engine import LLMEngine
from shoal.engine.outputs import RequestOutput
from shoal.engine.request_queue import RequestQueue
from shoal.engine.sampling_params import SamplingParams
from shoal.engine.stats import EngineStats, StepStats

log = logging.getLogger(__name__)


class AsyncEngine:
    def __init__(
        self,
        engine: LLMEngine | None,
        model_name: str | None = None,
        faults: FaultInjector | None = None,
        health: HealthPolicy | None = None,
        config: EngineConfig | None = None,
    ):
        """engine: a loaded LLMEngine, or None to load one from config in start()."""
        self.engine: LLMEngine | None = None
        self.config: EngineConfig = engine.config if engine is not None else config
        self.model_name = model_name or self.config.model
        self.phase = "loading"
        self._listeners: list[Callable[[StepStats], None]] = []
        if engine is not None:
            self._bind(engine)
        self.health = EngineHealth(health)
        self.ready = False
        self._inbox: queue.Queue = queue.Queue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, RequestQueue]] = {}
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._wakeup = threading.Event()
        self.error: BaseException | None = None
        self.faults = faults  # None unless fault injection is enabled

    @classmethod
    def from_config(cls, config: EngineConfig, faults: FaultInjector | None = None) -> AsyncEngine:
        """Load now (blocking) and return the front, not yet started."""
        front = cls(None, faults=faults, config=config)
        front._load()
        return front

    @classmethod
    def deferred(
        cls, config: EngineConfig, faults: FaultInjector | None = None, health: HealthPolicy | None = None
    ) -> AsyncEngine:
        """A front whose start() loads the model (in a worker thread, so the event loop keeps serving)."""
        return cls(None, faults=faults, health=health, config=config)

    def _load(self) -> None:
        if self.faults is not None:
            self.faults.before_load()
        engine = LLMEngine(self.config)
        self.phase = "warming_up"
        if self.faults is not None:
            self.faults.before_warmup()
        engine.warm_up()
        self._bind(engine)

    def _bind(self, engine: LLMEngine) -> None:
        self.engine = engine
        self.config = engine.config
        self.tokenizer = engine.tokenizer
        self.generation_config = engine.generation_config
        engine.step_listeners.extend(self._listeners)

    @property
    def stats(self) -> EngineStats:
        return self.engine.stats if self.engine is not None else EngineStats()

    def add_step_listener(self, fn: Callable[[StepStats], None]) -> None:
        self._listeners.append(fn)
        if self.engine is not None:
            self.engine.step_listeners.append(fn)

    async def refresh_stats(self) -> EngineStats:
        """The stats as of now: the engine thread refreshes them at every add, abort and step."""
        return self.stats

    async def start(self) -> None:
        """Load the model if it is not loaded yet (its errors propagate), then run the engine thread."""
        if self.engine is None:
            try:
                await asyncio.to_thread(self._load)
            except BaseException:
                self.phase = "failed"
                raise
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="shoal-engine", daemon=True)
            self._thread.start()
        self.ready = True
        self.phase = "ready"

    async def shutdown(self) -> None:
        self.ready = False
        self.phase = "stopped"
        self._stopping.set()
        self._wakeup.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 10)
        if self.engine is not None and not (self._thread is not None and self._thread.is_alive()):
            self.engine.close()  # a step still running keeps its workers: they go at interpreter exit

    # ---- the engine thread --------------------------------------------------------------------------
    def _loop(self) -> None:
        try:
            while not self._stopping.is_set():
                self._drain_inbox()
                if not self.engine.has_unfinished():
                    self._wakeup.wait(0.5)
                    self._wakeup.clear()
                    continue
                try:
                    if self.faults is not None:
                        self.faults.before_step()
                    outputs = self.engine.step()
                except Exception as e:  # noqa: BLE001 - the requests fail, the engine survives
                    self._fail_in_flight(e)
                    if self.health.step_failed():
                        raise EngineDeadError(
                            f"{self.health.consecutive_failures} engine steps failed in a row (last: {e})"
                        ) from e
                    continue
                self.health.step_succeeded()
                self._deliver_all(outputs)
        except BaseException as e:  # noqa: BLE001 - every waiter must learn the engine died
            log.exception("engine thread failed")
            self.error = e
            self.ready = False
            self.phase = "failed"
            self._fail_all_waiters()

    def _fail_all_waiters(self) -> None:
        for request_id in list(self._streams):
            self._deliver(request_id, EngineDeadError(f"engine failed: {self.error}"))

    def _drain_inbox(self) -> None:
        while True:
            try:
                kind, request_id, payload = self._inbox.get_nowait()
            except queue.Empty:
                return
            if kind == "add":
                try:
                    self.engine.add_request(request_id, *payload)
                except Exception as e:  # noqa: BLE001 - one bad request must not stop the engine
                    self._deliver(request_id, e)
            elif kind == "finish":  # end it with its output so far, and hand that to its consumer
                out = self.engine.abort_request(request_id)
                if out is not None:
                    self._deliver(request_id, out)
            else:
                self.engine.abort_request(request_id)
                self._streams.pop(request_id, None)
            self.engine.refresh_stats()

    def _fail_in_flight(self, error: Exception) -> None:
        for request_id in self.engine.abort_all(error):
            self._deliver(request_id, EngineStepError(f"engine step failed: {error}"))

    def _deliver(self, request_id: str, item: RequestOutput | BaseException) -> None:
        target = self._take_target(request_id, item)
        if target is not None:
            loop, q = target
            loop.call_soon_threadsafe(q.put, item)

    def _deliver_all(self, outputs: list[RequestOutput]) -> None:
        """One step's outputs: a single call_soon_threadsafe per event loop."""
        batches: dict[asyncio.AbstractEventLoop, list] = {}
        for out in outputs:
            target = self._take_target(out.request_id, out)
            if target is not None:
                batches.setdefault(target[0], []).append((target[1], out))
        for loop, items in batches.items():
            loop.call_soon_threadsafe(_put_all, items)

    def _take_target(
        self, request_id: str, item: RequestOutput | BaseException
    ) -> tuple[asyncio.AbstractEventLoop, RequestQueue] | None:
        """The waiter of request_id; forgotten once it gets its last item."""
        target = self._streams.get(request_id)
        if target is not None and (isinstance(item, BaseException) or item.finished):
            self._streams.pop(request_id, None)
        return target

    # ---- the asyncio side ---------------------------------------------------------------------------
    async def generate(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        arrival_time: float | None = None,
        priority: int = 0,
        cache_salt: str | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Yield cumulative snapshots until the request finishes; invalid requests raise ValueError.
        arrival_time: time.monotonic() when the HTTP request arrived (default: now); priority and
        cache_salt: see LLMEngine.add_request."""
        if self.error is not None:
            raise EngineDeadError(f"engine failed: {self.error}")
        self.engine.check_prompt(prompt_token_ids, params, priority)
        queue = RequestQueue()
        self.health.work_arrived(was_idle=not self._streams)
        self._streams[request_id] = (asyncio.get_running_loop(), queue)
        arrival = time.monotonic() if arrival_time is None else arrival_time
        self._inbox.put(("add", request_id, (list(prompt_token_ids), params, arrival, priority, cache_salt)))
        self._wakeup.set()
        if self.error is not None:  # the thread died between the check above and now
            self._deliver(request_id, EngineDeadError(f"engine failed: {self.error}"))
        async for item in queue.drain(on_early_exit=lambda: self.abort(request_id)):
            yield item

    @property
    def fault_injection_enabled(self) -> bool:
        return self.faults is not None

    async def set_faults(self, plan: dict) -> dict:
        return self.faults.set(plan)

    async def get_faults(self) -> dict:
        return self.faults.current()

    def abort(self, request_id: str) -> None:
        """Drop a request whose consumer is gone (no more outputs); its KV blocks are freed."""
        self._inbox.put(("abort", request_id, None))
        self._wakeup.set()

    def finish(self, request_ids: list[str]) -> list[str]:
        """End requests now with what they have generated: each consumer gets a last output with
        finish_reason "abort" (timeouts, the end of a drain). Returns the ids that were still running."""
        ids = [r for r in request_ids if r in self._streams]
        for request_id in ids:
            self._inbox.put(("finish", request_id, None))
        self._wakeup.set()
        return ids

    def finish_all(self) -> list[str]:
        return self.finish(list(self._streams))

    @property
    def num_pending(self) -> int:
        return len(self._streams)

    def health_problem(self) -> str | None:
        """Why liveness should fail (dead, broken or hung engine), or None while it is alive."""
        return self.health.problem(self.error, self.phase == "ready", pending=bool(self._streams))


def _put_all(items: list[tuple[RequestQueue, RequestOutput]]) -> None:
    for q, item in items:
        q.put(item)
