"""`shoal quant`: the quantization commands (issue 18): `quantize`, `eval` (eval.py) and `recommend` (recommend.py).

Only typer is imported at module level, so registering the group costs `shoal serve` nothing; the command
imports the toolkit (torch, safetensors) when it runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

quant_app = typer.Typer(
    help="Quantize a 16-bit model into a directory `shoal serve --model` serves (compressed-tensors layout).",
    no_args_is_help=True,
    add_completion=False,
)


@quant_app.command()
def quantize(
    model_dir: Annotated[Path, typer.Argument(help="The 16-bit Hugging Face model directory.")],
    output: Annotated[Path, typer.Option("--output", help="Directory to write the quantized model to.")],
    method: Annotated[
        str,
        typer.Option(
            help="rtn, gptq or awq (awq: asymmetric); w8a8 (int8 weights and activations) or fp8 (E4M3 "
            "weights, dynamic per-token fp8 activations; emulated on CPU)."
        ),
    ] = "rtn",
    bits: Annotated[int, typer.Option(help="4, or 8 for W8A16.")] = 4,
    group_size: Annotated[
        str,
        typer.Option(
            help="auto (128 where it divides the input size, else 64 or 32, else per channel or kept 16-bit), "
            "channel, or a size that must divide every quantized layer."
        ),
    ] = "auto",
    symmetric: Annotated[
        bool, typer.Option("--symmetric/--asymmetric", help="Zero points (asymmetric) or none.")
    ] = True,
    calib_text: Annotated[
        Path | None,
        typer.Option(
            help="gptq, awq: calibration text (default ../shared/eval/wikitext2-valid.txt of the repo)."
        ),
    ] = None,
    num_samples: Annotated[int, typer.Option(help="gptq, awq: calibration windows.")] = 512,
    seq_len: Annotated[int, typer.Option(help="gptq, awq: tokens per calibration window.")] = 512,
    seed: Annotated[
        int, typer.Option(help="gptq, awq: seed drawing the windows (same seed, same result).")
    ] = 0,
    weight_method: Annotated[str, typer.Option(help="w8a8: int8 weights by rtn or gptq.")] = "rtn",
    smoothquant_alpha: Annotated[
        float | None, typer.Option(help="w8a8: SmoothQuant migration strength in [0, 1] (off unless given).")
    ] = None,
    activation_scales: Annotated[
        str, typer.Option(help="w8a8: dynamic (per token) or static (per tensor, calibrated).")
    ] = "dynamic",
    observer: Annotated[
        str,
        typer.Option(
            help="w8a8 static scales: minmax (max|x|; asymmetric: min and max) or percentile (99.99th of "
            "|x|; asymmetric: the 0.01st and 99.99th of x)."
        ),
    ] = "minmax",
    activation_symmetric: Annotated[
        bool,
        typer.Option(
            "--activation-symmetric/--activation-asymmetric",
            help="w8a8 activations: symmetric (scale max|x| / 127) or asymmetric (affine: scale "
            "(max - min) / 255 and a zero point; static ones from the observer's range).",
        ),
    ] = True,
    quantize_lm_head: Annotated[
        bool,
        typer.Option(
            "--quantize-lm-head",
            help="Also lm_head: int8 per channel, round to nearest (rtn, gptq, awq; unties tied embeddings).",
        ),
    ] = False,
    scale_dtype: Annotated[
        str,
        typer.Option(help="rtn, gptq, awq: group scales in the weights' dtype (auto) or float32."),
    ] = "auto",
    weight_observer: Annotated[
        str,
        typer.Option(help="rtn, gptq: group ranges by minmax, or mse (shrunk where that lowers the error)."),
    ] = "minmax",
    act_order: Annotated[
        bool,
        typer.Option(
            "--act-order/--no-act-order", help="gptq: columns by decreasing Hessian diagonal (static groups)."
        ),
    ] = True,  # gptq.GPTQ_METHOD_DEFAULT (not imported: torch stays out of module import)
    dampening_frac: Annotated[
        float, typer.Option(help="gptq: fraction of the mean Hessian diagonal added to its diagonal.")
    ] = 0.1,
    true_sequential: Annotated[
        bool,
        typer.Option(
            "--true-sequential/--no-true-sequential",
            help="gptq: each linear calibrated on inputs after the block's earlier linears are quantized.",
        ),
    ] = False,
) -> None:
    """Quantize MODEL_DIR's decoder linear layers and write a servable model directory to --output."""
    from rich.progress import Progress

    from shoal.quant.activation_recipe import ActivationOptions
    from shoal.quant.gptq import GPTQOptions
    from shoal.quant.groups import parse_group_size
    from shoal.quant.quantize import Calibration, quantize_model

    calibration = Calibration(calib_text, num_samples, seq_len, seed)
    try:
        with Progress(transient=True) as bar:
            task = bar.add_task(f"{method}: decoder blocks", total=None)
            result = quantize_model(
                model_dir,
                output,
                method,
                bits,
                parse_group_size(group_size),
                symmetric,
                calibration,
                lambda done, total: bar.update(task, completed=done, total=total),
                ActivationOptions(
                    weight_method, smoothquant_alpha, activation_scales, observer, activation_symmetric
                ),
                quantize_lm_head,
                scale_dtype,
                GPTQOptions(weight_observer, act_order, dampening_frac, true_sequential),
            )
    except (ValueError, OSError) as e:
        typer.echo(f"shoal quant quantize: error: {e}", err=True)
        raise typer.Exit(1) from None
    sizes = sorted({("channel" if g == 0 else g) for g in result.group_sizes.values()}, key=str)
    typer.echo(
        f"{len(result.group_sizes)} layers quantized ({method}, {bits}-bit, group sizes {sizes}), "
        f"{len(result.ignored)} kept 16-bit; quantized layers {result.quantized_bytes / 1e6:.1f} MB "
        f"({result.ratio_to_16bit:.3f}x of 16-bit) in {result.seconds:.1f} s -> {result.output}"
    )


@quant_app.command("eval")
def eval_command(
    model_dir: Annotated[Path, typer.Argument(help="The 16-bit Hugging Face model directory.")],
    methods: Annotated[
        str,
        typer.Option(
            help="Comma-separated: rtn,gptq,awq,w8a8,fp8; name:bits for other bits (rtn:8 is W8A16)."
        ),
    ] = "rtn,gptq,awq",
    eval_text: Annotated[
        Path | None, typer.Option(help="Held-out text (default ../shared/eval/wikitext2-test.txt).")
    ] = None,
    calib_text: Annotated[Path | None, typer.Option(help="Calibration text for gptq, awq, w8a8.")] = None,
    num_samples: Annotated[int, typer.Option(help="Calibration windows.")] = 128,
    seq_len: Annotated[int, typer.Option(help="Tokens per calibration window.")] = 512,
    eval_tokens: Annotated[int, typer.Option(help="Perplexity on the first N tokens of --eval-text.")] = 8192,
    group_size: Annotated[str, typer.Option(help="auto, channel or N (as for quantize).")] = "auto",
    symmetric: Annotated[bool, typer.Option("--symmetric/--asymmetric")] = True,
    decode_tokens: Annotated[int, typer.Option(help="Tokens per decode-speed run.")] = 32,
    decode_iters: Annotated[int, typer.Option(help="Timed decode-speed runs per model (alternating).")] = 3,
    output_dir: Annotated[
        Path | None, typer.Option(help="Where quant_eval.json/.png go (default: MODEL_DIR).")
    ] = None,
    keep_models: Annotated[
        bool, typer.Option(help="Keep the quantized models under <output-dir>/quantized/<method>.")
    ] = False,
    seed: Annotated[int, typer.Option(help="Seed for calibration windows and prompts.")] = 0,
) -> None:
    """Quantize MODEL_DIR with each method and print bits, memory, speed, perplexity, agreement, time."""
    from shoal.quant.eval import DEFAULT_EVAL_TEXT, EvalSettings, markdown_table, run_eval
    from shoal.quant.groups import parse_group_size
    from shoal.quant.quantize import Calibration

    settings = EvalSettings(
        methods=[m.strip() for m in methods.split(",") if m.strip()],
        eval_text=eval_text or DEFAULT_EVAL_TEXT,
        eval_tokens=eval_tokens,
        calibration=Calibration(calib_text, num_samples, seq_len, seed),
        group_size=parse_group_size(group_size),
        symmetric=symmetric,
        decode_tokens=decode_tokens,
        decode_iters=decode_iters,
        seed=seed,
    )
    try:
        result = run_eval(model_dir, settings, output_dir, keep_models, log=lambda m: typer.echo(m, err=True))
    except (ValueError, OSError) as e:
        typer.echo(f"shoal quant eval: error: {e}", err=True)
        raise typer.Exit(1) from None
    typer.echo(markdown_table(result))
    typer.echo(f"\nwrote {(output_dir or model_dir) / 'quant_eval.json'} and quant_eval.png")


@quant_app.command()
def recommend(
    model_dir: Annotated[
        Path | None,
        typer.Argument(help="The model; its quant_eval.json (from `quant eval`) is used if present."),
    ] = None,
    memory_budget: Annotated[int | None, typer.Option(help="Bytes the weights may take, as stored.")] = None,
    quality_floor: Annotated[
        float, typer.Option(help="Largest acceptable perplexity ratio to 16-bit (1.05: at most 5% worse).")
    ] = 1.05,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the hardware and the choice as JSON.")
    ] = False,
) -> None:
    """Recommend a quantization method for this hardware, budget and quality floor, with the reasons."""
    import json

    from shoal.quant.hardware import detect
    from shoal.quant.recommend import recommend as choose

    hw = detect()
    try:
        rec = choose(hw, model_dir, memory_budget, quality_floor)
    except (ValueError, OSError, KeyError) as e:
        typer.echo(f"shoal quant recommend: error: {e}", err=True)
        raise typer.Exit(1) from None
    if as_json:
        typer.echo(json.dumps({"hardware": hw.to_json(), "recommendation": rec.to_json()}, indent=2))
        return
    gpus = ", ".join(f"{g.name} ({g.memory_bytes / 2**30:.0f} GiB, fp8: {g.fp8})" for g in hw.gpus) or "none"
    ram = f"{hw.ram_bytes / 2**30:.1f} GiB" if hw.ram_bytes else "?"
    typer.echo(
        f"hardware: {hw.cpu}, {hw.cores} cores, {ram} RAM, flags {' '.join(hw.cpu_flags)}; GPU: {gpus}"
    )
    typer.echo(f"method: {rec.method} ({rec.bits}-bit, {rec.source})")
    for r in rec.reasons:
        typer.echo(f"  - {r}")
    if rec.command:
        typer.echo(f"command: {rec.command}")
