"""What the interrupt check costs a decode step: single-stream decode of an LLMEngine with and without the
engine core's between-layers call (engine/interrupt.py), the real one: EngineCore's Inbox polling its stream
(a Unix socket) between every two decoder layers, through the one-call native step's ctypes callback where that
step runs (kernels/decode_step.c) and the per-op forward's Python call elsewhere.

    flock /work/notes/bench.lock python bench/between_layers.py [--model DIR] [--threads 2] [--steps 64]

Two engines on the same model (priority policy; the "check" one has the core's call installed, nothing
ever arrives so no step is interrupted) decode the same prompt in alternating rounds of --steps tokens,
--rounds times; each side's median step time is reported with its ratio, with the CPU and dtype. The
alternation makes a load change hit both sides alike.
"""

from __future__ import annotations

import argparse
import socket
import statistics
import time

import msgspec
import torch

from shoal.bench import workload
from shoal.engine.config import EngineConfig
from shoal.engine.core_process import EngineCore
from shoal.engine.core_stream import CoreEnd
from shoal.engine.interrupt import Inbox
from shoal.engine.llm_engine import LLMEngine
from shoal.engine.messages import ClientMessage
from shoal.engine.sampling_params import SamplingParams


def _engine(model: str, dtype: str) -> LLMEngine:
    config = EngineConfig(model=model, dtype=dtype, kv_cache_memory=256 << 20, scheduling_policy="priority")
    return LLMEngine(config)


def _round_ms(engine: LLMEngine, prompt: list[int], steps: int) -> float:
    """The median decode step (ms) of one request of `steps` greedy tokens after its prompt step."""
    engine.add_request(
        f"r{time.monotonic_ns()}", prompt, SamplingParams(max_tokens=steps, temperature=0, ignore_eos=True)
    )
    engine.step()  # the prompt
    times = []
    while engine.has_unfinished():
        t0 = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=8)
    args = parser.parse_args()
    workload.set_threads(args.threads)
    model = args.model or workload.default_model()
    plain, checked = _engine(model, args.dtype), _engine(model, args.dtype)
    core_side, server_side = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    stream = CoreEnd.over(core_side)
    core = EngineCore(checked, None, Inbox(stream, msgspec.msgpack.Decoder(ClientMessage)))
    assert checked.between_layers is not None and plain.between_layers is None
    prompt = plain.tokenizer.encode("The history of the city begins with a small settlement by the river")
    for e in (plain, checked):
        _round_ms(e, prompt, 8)  # warm-up
    sides: dict[str, list[float]] = {"without": [], "with": []}
    for i in range(args.rounds):
        order = [("without", plain), ("with", checked)]
        for name, engine in order if i % 2 == 0 else order[::-1]:
            sides[name].append(_round_ms(engine, prompt, args.steps))
    without, with_check = (statistics.median(sides[k]) for k in ("without", "with"))
    native = plain.runner.decode_stack is not None
    m = workload.machine_info()
    print(
        f"{m['cpu']}, {m['cpu_cores_usable']} cores, dtype {plain.dtype}, {torch.get_num_threads()} threads, "
        f"{'one-call native step' if native else 'per-op forward'}, {len(plain.runner.kv_caches)} layers"
    )
    print(
        f"decode step median of {args.rounds} rounds x {args.steps} steps: without the check {without:.2f} ms, "
        f"with it {with_check:.2f} ms ({with_check / without:.3f}x); rounds {sides}"
    )
    core.engine.between_layers = None
    stream.close()
    server_side.close()


if __name__ == "__main__":
    main()
