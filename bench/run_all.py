"""Run both benchmarks with their defaults, write bench/results/{latency,throughput}.json, print a markdown
snippet for docs/benchmarks.md.

    python bench/run_all.py [--model DIR] [--dtype auto] [--skip-hf] [--hf-batch-size 16]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from shoal.bench import workload
from shoal.bench.latency import print_latency, run_latency
from shoal.bench.report import metric_row
from shoal.bench.throughput import print_throughput, run_throughput

RESULTS = Path(__file__).resolve().parent / "results"


def markdown(lat: dict, thr: dict) -> str:
    m, lc, tc = lat["machine"], lat["config"], thr["config"]
    ls, lh, lr = lat["shoal"], lat["hf"] or {}, lat["ratio"]
    ts, th, tr = thr["shoal"], thr["hf"] or {}, thr["ratio"]
    lo_in, hi_in = tc["input_len_range"]
    lo_out, hi_out = tc["output_len_range"]
    hf_ttft = lh.get("ttft_s")
    # the docs' typography: an en dash where a side did not run, a multiplication sign on ratios
    docs = {"missing": "–", "times": "×"}
    rows = [
        metric_row(
            f"latency: decode tokens/s (prompt {lc['input_len']}, {lc['output_len']} new tokens, "
            f"median of {lc['iters']})",
            ls["decode_tokens_per_s"],
            lh.get("decode_tokens_per_s"),
            ".1f",
            lr["decode_tokens_per_s"],
            **docs,
        ),
        metric_row(
            "latency: time to first token (ms)",
            ls["ttft_s"] * 1e3,
            hf_ttft * 1e3 if hf_ttft else None,
            ".0f",
            lr["ttft"],
            **(docs | {"times": "× faster"}),
        ),
        metric_row(
            f"throughput: output tokens/s ({tc['num_prompts']} requests, prompt {lo_in}–{hi_in}, "
            f"output {lo_out}–{hi_out} tokens; HF batches of {tc['hf_batch_size']})",
            ts["output_tokens_per_s"],
            th.get("output_tokens_per_s"),
            ".1f",
            tr["output_tokens_per_s"],
            **docs,
        ),
        metric_row(
            "throughput: requests/s",
            ts["requests_per_s"],
            th.get("requests_per_s"),
            ".3f",
            tr["requests_per_s"],
            **docs,
        ),
        metric_row(
            "throughput: total (prompt + output) tokens/s",
            ts["total_tokens_per_s"],
            th.get("total_tokens_per_s"),
            ".1f",
            compared=False,
            **docs,
        ),
        metric_row(
            "throughput: wall time (s)", ts["wall_s"], th.get("wall_s"), ".1f", compared=False, **docs
        ),
    ]
    lines = [
        f"Measured {time.strftime('%Y-%m-%d')}: {Path(lc['model']).name}, {lc['dtype']}, {lc['device']}; "
        f"{m['cpu']}, {m['cpu_cores']} cores ({m['torch_threads']} torch threads), torch {m['torch']}, "
        f"transformers {m['transformers']} ({(lat['hf'] or {}).get('attn_implementation')} attention). "
        f"Load average (1, 5, 15 min) before {lat['load_average']['before']}, after "
        f"{thr['load_average']['after']}.",
        "",
        "| benchmark | shoal | transformers | shoal / HF |",
        "|---|---:|---:|---:|",
        *(f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows),
        "",
        f"shoal in the throughput run: {ts['steps']} engine steps, mean batch {ts['mean_batch_size']:.1f} "
        f"sequences, {ts['preemptions']} preemptions. Prompts: {tc['prompt_source']}.",
        "",
        "Reproduce:",
        "",
        "```",
        f"shoal bench latency --model {lc['model']} --dtype {lc['dtype']} --output-json bench/results/latency.json",
        f"shoal bench throughput --model {tc['model']} --dtype {tc['dtype']} "
        f"--output-json bench/results/throughput.json",
        "# or both: python bench/run_all.py",
        "```",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=None, help="default: $SHOAL_MODEL or models/SmolLM2-135M-Instruct")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--skip-hf", action="store_true", help="shoal only")
    parser.add_argument("--hf-batch-size", type=int, default=16)
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--results-dir", type=Path, default=RESULTS)
    args = parser.parse_args()
    model = args.model or workload.default_model()

    lat = run_latency(model=model, dtype=args.dtype, device=args.device, skip_hf=args.skip_hf)
    workload.write_json(lat, args.results_dir / "latency.json")
    print_latency(lat)
    thr = run_throughput(
        model=model,
        dtype=args.dtype,
        device=args.device,
        num_prompts=args.num_prompts,
        hf_batch_size=args.hf_batch_size,
        skip_hf=args.skip_hf,
    )
    workload.write_json(thr, args.results_dir / "throughput.json")
    print_throughput(thr)
    print(f"\nwrote {args.results_dir}/latency.json and throughput.json\n")
    print(markdown(lat, thr))


if __name__ == "__main__":
    main()
