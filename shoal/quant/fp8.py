"""FP8 (E4M3) weights per output channel, activations FP8 dynamic per token: compressed-tensors'
`float-quantized` format (compressors/naive_quantized/base.py `FloatQuantizationCompressor`, read in 0.20;
the FP8_DYNAMIC preset of quantization/quant_scheme.py).

- weights: scale = max|w_row| / 448 (448 = the largest finite float8_e4m3fn), stored in float32, as
  llm-compressor's float32 model stores it (bfloat16 scales measured 1.026x of 16-bit perplexity on SmolLM2
  against 1.0245x with float32 ones, docs/quantization.md; 2 more bytes a row);
  q = float8_e4m3fn(w / scale), w ~ q * scale;
- activations: per token, s_x = max|x_row| / 448, x ~ float8(x / s_x) * s_x, computed at run time.
On CPU FP8Linear emulates the FP8 matmul (dequantize weight and activations to float32, then matmul), for
correctness only. On CUDA (compute capability 8.9+) with dynamic activations it runs `torch._scaled_mm`
with row-wise scales (shoal/kernels/fp8.py); weight-only FP8 keeps the emulation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from shoal.kernels import fp8 as fp8_kernel
from shoal.quant.rtn import QuantizedWeight, _store_scale

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0


def quantize_fp8_weight(weight: torch.Tensor) -> QuantizedWeight:
    """weight [out, in] float -> QuantizedWeight(qweight float8_e4m3fn [out, in], scale [out, 1] float32,
    no zero point, bits 8, per channel)."""
    w = weight.detach().float()
    scale = _store_scale(w.abs().amax(dim=1, keepdim=True) / FP8_MAX, torch.float32)
    q = (w / scale.float()).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return QuantizedWeight(q, scale, None, 8, 0)


def quantize_fp8_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [rows, in] float -> (float8_e4m3fn [rows, in], float32 scale [rows, 1])."""
    xf = x.float()
    scale = (xf.abs().amax(dim=-1, keepdim=True) / FP8_MAX).clamp(min=1e-12)
    return (xf / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scale


class FP8Linear(nn.Module):
    """y = float8(x) @ float8(W)^T, emulated in float32 on CPU.

    Buffers: weight_fp8 float8_e4m3fn [out, in]; weight_scale [out, 1] (the checkpoint's dtype).
    dynamic_activations: quantize each input row to FP8 (the checkpoint's input_activations); False for
    weight-only FP8. Input [..., in] float; output [..., out] in the input's dtype."""

    def __init__(self, qw: QuantizedWeight, dynamic_activations: bool = True, bias=None):
        super().__init__()
        if qw.qweight.dtype != FP8_DTYPE or qw.group_size != 0:
            raise ValueError("FP8Linear needs float8_e4m3fn per-channel weights")
        self.out_features, self.in_features = qw.qweight.shape
        self.register_buffer("weight_fp8", qw.qweight.contiguous())
        self.register_buffer("weight_scale", qw.scale.reshape(-1, 1).contiguous())
        self.dynamic_activations = dynamic_activations
        self._scaled_mm_device, self._scaled_mm_ok = None, False
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    def dequantized_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """w_hat [out, in] = q * scale, computed in float32 (exact: 4-bit times 8-bit mantissas), in dtype."""
        return (self.weight_fp8.float() * self.weight_scale.float()).to(dtype)

    def weight_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.weight_fp8, self.weight_scale))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if self.dynamic_activations and x.is_cuda and self._scaled_mm_here(x.device):
            xq, xs = quantize_fp8_per_token(x2)
            out = fp8_kernel.scaled_mm(xq, xs, self.weight_fp8, self.weight_scale, self.bias, x.dtype)
            return out.view(*shape[:-1], self.out_features)
        if self.dynamic_activations:
            xq, xs = quantize_fp8_per_token(x2)
            x2 = xq.float() * xs
        bias = None if self.bias is None else self.bias.float()
        out = F.linear(x2.float(), self.dequantized_weight(torch.float32), bias)
        return out.to(x.dtype).view(*shape[:-1], self.out_features)

    def _scaled_mm_here(self, device: torch.device) -> bool:
        if self._scaled_mm_device != device:  # decided once per device (a CUDA capability query)
            self._scaled_mm_device = device
            self._scaled_mm_ok = fp8_kernel.supported(device, self.in_features, self.out_features)
        return self._scaled_mm_ok

    def extra_repr(self) -> str:
        acts = "fp8 dynamic per token" if self.dynamic_activations else "16-bit"
        return (
            f"in={self.in_features}, out={self.out_features}, fp8 e4m3 weights (emulated), activations {acts}"
        )
