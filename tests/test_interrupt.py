"""Interruptible steps (engine/interrupt.py): a more urgent arrival abandons the step in flight between
decoder layers, leaves no trace in the engine's tokens, blocks or generators, and its prompt runs next.

In process, the engine's between-layers call is driven directly (it says "urgent" at a chosen layer of a
chosen step, and the test then adds the urgent request, as the core applies what it read meanwhile);
the core's inbox is tested on real ZMQ sockets; over HTTP, a server whose layers are slowed by the fault
hook shows the interrupted step in its schedule record and its metric.
"""

from __future__ import annotations

import socket
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict

import httpx
import msgspec
import pytest

from shoal.engine.config import EngineConfig
from shoal.engine.core_process import EngineCore
from shoal.engine.core_stream import CoreEnd, FrameEncoder
from shoal.engine.interrupt import Inbox
from shoal.engine.llm_engine import LLMEngine
from shoal.engine.messages import AbortRequests, AddRequest, ClientMessage, StepUpdate
from shoal.engine.sampling_params import SamplingParams

try:
    from server_fixture import completion_request_id, launch_priority_server, metric_samples, stop_process
except ImportError:  # tests/ became a package
    from tests.server_fixture import (  # type: ignore[no-redef]
        completion_request_id,
        launch_priority_server,
        metric_samples,
        stop_process,
    )

pytestmark = pytest.mark.timeout(60)

# Six standard rows (more than the native decode step's 4: every step runs the per-op forward, between
# whose layers the check sits), greedy and seeded.
STANDARD = [[1, 403, 407, 261, 378], [1, 207, 28], [1, 400, 313], [1, 33, 44, 55], [1, 90], [1, 61, 62]]
PARAMS = [
    SamplingParams(max_tokens=8, temperature=0, ignore_eos=True),
    SamplingParams(max_tokens=8, temperature=1.0, seed=7, ignore_eos=True),
    SamplingParams(max_tokens=8, temperature=0, ignore_eos=True),
    SamplingParams(max_tokens=8, temperature=0.9, seed=11, n=2, ignore_eos=True),
    SamplingParams(max_tokens=8, temperature=0, ignore_eos=True),
    SamplingParams(max_tokens=8, temperature=0, ignore_eos=True),
]
URGENT = (
    [1, 300, 301, 302, 303, 304],
    SamplingParams(max_tokens=4, temperature=0.7, seed=3, ignore_eos=True),
)
URGENT_STEP, URGENT_LAYER = 2, 2  # the third step (decodes of every standard row), after layer 2
BEFORE_LM_HEAD = 5  # stories260K has 5 layers: calls 1-4 come between them, the 5th before the lm_head


@pytest.fixture(scope="module")
def engines(stories_dir) -> dict[str, LLMEngine]:
    def make(policy: str) -> LLMEngine:
        return LLMEngine(
            EngineConfig(
                model=str(stories_dir),
                dtype="float32",
                device="cpu",
                kv_cache_memory=16 << 20,
                scheduling_policy=policy,
                max_num_seqs=8,
            )
        )

    return {"priority": make("priority"), "fcfs": make("fcfs")}


class _Core:
    """The engine core's side of an interruption, for real (EngineCore, its Inbox on a Unix socket pair),
    with the arrival's timing chosen: the urgent AddRequest is sent at one layer of one step, or between
    two steps. Every step the engine runs is counted by `step`, and each between-layers call is logged."""

    def __init__(self, engine: LLMEngine, at: tuple[int, int] | None, priority: int):
        self.engine, self.at, self.priority = engine, at, priority
        core_side, self.server_side = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.stream = CoreEnd.over(core_side)
        self.inbox = Inbox(self.stream, msgspec.msgpack.Decoder(ClientMessage))
        self.core = EngineCore(engine, None, self.inbox)
        self.check = engine.between_layers  # what the core installed (None under fcfs)
        if self.check is not None:
            engine.between_layers = self._between_layers
        self.step, self.layer, self.calls = 0, 0, []

    def _between_layers(self, least_urgent: int) -> bool:
        self.layer += 1
        self.calls.append((self.step, self.layer, least_urgent))
        if (self.step, self.layer) == self.at:
            self.send_urgent()
        return self.check(least_urgent)

    def send_urgent(self) -> None:
        params = asdict(URGENT[1])
        frame = FrameEncoder().frame(AddRequest("urgent", URGENT[0], params, priority=self.priority))
        self.server_side.sendall(frame)
        assert self.inbox.wait(0)  # delivered: a socketpair's write is readable at once

    def run_step(self) -> list:
        self.layer = 0
        outs = self.engine.step()
        if (self.at is None or self.check is None) and self.step == URGENT_STEP:
            self.send_urgent()  # between steps: the uninterrupted reference, or nothing to send it mid-step
        for message in self.inbox.take():  # as the core's loop does before the next step
            self.core.apply(message, StepUpdate())
        self.step += 1
        return outs

    def close(self) -> None:
        self.engine.between_layers = None
        self.engine.step_listeners.remove(self.core._on_step)
        self.stream.close()
        self.server_side.close()


def _state(engine: LLMEngine) -> dict:
    """What a step changes when it computes: each sequence's progress, tokens, first schedule and
    generator (the urgent request's aside), the prefix cache's registered blocks, the completed-step
    count."""
    seqs = [seq for rid, seqs in engine.requests.items() for seq in seqs if rid != "urgent"]
    return {
        "seqs": {
            (s.request_id, s.index): (
                s.num_computed,
                list(s.token_ids),
                s.first_scheduled_time,
                None if s.generator is None else s.generator.get_state().tolist(),
            )
            for s in seqs
        },
        "cached": dict(engine.block_manager.cached),
        "num_steps": engine.stats.num_steps,
    }


def _run(
    engine: LLMEngine,
    at: tuple[int, int] | None,
    priority: int = 0,
    standard_priority: int | list = 1,
    rows: int = len(STANDARD),
):
    """The first `rows` standard requests, and the urgent one (priority) sent at `at` = (step, layer), or between steps
    URGENT_STEP and the next (at None), run to the end. Returns the tokens of each request's choices, the
    outputs of the step after URGENT_STEP, the engine's state before and after step URGENT_STEP, the
    steps interrupted, and the between-layers calls (step, layer, least_urgent)."""
    core = _Core(engine, at, priority)
    interrupted = engine.stats.num_steps_interrupted
    priorities = (
        standard_priority if isinstance(standard_priority, list) else [standard_priority] * len(STANDARD)
    )
    for i, (prompt, params, p) in enumerate(
        zip(STANDARD[:rows], PARAMS[:rows], priorities[:rows], strict=True)
    ):
        engine.add_request(f"s{i}", prompt, params, priority=p)
    finished, next_step, states = {}, None, []
    try:
        while engine.has_unfinished():
            step = core.step
            if step == URGENT_STEP:
                states.append(_state(engine))
            outs = core.run_step()
            if step == URGENT_STEP:
                states.insert(1, _state(engine))
            if step == URGENT_STEP + 1:
                next_step = {o.request_id: [c.token_ids for c in o.outputs] for o in outs}
            finished.update({o.request_id: [c.token_ids for c in o.outputs] for o in outs if o.finished})
    finally:
        core.close()
    return finished, next_step, states, engine.stats.num_steps_interrupted - interrupted, core.calls


@pytest.mark.parametrize("layer", [URGENT_LAYER, BEFORE_LM_HEAD])
def test_an_urgent_arrival_interrupts_the_step_and_leaves_no_trace(engines, layer):
    engine = engines["priority"]
    reference, _, _, none, _ = _run(engine, None)
    assert none == 0
    tokens, next_step, (before, after), interrupted, calls = _run(engine, (URGENT_STEP, layer))
    assert interrupted == 1
    # Consulted between layers and before the lm_head (5 layers: 5 calls a step) with the priority of
    # the step's least urgent row, and left where the urgent request arrived.
    assert {layer for _, layer, _ in calls} == {1, 2, 3, 4, BEFORE_LM_HEAD}
    assert [c for c in calls if c[0] == URGENT_STEP] == [(URGENT_STEP, i, 1) for i in range(1, layer + 1)]
    assert (URGENT_STEP + 1, 1, 0) in calls
    # As if the step had not run: no progress, token, sampling or prefix-cache entry, not counted.
    assert after == before
    # The urgent request's first token comes from the next step, which runs it alone (the standard rows
    # sit out its prompt step).
    assert list(next_step) == ["urgent"] and len(next_step["urgent"][0]) == 1
    # Token for token what the uninterrupted run produced, greedy and seeded.
    assert tokens == reference


def test_the_one_call_native_decode_step_is_interrupted_between_its_layers(engines):
    """Three standard rows (greedy, seeded, greedy): their decode steps run as one native call
    (kernels/decode_step.c), whose layer loop makes the same between-layers call through a ctypes
    callback; the urgent arrival stops it there, and every token is as without it."""
    engine = engines["priority"]
    if engine.runner.decode_stack is None:
        pytest.skip("no one-call native decode step here (no C compiler, or SHOAL_NATIVE_KERNELS=0)")
    reference, _, _, none, _ = _run(engine, None, rows=3)
    tokens, next_step, (before, after), interrupted, calls = _run(engine, (URGENT_STEP, URGENT_LAYER), rows=3)
    assert none == 0 and interrupted == 1
    assert [c for c in calls if c[0] == URGENT_STEP] == [(URGENT_STEP, 1, 1), (URGENT_STEP, 2, 1)]
    assert after == before and list(next_step) == ["urgent"]
    assert tokens == reference


def test_a_step_with_a_row_as_urgent_as_the_arrival_is_interrupted_for_its_less_urgent_rows(engines):
    """A premium request decoding (priority 0) beside standard rows: another premium arrival interrupts
    their step (its prompt step would leave the standard rows out), and every token is as without it."""
    priorities = [0, 1, 1, 1, 1, 1]
    engine = engines["priority"]
    reference, _, _, _, _ = _run(engine, None, standard_priority=priorities)
    tokens, next_step, _, interrupted, _ = _run(engine, (URGENT_STEP, URGENT_LAYER), 0, priorities)
    assert interrupted == 1 and tokens == reference
    assert set(next_step) == {"urgent", "s0"}  # the premium rows only: its prompt and the premium decode


@pytest.mark.parametrize(("priority", "standard"), [(1, 1), (2, 1), (0, 0)])
def test_an_arrival_no_more_urgent_than_every_row_never_interrupts(engines, priority, standard):
    _, _, _, interrupted, calls = _run(engines["priority"], (URGENT_STEP, URGENT_LAYER), priority, standard)
    assert interrupted == 0 and len(calls) > BEFORE_LM_HEAD * URGENT_STEP


def test_fcfs_never_interrupts(engines):
    engine = engines["fcfs"]
    reference, _, _, _, _ = _run(engine, None, standard_priority=0)
    tokens, _, _, interrupted, calls = _run(engine, (URGENT_STEP, URGENT_LAYER), standard_priority=0)
    assert interrupted == 0 and calls == [] and tokens == reference  # the core installs no call at all
    # Even a between-layers call that says "urgent" at every layer never abandons an fcfs step.
    engine.between_layers = lambda least_urgent: True
    try:
        out = engine.generate([STANDARD[0]], PARAMS[0])[0]
    finally:
        engine.between_layers = None
    assert len(out.outputs[0].token_ids) == PARAMS[0].max_tokens and engine.stats.num_steps_interrupted == 0


def test_the_inbox_holds_what_arrives_mid_step_and_flags_only_a_more_urgent_request():
    core_side, server_side = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    frames = FrameEncoder()
    stream = CoreEnd.over(core_side)
    inbox = Inbox(stream, msgspec.msgpack.Decoder(ClientMessage))
    try:
        sent = [
            AddRequest("low", [1], {}, priority=1),
            AbortRequests(["gone"]),
            AddRequest("premium", [1], {}, priority=0),
        ]
        server_side.sendall(frames.frame(sent[0]))
        server_side.sendall(frames.frame(sent[1]))
        assert not inbox.urgent_arrival(1)  # priority 1: not below 1
        server_side.sendall(frames.frame(sent[2])[:5])  # a frame cut short is not a message yet
        assert not inbox.urgent_arrival(1)
        server_side.sendall(frames.frame(sent[2])[5:])
        assert inbox.urgent_arrival(1)
        assert not inbox.urgent_arrival(0)  # equally urgent: no
        assert inbox.wait(0)
        assert inbox.take() == sent  # held first, in arrival order
        assert not inbox.urgent_arrival(5) and not inbox.wait(0)
        server_side.close()  # the server is gone: the inbox says so
        assert inbox.wait(0) and inbox.take() == [] and inbox.closed
    finally:
        stream.close()
        server_side.close()


def _eventually(condition, seconds: float = 5.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return False


@pytest.fixture(scope="module")
def priority_server():
    server = launch_priority_server("interrupt", max_num_seqs=8)
    yield server
    stop_process(server.proc)


def _metric(url: str, name: str) -> float:
    return sum(metric_samples(httpx.get(f"{url}/metrics").text, name).values())


@pytest.mark.timeout(90)
def test_over_http_a_premium_request_interrupts_the_step_in_flight(priority_server):
    """Six standard requests decode in slow steps (every layer sleeps 0.1 s: about 0.4 s a step); a
    premium request sent meanwhile is admitted by the step right after an interrupted one, whose rows
    are standard requests still unfinished."""
    url = priority_server.url
    httpx.post(f"{url}/debug/faults", json={"layer_delay_s": 0.1}).raise_for_status()
    try:
        with ThreadPoolExecutor(8) as pool, httpx.Client(base_url=url) as client:
            standard = [pool.submit(completion_request_id, client, f"standard {i}", 1, 12) for i in range(6)]
            assert _eventually(lambda: _metric(url, "vllm:num_requests_running") >= 6, seconds=30)
            premium = pool.submit(completion_request_id, client, "premium", 0, 1).result(timeout=60)
            standard_ids = {f.result(timeout=60) for f in standard}
    finally:
        httpx.post(f"{url}/debug/faults", json={})
    steps = httpx.get(f"{url}/debug/schedule").json()["steps"]
    by_number = {step["step"]: step for step in steps}
    admitted = next(s["step"] for s in steps if premium in [a[0] for a in s["admitted"]])
    interrupted = by_number.get(admitted - 1)
    assert interrupted is not None and interrupted["interrupted"], steps
    assert interrupted["abandoned"] and set(interrupted["abandoned"]) <= standard_ids
    assert _metric(url, "shoal:engine_steps_interrupted_total") >= 1
