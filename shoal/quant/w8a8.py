"""W8A8: int8 weights times int8 activations, accumulated in int32, rescaled to float.

The scheme is SmoothQuant's W8A8 (Xiao et al. 2022, arXiv:2211.10438, "O1/O2" per-token / per-tensor) as
compressed-tensors 0.20 stores it (`int-quantized` format, compressors/naive_quantized/base.py
`IntQuantizationCompressor`) and vLLM serves it (`CompressedTensorsW8A8Int8`):
- weights: int8 symmetric per output channel, w ~ q_w * s_w, s_w [out, 1] (rtn.py or gptq.py);
- activations: int8, either dynamic per token, s_x = max|x_row| / 127 computed for each row at run time,
  or static per tensor, s_x = the checkpoint's `input_scale` from calibration;
- y = (q_x @ q_w^T) * s_x * s_w^T + bias, the integer product exact in int32 (|q| <= 128, so no
  overflow below 131,072 input features; 65,793 with an activation zero point, |q_x - z| <= 255, which
  W8A8Linear checks).
Activations may also be asymmetric (affine, the form of Jacob et al. 2018, arXiv:1712.05877, and of the
seed's "scale = (max - min) / 255 with a zero point"): s_x = (max - min) / 255 over a range widened to hold
0, an integer zero point z = clamp(round(-128 - min / s_x), -128, 127), q_x = clamp(round(x / s_x + z)),
x ~ (q_x - z) * s_x, as compressed-tensors 0.20 computes it (quantization/utils/helpers.py
`calculate_qparams`, lifecycle/forward_helpers.py `_quantize`) and vLLM serves it (its `azp` W8A8 path).
The zero point leaves the integer product exact: (q_x - z) @ q_w^T = q_x @ q_w^T - z * rowsum(q_w), in int32.
A one-sided input (after SiLU, say) then spends all 256 levels on its range instead of about half.
torch._int_mm (int8 x int8 -> int32) does the product where the CPU has int8 dot-product instructions
(avx512_vnni, amx_int8) or on a GPU; on a CPU without them (AVX2 only) its kernel is scalar, ~40x slower than
a float32 matmul (1024 x 576 x 3072, 1 thread: 15 s against 0.39 s), so the product is float32 matmuls over
slices of at most 1,024 input features, each exact (every partial sum is an integer of at most
1024 * 128 * 128 = 2^24, which float32 holds exactly, in whatever order BLAS adds), summed in int32. Where
_int_mm refuses a shape, an int64 reference matmul, exact too. Both are checked against int64 in tests/test_quant_w8a8_fp8.py.
"""

from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn

from shoal.quant.hardware import _cpuinfo
from shoal.quant.rtn import QuantizedWeight, dequantize

INT8_MAX = 127.0
INT32_MAX = 2**31 - 1
_SCALE_EPS = 1e-8  # an all-zero row gets this scale (q = 0), not a division by zero


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [rows, in] float -> (q int8 [rows, in], scale float32 [rows, 1]), x ~ q * scale, |x - q*s| <= s/2."""
    xf = x.float()
    scale = (xf.abs().amax(dim=-1, keepdim=True) / INT8_MAX).clamp(min=_SCALE_EPS)
    return torch.round(xf / scale).clamp(-128, 127).to(torch.int8), scale


def quantize_per_tensor(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None = None
) -> torch.Tensor:
    """x [rows, in] float, scale float [1] or [rows, 1], zero_point integer of scale's shape or None ->
    q int8 [rows, in] = clamp(round(x / scale + zero_point), -128, 127); values past the range clip."""
    scaled = x.float() / scale.float()
    if zero_point is not None:
        scaled = scaled + zero_point.float()
    return torch.round(scaled).clamp(-128, 127).to(torch.int8)


def affine_params(lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric int8 parameters for the range [lo, hi] (any equal shapes, float): (scale float32,
    zero_point int32), scale = (max(hi, 0) - min(lo, 0)) / 255, zero_point = clamp(round(-128 - lo / scale),
    -128, 127); compressed-tensors 0.20's `calculate_qparams` (a zero-width range gets scale 1e-8, q = z)."""
    lo, hi = lo.float().clamp(max=0), hi.float().clamp(min=0)
    scale = ((hi - lo) / 255).clamp(min=_SCALE_EPS)
    zero_point = torch.round(-128 - lo / scale).clamp(-128, 127).to(torch.int32)
    return scale, zero_point


def quantize_per_token_affine(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [rows, in] float -> (q int8 [rows, in], scale float32 [rows, 1], zero_point int32 [rows, 1]),
    x ~ (q - zero_point) * scale, each row's [min, max] (widened to hold 0) over the 256 levels."""
    xf = x.float()
    scale, zero_point = affine_params(xf.amin(dim=-1, keepdim=True), xf.amax(dim=-1, keepdim=True))
    return quantize_per_tensor(xf, scale, zero_point), scale, zero_point


def union_affine(
    scales: list[torch.Tensor], zero_points: list[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """One static (scale float32 [1], zero_point int32 [1]) for parts fused into one layer: theirs when
    equal (q/k/v read one input, so a calibration gives them equal parameters), else one covering every
    part's representable range [(-128 - z) s, (127 - z) s]."""
    s = torch.stack([t.float().reshape(()) for t in scales])
    z = torch.stack([t.float().reshape(()) for t in zero_points])
    if bool((s == s[0]).all()) and bool((z == z[0]).all()):
        return s[:1], z[:1].to(torch.int32)
    return affine_params(((-128 - z) * s).min().reshape(1), ((127 - z) * s).max().reshape(1))


def int8_matmul_reference(xq: torch.Tensor, wq: torch.Tensor) -> torch.Tensor:
    """xq int8 [m, k] @ wq int8 [n, k]^T -> int32 [m, n], exact (computed in int64)."""
    return (xq.to(torch.int64) @ wq.to(torch.int64).t()).to(torch.int32)


FLOAT_EXACT_K = 1024  # input features whose int8 products float32 sums exactly (see the module docstring)


def int8_matmul_float(xq: torch.Tensor, wq: torch.Tensor) -> torch.Tensor:
    """xq int8 [m, k] @ wq int8 [n, k]^T -> int32 [m, n], exact, as float32 matmuls over k-slices of at most
    FLOAT_EXACT_K features (values in [-128, 127]), summed in int32."""
    acc = None
    for k0 in range(0, xq.shape[1], FLOAT_EXACT_K):
        k1 = k0 + FLOAT_EXACT_K
        part = (xq[:, k0:k1].float() @ wq[:, k0:k1].float().t()).to(torch.int32)
        acc = part if acc is None else acc + part
    return acc if acc is not None else torch.zeros(xq.shape[0], wq.shape[0], dtype=torch.int32)


@lru_cache(maxsize=1)
def _cpu_has_int8_dot() -> bool:
    """Whether this CPU has int8 dot-product instructions (avx512_vnni or amx_int8), which _int_mm uses."""
    return any(f in _cpuinfo()[1] for f in ("avx512_vnni", "amx_int8"))


def int8_matmul(xq: torch.Tensor, wq: torch.Tensor) -> torch.Tensor:
    """xq int8 [m, k] @ wq int8 [n, k]^T -> int32 [m, n], exact: torch._int_mm, or int8_matmul_float on a CPU
    without int8 dot products, or the int64 reference where _int_mm refuses the shape."""
    if xq.device.type == "cpu" and not _cpu_has_int8_dot():
        return int8_matmul_float(xq, wq)
    try:
        return torch._int_mm(xq, wq.t())
    except RuntimeError:  # a shape or device _int_mm does not take
        return int8_matmul_reference(xq, wq)


class W8A8Linear(nn.Module):
    """y = dequant(int8(x) @ int8(W)^T) + bias.

    Buffers: weight_int8 int8 [out, in]; weight_scale [out, 1] (the checkpoint's dtype); input_scale
    float32 [1] for static activation scales, else None (dynamic per token); input_zero_point int32 [1]
    for static asymmetric activations, else None; weight_row_sum int32 [out] (asymmetric only). bias: [out]
    or None. symmetric=False with dynamic scales computes a zero point a row. Input [..., in]
    float32/bfloat16/float16; output [..., out] in the input's dtype. ValueError for weights that are not
    int8 symmetric per channel, or for static asymmetric scales without a zero point."""

    def __init__(
        self,
        qw: QuantizedWeight,
        input_scale: torch.Tensor | None = None,
        bias=None,
        symmetric: bool = True,
        input_zero_point: torch.Tensor | None = None,
    ):
        super().__init__()
        if qw.bits != 8 or not qw.symmetric or qw.group_size != 0 or qw.qweight.dtype != torch.int8:
            raise ValueError("W8A8Linear needs int8 symmetric per-channel weights")
        if input_scale is not None and (input_zero_point is None) != symmetric:
            raise ValueError("static activation scales need a zero point exactly when asymmetric")
        if input_scale is None and input_zero_point is not None:
            raise ValueError(
                "an input zero point needs a static input scale (dynamic ones compute their own)"
            )
        if qw.qweight.shape[1] > (INT32_MAX // (128 * (128 if symmetric else 255))):
            raise ValueError(
                f"{qw.qweight.shape[1]} input features overflow the int32 product of int8 "
                f"{'symmetric' if symmetric else 'asymmetric'} activations"
            )
        self.out_features, self.in_features = qw.qweight.shape
        self.symmetric = symmetric
        self.register_buffer("weight_int8", qw.qweight.contiguous())
        self.register_buffer("weight_scale", qw.scale.reshape(-1, 1).contiguous())
        self.register_buffer("input_scale", None if input_scale is None else input_scale.float().reshape(1))
        zp = None if input_zero_point is None else input_zero_point.to(torch.int32).reshape(1)
        self.register_buffer("input_zero_point", zp)
        row_sum = None if symmetric else qw.qweight.to(torch.int32).sum(dim=1)
        self.register_buffer("weight_row_sum", row_sum)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    def dequantized_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """w_hat [out, in] = q * scale in dtype, as compressed-tensors decompresses it."""
        return dequantize(self.weight_int8, self.weight_scale, None, dtype)

    def weight_bytes(self) -> int:
        """Bytes of the stored int8 weight and its scales, bias excluded."""
        tensors = (self.weight_int8, self.weight_scale, self.input_scale, self.input_zero_point)
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def quantize_input(self, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """x2 [rows, in] -> (int8 [rows, in], float32 scale [rows, 1] or [1, 1], int32 zero point of the
        scale's shape or None when symmetric)."""
        if self.input_scale is None:
            return (*quantize_per_token(x2), None) if self.symmetric else quantize_per_token_affine(x2)
        scale = self.input_scale.view(1, 1)
        zp = None if self.input_zero_point is None else self.input_zero_point.view(1, 1)
        return quantize_per_tensor(x2, scale, zp), scale, zp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        xq, xs, zp = self.quantize_input(x.reshape(-1, shape[-1]))
        acc = int8_matmul(xq, self.weight_int8)
        if zp is not None:  # (q_x - z) @ q_w^T, still exact in int32
            acc = acc - zp * self.weight_row_sum.view(1, -1)
        out = acc.float() * xs * self.weight_scale.float().view(1, -1)
        if self.bias is not None:
            out = out + self.bias.float()
        return out.to(x.dtype).view(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        acts = "dynamic per token" if self.input_scale is None else "static per tensor"
        form = "symmetric" if self.symmetric else "asymmetric"
        return (
            f"in={self.in_features}, out={self.out_features}, int8 weights, int8 activations ({acts}, {form})"
        )


def reference_forward(module: W8A8Linear, x: torch.Tensor) -> torch.Tensor:
    """The float reference of W8A8Linear: x through the same activation quantization, times the
    dequantized weight, in float32 (no integer product). [..., in] -> [..., out] float32."""
    x2 = x.reshape(-1, x.shape[-1])
    xq, xs, zp = module.quantize_input(x2)
    xf = xq.float() if zp is None else xq.float() - zp.float()
    bias = None if module.bias is None else module.bias.float()
    out = F.linear(xf * xs, module.dequantized_weight(torch.float32), bias)
    return out.view(*x.shape[:-1], module.out_features)
