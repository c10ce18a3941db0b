"""FP8 (E4M3) matmul through `torch._scaled_mm`: per-token activation scales times per-channel weight scales.

quant/fp8.py's FP8Linear quantizes each input row to float8_e4m3fn (its own scale) against weights
quantized per output channel; on a GPU with FP8 tensor cores (compute capability 8.9+: Ada, Hopper) the
product runs as one `torch._scaled_mm` with row-wise scales (scale_a [M, 1], scale_b [1, N], both fp32),
y = (x_fp8 @ w_fp8.T) * scale_a * scale_b, accumulated in fp32 (cuBLASLt; vLLM's `cutlass_scaled_mm` and
`torch._scaled_mm` fallback compute the same). CUDA's row-wise path wants a bfloat16 output, K and N
multiples of 16, the weight as a column-major operand (w_fp8.t() of the row-major [N, K] weight is one):
`supported` checks what the layer can offer. torch 2.13 also runs `_scaled_mm` on the CPU, which is how
the tests check it against the dequantized reference; FP8Linear keeps its float32 emulation on the CPU,
so nothing changes there.
"""

from __future__ import annotations

import torch

FP8_DTYPE = torch.float8_e4m3fn
MULTIPLE = 16  # K and N of a CUDA _scaled_mm


def supported(device: torch.device, in_features: int, out_features: int) -> bool:
    """Whether scaled_mm serves a layer on this device: CUDA of compute capability 8.9 or more (FP8 tensor
    cores), K and N multiples of 16; the CPU where this torch has `_scaled_mm` (tests)."""
    if not hasattr(torch, "_scaled_mm"):
        return False
    if device.type == "cpu":
        return True
    return (
        device.type == "cuda"
        and torch.cuda.get_device_capability(device) >= (8, 9)
        and in_features % MULTIPLE == 0
        and out_features % MULTIPLE == 0
    )


def scaled_mm(
    x_fp8: torch.Tensor,
    x_scale: torch.Tensor,
    w_fp8: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """(x_fp8 * x_scale) @ (w_fp8 * w_scale).T + bias -> [M, N] in out_dtype.

    x_fp8 float8_e4m3fn [M, K], x_scale [M, 1] (per token); w_fp8 float8_e4m3fn [N, K] (row-major),
    w_scale [N, 1] or [N] (per channel), any float dtype; bias [N] or None. Raises ValueError for dtypes or
    shapes out of contract (and torch's RuntimeError where the device refuses the call)."""
    m, k = x_fp8.shape
    n = w_fp8.shape[0]
    if (
        x_fp8.dtype != FP8_DTYPE
        or w_fp8.dtype != FP8_DTYPE
        or w_fp8.shape != (n, k)
        or x_scale.numel() != m
        or w_scale.numel() != n
    ):
        raise ValueError(
            f"scaled_mm: x {x_fp8.dtype} {tuple(x_fp8.shape)}, x_scale {tuple(x_scale.shape)}, w {w_fp8.dtype} "
            f"{tuple(w_fp8.shape)}, w_scale {tuple(w_scale.shape)}: expected float8_e4m3fn [M, K] and [N, K], "
            "scales of M and N values"
        )
    # CUDA's row-wise scaling produces bfloat16 only; the CPU produces any dtype.
    mm_dtype = torch.bfloat16 if x_fp8.is_cuda else out_dtype
    out = torch._scaled_mm(
        x_fp8,
        w_fp8.t(),
        scale_a=x_scale.reshape(m, 1).float(),
        scale_b=w_scale.reshape(1, n).float(),
        out_dtype=mm_dtype,
    )
    if bias is not None:
        out = out + bias.to(mm_dtype)
    return out.to(out_dtype)
