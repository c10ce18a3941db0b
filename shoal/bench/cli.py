"""`shoal bench latency` and `shoal bench throughput`: shoal against transformers' generate, same process."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from shoal.bench import workload

bench_app = typer.Typer(
    help=(
        "Benchmarks with vLLM's names: shoal against Hugging Face transformers' generate, in one process, on "
        "the same weights, dtype and token ids, EOS ignored on both sides. Reports tokens/s per side and the "
        "shoal/HF ratio (quote the ratio: it holds under other load on the machine)."
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
MaxLenOpt = Annotated[
    int | None, typer.Option(help="shoal's max_model_len (default: the engine's per-device default).")
]


def _run(fn, printer, output_json: Path | None, **kwargs) -> None:
    try:
        result = fn(log=typer.echo, **kwargs)
    except (ValueError, FileNotFoundError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from e
    printer(result)
    if output_json is not None:
        workload.write_json(result, output_json)
        typer.echo(f"wrote {output_json}")


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


if __name__ == "__main__":
    bench_app()
