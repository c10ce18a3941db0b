"""Offline throughput (vLLM's `benchmark_throughput`): a batch of requests of mixed lengths, shoal vs HF.

The workload (workload.build_requests, seeded): prompt lengths uniform in [64, 512] tokens cut from real text
(WikiText-2 test if present, else random ids), output lengths uniform in [32, 256], EOS ignored on both sides.

- shoal: every request is handed to the engine at once (`LLMEngine.generate`); continuous batching, chunked
  prefill and the paged KV cache do the rest.
- transformers: `generate` on left-padded batches of `hf_batch_size` requests in arrival order, each batch
  running for the longest output length in it (what a static-batching server does).

Only the requested output tokens count as useful output on both sides (HF's padding rows and tokens past a
request's own length are waste). With iters > 1 each iteration gets a fresh workload (shoal's prefix cache
never helps) and the side that goes first alternates; figures are medians over the iterations.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from shoal.bench import workload
from shoal.bench.report import comparison_table, machine_line, metric_row
from shoal.bench.workload import Request
from shoal.engine.sampling_params import SamplingParams


@dataclass
class StepCounter:
    """An engine step listener: how the steps of one run were filled."""

    steps: int = 0
    prefill_tokens: int = 0
    decode_tokens: int = 0
    step_seconds: float = 0.0
    batch_sizes: list[int] = field(default_factory=list)

    def __call__(self, step) -> None:
        self.steps += 1
        self.prefill_tokens += step.num_prefill_tokens
        self.decode_tokens += step.num_decode_tokens
        self.step_seconds += step.step_seconds
        self.batch_sizes.append(step.batch_size)


def _rates(wall: float, requests: list[Request], output_tokens: int) -> dict:
    prompt_tokens = sum(len(r.prompt_token_ids) for r in requests)
    return {
        "wall_s": wall,
        "requests": len(requests),
        "prompt_tokens": prompt_tokens,
        "output_tokens": output_tokens,
        "output_tokens_per_s": output_tokens / wall,
        "total_tokens_per_s": (prompt_tokens + output_tokens) / wall,
        "requests_per_s": len(requests) / wall,
    }


@torch.inference_mode()
def shoal_run(engine, requests: list[Request]) -> dict:
    params = [SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=r.output_len) for r in requests]
    counter = StepCounter()
    preempted_before = engine.scheduler.num_preemptions
    engine.step_listeners.append(counter)
    try:
        t0 = time.perf_counter()
        outs = engine.generate([r.prompt_token_ids for r in requests], params)
        workload.sync(engine.device)
        wall = time.perf_counter() - t0
    finally:
        engine.step_listeners.remove(counter)
    for i, (req, out) in enumerate(zip(requests, outs, strict=True)):
        got = len(out.outputs[0].token_ids)
        if got != req.output_len:
            raise RuntimeError(f"shoal: request {i} generated {got} tokens, asked for {req.output_len}")
    result = _rates(wall, requests, sum(r.output_len for r in requests))
    result.update(
        steps=counter.steps,
        mean_batch_size=sum(counter.batch_sizes) / max(counter.steps, 1),
        max_batch_size=max(counter.batch_sizes, default=0),
        prefill_tokens_computed=counter.prefill_tokens,
        engine_step_s=counter.step_seconds,
        preemptions=engine.scheduler.num_preemptions - preempted_before,
        prefix_cache_hit_tokens=sum(o.num_cached_tokens for o in outs),
    )
    return result


@torch.inference_mode()
def hf_run(
    model, requests: list[Request], batch_size: int, pad_id: int, device: torch.device, log=None
) -> dict:
    batches = []
    t0 = time.perf_counter()
    for start in range(0, len(requests), batch_size):
        batch = requests[start : start + batch_size]
        ids, mask = workload.left_pad([r.prompt_token_ids for r in batch], pad_id)
        new = max(r.output_len for r in batch)
        b0 = time.perf_counter()
        out = model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            **workload.hf_generate_kwargs(new, pad_id),
        )
        workload.sync(device)
        seconds = time.perf_counter() - b0
        if out.shape[1] - ids.shape[1] != new:
            raise RuntimeError(
                f"transformers generated {out.shape[1] - ids.shape[1]} tokens, asked for {new}"
            )
        batches.append(
            {"size": len(batch), "padded_prompt_len": ids.shape[1], "new_tokens": new, "seconds": seconds}
        )
        if log:
            log(
                f"  HF batch {len(batches)}: {len(batch)} x ({ids.shape[1]} + {new}) tokens in {seconds:.1f} s"
            )
    wall = time.perf_counter() - t0
    result = _rates(wall, requests, sum(r.output_len for r in requests))
    result.update(
        batch_size=batch_size,
        generated_tokens=sum(b["size"] * b["new_tokens"] for b in batches),
        batches=batches,
    )
    return result


def _median_side(runs: list[dict]) -> dict | None:
    if not runs:
        return None
    keys = ("wall_s", "output_tokens_per_s", "total_tokens_per_s", "requests_per_s")
    side = {k: workload.median([r[k] for r in runs]) for k in keys}
    side["best_output_tokens_per_s"] = max(r["output_tokens_per_s"] for r in runs)
    side.update({k: v for k, v in runs[0].items() if k not in keys and k != "batches"})
    side["runs"] = runs
    return side


def run_throughput(
    model: str | None = None,
    dtype: str = "auto",
    device: str = "auto",
    num_prompts: int = 64,
    input_len_range: tuple[int, int] = (64, 512),
    output_len_range: tuple[int, int] = (32, 256),
    hf_batch_size: int = 16,
    iters: int = 1,
    seed: int = 0,
    skip_hf: bool = False,
    max_num_seqs: int | None = None,
    max_num_batched_tokens: int | None = None,
    max_model_len: int | None = None,
    dataset: Path | None = workload.DEFAULT_DATASET,
    threads: int | None = None,
    compile: bool = False,
    log=print,
) -> dict:
    """Run the benchmark and return its result (also what --output-json writes)."""
    workload.set_threads(threads)
    (lo_in, hi_in), (lo_out, hi_out) = input_len_range, output_len_range
    if (
        num_prompts < 1
        or hf_batch_size < 1
        or iters < 1
        or not (1 <= lo_in <= hi_in and 1 <= lo_out <= hi_out)
    ):
        raise ValueError(
            "need num_prompts, hf_batch_size, iters >= 1 and 1 <= min <= max for both length ranges"
        )
    model = model or workload.default_model()
    load_before = workload.load_average()
    log(f"loading shoal engine: {model} ({dtype})")
    engine = workload.build_engine(
        model,
        dtype,
        device,
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max_num_batched_tokens,
        max_model_len=max_model_len,
        compile=compile,
    )
    t_warm = time.perf_counter()
    engine.warm_up()  # with compile: the torch.compile time is spent here, before anything is timed
    warm_up_s = time.perf_counter() - t_warm
    vocab = engine.model_config.vocab_size
    source = workload.TokenSource.load(engine.tokenizer, vocab, dataset, num_prompts * (iters + 1) * hi_in)
    workloads = [
        workload.build_requests(source, num_prompts, input_len_range, output_len_range, seed + i)
        for i in range(iters)
    ]
    rng = random.Random(seed - 1)
    warm = [Request(source.take(rng, rng.randint(lo_in, hi_in)), min(8, hi_out)) for _ in range(2)]

    hf_model = pad_id = None
    if not skip_hf:
        log("loading transformers model")
        hf_model = workload.load_hf_model(engine.model_path, engine.dtype, engine.device)
        pad_id = workload.hf_pad_token_id(hf_model)

    log("warm-up")
    shoal_run(engine, warm)
    if hf_model is not None:
        hf_run(hf_model, warm, len(warm), pad_id, engine.device)

    shoal_runs, hf_runs, loads = [], [], []
    for i, requests in enumerate(workloads):
        order = ["shoal", "hf"] if i % 2 == 0 else ["hf", "shoal"]
        for side in order:
            load = workload.load_average()
            if side == "shoal":
                log(f"iter {i + 1}/{iters}: shoal, {len(requests)} requests at once")
                shoal_runs.append(shoal_run(engine, requests))
                log(f"  shoal: {shoal_runs[-1]['output_tokens_per_s']:.1f} output tokens/s")
            elif hf_model is not None:
                log(f"iter {i + 1}/{iters}: transformers, batches of {hf_batch_size}")
                hf_runs.append(hf_run(hf_model, requests, hf_batch_size, pad_id, engine.device, log))
                log(f"  HF: {hf_runs[-1]['output_tokens_per_s']:.1f} output tokens/s")
            else:
                continue
            loads.append({"iter": i + 1, "side": side, "before": load, "after": workload.load_average()})

    s, h = _median_side(shoal_runs), _median_side(hf_runs)
    if h is not None:
        h["attn_implementation"] = getattr(hf_model.config, "_attn_implementation", None)
    first = workloads[0]
    return {
        "benchmark": "throughput",
        "config": {
            "model": str(engine.model_path),
            "dtype": str(engine.dtype).replace("torch.", ""),
            "device": str(engine.device),
            "num_prompts": num_prompts,
            "input_len_range": list(input_len_range),
            "output_len_range": list(output_len_range),
            "hf_batch_size": hf_batch_size,
            "iters": iters,
            "seed": seed,
            "prompt_source": source.description,
            "compile": compile,
            "shoal_warm_up_s": warm_up_s,
            "prompt_tokens": sum(len(r.prompt_token_ids) for r in first),
            "output_tokens": sum(r.output_len for r in first),
        },
        "machine": workload.machine_info(),
        "engine": engine.describe(),
        "load_average": {"before": load_before, "after": workload.load_average(), "per_run": loads},
        "shoal": s,
        "hf": h,
        "ratio": {
            "output_tokens_per_s": workload.ratio(s["output_tokens_per_s"], h and h["output_tokens_per_s"]),
            "requests_per_s": workload.ratio(s["requests_per_s"], h and h["requests_per_s"]),
            "best_output_tokens_per_s": workload.ratio(
                s["best_output_tokens_per_s"], h and h["best_output_tokens_per_s"]
            ),
        },
    }


def print_throughput(result: dict, console=None) -> None:
    from rich.console import Console

    console = console or Console()
    c, s, h, r = result["config"], result["shoal"], result["hf"] or {}, result["ratio"]
    lo_in, hi_in = c["input_len_range"]
    lo_out, hi_out = c["output_len_range"]
    title = (
        f"throughput: {Path(c['model']).name}, {c['dtype']}, {c['device']}, {c['num_prompts']} requests "
        f"(prompt {lo_in}-{hi_in}, output {lo_out}-{hi_out} tokens), HF batch {c['hf_batch_size']}"
    )
    rows = [
        metric_row(
            "output tokens/s",
            s["output_tokens_per_s"],
            h.get("output_tokens_per_s"),
            ".1f",
            r["output_tokens_per_s"],
        )
    ]
    if c["iters"] > 1:
        rows.append(
            metric_row(
                "output tokens/s, best run",
                s["best_output_tokens_per_s"],
                h.get("best_output_tokens_per_s"),
                ".1f",
                r["best_output_tokens_per_s"],
            )
        )
    rows += [
        metric_row(
            "total (prompt + output) tokens/s",
            s["total_tokens_per_s"],
            h.get("total_tokens_per_s"),
            ".1f",
            compared=False,
        ),
        metric_row("requests/s", s["requests_per_s"], h.get("requests_per_s"), ".3f", r["requests_per_s"]),
        metric_row("wall time (s)", s["wall_s"], h.get("wall_s"), ".1f", compared=False),
        (
            "tokens generated (useful)",
            f"{s['output_tokens']}",
            f"{h['generated_tokens']} ({h['output_tokens']})" if h else "-",
            "",
        ),
    ]
    console.print(comparison_table(title, rows))
    console.print(
        f"shoal: {s['steps']} steps, mean batch {s['mean_batch_size']:.1f} sequences (max {s['max_batch_size']}), "
        f"{s['preemptions']} preemptions, {s['prefix_cache_hit_tokens']} prompt tokens from the prefix cache"
    )
    console.print(machine_line(result))
