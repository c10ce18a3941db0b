"""The engine core in its own process (shoal/engine/core_process.py) behind EngineCoreClient.

The deltas it sends, reassembled by the client, must equal what the in-process engine produces (text,
token ids, logprobs, prompt logprobs, finish reasons), and when the core process dies every waiting
request must get an error and the server must stop being ready. The shared live server runs in this
mode too, so every API test in test_server_api.py, test_openai_client.py, test_api_faults.py and
test_fault_injection.py also crosses this boundary.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys

import pytest

from shoal.engine.config import EngineConfig
from shoal.engine.errors import EngineDeadError
from shoal.engine.sampling_params import SamplingParams

pytestmark = pytest.mark.timeout(90)


@pytest.fixture(scope="module")
def config(stories_dir) -> EngineConfig:
    return EngineConfig(model=str(stories_dir), dtype="float32", device="cpu", kv_cache_memory=16 << 20)


PARAMS = [
    SamplingParams(max_tokens=12, temperature=0, logprobs=2, prompt_logprobs=1),
    SamplingParams(
        max_tokens=9, temperature=0.8, seed=7, n=2, stop=[" the"], include_stop_str_in_output=True
    ),
    SamplingParams(max_tokens=6, temperature=0, min_tokens=6, logit_bias={2: 50.0}),
]
PROMPTS = [[1, 403, 407, 261, 378], [1, 207, 28], [1, 400, 313]]


async def _collect(engine, prompts, params, prefix: str = "r") -> list:
    async def one(i: int):
        last = None
        async for out in engine.generate(f"{prefix}{i}", prompts[i], params[i]):
            last = out
        return last

    return await asyncio.gather(*(one(i) for i in range(len(prompts))))


def _summary(out) -> list:
    return [
        out.prompt_logprobs,
        [(o.index, o.text, o.token_ids, o.logprobs, o.finish_reason, o.stop_reason) for o in out.outputs],
    ]


def test_deltas_reassemble_to_the_in_process_outputs(config, monkeypatch):
    import torch

    from shoal.engine.core_client import EngineCoreClient
    from shoal.engine.llm_engine import LLMEngine

    # The same intra-op threads on both sides, so that float sums (logprobs) agree to the last bit.
    monkeypatch.setenv("OMP_NUM_THREADS", str(torch.get_num_threads()))

    local = LLMEngine(config)
    expected = [_summary(out) for out in local.generate(PROMPTS, PARAMS)]

    async def run():
        client = EngineCoreClient(config)
        await client.start()
        try:
            outs = await _collect(client, PROMPTS, PARAMS)
            for out in outs:  # the engine's timestamps cross the boundary with the deltas
                assert all(len(o.token_times) == len(o.token_ids) for o in out.outputs)
                assert out.metrics["first_token_time"] <= out.metrics["finished_time"]
            return [_summary(out) for out in outs], client.stats, client.description
        finally:
            await client.shutdown()

    got, stats, description = asyncio.run(run())
    # Requests reach the core one by one, so its first steps batch them differently from generate()'s:
    # logprobs agree to float32 rounding of differently shaped matmuls, everything else exactly.
    for i, (g, e) in enumerate(zip(got, expected, strict=True)):
        _assert_logprobs_close(g[0], e[0])
        for a, b in zip(g[1], e[1], strict=True):
            assert a[:3] + a[4:] == b[:3] + b[4:], f"request {i}"
            _assert_logprobs_close(a[3], b[3])
    assert stats.num_steps > 0 and stats.num_running == 0
    # The core froze its start-up heap (shoal/gc_heap.py): torch, the model and the tokenizer at least.
    assert description["gc_frozen_objects"] > 10_000


def _assert_logprobs_close(got: list | None, expected: list | None) -> None:
    assert (got is None) == (expected is None)
    for g, e in zip(got or [], expected or [], strict=True):
        assert (g is None and e is None) or (g.keys() == e.keys() and all(abs(g[t] - e[t]) < 1e-4 for t in g))


def test_core_process_death_fails_every_waiting_request(config):
    from shoal.engine.core_client import EngineCoreClient

    async def run():
        client = EngineCoreClient(config)
        await client.start()
        long = SamplingParams(max_tokens=400, ignore_eos=True, temperature=0)
        tasks = [asyncio.ensure_future(_collect(client, [PROMPTS[0]], [long], f"t{k}-")) for k in range(3)]
        for _ in range(2000):
            if client.stats.num_running >= 3:
                break
            await asyncio.sleep(0.01)
        os.kill(client._process.pid, signal.SIGKILL)
        results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 20)
        ready = client.ready
        with pytest.raises(EngineDeadError):
            await _collect(client, [PROMPTS[0]], [long])
        await client.shutdown()
        return results, ready

    results, ready = asyncio.run(run())
    assert all(isinstance(r, EngineDeadError) for r in results), results
    assert not ready


def test_bad_model_fails_at_start_with_the_reason(tmp_path):
    from shoal.engine.core_client import EngineCoreClient

    client = EngineCoreClient(EngineConfig(model=str(tmp_path), device="cpu"))
    with pytest.raises(RuntimeError, match="failed to start"):
        asyncio.run(client.start())
    assert client.phase == "failed"


def test_http_process_imports_no_torch():
    """The HTTP side of the process mode (server, client, the `shoal` command that starts it) runs without
    torch: the engine core has it."""
    code = (
        "import sys\n"
        "import shoal.engine.core_client, shoal.server.app, shoal.server.launch, shoal.cli\n"
        "print('torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_freezing_the_startup_heap_collects_its_garbage_first_and_leaves_nothing_to_walk():
    """In a fresh interpreter (a freeze is for the whole process): garbage cycles made before the freeze
    are reclaimed, not frozen; afterwards the collector tracks only what is created later."""
    code = (
        "import gc, weakref\n"
        "from shoal.gc_heap import freeze_startup_heap\n"
        "class Node: pass\n"
        "kept = [Node() for _ in range(5000)]\n"
        "a, b = Node(), Node(); a.other, b.other = b, a; dead = weakref.ref(a); del a, b\n"
        "frozen = freeze_startup_heap()\n"
        "assert dead() is None, 'a garbage cycle was frozen'\n"
        "assert frozen >= 5000 and gc.get_freeze_count() == frozen\n"
        "tracked = len(gc.get_objects())\n"
        "assert tracked < 100, tracked\n"
        "later = [Node() for _ in range(10)]\n"
        "assert len(gc.get_objects()) >= tracked + 10\n"
        "print('ok', frozen, tracked)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.startswith("ok"), out.stderr


def test_a_request_read_to_its_last_output_sends_no_abort(config):
    """A consumer that stops at the finished output (as the server's streams do) closes the generator there:
    no AbortRequests reaches the core (it used to follow every request, with the core's reply to it). One
    that stops before the end still aborts."""
    from shoal.engine.core_client import EngineCoreClient

    async def run() -> list[list[str]]:
        client = EngineCoreClient(config)
        await client.start()
        sent: list[str] = []
        send = client._send
        client._send = lambda message: (sent.append(type(message).__name__), send(message))[1]
        kinds = []
        try:
            for request_id, stop_early in (("whole", False), ("early", True)):
                # The early one is long enough still to run after its first output is read.
                params = SamplingParams(max_tokens=200 if stop_early else 4, temperature=0, ignore_eos=True)
                agen = client.generate(request_id, PROMPTS[0], params)
                async for out in agen:
                    if out.finished or stop_early:
                        break
                await agen.aclose()
                await asyncio.sleep(
                    0.2
                )  # an abort would be sent from the generator's finalizer at the latest
                kinds.append(sent[:])
                sent.clear()
        finally:
            await client.shutdown()
        return kinds

    whole, early = asyncio.run(run())
    assert whole == ["AddRequest"]
    assert early == ["AddRequest", "AbortRequests"]
