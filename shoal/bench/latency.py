"""Single-stream latency (vLLM's `benchmark_latency`): one prompt, a fixed number of new tokens, shoal vs HF.

Both sides decode greedily with EOS ignored, on the same weights, dtype and prompt. After a full-length
warm-up of each, the sides alternate (shoal, HF, then HF, shoal, ...) so a load change on the machine hits
both; every iteration uses a fresh prompt (the same one on both sides) so shoal's prefix cache never helps.
Reported per side: time to first token, decode tokens/s ((N - 1) tokens after the first, over the time after
the first) and end-to-end time, each the median over the iterations, and shoal/HF ratios; also each side's
best run (the one least disturbed by other load on the machine) and the ratio of the best runs.
"""

from __future__ import annotations

import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from shoal.bench import workload
from shoal.bench.report import comparison_table, machine_line, metric_row
from shoal.engine.sampling_params import SamplingParams


@dataclass
class Run:
    ttft_s: float
    total_s: float
    output_tokens: int
    token_ids: list[int]

    @property
    def decode_tokens_per_s(self) -> float:
        decode_s = self.total_s - self.ttft_s
        return (self.output_tokens - 1) / decode_s if decode_s > 0 else float("nan")

    def summary(self) -> dict:
        d = asdict(self)
        del d["token_ids"]
        d["decode_tokens_per_s"] = self.decode_tokens_per_s
        d["e2e_tokens_per_s"] = self.output_tokens / self.total_s
        return d


@torch.inference_mode()
def shoal_once(engine, prompt: list[int], output_len: int) -> Run:
    params = SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=output_len)
    request_id = f"bench-latency-{time.monotonic_ns()}"
    t0 = time.perf_counter()
    engine.add_request(request_id, prompt, params)
    seq = engine.requests[request_id][0]
    first, out = None, None
    while out is None:
        for o in engine.step():
            if o.request_id == request_id and o.finished:
                out = o
        if first is None and seq.num_output_tokens:
            first = time.perf_counter()
    end = time.perf_counter()
    if out.num_cached_tokens:
        raise RuntimeError(
            f"the prefix cache served {out.num_cached_tokens} prompt tokens: not a cold prompt"
        )
    tokens = out.outputs[0].token_ids
    return Run(first - t0, end - t0, len(tokens), list(tokens))


@torch.inference_mode()
def hf_once(model, prompt: list[int], output_len: int, pad_id: int, device: torch.device) -> Run:
    ids = torch.tensor([prompt], dtype=torch.long, device=device)
    mask = torch.ones_like(ids)
    clock = workload.token_clock()
    t0 = time.perf_counter()
    out = model.generate(
        input_ids=ids,
        attention_mask=mask,
        stopping_criteria=[clock],
        **workload.hf_generate_kwargs(output_len, pad_id),
    )
    workload.sync(device)
    end = time.perf_counter()
    tokens = out[0, len(prompt) :].tolist()
    first = clock.times[0] if clock.times else end
    return Run(first - t0, end - t0, len(tokens), tokens)


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _side(runs: list[Run]) -> dict:
    return {
        "decode_tokens_per_s": workload.median([r.decode_tokens_per_s for r in runs]),
        "best_decode_tokens_per_s": max((r.decode_tokens_per_s for r in runs), default=None),
        "ttft_s": workload.median([r.ttft_s for r in runs]),
        "best_ttft_s": min((r.ttft_s for r in runs), default=None),
        "e2e_s": workload.median([r.total_s for r in runs]),
        "output_tokens": runs[0].output_tokens if runs else 0,
        "runs": [r.summary() for r in runs],
    }


def run_latency(
    model: str | None = None,
    dtype: str = "auto",
    device: str = "auto",
    input_len: int = 32,
    output_len: int = 128,
    iters: int = 3,
    warmup_iters: int = 1,
    seed: int = 0,
    skip_hf: bool = False,
    dataset: Path | None = workload.DEFAULT_DATASET,
    max_model_len: int | None = None,
    threads: int | None = None,
    compile: bool = False,
    profile: Path | None = None,
    log=print,
) -> dict:
    """Run the benchmark and return its result (also what --output-json writes). With profile, one more
    shoal run (untimed) goes through torch.profiler: a Chrome trace is written there (open it in
    chrome://tracing or ui.perfetto.dev) and the top ops by self CPU time go into the result."""
    workload.set_threads(threads)
    if input_len < 1 or output_len < 2 or iters < 1 or warmup_iters < 0:
        raise ValueError("need input_len >= 1, output_len >= 2, iters >= 1 and warmup_iters >= 0")
    model = model or workload.default_model()
    load_before = workload.load_average()
    log(f"loading shoal engine: {model} ({dtype})")
    engine = workload.build_engine(model, dtype, device, max_model_len=max_model_len, compile=compile)
    t_warm = time.perf_counter()
    engine.warm_up()  # with compile: the torch.compile time is spent here, before anything is timed
    warm_up_s = time.perf_counter() - t_warm
    vocab = engine.model_config.vocab_size
    source = workload.TokenSource.load(
        engine.tokenizer, vocab, dataset, input_len * (iters + warmup_iters) * 4
    )
    rng = random.Random(seed)
    warm_prompts = [source.take(rng, input_len) for _ in range(warmup_iters)]
    prompts = [source.take(rng, input_len) for _ in range(iters)]
    profile_prompt = source.take(rng, input_len) if profile else None  # a cold prompt of its own

    hf_model = pad_id = None
    if not skip_hf:
        log("loading transformers model")
        hf_model = workload.load_hf_model(engine.model_path, engine.dtype, engine.device)
        pad_id = workload.hf_pad_token_id(hf_model)

    def hf(prompt):
        run = hf_once(hf_model, prompt, output_len, pad_id, engine.device)
        if run.output_tokens != output_len:
            raise RuntimeError(f"transformers generated {run.output_tokens} tokens, asked for {output_len}")
        return run

    def shoal(prompt):
        run = shoal_once(engine, prompt, output_len)
        if run.output_tokens != output_len:
            raise RuntimeError(f"shoal generated {run.output_tokens} tokens, asked for {output_len}")
        return run

    for p in warm_prompts:
        log("warm-up")
        shoal(p)
        if hf_model is not None:
            hf(p)

    shoal_runs, hf_runs, agreement = [], [], []
    for i, p in enumerate(prompts):
        order = ["shoal", "hf"] if i % 2 == 0 else ["hf", "shoal"]
        got = {}
        for side in order:
            if side == "shoal":
                got[side] = shoal(p)
                shoal_runs.append(got[side])
            elif hf_model is not None:
                got[side] = hf(p)
                hf_runs.append(got[side])
        msg = f"iter {i + 1}/{iters}: shoal {got['shoal'].decode_tokens_per_s:.1f} tok/s"
        if "hf" in got:
            msg += f", HF {got['hf'].decode_tokens_per_s:.1f} tok/s"
            agreement.append(_common_prefix(got["shoal"].token_ids, got["hf"].token_ids))
        log(msg)

    profile_top = _profile(engine, profile_prompt, output_len, profile, log) if profile else None
    s = _side(shoal_runs)
    h = _side(hf_runs) if hf_runs else None
    if h is not None:
        h["attn_implementation"] = getattr(hf_model.config, "_attn_implementation", None)
    return {
        "benchmark": "latency",
        "config": {
            "model": str(engine.model_path),
            "dtype": str(engine.dtype).replace("torch.", ""),
            "device": str(engine.device),
            "input_len": input_len,
            "output_len": output_len,
            "iters": iters,
            "warmup_iters": warmup_iters,
            "seed": seed,
            "prompt_source": source.description,
            "compile": compile,
            "shoal_warm_up_s": warm_up_s,
        },
        "machine": workload.machine_info(),
        "engine": engine.describe(),
        "load_average": {"before": load_before, "after": workload.load_average()},
        "shoal": s,
        "hf": h,
        "ratio": {
            "decode_tokens_per_s": workload.ratio(s["decode_tokens_per_s"], h and h["decode_tokens_per_s"]),
            # best run of each side: the least disturbed by other load on the machine
            "best_decode_tokens_per_s": workload.ratio(
                s["best_decode_tokens_per_s"], h and h["best_decode_tokens_per_s"]
            ),
            "ttft": workload.ratio(h and h["ttft_s"], s["ttft_s"]),
            "e2e": workload.ratio(h and h["e2e_s"], s["e2e_s"]),
        },
        # Greedy tokens shoal and HF agree on before the first difference, per iteration (bf16 rounding
        # differs between the two implementations, so a near-tie can flip a token and the rest with it).
        "greedy_agreement_tokens": agreement,
        "profile": None if profile is None else {"trace": str(profile), "top_self_cpu": profile_top},
    }


def _profile(engine, prompt: list[int], output_len: int, path: Path, log, top: int = 25) -> list[dict]:
    """One shoal run under torch.profiler (CPU activity, shapes): Chrome trace at path, top ops returned."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    log(f"profiling one shoal run -> {path}")
    with torch_profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        shoal_once(engine, prompt, output_len)
    path.parent.mkdir(parents=True, exist_ok=True)
    prof.export_chrome_trace(str(path))
    events = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:top]
    return [
        {
            "op": e.key,
            "calls": e.count,
            "self_cpu_ms": e.self_cpu_time_total / 1000,
            "cpu_total_ms": e.cpu_time_total / 1000,
        }
        for e in events
    ]


def print_latency(result: dict, console=None) -> None:
    from rich.console import Console

    console = console or Console()
    c, s, h, r = result["config"], result["shoal"], result["hf"] or {}, result["ratio"]
    title = (
        f"latency: {Path(c['model']).name}, {c['dtype']}, {c['device']}, prompt {c['input_len']} tokens, "
        f"{c['output_len']} new tokens, median of {c['iters']}"
    )
    rows = [
        metric_row(
            "decode tokens/s",
            s["decode_tokens_per_s"],
            h.get("decode_tokens_per_s"),
            ".1f",
            r["decode_tokens_per_s"],
        ),
        metric_row(
            "decode tokens/s, best run",
            s["best_decode_tokens_per_s"],
            h.get("best_decode_tokens_per_s"),
            ".1f",
            r["best_decode_tokens_per_s"],
        ),
        metric_row(
            "time to first token (ms)",
            s["ttft_s"] * 1e3,
            h["ttft_s"] * 1e3 if h else None,
            ".1f",
            r["ttft"],
        ),
        metric_row("end-to-end (s)", s["e2e_s"], h.get("e2e_s"), ".3f", r["e2e"]),
    ]
    console.print(comparison_table(title, rows))
    console.print(machine_line(result))
