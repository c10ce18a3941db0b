"""`shoal quant`: the quantization commands (issue 18). `quantize` is here; `eval` and `recommend` come next.

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
        str, typer.Option(help="w8a8: dynamic (per token) or static (per tensor, calibrated min/max).")
    ] = "dynamic",
) -> None:
    """Quantize MODEL_DIR's decoder linear layers and write a servable model directory to --output."""
    from rich.progress import Progress

    from shoal.quant.activation_recipe import ActivationOptions
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
                ActivationOptions(weight_method, smoothquant_alpha, activation_scales),
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
