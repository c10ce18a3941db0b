"""The w8a8 and fp8 methods over a whole checkpoint: which weights, which activation scales, which format.

- w8a8 (compressed-tensors `int-quantized`, as llm-compressor's W8A8 recipe): optional SmoothQuant
  (smoothquant.py) first, then int8 symmetric per-channel weights by round to nearest (rtn.py) or GPTQ
  (sequential.py over the smoothed model; with dynamic activations the smoothing is done inside GPTQ's
  block-by-block pass, smoothquant.smooth_block, and the smoothed norm weights are stored in float32),
  then activations int8 either dynamic per token (nothing stored)
  or static per tensor: input_scale = r / 127 with r observed on calibration windows after smoothing,
  either max|x| (`minmax` observer; symmetric, so min/max is max|x|: max_j |x_j| / s_j) or the
  99.99th percentile of |x| over 512 sampled input rows (`percentile`, clipping rare outliers).
  Asymmetric activations (`activation_symmetric=False`, the seed's affine form) take the observed range
  [min, max] instead (minmax: min_j / max_j of x_j / s_j; percentile: the 0.01st and 99.99th percentiles
  of x), scale = (max - min) / 255 and a zero point (w8a8.affine_params); dynamic ones compute both a row.
- fp8 (`float-quantized`, the FP8_DYNAMIC preset): float8_e4m3fn per-channel weights (fp8.py), activations
  dynamic per token; no calibration.
Every decoder linear is quantized per channel (no packing constraint, so nothing is kept 16-bit here).
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

from shoal.model.config import load_config
from shoal.model.loader import load_model
from shoal.quant.fp8 import quantize_fp8_weight
from shoal.quant.gptq import GPTQOptions
from shoal.quant.rtn import QuantizedWeight, quantize_rtn
from shoal.quant.scheme import FLOAT_QUANTIZED, INT_QUANTIZED, ActivationScheme, LayerScheme
from shoal.quant.sequential import BLOCK_LINEARS, gptq_model
from shoal.quant.smoothquant import activation_absmax, check_alpha, smooth_block, smooth_checkpoint
from shoal.quant.w8a8 import INT8_MAX, affine_params

ACTIVATION_METHODS = ("w8a8", "fp8")
# w8a8's GPTQ: act-order (llm-compressor's W8A8 default, `actorder="static"`; per channel there is one scale a
# row, so the order changes only which columns absorb the others' errors), the reference's dampening 0.01.
# SmolLM2 quick protocol, float32: 1.0123x of 16-bit perplexity, against 1.0151x without act-order and
# llm-compressor's 1.013x (docs/quantization.md).
W8A8_GPTQ_OPTIONS = GPTQOptions(act_order=True)
PERCENTILE = 99.99  # the percentile observer's clipping point of |x|


@dataclass
class ActivationOptions:
    """w8a8's options: weight_method rtn|gptq, smoothquant_alpha (None: off), activation_scales
    dynamic|static, observer minmax|percentile (static scales only), activation_symmetric (False: a zero
    point too, the affine form)."""

    weight_method: str = "rtn"
    smoothquant_alpha: float | None = None
    activation_scales: str = "dynamic"
    observer: str = "minmax"
    activation_symmetric: bool = True

    def check(self, method: str) -> None:
        """ValueError naming the option that is unknown or does not apply to method."""
        if self.weight_method not in ("rtn", "gptq"):
            raise ValueError(f"--weight-method {self.weight_method!r}: choose rtn or gptq")
        if self.activation_scales not in ("dynamic", "static"):
            raise ValueError(f"--activation-scales {self.activation_scales!r}: choose dynamic or static")
        if self.observer not in ("minmax", "percentile"):
            raise ValueError(f"--observer {self.observer!r}: choose minmax or percentile")
        if method == "fp8" and (
            self.weight_method != "rtn"
            or self.smoothquant_alpha is not None
            or self.activation_scales != "dynamic"
            or not self.activation_symmetric
        ):
            raise ValueError(
                "fp8 takes no --weight-method, --smoothquant-alpha, --activation-scales or --activation-asymmetric"
            )


@dataclass
class ActivationResult:
    """Quantized weights and static input scales by checkpoint linear name, the scheme of every layer and
    the format. Smoothing's changes to norm weights are made in the caller's tensors dict."""

    weights: dict[str, QuantizedWeight]
    input_scales: dict[str, torch.Tensor]
    scheme: LayerScheme
    format: str
    input_zero_points: dict[str, torch.Tensor] = field(default_factory=dict)  # static asymmetric only


def _fused_of(name: str) -> str:
    """model.layers.3.mlp.up_proj -> layers.3.mlp.gate_up_proj."""
    head, _, rest = name.removeprefix("model.").partition(".")
    index, _, leaf = rest.partition(".")
    fused = next(f for f, parts in BLOCK_LINEARS.items() if leaf in parts)
    return f"{head}.{index}.{fused}"


def quantize_activation_method(
    src: Path,
    tensors: dict[str, torch.Tensor],
    names: list[str],
    method: str,
    options: ActivationOptions,
    calib_ids: Callable[[], torch.Tensor],
    progress: Callable[[int, int], None] | None = None,
    threads: int | None = None,
) -> ActivationResult:
    """Quantize the linears `names` (checkpoint names, without .weight) of the checkpoint `tensors` (all
    of src's tensors; smoothing rewrites some in place). calib_ids() gives [samples, seq_len] windows, called
    only when calibration is needed (SmoothQuant, static scales, GPTQ). threads: torch threads for GPTQ's
    block forwards (sequential.gptq_model). ValueError for bad options."""
    options.check(method)
    if method == "fp8":
        weights = {n: quantize_fp8_weight(tensors[f"{n}.weight"]) for n in names}
        return ActivationResult(
            weights, {}, LayerScheme(8, 0, True, "float", ActivationScheme("float")), FLOAT_QUANTIZED
        )
    static = options.activation_scales == "static"
    ids = (
        calib_ids()
        if (static or options.smoothquant_alpha is not None or options.weight_method == "gptq")
        else None
    )
    acts = ActivationScheme("int", dynamic=not static, symmetric=options.activation_symmetric)
    scheme = LayerScheme(8, 0, True, "int", acts)
    if options.weight_method == "gptq" and options.smoothquant_alpha is not None and not static:
        weights = _smoothed_gptq_weights(
            src, tensors, names, ids, options.smoothquant_alpha, progress, threads
        )
        return ActivationResult(weights, {}, scheme, INT_QUANTIZED)
    absmax: dict[str, torch.Tensor] = {}
    factors: dict[str, torch.Tensor] = {}
    samples: dict[str, torch.Tensor] | None = {} if static and options.observer == "percentile" else None
    ranges: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    if static or options.smoothquant_alpha is not None:
        model, cfg = load_model(src, torch.float32, torch.device("cpu"), pack=False)
        absmax = activation_absmax(model, ids, samples=samples, ranges=ranges)
        del model
        if options.smoothquant_alpha is not None:
            gqa = cfg.num_heads != cfg.num_kv_heads
            factors = smooth_checkpoint(tensors, absmax, options.smoothquant_alpha, cfg.num_layers, gqa)
    if options.weight_method == "gptq":
        weights = _gptq_weights(src, tensors, names, ids, progress, threads)
    else:
        weights = {n: quantize_rtn(tensors[f"{n}.weight"], None, 8, 0) for n in names}
    result = ActivationResult(weights, {}, scheme, INT_QUANTIZED)
    if static:
        for n in names:
            fused = _fused_of(n)
            s = factors.get(fused, torch.ones_like(absmax[fused]))
            rows = None if samples is None else samples[fused] / s
            if options.activation_symmetric:
                result.input_scales[n] = _symmetric_scale(absmax[fused] / s, rows)
            else:
                lo, hi = ranges[fused]
                scale, zp = _affine_scale(lo / s, hi / s, rows)
                result.input_scales[n], result.input_zero_points[n] = scale, zp
    return result


def _percentile(values: torch.Tensor, q: float) -> torch.Tensor:
    """The q-th percentile (0 < q <= 100) of values, as the kthvalue of the flattened tensor."""
    flat = values.flatten()
    return flat.kthvalue(max(1, round(flat.numel() * q / 100))).values


def _symmetric_scale(absmax: torch.Tensor, samples: torch.Tensor | None) -> torch.Tensor:
    """float32 [1]: max|x| / 127 (minmax; absmax [in] per channel) or the PERCENTILE of |samples| / 127."""
    r = absmax.max() if samples is None else _percentile(samples.abs(), PERCENTILE)
    return (r / INT8_MAX).clamp(min=1e-8).reshape(1).float()


def _affine_scale(
    lo: torch.Tensor, hi: torch.Tensor, samples: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale float32 [1], zero_point int32 [1]) for [min lo, max hi] (minmax; [in] per channel) or for the
    (100 - PERCENTILE)th and PERCENTILE-th percentiles of samples [rows, in]."""
    if samples is None:
        low, high = lo.min(), hi.max()
    else:
        low, high = _percentile(samples, 100 - PERCENTILE), _percentile(samples, PERCENTILE)
    return affine_params(low.reshape(1), high.reshape(1))


def _smoothed_gptq_weights(
    src: Path,
    tensors: dict[str, torch.Tensor],
    names: list[str],
    ids: torch.Tensor,
    alpha: float,
    progress,
    threads: int | None = None,
) -> dict[str, QuantizedWeight]:
    """SmoothQuant folded block by block inside GPTQ's pass over src (smoothquant.smooth_block), then GPTQ int8
    per-channel weights of the smoothed float32 linears; the smoothed norm weights go into tensors, float32
    (rounding them to a 16-bit checkpoint dtype would move every input channel of the linears they feed)."""
    check_alpha(alpha)
    scale_dtype = tensors[f"{names[0]}.weight"].dtype
    norms: dict[str, torch.Tensor] = {}

    def smooth(block: int, layer, stats) -> None:
        norms.update(smooth_block(layer, stats, alpha, block, cfg))

    cfg = load_config(src)
    weights = gptq_model(
        src, dict.fromkeys(names, 0), 8, True, ids, scale_dtype, progress, W8A8_GPTQ_OPTIONS, smooth, threads
    )
    tensors.update(norms)
    return weights


def _gptq_weights(
    src: Path, tensors: dict[str, torch.Tensor], names: list[str], ids: torch.Tensor, progress, threads=None
) -> dict[str, QuantizedWeight]:
    """GPTQ int8 per-channel weights of the (possibly smoothed) tensors: written to a scratch model
    directory beside src's config and tokenizer, then sequential.gptq_model over it."""
    scale_dtype = tensors[f"{names[0]}.weight"].dtype
    with tempfile.TemporaryDirectory(prefix="shoal-w8a8-") as tmp:
        for f in src.iterdir():
            if (
                f.is_file()
                and not f.name.endswith(".safetensors")
                and f.name != "model.safetensors.index.json"
            ):
                shutil.copy2(f, Path(tmp) / f.name)
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(Path(tmp) / "model.safetensors"))
        return gptq_model(
            Path(tmp),
            dict.fromkeys(names, 0),
            8,
            True,
            ids,
            scale_dtype,
            progress,
            W8A8_GPTQ_OPTIONS,
            threads=threads,
        )
