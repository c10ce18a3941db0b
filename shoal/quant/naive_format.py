"""compressed-tensors' unpacked 8-bit formats, `int-quantized` (int8) and `float-quantized`
(float8_e4m3fn): the tensors of one linear, written and read back.

Layout (compressors/naive_quantized/base.py in compressed-tensors 0.20, `compression_param_names`):
- `<module>.weight`: the quantized weight itself, int8 or float8_e4m3fn [out, in];
- `<module>.weight_scale`: [out, 1], the model's dtype (per channel; float32 for FP8);
- `<module>.input_scale`: float32 [1], only with static per-tensor activation scales;
- `<module>.input_zero_point`: int8 [1], only with static asymmetric activations (compressed-tensors'
  `initialize_qparams` registers it in the quantization args' zp dtype, int8 for int).
Weights are symmetric (no `weight_zero_point`), as shoal writes and serves them.
"""

from __future__ import annotations

import torch

from shoal.quant.fp8 import FP8_DTYPE
from shoal.quant.rtn import QuantizedWeight
from shoal.quant.scheme import LayerScheme

NAIVE_SUFFIXES = ("weight", "weight_scale", "input_scale", "input_zero_point")


def compress_naive(
    qw: QuantizedWeight,
    input_scale: torch.Tensor | None = None,
    input_zero_point: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """The checkpoint tensors of one linear, keyed by suffix (weight, weight_scale[, input_scale[,
    input_zero_point]])."""
    tensors = {"weight": qw.qweight.contiguous(), "weight_scale": qw.scale.reshape(-1, 1).contiguous()}
    if input_scale is not None:
        tensors["input_scale"] = input_scale.float().reshape(1)
    if input_zero_point is not None:
        tensors["input_zero_point"] = input_zero_point.to(torch.int8).reshape(1)
    return tensors


def decompress_naive(
    tensors: dict[str, torch.Tensor], scheme: LayerScheme, name: str
) -> tuple[QuantizedWeight, torch.Tensor | None, torch.Tensor | None]:
    """(weight, input_scale or None, input_zero_point or None) of one linear; ValueError naming the tensor
    when a dtype or shape disagrees with the scheme (int8 for type int, float8_e4m3fn for type float; scale
    [out, 1]; an integer [1] input_zero_point exactly for static asymmetric activations)."""
    for key in ("weight", "weight_scale"):
        if key not in tensors:
            raise ValueError(f"tensor {name}.{key} is missing from the checkpoint")
    weight, scale = tensors["weight"], tensors["weight_scale"]
    expected = torch.int8 if scheme.type == "int" else FP8_DTYPE
    if weight.dtype != expected or weight.dim() != 2:
        raise ValueError(
            f"tensor {name}.weight has {weight.dtype} {tuple(weight.shape)}, expected {expected} 2-D"
        )
    if tuple(scale.shape) not in ((weight.shape[0], 1), (weight.shape[0],)):
        raise ValueError(
            f"tensor {name}.weight_scale has shape {tuple(scale.shape)}, expected {(weight.shape[0], 1)}"
        )
    acts = scheme.activations
    input_scale = tensors.get("input_scale")
    if acts is not None and not acts.dynamic and input_scale is None:
        raise ValueError(f"tensor {name}.input_scale is missing (the config says static activation scales)")
    if input_scale is not None and input_scale.numel() != 1:
        raise ValueError(f"tensor {name}.input_scale has shape {tuple(input_scale.shape)}, expected (1,)")
    return (
        QuantizedWeight(weight, scale.reshape(-1, 1), None, 8, 0),
        input_scale,
        _zero_point(tensors, acts, name),
    )


def _zero_point(tensors: dict[str, torch.Tensor], acts, name: str) -> torch.Tensor | None:
    """The static asymmetric input_zero_point (int32 [1]), None otherwise; an all-zero one written beside
    symmetric scales (compressed-tensors may force one) is dropped. ValueError naming the tensor."""
    zp = tensors.get("input_zero_point")
    static_asymmetric = acts is not None and not acts.dynamic and not acts.symmetric
    if static_asymmetric and zp is None:
        raise ValueError(
            f"tensor {name}.input_zero_point is missing (the config says asymmetric static activations)"
        )
    if zp is None:
        return None
    if zp.numel() != 1 or zp.dtype.is_floating_point or not -128 <= int(zp.reshape(())) <= 127:
        raise ValueError(
            f"tensor {name}.input_zero_point must be one integer in [-128, 127], got {zp.dtype} {tuple(zp.shape)}"
        )
    if not static_asymmetric:
        if int(zp.reshape(())) != 0:
            kind = "symmetric" if acts is None or acts.symmetric else "dynamic (a zero point a row)"
            raise ValueError(
                f"tensor {name}.input_zero_point is nonzero but the config says {kind} activations"
            )
        return None
    return zp.to(torch.int32).reshape(1)
