"""The server's handle on an engine core running in another process (shoal/engine/core_process.py).

It has the AsyncEngine surface the server uses (config, tokenizer, generation_config, model_name, phase,
ready, stats, start, shutdown, generate, abort, finish, finish_all, health_problem, add_step_listener,
set_faults, get_faults), so routes do not know which one they talk to. It imports no torch: this process
tokenizes, streams and encodes JSON.

The constructor only spawns the core; `start()` waits for it to load and warm up (`phase` goes
"loading" -> "warming_up" -> "ready"), so the HTTP server can listen and answer probes meanwhile.

Each request's output is kept here as one RequestOutput that the core's deltas extend in place, and
handed to the request's queue after each update; consumers read it as a cumulative snapshot. If the
core process dies, every waiting request gets EngineDeadError and the server stops being ready.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import multiprocessing
import os
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict

import msgspec

from shoal.engine.admission import check_request
from shoal.engine.config import EngineConfig
from shoal.engine.core_stream import ServerEnd
from shoal.engine.errors import EngineDeadError, EngineStepError
from shoal.engine.health import EngineHealth, HealthPolicy
from shoal.engine.messages import (
    AbortRequests,
    AddRequest,
    Control,
    CoreMessage,
    Loaded,
    Ready,
    RequestDelta,
    StartupFailed,
    StepUpdate,
)
from shoal.engine.outputs import CompletionOutput, RequestOutput
from shoal.engine.request_queue import RequestQueue
from shoal.engine.sampling_params import SamplingParams
from shoal.engine.stats import EngineStats, StepStats
from shoal.model.tokenizer import Tokenizer

log = logging.getLogger(__name__)
STATS_CALL_TIMEOUT_S = 0.5


class EngineCoreClient:
    def __init__(
        self,
        config: EngineConfig,
        fault_plan: dict | None = None,
        model_name: str | None = None,
        health: HealthPolicy | None = None,
    ):
        """Spawn the core process; `await start()` waits until it has loaded the model."""
        self._ipc_dir = tempfile.mkdtemp(prefix="shoal-core-")
        # Requests go out and updates come back on one Unix stream socket, read and written by the event
        # loop; a send never blocks it (engine/core_stream.py).
        self._stream = ServerEnd(f"{self._ipc_dir}/stream")
        self._following_updates: asyncio.Future | None = None
        self._decoder = msgspec.msgpack.Decoder(CoreMessage)
        self._on_message: Callable[[CoreMessage], None] = self._on_startup_message
        self._startup: asyncio.Future | None = None
        self.fault_injection_enabled = fault_plan is not None
        self._process = multiprocessing.get_context("spawn").Process(
            target=_run_core,
            args=(config, self._stream.path, fault_plan, os.getpid()),
            name="shoal-engine-core",
            daemon=True,
        )
        self._process.start()
        self.config = config  # replaced by the core's resolved configuration once it is ready
        self.model_name = model_name or config.model
        self.phase = "loading"
        self.ready = False
        self.error: BaseException | None = None
        self.health = EngineHealth(health)
        self.stats = EngineStats()
        self._listeners: list[Callable[[StepStats], None]] = []
        self._outputs: dict[str, tuple[RequestOutput, RequestQueue]] = {}
        self._calls: dict[int, asyncio.Future] = {}
        self._call_ids = itertools.count()
        self._following = False  # the core is ready and its updates are followed

    async def _wait_ready(self) -> None:
        """Follow the core's start-up messages until Ready (RuntimeError if it fails or exits)."""
        loop = asyncio.get_running_loop()
        self._startup = loop.create_future()
        self._start_reading()
        while not self._startup.done():
            await asyncio.wait([self._startup], timeout=0.2)
            if not self._startup.done() and not self._process.is_alive():
                raise RuntimeError(
                    f"the engine core process exited with {self._process.exitcode} while loading"
                )
            following = self._following_updates
            if following.done() and not following.cancelled() and following.exception() is not None:
                raise RuntimeError("the engine core's stream failed") from following.exception()
        message = self._startup.result()  # Ready (already bound), or StartupFailed
        if isinstance(message, StartupFailed):
            await asyncio.to_thread(self._process.join, 10)
            raise RuntimeError(f"the engine core failed to start: {message.message}")

    def _on_startup_message(self, message: CoreMessage) -> None:
        if isinstance(message, Loaded):
            self.phase = "warming_up"
        elif isinstance(message, Ready | StartupFailed) and not self._startup.done():
            try:
                if isinstance(message, Ready):
                    self._bind(message)  # before the updates that follow it in this same drain
            except Exception as e:  # noqa: BLE001 - start() raises it
                self._startup.set_exception(e)
                return
            self._on_message = self._on_update
            self._startup.set_result(message)

    def _bind(self, ready: Ready) -> None:
        self.config = EngineConfig(**ready.config)
        self.generation_config = ready.generation_config
        self.vocab_size = ready.vocab_size
        self.description = ready.describe
        self.stats = EngineStats(
            block_size=self.config.block_size, num_kv_blocks=ready.describe["kv_cache_blocks"]
        )
        path = self.config.chat_template
        template = open(path).read() if path else None  # noqa: SIM115
        self.tokenizer = Tokenizer(self.description["model"], chat_template=template)

    def add_step_listener(self, fn: Callable[[StepStats], None]) -> None:
        self._listeners.append(fn)

    @property
    def core_pid(self) -> int | None:
        """The engine core process's pid (its CPU and memory are exported beside the server's)."""
        return self._process.pid

    async def refresh_stats(self, timeout: float = STATS_CALL_TIMEOUT_S) -> EngineStats:
        """Ask the core for fresh stats (a /metrics scrape); the last ones if it does not answer in time
        (a long or hung step), so that a scrape never hangs with the engine."""
        if self.error is None and self._process.is_alive():
            try:
                await self._call("stats", timeout=timeout)
            except (asyncio.TimeoutError, EngineDeadError, ValueError):
                pass
        return self.stats

    # ---- lifecycle ----------------------------------------------------------------------------------
    async def start(self) -> None:
        """Wait for the core to load and warm up, then follow its updates (RuntimeError if it fails)."""
        if not self._following:
            try:
                await self._wait_ready()
            except BaseException:
                self.phase = "failed"
                self._release()
                raise
            loop = asyncio.get_running_loop()
            loop.add_reader(self._process.sentinel, self._core_died)
            self._following = True
        self.ready = self.error is None
        self.phase = "ready" if self.ready else "failed"

    async def shutdown(self) -> None:
        self.ready = False
        self.phase = "stopped"
        if self._process.is_alive():
            self._send(Control(next(self._call_ids), "shutdown"))
            await asyncio.to_thread(self._process.join, 10)
        if self._following:
            asyncio.get_running_loop().remove_reader(self._process.sentinel)
        self._release()

    def _release(self) -> None:
        """Stop the core process if it still runs, and close the sockets without waiting."""
        if self._process.is_alive():
            self._process.terminate()
            self._process.join(5)
        following = self._following_updates
        if following is not None and not following.done() and not following.get_loop().is_closed():
            following.cancel()  # still waiting for the core to connect
        self._stream.close()
        shutil.rmtree(self._ipc_dir, ignore_errors=True)

    def _core_died(self) -> None:
        asyncio.get_running_loop().remove_reader(self._process.sentinel)
        if self.error is None and self.ready:
            self._process.join(1)  # reap it, for its exit code
            self._mark_dead(f"the engine core process exited with {self._process.exitcode}")
        self.ready = False
        self._fail_all_waiters()

    def _mark_dead(self, reason: str) -> None:
        """From now on every request, waiting or new, gets EngineDeadError; liveness fails."""
        self.error = EngineDeadError(reason)
        self.ready = False
        self.phase = "failed"
        log.error("engine dead: %s", reason)

    def _fail_all_waiters(self) -> None:
        for request_id in list(self._outputs):
            self._finish_with(request_id, EngineDeadError(f"engine failed: {self.error}"))
        for future in self._calls.values():
            if not future.done():
                future.set_exception(EngineDeadError("the engine core process is gone"))

    # ---- the stream from the core -------------------------------------------------------------------
    def _start_reading(self) -> None:
        self._following_updates = asyncio.ensure_future(self._stream.follow(self._on_frame))

    def _on_frame(self, payload: memoryview) -> None:
        try:
            self._on_message(self._decoder.decode(payload))
        except Exception:  # noqa: BLE001 - one bad update must not stop the ones after it
            log.exception("an engine core update could not be applied")

    def _on_update(self, update: CoreMessage) -> None:
        if isinstance(update, StepUpdate):
            self._apply(update)

    def _apply(self, update: StepUpdate) -> None:
        for delta in update.deltas:
            self._extend(delta)
        for error in update.errors:
            kind = ValueError if error.kind == "invalid" else EngineStepError
            self._finish_with(error.request_id, kind(error.message))
        for reply in update.replies:
            future = self._calls.pop(reply.call_id, None)
            if future is not None and not future.done():
                future.set_result(reply)
        if update.stats is not None:
            self.stats = EngineStats(**update.stats)
        self._track_health(update)
        if update.step is not None:
            step = StepStats(**update.step)
            for listener in self._listeners:
                listener(step)

    def _track_health(self, update: StepUpdate) -> None:
        if update.failed_step is not None:
            if self.health.step_failed() and self.error is None:
                self._mark_dead(
                    f"{self.health.consecutive_failures} engine steps failed in a row "
                    f"(last: {update.failed_step})"
                )
                self._fail_all_waiters()
        elif update.step is not None:
            self.health.step_succeeded()

    def health_problem(self) -> str | None:
        """Why liveness should fail (dead, broken or hung engine), or None while it is alive."""
        return self.health.problem(self.error, self.phase == "ready", pending=bool(self._outputs))

    def _extend(self, delta: RequestDelta) -> None:
        entry = self._outputs.get(delta.request_id)
        if entry is None:
            return  # aborted here before the core heard of it
        out, queue = entry
        if delta.first:
            out.prompt_logprobs = delta.prompt_logprobs
            out.num_cached_tokens = delta.num_cached_tokens
        for seq in delta.outputs:
            o = out.outputs[seq.index]
            o.text += seq.text
            o.token_ids.extend(seq.token_ids)
            o.token_times.extend(seq.token_times)
            if seq.logprobs is not None and o.logprobs is not None:
                o.logprobs.extend(seq.logprobs)
            o.finish_reason, o.stop_reason = seq.finish_reason, seq.stop_reason
        out.finished = delta.finished
        if delta.metrics is not None:
            out.metrics = delta.metrics
        if out.finished:
            del self._outputs[delta.request_id]
        queue.put(out)

    def _finish_with(self, request_id: str, error: BaseException) -> None:
        entry = self._outputs.pop(request_id, None)
        if entry is not None:
            entry[1].put(error)

    # ---- requests -----------------------------------------------------------------------------------
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
        check_request(
            prompt_token_ids,
            params,
            self.config.max_model_len,
            self.vocab_size,
            priority,
            self.config.scheduling_policy,
        )
        if request_id in self._outputs:
            raise ValueError(f"request id {request_id!r} is already running")
        outputs = [
            CompletionOutput(i, "", [], [] if params.logprobs is not None else None) for i in range(params.n)
        ]
        out = RequestOutput(request_id, list(prompt_token_ids), outputs)
        queue = RequestQueue()
        self.health.work_arrived(was_idle=not self._outputs)
        self._outputs[request_id] = (out, queue)
        arrival = time.monotonic() if arrival_time is None else arrival_time
        self._send(
            AddRequest(request_id, list(prompt_token_ids), asdict(params), arrival, priority, cache_salt)
        )
        async for item in queue.drain(on_early_exit=lambda: self.abort(request_id)):
            yield item

    def abort(self, request_id: str) -> None:
        """Drop a request whose consumer is gone (no more outputs); its KV blocks are freed."""
        self._outputs.pop(request_id, None)
        if self._process.is_alive():
            self._send(AbortRequests([request_id]))

    def finish(self, request_ids: list[str]) -> list[str]:
        """End requests now with what they have generated: each consumer gets a last output with
        finish_reason "abort" (timeouts, the end of a drain). Returns the ids that were still running."""
        ids = [r for r in request_ids if r in self._outputs]
        if ids and self._process.is_alive():
            self._send(AbortRequests(ids, keep_output=True))
        return ids

    def finish_all(self) -> list[str]:
        return self.finish(list(self._outputs))

    @property
    def num_pending(self) -> int:
        """Requests added and not yet finished (as far as this side knows)."""
        return len(self._outputs)

    def _send(self, message: AddRequest | AbortRequests | Control) -> None:
        self._stream.send(message)

    # ---- fault injection ----------------------------------------------------------------------------
    async def set_faults(self, plan: dict) -> dict:
        return await self._call("faults_set", plan)

    async def get_faults(self) -> dict:
        return await self._call("faults_get")

    async def _call(self, op: str, payload=None, timeout: float = 30) -> dict:
        call_id = next(self._call_ids)
        future = asyncio.get_running_loop().create_future()
        self._calls[call_id] = future
        self._send(Control(call_id, op, payload))
        try:
            reply = await asyncio.wait_for(future, timeout)
        finally:
            self._calls.pop(call_id, None)  # answered, or given up on: never left behind
        if not reply.ok:
            raise ValueError(reply.payload)
        return reply.payload


def _run_core(config: EngineConfig, stream_path: str, fault_plan: dict | None, parent: int) -> None:
    """Spawned process target; imported there, so the parent never imports torch for it."""
    from shoal.engine.core_process import run_core

    run_core(config, stream_path, fault_plan, parent)
