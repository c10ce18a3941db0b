"""Where an engine's time goes for N concurrent streams, in process: the step times of one LLMEngine serving
N requests of --prompt-len tokens and --output-len greedy tokens each (EOS ignored), the load
`shoal bench serve-compare` runs for its concurrent streams, without HTTP or a client.

    python bench/engine_steps.py [--streams 32] [--dtype float32] [--rounds 3] [--threads 2] [--model DIR]

Per round (fresh prompts each): the first steps' times (the prompt steps: --streams x --prompt-len tokens
in chunks of max_num_batched_tokens, 512 on CPU), the mean of the decode steps after them, the whole
round's time and its output tokens/s. Compare commits or settings by running each in turn on a quiet machine,
several rounds, and reading the ranges.
"""

from __future__ import annotations

import argparse
import time

import torch

from shoal.engine.config import EngineConfig
from shoal.engine.llm_engine import LLMEngine
from shoal.engine.sampling_params import SamplingParams

SHOWN_FIRST_STEPS = 4


def run_round(engine: LLMEngine, round_index: int, args: argparse.Namespace) -> list[float]:
    """Seconds of each step until the round's requests are all done."""
    vocab = engine.model_config.vocab_size
    params = SamplingParams(max_tokens=args.output_len, ignore_eos=True, temperature=0)
    for i in range(args.streams):
        prompt = [(i * 7919 + j * 104729 + round_index) % (vocab - 1) + 1 for j in range(args.prompt_len)]
        engine.add_request(f"round{round_index}-{i}", prompt, params)
    times = []
    while engine.has_unfinished():
        t0 = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="models/SmolLM2-135M-Instruct")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--streams", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    engine = LLMEngine(EngineConfig(model=args.model, dtype=args.dtype))
    engine.warm_up()
    print(f"{args.model} {args.dtype}, {args.threads} threads, {args.streams} streams")
    for r in range(args.rounds):
        times = run_round(engine, r, args)
        first = [round(t * 1e3) for t in times[:SHOWN_FIRST_STEPS]]
        rest = times[SHOWN_FIRST_STEPS:] or [0.0]
        total = sum(times)
        print(
            f"round {r}: first steps {first} ms, later steps mean {sum(rest) / len(rest) * 1e3:.1f} ms, "
            f"{len(times)} steps in {total:.2f} s, {args.streams * args.output_len / total:.1f} output tok/s"
        )


if __name__ == "__main__":
    main()
