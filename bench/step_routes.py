"""Two engine routes timed against their alternative in one process, alternating (2026-11-30 changes):

- **prompt steps**: a prompt of N tokens computed as decode rows of the one-call native step
  (engine/model_runner.py, chunks of at most SHORT_PROMPT_TOKENS) against the per-op prefill
  (`runner.short_prompt_tokens = 0`); one prompt step per measurement, median of the rounds;
- **single-stream decode**: gemm.c's bf16 decode loop for 1-4 rows against its tiles
  (kernels/gemm.py `set_bf16_decode_loop`), whichever the load-time timing chose; output tokens/s of
  one greedy stream.

    python bench/step_routes.py [--threads 2] [--rounds 5] [--prompt-lens 13,32,64] [--decode-tokens 128]

The model's dtype is `auto` (bfloat16 where the CPU has AVX512-BF16); the decode comparison needs the bf16
kernel and is skipped, with the reason, without it. State the CPU beside every number.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from shoal.engine.config import EngineConfig
from shoal.engine.llm_engine import LLMEngine
from shoal.engine.sampling_params import SamplingParams
from shoal.kernels import gemm


def prompt_steps(engine: LLMEngine, lengths: list[int], rounds: int) -> dict[str, dict[int, float]]:
    """Median ms of one prompt step of each length, through the native rows and through the per-op forward."""
    runner, default = engine.runner, engine.runner.short_prompt_tokens
    params = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
    times: dict[str, dict[int, list[float]]] = {"native rows": {}, "per-op": {}}
    for r in range(rounds):
        for route, limit in (("native rows", max(lengths)), ("per-op", 0)):
            runner.short_prompt_tokens = limit
            for n in lengths:
                prompt = [1] + [100 + (r * 31 + k * 7 + len(route)) % 9000 for k in range(n - 1)]
                engine.add_request(f"{route}-{n}-{r}", prompt, params)
                t0 = time.perf_counter()
                engine.step()
                times[route].setdefault(n, []).append(1000 * (time.perf_counter() - t0))
                while engine.has_unfinished():
                    engine.step()
    runner.short_prompt_tokens = default
    return {route: {n: statistics.median(v) for n, v in per.items()} for route, per in times.items()}


def decode_routes(engine: LLMEngine, tokens: int, rounds: int) -> dict[str, float]:
    """Median output tokens/s of one greedy stream with gemm.c's bf16 decode loop on and off."""
    chosen = gemm.bf16_decode_loop()
    params = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True)
    rates: dict[str, list[float]] = {"decode loop": [], "tiles": []}
    for r in range(rounds):
        for route, on in (("decode loop", True), ("tiles", False)):
            gemm.set_bf16_decode_loop(on)
            t0 = time.perf_counter()
            engine.generate([[1, 504, 3000 + r, 77]], params)
            rates[route].append(tokens / (time.perf_counter() - t0))
    gemm.set_bf16_decode_loop(chosen)
    return {route: statistics.median(v) for route, v in rates.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="models/SmolLM2-135M-Instruct")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--prompt-lens", default="13,32,64")
    parser.add_argument("--decode-tokens", type=int, default=128)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    engine = LLMEngine(
        EngineConfig(model=args.model, dtype="auto", device="cpu", enable_prefix_caching=False)
    )
    engine.warm_up()
    info = engine.describe()
    print(f"{info['dtype']}, {args.threads} threads, bf16 route chosen at load: {info['bf16_decode_route']}")
    lengths = [int(n) for n in args.prompt_lens.split(",")]
    for route, per in prompt_steps(engine, lengths, args.rounds).items():
        print(f"prompt step, {route}: " + ", ".join(f"{n} tokens {ms:.1f} ms" for n, ms in per.items()))
    if gemm.bf16_decode_loop() is None:
        print("single-stream decode routes: skipped (no bf16 gemm kernel built for this CPU)")
        return
    for route, rate in decode_routes(engine, args.decode_tokens, args.rounds).items():
        print(f"single-stream decode, {route}: {rate:.1f} tok/s")


if __name__ == "__main__":
    main()
