"""Round-to-nearest weight quantization, per group of input columns, int4 or int8.

The scheme is compressed-tensors' (quantization/utils/helpers.py `calculate_qparams`, read in the 0.20
package), so that a checkpoint means the same thing to shoal, compressed-tensors and vLLM:
- integers span [-2^(b-1), 2^(b-1) - 1] (int4: [-8, 7]);
- symmetric: scale = max|w| / ((2^b - 1) / 2), no zero point; w ~ q * scale;
- asymmetric: the range [min(w, 0), max(w, 0)] maps onto the integers: scale = (max - min) / (2^b - 1),
  zero point = round(-2^(b-1) - min / scale); w ~ (q - zero_point) * scale.
Scales are computed in float32 and stored in the weight's dtype, rounded up where the cast rounded them
down, so that no weight falls outside the range and every element keeps |w - w_hat| <= scale / 2.

Every method (rtn here; gptq and awq in their own modules) has the signature
`method(weight, calib_activations, bits, group_size) -> QuantizedWeight`, so `quantize.py` treats them alike.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from shoal.quant.groups import PER_CHANNEL
from shoal.quant.observer import check_observer, mse_shrink


@dataclass
class QuantizedWeight:
    """One linear layer's quantized weight.

    qweight: int8 [out, in], values in [-2^(bits-1), 2^(bits-1) - 1].
    scale: [out, groups], the weight's dtype (groups = in / group_size; 1 per channel).
    zero_point: int8 [out, groups] in the same integer range, or None (symmetric).
    group_size: input columns per scale; PER_CHANNEL (0) for one scale per row.
    """

    qweight: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor | None
    bits: int
    group_size: int

    @property
    def symmetric(self) -> bool:
        return self.zero_point is None

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """w_hat [out, in] = (q - zero_point) * scale, computed in float32, returned in dtype (default: the
        scale's). Exact as compressed-tensors' `dequantize` (computed in the scale's dtype): q - zp is a
        small integer, so the one rounding is of the product."""
        return dequantize(self.qweight, self.scale, self.zero_point, dtype or self.scale.dtype)


def integer_range(bits: int) -> tuple[int, int]:
    return -(1 << (bits - 1)), (1 << (bits - 1)) - 1


def dequantize(
    qweight: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, dtype: torch.dtype
) -> torch.Tensor:
    """qweight int8 [out, in], scale [out, groups], zero_point int8 [out, groups] or None -> [out, in] dtype."""
    out, cols = qweight.shape
    groups = scale.shape[1]
    q = qweight.float().view(out, groups, cols // groups)
    if zero_point is not None:
        q = q - zero_point.float().unsqueeze(-1)
    return (q * scale.float().unsqueeze(-1)).view(out, cols).to(dtype)


def _store_scale(scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Cast float32 scales to dtype, rounding up where the cast rounded down (one ulp up is enough)."""
    stored = scale.to(dtype)
    low = stored.float() < scale
    if low.any():
        bumped = (stored.float() * (1 + torch.finfo(dtype).eps)).to(dtype)
        stored = torch.where(low, bumped, stored)
    tiny = torch.finfo(dtype).eps  # an all-zero group: any scale gives q = 0 (compressed-tensors uses eps)
    return torch.where(stored == 0, torch.tensor(tiny, dtype=dtype), stored)


def quantize_rtn(
    weight: torch.Tensor,
    calib_activations: torch.Tensor | None,
    bits: int,
    group_size: int,
    symmetric: bool = True,
    observer: str = "minmax",
) -> QuantizedWeight:
    """Round-to-nearest quantization of weight [out, in] (any float dtype).

    calib_activations is unused (the common method signature). group_size must divide in, or be
    PER_CHANNEL. observer: "minmax" (compressed-tensors' range) or "mse" (each group's range shrunk where
    that lowers its rounding error, shoal.quant.observer). Raises ValueError for other bits, a group size
    that does not divide the input size, or another observer."""
    del calib_activations
    check_observer(observer)
    if bits not in (4, 8):
        raise ValueError(f"bits={bits}: rtn quantizes to 4 or 8 bits")
    out, cols = weight.shape
    size = cols if group_size == PER_CHANNEL else group_size
    if size <= 0 or cols % size:
        raise ValueError(f"group_size={group_size} does not divide in_features={cols}")
    w = weight.detach().float().view(out * (cols // size), size)
    dtype = weight.dtype if weight.dtype.is_floating_point else torch.float32
    lo = w.amin(-1).clamp(max=0)
    hi = w.amax(-1).clamp(min=0)
    if observer == "mse":

        def fake_quantize(x: torch.Tensor, lo1: torch.Tensor, hi1: torch.Tensor) -> torch.Tensor:
            q, scale, zp = _round(x, lo1, hi1, bits, symmetric, dtype)
            return (q - (0 if zp is None else zp.unsqueeze(-1))) * scale.float().unsqueeze(-1)

        p = mse_shrink(w, fake_quantize)
        lo, hi = lo * p, hi * p
    q, scale, zp = _round(w, lo, hi, bits, symmetric, dtype)
    groups = cols // size
    zero_point = None if zp is None else zp.to(torch.int8).view(out, groups)
    return QuantizedWeight(
        q.to(torch.int8).view(out, cols), scale.view(out, groups), zero_point, bits, group_size
    )


def _round(
    w: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, bits: int, symmetric: bool, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Integers (float32) of w [rows, size] on the range [lo, hi] [rows], the scales [rows] in dtype and the
    zero points [rows] (float32; None when symmetric)."""
    qmin, qmax = integer_range(bits)
    if symmetric:
        scale = _store_scale(torch.maximum(-lo, hi) / ((qmax - qmin) / 2), dtype)
        return torch.round(w / scale.float().unsqueeze(-1)).clamp(qmin, qmax), scale, None
    scale = _store_scale((hi - lo) / (qmax - qmin), dtype)
    zp = torch.round(qmin - lo / scale.float()).clamp(qmin, qmax)
    q = torch.round(w / scale.float().unsqueeze(-1) + zp.unsqueeze(-1)).clamp(qmin, qmax)
    return q, scale, zp
