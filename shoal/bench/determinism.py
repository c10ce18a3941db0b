"""`shoal bench determinism`: what `--deterministic` costs in throughput, against the default, in one process.

Two in-process engines on the same weights, dtype and threads, one with the mode (docs/determinism.md):
each round builds a fresh seeded workload of mixed requests (prompt and output lengths uniform in their
ranges, real-text token ids; fresh so the prefix cache never helps), seeded sampling at temperature 1 with
EOS ignored, and runs it through `LLMEngine.generate` on both engines, in alternating order (so a drift in
machine load falls on both). Reported: output and total tokens/s per side (median of the rounds) and the
deterministic / default ratio, which is what to quote on a shared machine; and the process CPU seconds
per output token (every thread of this process), less disturbed than wall time when other jobs take the
cores (OpenMP threads that spin while waiting for a core still count, so it is not immune either).
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

from shoal.bench import workload
from shoal.engine.sampling_params import SamplingParams

SIDES = ("default", "deterministic")


def run_determinism(
    model: str | None = None,
    dtype: str = "bfloat16",
    threads: int | None = None,
    num_prompts: int = 16,
    input_len: tuple[int, int] = (32, 256),
    output_len: tuple[int, int] = (16, 64),
    rounds: int = 3,
    seed: int = 0,
    dataset: Path = workload.DEFAULT_DATASET,
    log=print,
) -> dict:
    """Tokens/s of each side per round and their medians; ValueError for a bad model or dtype."""
    import torch

    if threads is not None:
        torch.set_num_threads(threads)
    model = model or workload.default_model()
    load_before = workload.load_average()
    engines = {
        side: workload.build_engine(
            model, dtype, device="cpu", max_model_len=512, deterministic=side == "deterministic"
        )
        for side in SIDES
    }
    for engine in engines.values():
        engine.warm_up()
    first = engines["default"]
    needed = num_prompts * input_len[1] * rounds
    source = workload.TokenSource.load(first.tokenizer, first.model_config.vocab_size, dataset, needed)
    runs: dict[str, list[dict]] = {side: [] for side in SIDES}
    for r in range(rounds):
        requests = workload.build_requests(source, num_prompts, input_len, output_len, seed=seed + r)
        for side in SIDES if r % 2 == 0 else reversed(SIDES):
            runs[side].append(_time(engines[side], requests, seed + r))
            log(f"round {r + 1}/{rounds} {side}: {runs[side][-1]['output_tokens_per_s']:.1f} output tokens/s")
    medians = {side: _median(runs[side]) for side in SIDES}
    return {
        "machine": workload.machine_info(),
        "load_average": {"before": load_before, "after": workload.load_average()},
        "config": {
            "model": model,
            "dtype": str(first.dtype).replace("torch.", ""),
            "threads": torch.get_num_threads(),
            "num_prompts": num_prompts,
            "input_len": list(input_len),
            "output_len": list(output_len),
            "rounds": rounds,
            "dataset": source.description,
        },
        "runs": runs,
        "median": medians,
        "ratio": {
            key: medians["deterministic"][key] / medians["default"][key]
            for key in ("output_tokens_per_s", "total_tokens_per_s", "cpu_ms_per_output_token")
        },
    }


def _time(engine, requests: list[workload.Request], seed: int) -> dict:
    prompts = [r.prompt_token_ids for r in requests]
    params = [
        SamplingParams(temperature=1.0, seed=seed * 1000 + i, max_tokens=r.output_len, ignore_eos=True)
        for i, r in enumerate(requests)
    ]
    t0, cpu0 = time.perf_counter(), time.process_time()
    outs = engine.generate(prompts, params)
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    output_tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    prompt_tokens = sum(len(p) for p in prompts)
    return {
        "wall_s": wall,
        "output_tokens_per_s": output_tokens / wall,
        "total_tokens_per_s": (prompt_tokens + output_tokens) / wall,
        "cpu_ms_per_output_token": cpu * 1e3 / output_tokens,
    }


def _median(runs: list[dict]) -> dict:
    return {key: statistics.median(run[key] for run in runs) for key in runs[0]}


def markdown(result: dict) -> str:
    """The docs/benchmarks.md table: one row per side, the ratio in the last column."""
    c, m, lo = result["config"], result["machine"], result["load_average"]
    lines = [
        f"{c['model']}, {c['dtype']}, {c['threads']} threads, {c['num_prompts']} requests a round (prompts "
        f"{c['input_len'][0]}-{c['input_len'][1]}, outputs {c['output_len'][0]}-{c['output_len'][1]} tokens, "
        f"seeded, temperature 1), median of {c['rounds']} rounds; {m['cpu']}, {m['cpu_cores']} cores; load "
        f"average before {lo['before']}, after {lo['after']}",
        "",
        "| mode | output tokens/s | total tokens/s | throughput vs default | CPU ms per output token |"
        " CPU vs default |",
        "|---|---|---|---|---|---|",
    ]
    for side in SIDES:
        med, det = result["median"][side], side == "deterministic"
        ratio = result["ratio"]["output_tokens_per_s"] if det else 1.0
        cpu_ratio = result["ratio"]["cpu_ms_per_output_token"] if det else 1.0
        lines.append(
            f"| {side} | {med['output_tokens_per_s']:.1f} | {med['total_tokens_per_s']:.1f} | {ratio:.2f}x | "
            f"{med['cpu_ms_per_output_token']:.0f} | {cpu_ratio:.2f}x |"
        )
    return "\n".join(lines)
