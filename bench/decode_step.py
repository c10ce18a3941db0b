"""Batched decode steps in process: the one-call native step (kernels/decode_step.c) against the per-op
forward, on the same runner, steps interleaved.

    flock /work/notes/bench.lock python bench/decode_step.py [--dtype float32] [--sequences 8,32,64]
        [--steps 10] [--threads 2] [--model DIR]

For each sequence count N: one ModelRunner of the model (loaded as the engine loads it: linears packed,
float32's gemm panels made where RAM allows), N sequences of --prompt-len prompt tokens prefilled one by
one, then --steps decode steps of all N a side, alternating one-call / per-op (the order flips every
round, so a side is not always the one after the other's cache misses). A step is `ModelRunner.run`: the
decoder stack, then the lm_head over N rows and the float cast (the same on both sides), no sampling. The
first step of each side is dropped (scratch allocation); each side reports its median and best step.
Where the one-call step does not take N tokens (bfloat16 without its gemm kernel, quantized models: its
max_tokens is 4) both sides run the per-op forward, and the row says so.

Read ratios on a shared machine (OpenMP threads waiting for a core inflate every step alike); the best
step is what the code can do.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from shoal.engine.model_runner import ModelRunner, StepInput
from shoal.model.loader import load_model

BLOCK = 16


def step_times(
    model, dtype: torch.dtype, seqs: int, steps: int, prompt_len: int
) -> tuple[dict[str, list[float]], bool]:
    """Seconds of each decode step of `seqs` sequences, per side ("one-call", "per-op"), and whether the
    one-call step took them (else both sides ran the per-op forward)."""
    per_seq = -(-(prompt_len + 2 * steps + 2) // BLOCK)
    runner = ModelRunner(model, seqs * per_seq, BLOCK, torch.device("cpu"), dtype)
    stack = runner.decode_stack
    tables = [list(range(i * per_seq, (i + 1) * per_seq)) for i in range(seqs)]
    vocab = model.config.vocab_size
    for i, table in enumerate(tables):
        prompt = [(i * 7919 + j * 104729) % (vocab - 1) + 1 for j in range(prompt_len)]
        runner.run(StepInput([prompt], [0], [table], [[prompt_len - 1]]))
    lens, times = [prompt_len] * seqs, {"one-call": [], "per-op": []}
    for r in range(steps):
        for side in ("one-call", "per-op") if r % 2 == 0 else ("per-op", "one-call"):
            runner.decode_stack = stack if side == "one-call" else None
            inp = StepInput(
                [[(i + r) % (vocab - 1) + 1] for i in range(seqs)], list(lens), tables, [[0]] * seqs
            )
            t0 = time.perf_counter()
            runner.run(inp)
            times[side].append(time.perf_counter() - t0)
            lens = [n + 1 for n in lens]
    return times, stack is not None and seqs <= stack.max_tokens


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="models/SmolLM2-135M-Instruct")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--sequences", default="8,32,64", help="comma-separated sequence counts")
    parser.add_argument("--steps", type=int, default=10, help="steps a side")
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    model = load_model(Path(args.model), dtype, torch.device("cpu"))[0]
    with open("/proc/loadavg") as f:
        load = f.read().split()[0]
    print(f"{args.model} {args.dtype}, {args.threads} threads, load {load} at start")
    print("| sequences | one-call median (best) ms | per-op median (best) ms | speed-up (median) |")
    print("|---|---|---|---|")
    for seqs in (int(n) for n in args.sequences.split(",")):
        times, taken = step_times(model, dtype, seqs, args.steps, args.prompt_len)
        (a, a_best), (b, b_best) = ((statistics.median(t[1:]), min(t[1:])) for t in times.values())
        note = "" if taken else " (both per-op: the one-call step takes 1-4)"
        print(
            f"| {seqs}{note} | {a * 1e3:.1f} ({a_best * 1e3:.1f}) | {b * 1e3:.1f} ({b_best * 1e3:.1f}) | {b / a:.2f}x |"
        )
    with open("/proc/loadavg") as f:
        print(f"load {f.read().split()[0]} at the end")


if __name__ == "__main__":
    main()
