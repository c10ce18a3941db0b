"""`shoal bench latency` and `shoal bench throughput` (shoal against transformers' generate, same process), and
`shoal bench serve-compare` (shoal over HTTP and in process against llama.cpp's llama-server), and
`shoal bench quant` (issue 18's quantization benchmark, shoal/bench/quant.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from shoal.bench import workload

bench_app = typer.Typer(
    help=(
        "Benchmarks with vLLM's names: shoal against Hugging Face transformers' generate, in one process, on "
        "the same weights, dtype and token ids, EOS ignored on both sides. Reports tokens/s per side and the "
        "shoal/HF ratio (quote the ratio: it holds under other load on the machine). serve-compare: shoal over "
        "HTTP and in process against llama.cpp's llama-server, one run, same machine."
    ),
    no_args_is_help=True,
    add_completion=False,
)

ModelOpt = Annotated[
    str | None,
    typer.Option(
        help=(
            "Local Hugging Face model directory or hub id "
            "(default: $SHOAL_MODEL, else models/SmolLM2-135M-Instruct if present, else the hub id)."
        ),
        show_default=False,
    ),
]
DtypeOpt = Annotated[
    str,
    typer.Option(
        help="auto, float32 or bfloat16, for both sides. auto: the checkpoint's 16-bit dtype where the "
        "hardware runs it fast (CUDA, CPUs with AVX512-BF16 or AMX), else float32 (on an AVX2-only CPU, torch's "
        "bf16 matmuls run about 10x slower than fp32)."
    ),
]
DeviceOpt = Annotated[str, typer.Option(help="auto, cpu or cuda (both sides).")]
CompileOpt = Annotated[
    bool, typer.Option("--compile", help="shoal: torch.compile the decode forward (compiled during warm-up).")
]
SeedOpt = Annotated[int, typer.Option(help="Seed of the prompts (and lengths).")]
SkipHfOpt = Annotated[bool, typer.Option("--skip-hf", help="Run shoal only (no transformers side).")]
JsonOpt = Annotated[
    Path | None, typer.Option(help="Write the full result (machine info included) to this JSON file.")
]
DatasetOpt = Annotated[
    Path,
    typer.Option(help="Text the prompt token ids are cut from (random ids if the file is missing)."),
]
ThreadsOpt = Annotated[
    int | None, typer.Option(help="torch intra-op threads for both sides (default: torch's, one per core).")
]
MarkdownOpt = Annotated[bool, typer.Option("--markdown", help="Also print the docs/benchmarks.md table.")]
MaxLenOpt = Annotated[
    int | None, typer.Option(help="shoal's max_model_len (default: the engine's per-device default).")
]


def run_as_script(command: str, results: Path, argv: list[str], prog_name: str) -> None:
    """What a thin bench/<name>.py does: `shoal bench <command> ARGV`, writing the JSON result to `results`
    and printing the markdown table for docs/benchmarks.md, unless ARGV says otherwise."""
    args = list(argv)
    if not any(a == "--output-json" or a.startswith("--output-json=") for a in args):
        args += ["--output-json", str(results)]
    if "--markdown" not in args:
        args.append("--markdown")
    bench_app([command, *args], prog_name=prog_name)


def _markdown_printer(render, markdown: bool):
    """A printer for _run: the result's docs/benchmarks.md table with --markdown, else a blank line."""

    def printer(result: dict) -> None:
        typer.echo(render(result) if markdown else "")

    return printer


def _run(fn, printer, output_json: Path | None, **kwargs) -> dict:
    try:
        result = fn(log=typer.echo, **kwargs)
    except (ValueError, FileNotFoundError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from e
    printer(result)
    if output_json is not None:
        workload.write_json(result, output_json)
        typer.echo(f"wrote {output_json}")
    return result


@bench_app.command()
def latency(
    model: ModelOpt = None,
    dtype: DtypeOpt = "auto",
    device: DeviceOpt = "auto",
    input_len: Annotated[int, typer.Option(help="Prompt length in tokens.")] = 32,
    output_len: Annotated[int, typer.Option(help="New tokens per run (EOS ignored).")] = 128,
    iters: Annotated[int, typer.Option(help="Measured runs per side (alternating shoal/HF); medians.")] = 3,
    warmup_iters: Annotated[int, typer.Option(help="Full-length warm-up runs per side.")] = 1,
    seed: SeedOpt = 0,
    skip_hf: SkipHfOpt = False,
    max_model_len: MaxLenOpt = None,
    dataset: DatasetOpt = workload.DEFAULT_DATASET,
    threads: ThreadsOpt = None,
    compile: CompileOpt = False,
    output_json: JsonOpt = None,
    profile: Annotated[
        Path | None,
        typer.Option(
            help="Also run one shoal request under torch.profiler: write its Chrome trace here (open it in "
            "ui.perfetto.dev) and put the top ops by self CPU time in the result."
        ),
    ] = None,
) -> None:
    """Single-stream decode: one prompt, --output-len new tokens; decode tokens/s, time to first token."""
    from shoal.bench.latency import print_latency, run_latency

    _run(
        run_latency,
        print_latency,
        output_json,
        model=model,
        dtype=dtype,
        device=device,
        input_len=input_len,
        output_len=output_len,
        iters=iters,
        warmup_iters=warmup_iters,
        seed=seed,
        skip_hf=skip_hf,
        dataset=dataset,
        max_model_len=max_model_len,
        threads=threads,
        compile=compile,
        profile=profile,
    )


@bench_app.command()
def throughput(
    model: ModelOpt = None,
    dtype: DtypeOpt = "auto",
    device: DeviceOpt = "auto",
    num_prompts: Annotated[int, typer.Option(help="Requests in the batch.")] = 64,
    min_input_len: Annotated[int, typer.Option(help="Shortest prompt (tokens; lengths uniform).")] = 64,
    max_input_len: Annotated[int, typer.Option(help="Longest prompt (tokens).")] = 512,
    min_output_len: Annotated[int, typer.Option(help="Shortest output (tokens; lengths uniform).")] = 32,
    max_output_len: Annotated[int, typer.Option(help="Longest output (tokens).")] = 256,
    hf_batch_size: Annotated[
        int, typer.Option(help="transformers: requests per left-padded generate() batch (e.g. 16 or 64).")
    ] = 16,
    iters: Annotated[
        int, typer.Option(help="Runs per side, each on a fresh workload, alternating which side goes first.")
    ] = 1,
    seed: SeedOpt = 0,
    skip_hf: SkipHfOpt = False,
    max_num_seqs: Annotated[
        int | None, typer.Option(help="shoal's max_num_seqs (default: the engine's, 256).")
    ] = None,
    max_num_batched_tokens: Annotated[
        int | None,
        typer.Option(help="shoal's max_num_batched_tokens per step (default: the engine's, 512 on CPU)."),
    ] = None,
    max_model_len: MaxLenOpt = None,
    dataset: DatasetOpt = workload.DEFAULT_DATASET,
    threads: ThreadsOpt = None,
    compile: CompileOpt = False,
    output_json: JsonOpt = None,
) -> None:
    """Offline batch: --num-prompts requests of mixed lengths; output tokens/s, requests/s."""
    from shoal.bench.throughput import print_throughput, run_throughput

    _run(
        run_throughput,
        print_throughput,
        output_json,
        model=model,
        dtype=dtype,
        device=device,
        num_prompts=num_prompts,
        input_len_range=(min_input_len, max_input_len),
        output_len_range=(min_output_len, max_output_len),
        hf_batch_size=hf_batch_size,
        iters=iters,
        seed=seed,
        skip_hf=skip_hf,
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max_num_batched_tokens,
        max_model_len=max_model_len,
        dataset=dataset,
        threads=threads,
        compile=compile,
    )


@bench_app.command("serve-compare")
def serve_compare(
    model: ModelOpt = None,
    dtype: Annotated[
        str,
        typer.Option(
            help="auto, bfloat16 or float32, on every side. auto: bfloat16 where the CPU has AVX512-BF16 or AMX "
            "(with a bf16 GGUF for llama.cpp), else float32 (an f32 GGUF)."
        ),
    ] = "auto",
    threads: Annotated[
        int | None,
        typer.Option(
            help="Threads a side: torch's in process, OMP_NUM_THREADS for shoal serve, -t/-tb for llama-server "
            "(default: the usable cores)."
        ),
    ] = None,
    single_output_len: Annotated[
        int, typer.Option(help="single stream: tokens to generate (0: skip).")
    ] = 128,
    concurrency: Annotated[
        str, typer.Option(help="Concurrent streams per load, comma-separated (empty: none).")
    ] = "32,64",
    stream_output_len: Annotated[int, typer.Option(help="Tokens per stream in the concurrent loads.")] = 64,
    short_prompt_len: Annotated[
        int, typer.Option(help="Prompt tokens in the single-stream and concurrent loads.")
    ] = 32,
    mixed_num_prompts: Annotated[
        int, typer.Option(help="Requests in the mixed workload (prompts 64-512, outputs 32-256; 0: skip).")
    ] = 64,
    seed: SeedOpt = 0,
    iters: Annotated[
        int, typer.Option(help="Rounds of every load (fresh prompts each); figures are medians.")
    ] = 1,
    sides: Annotated[
        str,
        typer.Option(
            help="Sides to run, comma-separated: inproc (the engine's step loop on the main thread), "
            "inproc_thread (the same loop on a thread of its own, as shoal serve drove it at the baseline), "
            "http, llama."
        ),
    ] = "inproc,http,llama",
    llama_server: Annotated[
        Path | None,
        typer.Option(
            help="llama-server binary (default: $LLAMA_SERVER, else where ../shared/tools/build-llama-server.sh "
            "builds it). Its side is skipped, with the reason, when absent.",
            show_default=False,
        ),
    ] = None,
    gguf: Annotated[
        Path | None,
        typer.Option(
            help="The model as GGUF for llama-server (default: the build script's <model dir>-<bf16|f32>.gguf).",
            show_default=False,
        ),
    ] = None,
    llama_parallel: Annotated[int, typer.Option(help="llama-server -np (slots).")] = 32,
    llama_ctx: Annotated[int, typer.Option(help="llama-server -c (context, shared by the slots).")] = 32768,
    kv_cache_memory: Annotated[
        int, typer.Option(help="Bytes of KV cache for both shoal sides (the same on both).")
    ] = 2 << 30,
    wait_idle: Annotated[
        float,
        typer.Option(
            help="Before each side's run, wait up to this many seconds until other processes use less than "
            "--idle-threshold cores (0: do not wait). For a shared machine."
        ),
    ] = 0.0,
    idle_threshold: Annotated[
        float, typer.Option(help="Cores other processes may use for --wait-idle.")
    ] = 0.3,
    max_run_s: Annotated[
        float,
        typer.Option(
            help="Time limit of one side's run of one load: streams still going are cut and count the tokens "
            "they had (flagged in the table)."
        ),
    ] = 300.0,
    retries_if_busy: Annotated[
        int,
        typer.Option(
            help="Repeat a side's run (same lengths, fresh prompts) up to this many times when other processes "
            "used more than --idle-threshold cores during it; the least disturbed run stands."
        ),
    ] = 1,
    llama_arg: Annotated[
        list[str] | None,
        typer.Option(help="Extra llama-server argument (repeat it), e.g. --llama-arg=--poll --llama-arg=0."),
    ] = None,
    dataset: DatasetOpt = workload.DEFAULT_DATASET,
    log_dir: Annotated[
        Path | None, typer.Option(help="Where the servers' logs go (default: a temporary folder).")
    ] = None,
    markdown: Annotated[
        bool,
        typer.Option("--markdown", help="Also print the result as a markdown table (docs/benchmarks.md)."),
    ] = False,
    output_json: JsonOpt = None,
) -> None:
    """Serving on CPU: shoal over HTTP vs shoal in process vs llama.cpp's llama-server, in one run.

    Loads: a single stream, N concurrent streams (--concurrency), the mixed workload; output tokens/s and
    TTFT P50/P99 per load and side, and the ratios HTTP / in process and HTTP / llama-server.
    """
    from shoal.bench import serve_compare as sc

    def printer(result: dict) -> None:
        sc.print_serve_compare(result)
        if markdown:
            typer.echo("\n" + sc.markdown(result))

    _run(
        sc.run_serve_compare,
        printer,
        output_json,
        model=model,
        dtype=dtype,
        threads=threads,
        single_output_len=single_output_len,
        concurrency=[int(n) for n in concurrency.split(",") if n.strip()],
        stream_output_len=stream_output_len,
        short_prompt_len=short_prompt_len,
        mixed_num_prompts=mixed_num_prompts,
        seed=seed,
        iters=iters,
        sides=[s.strip() for s in sides.split(",") if s.strip()],
        llama_server_path=llama_server,
        gguf=gguf,
        llama_parallel=llama_parallel,
        llama_ctx=llama_ctx,
        kv_cache_memory=kv_cache_memory,
        wait_idle_s=wait_idle,
        idle_threshold=idle_threshold,
        max_run_s=max_run_s,
        retries_if_busy=retries_if_busy,
        llama_extra=llama_arg or [],
        dataset=dataset,
        log_dir=log_dir,
    )


@bench_app.command("serve")
def serve(
    model: Annotated[str, typer.Option(help="The model name the server serves (the requests' `model`).")],
    base_url: Annotated[
        str, typer.Option(help="Server base URL, without /v1 (any OpenAI-compatible server).")
    ] = "http://127.0.0.1:8000",
    endpoint: Annotated[str, typer.Option(help="The streamed completions route.")] = "/v1/completions",
    api_key: Annotated[
        str | None, typer.Option(envvar="OPENAI_API_KEY", help="Bearer token ($OPENAI_API_KEY).")
    ] = None,
    tokenizer: Annotated[
        Path | None,
        typer.Option(
            help="Local directory with the served model's tokenizer.json, for the random dataset's token-id "
            "prompts (default: --model when it is a local directory).",
            show_default=False,
        ),
    ] = None,
    dataset_name: Annotated[
        str, typer.Option(help="random (token ids cut from real text) or custom (--dataset-path JSONL).")
    ] = "random",
    dataset_path: Annotated[
        Path | None, typer.Option(help='custom: a JSONL file, one {"prompt": "..."} per line.')
    ] = None,
    num_prompts: Annotated[int, typer.Option(min=1, help="Requests to send.")] = 100,
    random_input_len: Annotated[int, typer.Option(help="Prompt tokens (mean of the range).")] = 128,
    random_output_len: Annotated[int, typer.Option(help="Output tokens, max_tokens (mean).")] = 64,
    random_range_ratio: Annotated[
        float, typer.Option(help="Lengths within +- this share of the mean (0: fixed lengths).")
    ] = 0.0,
    length_distribution: Annotated[
        str, typer.Option(help="uniform, or normal (sd a quarter of the range, clipped to it).")
    ] = "uniform",
    request_rate: Annotated[
        float, typer.Option(help="Requests/s, open loop (inf: all at once; with --max-concurrency, closed).")
    ] = float("inf"),
    arrivals: Annotated[str, typer.Option(help="poisson (gamma with --burstiness) or fixed intervals.")] = (
        "poisson"
    ),
    burstiness: Annotated[
        float, typer.Option(help="Gamma shape of the gaps, vLLM's (1: Poisson; < 1 burstier).")
    ] = 1.0,
    max_concurrency: Annotated[
        int | None, typer.Option(help="Requests in flight at most (default: no cap).")
    ] = None,
    goodput: Annotated[
        list[str] | None,
        typer.Option(
            help="SLA targets in ms, vLLM's: --goodput 'ttft:500 tpot:50 e2el:3000' (or repeat the flag). "
            "Goodput counts the requests meeting all of them."
        ),
    ] = None,
    request_timeout: Annotated[
        float, typer.Option(help="Seconds before a request counts as timeout.")
    ] = 600.0,
    ignore_eos: Annotated[
        bool, typer.Option("--ignore-eos/--no-ignore-eos", help="Ask for exactly max_tokens (vLLM's field).")
    ] = True,
    num_warmups: Annotated[int, typer.Option(help="Requests sent one by one before the measured run.")] = 1,
    seed: SeedOpt = 0,
    output_json: JsonOpt = None,
) -> None:
    """Load benchmark against any OpenAI-compatible server (vLLM's benchmark_serving): TTFT, TPOT, E2E
    P50/P95/P99, requests/s, tokens/s, goodput under --goodput, errors counted by kind (never a crash)."""
    from rich.console import Console

    from shoal.bench import serve as bs
    from shoal.bench import serve_report

    try:
        spec = bs.LoadSpec(base_url=base_url, model=model, endpoint=endpoint, api_key=api_key,
                           request_rate=request_rate, arrivals=arrivals, burstiness=burstiness,
                           max_concurrency=max_concurrency, request_timeout_s=request_timeout,
                           ignore_eos=ignore_eos, num_warmups=num_warmups, seed=seed,
                           goodput=bs.parse_goodput([g for item in goodput or [] for g in item.split()]))  # fmt: skip
        total = num_prompts + num_warmups
        if dataset_name == "custom":
            if dataset_path is None:
                raise ValueError("--dataset-name custom needs --dataset-path")
            prompts = bs.dataset_prompts(dataset_path, total, random_output_len, random_range_ratio,
                                         length_distribution, seed)  # fmt: skip
        elif dataset_name == "random":
            tok = tokenizer or (Path(model) if Path(model).is_dir() else None)
            if tok is None:
                raise ValueError(
                    "the random dataset needs --tokenizer DIR (the served model's tokenizer.json)"
                )
            prompts = bs.random_prompts(tok, total, random_input_len, random_output_len, random_range_ratio,
                                        length_distribution, seed)  # fmt: skip
        else:
            raise ValueError(f"--dataset-name must be random or custom, got {dataset_name!r}")
    except (ValueError, OSError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from e
    result = bs.run_bench_serve(spec, prompts, log=typer.echo)
    Console().print(serve_report.run_table(result))
    typer.echo(serve_report.describe(result))
    typer.echo(serve_report.errors_line(result))
    if output_json is not None:
        workload.write_json(result, output_json)
        typer.echo(f"wrote {output_json}")


@bench_app.command("serve-diff")
def serve_diff(
    a: Annotated[Path, typer.Argument(help="Result JSON of `shoal bench serve` (the baseline, A).")],
    b: Annotated[Path, typer.Argument(help="Result JSON to compare (B).")],
    markdown: Annotated[bool, typer.Option("--markdown", help="Print a markdown table instead.")] = False,
) -> None:
    """Two `shoal bench serve` runs side by side, every metric with its ratio B / A."""
    from rich.console import Console

    from shoal.bench import serve_report

    try:
        ra, rb = serve_report.load(a), serve_report.load(b)
    except (ValueError, OSError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from e
    if markdown:
        typer.echo(serve_report.markdown([ra, rb], [a.name, b.name]))
    else:
        Console().print(serve_report.diff_table(ra, rb, (a.name, b.name)))
        typer.echo(f"A: {serve_report.describe(ra)}\nB: {serve_report.describe(rb)}")


@bench_app.command("quant")
def quant(
    model: ModelOpt = None,
    rows: Annotated[
        str,
        typer.Option(
            help="Comma-separated rows: rtn-g64, gptq-g64, awq-g64, gptq-auto, w8a8-sq-gptq, fp8; also "
            "rtn-g64-mse, gptq-g64-mse, gptq-g64-act, gptq-g64-ts (GPTQ options); rtn-g64-lmhead, "
            "gptq-g64-lmhead, w8a16-lmhead (lm_head int8 too); w8a8-sq, w8a8-sq-affine, w8a8-sq-static, "
            "w8a8-sq-static-affine (activation forms)."
        ),
    ] = "rtn-g64,gptq-g64,awq-g64,gptq-auto,w8a8-sq-gptq,fp8",
    num_tokens: Annotated[
        int, typer.Option(help="Perplexity over the first N tokens of ../shared/eval/wikitext2-test.txt.")
    ] = 65536,
    num_samples: Annotated[int, typer.Option(help="Calibration windows of wikitext2-valid.")] = 128,
    seq_len: Annotated[int, typer.Option(help="Tokens per calibration window.")] = 512,
    decode_tokens: Annotated[int, typer.Option(help="Tokens per decode-speed run.")] = 64,
    decode_iters: Annotated[
        int,
        typer.Option(
            help="Timed decode-speed runs per model (alternating; 3 x 32 tokens read 1.26x where 12 x 64 read "
            "1.33-1.36x for the same 4-bit row on a shared 2-core machine)."
        ),
    ] = 12,
    output_dir: Annotated[
        Path, typer.Option(help="Where quant_eval.json and quant_eval.png go.")
    ] = workload.REPO / "bench" / "results" / "quant",
    seed: SeedOpt = 0,
    scale_dtype: Annotated[
        str, typer.Option(help="4-bit rows: group scales in the weights' dtype (auto) or float32.")
    ] = "auto",
    threads: ThreadsOpt = None,
    speed_only: Annotated[
        bool,
        typer.Option(
            "--speed-only", help="Decode speed and memory only: no perplexity or agreement (minutes saved)."
        ),
    ] = False,
) -> None:
    """Issue 18's quantization benchmark (shoal/bench/quant.py): perplexity, memory, decode speed and
    calibration time of each row against the 16-bit model, beside llm-compressor 0.14's ratios."""
    from shoal.bench import quant as bench_quant

    try:
        workload.set_threads(threads)
        s = bench_quant.settings(
            [r.strip() for r in rows.split(",") if r.strip()],
            num_tokens,
            num_samples,
            seq_len,
            decode_tokens,
            decode_iters,
            seed,
            scale_dtype,
            quality=not speed_only,
        )
        result = bench_quant.run(Path(model or workload.default_model()), s, output_dir, log=typer.echo)
    except (ValueError, OSError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from e
    typer.echo(bench_quant.markdown(result))
    typer.echo(f"wrote {output_dir / 'quant_eval.json'} and quant_eval.png")


@bench_app.command("quant-spread")
def quant_spread(
    quantized: Annotated[Path, typer.Argument(help="A quantized model directory (`shoal quant quantize`).")],
    base: Annotated[Path, typer.Option(help="The 16-bit model it was quantized from.")],
    seeds: Annotated[int, typer.Option(help="Jittered rescorings (seeds 1..N).")] = 4,
    num_tokens: Annotated[
        int, typer.Option(help="Perplexity over the first N tokens of ../shared/eval/wikitext2-test.txt.")
    ] = 65536,
    threads: ThreadsOpt = None,
) -> None:
    """How far the quantized model's perplexity ratio moves when its quantized linears' inputs change by
    float32 rounding (x (1 + 1e-6 N(0,1))): the resolution at which runtimes computing the same scheme can
    be compared (shoal/bench/quant_spread.py)."""
    from shoal.bench import quant_spread as qs
    from shoal.quant.eval import DEFAULT_EVAL_TEXT

    try:
        workload.set_threads(threads)
        base_ppl = qs.measure(base, DEFAULT_EVAL_TEXT, num_tokens, 0).plain
        spread = qs.measure(quantized, DEFAULT_EVAL_TEXT, num_tokens, seeds)
    except (ValueError, OSError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from e
    typer.echo(qs.markdown(spread, base_ppl))


@bench_app.command("quant-profile")
def quant_profile(
    models: Annotated[
        list[str], typer.Argument(help="LABEL=DIR for each model (e.g. bf16=models/SmolLM2-135M-Instruct).")
    ],
    tokens: Annotated[int, typer.Option(help="Tokens per greedy decode run.")] = 64,
    iters: Annotated[int, typer.Option(help="Rounds alternating between the models (best kept).")] = 3,
    threads: ThreadsOpt = None,
) -> None:
    """Where single-stream decode time goes per model: tok/s, and ms per token in lm_head, quantized and
    16-bit linears (shoal/bench/quant.py decode_profile)."""
    import torch

    from shoal.bench.quant import decode_profile

    if threads:
        torch.set_num_threads(threads)
    try:
        pairs = dict(m.split("=", 1) for m in models)
    except ValueError:
        typer.echo("error: give each model as LABEL=DIR", err=True)
        raise typer.Exit(2) from None
    result = decode_profile({k: Path(v) for k, v in pairs.items()}, tokens, iters, log=typer.echo)
    for label, r in result.items():
        parts = ", ".join(f"{kind} {v:.2f}" for kind, v in sorted(r["ms"].items()))
        typer.echo(f"{label}: {r['tok_s']:.1f} tok/s, {r['ms_per_token']:.2f} ms/token ({parts} ms)")


@bench_app.command()
def overhead(
    model: ModelOpt = None,
    dtype: DtypeOpt = "auto",
    threads: ThreadsOpt = None,
    rounds: Annotated[int, typer.Option(help="Measured rounds (each runs every variant once).")] = 8,
    concurrency: Annotated[int, typer.Option(help="Streams at once in each run.")] = 16,
    prompt_len: Annotated[int, typer.Option(help="Prompt tokens per stream.")] = 32,
    output_len: Annotated[int, typer.Option(help="Output tokens per stream (EOS ignored).")] = 32,
    seed: SeedOpt = 0,
    dataset: DatasetOpt = workload.DEFAULT_DATASET,
    output_json: JsonOpt = None,
    markdown: MarkdownOpt = False,
) -> None:
    """What observability costs: `shoal serve` throughput with metrics off (--disable-log-stats) and with
    tracing on (OTLP to a receiver in this process), against the defaults, in one run (target: < 3% each)."""
    from shoal.bench import overhead as oh

    _run(
        oh.run_overhead,
        _markdown_printer(oh.markdown, markdown),
        output_json,
        model=model,
        dtype=dtype,
        threads=threads,
        rounds=rounds,
        concurrency=concurrency,
        prompt_len=prompt_len,
        output_len=output_len,
        seed=seed,
        dataset=dataset,
    )


@bench_app.command("http-cpu")
def http_cpu(
    model: ModelOpt = None,
    dtype: DtypeOpt = "auto",
    threads: ThreadsOpt = None,
    rounds: Annotated[int, typer.Option(help="Measured rounds (after one warm-up).")] = 3,
    concurrency: Annotated[list[int] | None, typer.Option(help="Streams at once (repeatable).")] = None,
    single_output_len: Annotated[int, typer.Option(help="Tokens of the single stream (0: skip).")] = 128,
    stream_output_len: Annotated[int, typer.Option(help="Tokens per concurrent stream.")] = 64,
    sequential: Annotated[
        int,
        typer.Option(help="Also N requests of one token, one after another, not streamed: CPU per request."),
    ] = 0,
    client: Annotated[
        list[str] | None, typer.Option(help="Load client(s) of serve_compare: aiohttp, httpx.")
    ] = None,
    seed: SeedOpt = 0,
    dataset: DatasetOpt = workload.DEFAULT_DATASET,
    output_json: JsonOpt = None,
    markdown: Annotated[
        bool, typer.Option("--markdown", help="Also print the docs/benchmarks.md table.")
    ] = False,
) -> None:
    """CPU ms per output token of `shoal serve`'s HTTP process, its engine core and the load client, for a
    fixed workload: the serving path's cost that hardly moves with other load on the machine."""
    from shoal.bench import http_cpu as hc

    _run(
        hc.run_http_cpu,
        _markdown_printer(hc.markdown, markdown),
        output_json,
        clients=tuple(client or ("aiohttp", "httpx")),
        concurrency=tuple(concurrency or (64,)),
        single_output_len=single_output_len,
        stream_output_len=stream_output_len,
        sequential=sequential,
        model=model,
        dtype=dtype,
        threads=threads,
        rounds=rounds,
        seed=seed,
        dataset=dataset,
    )


@bench_app.command("spike")
def spike(
    model: ModelOpt = None,
    dtype: Annotated[str, typer.Option(help="auto, float32 or bfloat16.")] = "auto",
    threads: Annotated[int, typer.Option(help="OMP threads of the server.")] = 2,
    factor: Annotated[
        float, typer.Option(help="The spike's rate as a multiple of the sustainable one.")
    ] = 10.0,
    spike_s: Annotated[float, typer.Option(help="Seconds of spike.")] = 30.0,
    premium_share: Annotated[float, typer.Option(help="Share of premium requests.")] = 0.1,
    max_tokens: Annotated[int, typer.Option(help="Tokens per request.")] = 16,
    max_requests: Annotated[int, typer.Option(help="At most this many requests in the spike.")] = 6000,
    max_num_seqs: Annotated[int, typer.Option(help="--max-num-seqs of both servers.")] = 8,
    nice_flood: Annotated[
        bool,
        typer.Option(
            help="Send the standard flood from its process at nice 19 (in production it comes from other "
            "machines); premium requests come from another process, never niced."
        ),
    ] = True,
    rate: Annotated[
        float | None,
        typer.Option(
            help="Sustainable rate (req/s) to spike from, instead of measuring it (comparable runs)."
        ),
    ] = None,
    without_policy: Annotated[
        bool, typer.Option(help="Also run the spike against the server without the policy.")
    ] = True,
    unloaded_requests: Annotated[
        int,
        typer.Option(
            help="Premium requests of the unloaded baseline, one at a time (its P95 is the ratio's "
            "denominator: more requests, a steadier one)."
        ),
    ] = 20,
    urgent_threads: Annotated[
        int | None,
        typer.Option(
            help="--urgent-threads of the server with the policy (premium prompt steps' CPU threads)."
        ),
    ] = None,
    premium_alone: Annotated[
        bool,
        typer.Option(
            help="Also send the spike's premium arrivals without the flood (spike-s seconds per server): "
            "the premium P95 that premium traffic alone gives, beside the one-at-a-time one."
        ),
    ] = True,
    output_json: Annotated[Path | None, typer.Option(help="Write the result here.")] = None,
) -> None:
    """Issue 20's spike (shoal/bench/spike.py): factor x the sustainable rate for spike_s seconds against
    shoal with its traffic policy (keys, priority classes, shedding) and without; per class success
    rate, TTFT P50/P95/P99, rejections; premium TTFT P95 against its unloaded value."""
    from shoal.bench import spike as bench_spike

    result = bench_spike.run_spike(
        model or workload.default_model(),
        dtype,
        threads,
        factor,
        spike_s,
        premium_share,
        max_tokens,
        max_requests,
        max_num_seqs=max_num_seqs,
        nice_flood=nice_flood,
        rate=rate,
        without_policy=without_policy,
        unloaded_requests=unloaded_requests,
        urgent_threads=urgent_threads,
        premium_alone=premium_alone,
    )
    typer.echo(bench_spike.markdown(result))
    if output_json is not None:
        workload.write_json(result, output_json)


@bench_app.command("spike-pool")
def spike_pool(
    results: Annotated[
        list[Path], typer.Argument(help="JSON results of `shoal bench spike` (--output-json).")
    ],
    side: Annotated[str, typer.Option(help="'with policy' or 'without policy'.")] = "with policy",
) -> None:
    """Pool several spike runs' premium TTFTs: P95 per phase over all of them (one 30 s spike at 1%
    premium has 15-30 premium requests, whose P95 is the second or third slowest)."""
    from shoal.bench import spike as bench_spike

    try:
        pooled = bench_spike.pool([json.loads(p.read_text()) for p in results], side)
    except (OSError, ValueError) as e:
        raise typer.BadParameter(str(e)) from e
    typer.echo(bench_spike.pool_markdown(pooled))


@bench_app.command()
def gateway(
    model: Annotated[str, typer.Option(help="Model both backends serve.")] = str(
        workload.REPO / "models" / "stories260K"
    ),
    dtype: Annotated[str, typer.Option(help="float32 or bfloat16 (the backends').")] = "float32",
    latency_requests: Annotated[int, typer.Option(help="Sequential requests per side.")] = 200,
    workloads: Annotated[
        str,
        typer.Option(
            help="Throughput workloads, comma-separated: tiny (max_tokens 1 on MODEL: the worst case), chat "
            "and chat-stream (chat completions on CHAT_MODEL, non-streamed and streamed)."
        ),
    ] = "tiny,chat,chat-stream",
    throughput_requests: Annotated[int, typer.Option(help="Requests per tiny throughput block.")] = 300,
    concurrency: Annotated[
        int, typer.Option(help="Requests in flight for tiny throughput and prefix runs.")
    ] = 8,
    rounds: Annotated[int, typer.Option(help="ABBA rounds (4 blocks each) of the tiny workload.")] = 1,
    chat_model: Annotated[str, typer.Option(help="Model of the chat workloads' backend.")] = str(
        workload.REPO / "models" / "SmolLM2-135M-Instruct"
    ),
    chat_max_tokens: Annotated[int, typer.Option(help="Output tokens per chat request (EOS ignored).")] = 32,
    chat_concurrency: Annotated[int, typer.Option(help="Chat requests in flight.")] = 8,
    chat_requests: Annotated[int, typer.Option(help="Requests per chat throughput block.")] = 16,
    chat_rounds: Annotated[int, typer.Option(help="ABBA rounds (4 blocks each) per chat workload.")] = 2,
    chat_kv_cache_memory: Annotated[int, typer.Option(help="The chat backend's KV cache (bytes).")] = 128
    << 20,
    groups: Annotated[int, typer.Option(help="Distinct system prompts in the prefix workload.")] = 12,
    per_group: Annotated[int, typer.Option(help="Questions per system prompt.")] = 8,
    kv_cache_memory: Annotated[
        int, typer.Option(help="Each backend's KV cache (bytes): small on purpose.")
    ] = 3 << 20,
    threads: Annotated[int, typer.Option(help="OMP threads per backend.")] = 1,
    output_json: JsonOpt = None,
    markdown: MarkdownOpt = False,
) -> None:
    """The gateway's added latency and throughput loss against direct access (per workload), and
    prefix-aware against round-robin routing over two replicas (see shoal/bench/gateway.py)."""
    import json

    from shoal.bench import gateway as gw

    def show(result: dict) -> None:
        brief = {k: result[k] for k in ("latency", "throughput", "prefix_routing")}
        brief["throughput"] = {
            name: {k: v for k, v in t.items() if k != "blocks"} for name, t in brief["throughput"].items()
        }
        typer.echo(json.dumps(brief, indent=2))
        if markdown:
            typer.echo(gw.markdown(result))

    _run(gw.run_gateway_bench, show, output_json, model=model, dtype=dtype, latency_requests=latency_requests,
         workloads=workloads, throughput_requests=throughput_requests, concurrency=concurrency, rounds=rounds,
         chat_model=chat_model, chat_max_tokens=chat_max_tokens, chat_concurrency=chat_concurrency,
         chat_requests=chat_requests, chat_rounds=chat_rounds, chat_kv_cache_memory=chat_kv_cache_memory,
         groups=groups, per_group=per_group, kv_cache_memory=kv_cache_memory, threads=threads)  # fmt: skip


@bench_app.command()
def coldstart(
    model: Annotated[str, typer.Option(help="Local model directory (the 'local' baseline).")] = str(
        workload.REPO / "models" / "SmolLM2-135M-Instruct"
    ),
    source: Annotated[
        str | None, typer.Option(help="Source to copy into the cache (default: MODEL as a file:// share).")
    ] = None,
    dtype: Annotated[
        str, typer.Option(help="float32, bfloat16 or auto (shoal serve's --dtype).")
    ] = "float32",
    threads: Annotated[int, typer.Option(help="OMP threads of the server.")] = 1,
    repeats: Annotated[int, typer.Option(help="Starts per variant (median reported).")] = 3,
    decode_tokens: Annotated[
        int, typer.Option(help="Tokens of the decode-speed request (load formats).")
    ] = 64,
    output_json: JsonOpt = None,
    markdown: MarkdownOpt = False,
) -> None:
    """Time from process start to ready: model served in place, copied into a cold cache, from a warm
    cache; then --load-format mmap against the default (see shoal/bench/coldstart.py)."""
    from shoal.bench import coldstart as cs

    def show(result: dict) -> None:
        typer.echo(cs.markdown(result) if markdown else result["median_s"])

    _run(cs.run_coldstart, show, output_json, model=model, source=source, dtype=dtype, threads=threads,
         repeats=repeats, decode_tokens=decode_tokens)  # fmt: skip


@bench_app.command()
def chaos(
    model: Annotated[str, typer.Option(help="Model both replicas serve.")] = str(
        workload.REPO / "models" / "stories260K"
    ),
    dtype: Annotated[str, typer.Option(help="float32 or bfloat16 (the replicas').")] = "float32",
    threads: Annotated[int, typer.Option(help="OMP threads per replica.")] = 1,
    concurrency: Annotated[int, typer.Option(help="Clients in a closed loop through the gateway.")] = 4,
    max_tokens: Annotated[int, typer.Option(help="Tokens per request (EOS ignored).")] = 64,
    upstream_timeout: Annotated[float, typer.Option(help="The gateway's --upstream-timeout (s).")] = 2.0,
    pause_s: Annotated[float, typer.Option(help="How long replica B stays stopped (SIGSTOP).")] = 3.0,
    restart_delay_s: Annotated[float, typer.Option(help="From replica A's SIGKILL to its restart.")] = 0.5,
    warmup_s: Annotated[float, typer.Option(help="Load before the first disturbance.")] = 1.0,
    tail_s: Annotated[float, typer.Option(help="Load after both replicas are back.")] = 0.5,
    scrape_interval: Annotated[float, typer.Option(help="The gateway's scrape_interval_s.")] = 1.0,
    health_timeout: Annotated[float, typer.Option(help="The gateway's health_timeout_s.")] = 1.0,
    kv_cache_memory: Annotated[int | None, typer.Option(help="Each replica's KV cache (bytes).")] = 32 << 20,
    output_json: JsonOpt = None,
    markdown: MarkdownOpt = False,
) -> None:
    """Load through the gateway to two replicas while one is killed (SIGKILL) and restarted and the other
    paused (SIGSTOP) and resumed: failed and hung requests, recovery times, and the goals of issue 22 (see
    shoal/bench/chaos.py). Exit code 1 when a goal is not met."""
    import json

    from shoal.bench import chaos as bench_chaos

    def show(result: dict) -> None:
        typer.echo(json.dumps({k: result[k] for k in ("requests", "recovery", "goals")}, indent=2))
        for failure in result["failures"]:
            typer.echo(f"failed ({failure['class']}): {json.dumps(failure)}")
        if markdown:
            typer.echo(bench_chaos.markdown(result))

    result = _run(bench_chaos.run_chaos, show, output_json, model=model, dtype=dtype, threads=threads,
         concurrency=concurrency, max_tokens=max_tokens, upstream_timeout_s=upstream_timeout, pause_s=pause_s,
         restart_delay_s=restart_delay_s, warmup_s=warmup_s, tail_s=tail_s, scrape_interval_s=scrape_interval,
         health_timeout_s=health_timeout, kv_cache_memory=kv_cache_memory)  # fmt: skip
    if not result["passed"]:
        raise typer.Exit(1)


@bench_app.command()
def determinism(
    model: ModelOpt = None,
    dtype: DtypeOpt = "bfloat16",
    threads: ThreadsOpt = None,
    num_prompts: Annotated[int, typer.Option(help="Requests in each round's mixed batch.")] = 16,
    min_input: Annotated[int, typer.Option(help="Shortest prompt (tokens).")] = 32,
    max_input: Annotated[int, typer.Option(help="Longest prompt (tokens).")] = 256,
    min_output: Annotated[int, typer.Option(help="Shortest output (tokens, EOS ignored).")] = 16,
    max_output: Annotated[int, typer.Option(help="Longest output (tokens, EOS ignored).")] = 64,
    rounds: Annotated[int, typer.Option(help="Rounds (each a fresh workload on both engines).")] = 3,
    seed: SeedOpt = 0,
    dataset: DatasetOpt = workload.DEFAULT_DATASET,
    output_json: JsonOpt = None,
    markdown: MarkdownOpt = False,
) -> None:
    """What --deterministic costs: throughput of two in-process engines, with and without the mode, on the
    same mixed batch of seeded requests (see shoal/bench/determinism.py)."""
    from shoal.bench import determinism as det

    def show(result: dict) -> None:
        typer.echo(det.markdown(result) if markdown else result["ratio"])

    _run(det.run_determinism, show, output_json, model=model, dtype=dtype, threads=threads,
         num_prompts=num_prompts, input_len=(min_input, max_input), output_len=(min_output, max_output),
         rounds=rounds, seed=seed, dataset=dataset)  # fmt: skip


if __name__ == "__main__":
    bench_app()
