"""QuantizedLinear: a linear layer that keeps its weight as compressed-tensors' packed integers.

Routes, by device and the number of rows (as PackedLinear routes its float weights):
- on CUDA with triton installed, every call where the layout allows (4/8 bits, groups of a multiple of 16
  columns): the Triton GEMM over the packed weight (shoal/kernels/triton_w4a16.py);
- 1-4 rows (decode) where the layout allows (4/8 bits, groups a multiple of 32 columns; per channel is one
  group of all the columns): shoal's qgemv kernel (shoal/kernels/qgemv.c), which reads the packed weight
  once per call;
- 8-bit symmetric per-channel layers, except where qgemv runs its AVX2 row (CPUs without AVX512F:
  `qgemv.avx2_row`, measured 1.4-10x faster there), keep an unpacked int8 weight (the same bytes) and run
  bfloat16 inputs through torch's `_weight_int8pack_mm` (AVX512 EPYC, 1 row, 3072x576: 14-45 us, as fast
  as shoal's bf16 gemv), except 1-4 rows on AVX512-BF16 (input size a multiple of 64), which qgemv runs over
  that same int8 weight taken as signed codes (`qgemv(..., signed=True)`; the int8 lm_head of
  `--quantize-lm-head`, 49152x576, 1 row: 0.69 against 0.93 ms);
- everything else (prompt chunks, fp16, other layouts): the reference path, dequantize to the input's dtype
  (w_hat = (q - zero_point) * scale) and F.linear; every faster path is tested against it.
Measured decode speeds (SmolLM2-135M-Instruct, bfloat16, against bf16) are in docs/quantization.md.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from shoal.kernels import qgemv, triton_support
from shoal.quant.format import pack_int32, unpack_int32
from shoal.quant.groups import PER_CHANNEL
from shoal.quant.rtn import QuantizedWeight, dequantize


class QuantizedLinear(nn.Module):
    """y = x @ w_hat.T + bias, with w_hat dequantized from int4/int8 weights.

    Buffers:
    - weight_packed: int32 [out, in * bits / 32] (compressed-tensors' pack order), or for the int8 route
      weight_int8: int8 [out, in];
    - weight_scale: [out, groups], the checkpoint's scale dtype;
    - weight_zero_point: int8 [out, groups], or None (symmetric).
    - input_perm: int64 [in] or None: the weight's columns are stored in this order of the input's
      (GPTQ act-order, see shoal/quant/upstream_format.py), so the input is permuted the same way first.
    bias: [out] in the model dtype, or None. Inputs: [..., in] float32/bfloat16/float16; output: [..., out],
    the input's dtype.
    """

    def __init__(
        self, qw: QuantizedWeight, bias: torch.Tensor | None = None, input_perm: torch.Tensor | None = None
    ):
        super().__init__()
        self.register_buffer("input_perm", input_perm)
        self.out_features, self.in_features = qw.qweight.shape
        self.bits, self.group_size = qw.bits, qw.group_size
        # qgemv's group size: all the columns for a per-channel layer
        self.qgemv_group = self.in_features if qw.group_size == PER_CHANNEL else qw.group_size
        self.use_qgemv = qgemv.supported(qw.bits, self.qgemv_group, self.in_features, qw.scale)
        per_channel_int8 = qw.bits == 8 and qw.symmetric and qw.group_size == PER_CHANNEL
        self.int8_route = per_channel_int8 and not (self.use_qgemv and qgemv.avx2_row())
        # where qgemv reads torch's signed int8 weight as it is, 1-4 bf16 rows take it (it streams faster than
        # _weight_int8pack_mm: lm_head 49152x576, 1 row, 2 threads, 0.69 against 0.93 ms) and batches torch's
        self.int8_qgemv = (
            self.int8_route and self.use_qgemv and qgemv.signed_supported(torch.bfloat16, self.qgemv_group)
        )
        self.use_qgemv &= not self.int8_route
        if self.int8_route:
            self.register_buffer("weight_int8", qw.qweight.contiguous())
            self.weight_packed = None
        else:
            self.register_buffer("weight_packed", pack_int32(qw.qweight, qw.bits))
            self.weight_int8 = None
        self.register_buffer("weight_scale", qw.scale.contiguous())
        self.register_buffer("weight_zero_point", qw.zero_point)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.triton_layout = not self.int8_route and (
            triton_support.w4a16_block_k(qw.bits, qw.group_size, self.in_features) is not None
        )

    def integer_weight(self) -> torch.Tensor:
        """int8 [out, in]: the stored integers."""
        if self.weight_int8 is not None:
            return self.weight_int8
        return unpack_int32(self.weight_packed, self.bits, self.in_features)

    def dequantized_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """w_hat [out, in] in dtype, columns in stored order (input_perm's): the reference every faster path
        is checked against."""
        return dequantize(self.integer_weight(), self.weight_scale, self.weight_zero_point, dtype)

    def weight_bytes(self) -> int:
        """Bytes of the stored weight tensors (integers, scales, zero points), bias excluded."""
        tensors = (self.weight_packed, self.weight_int8, self.weight_scale, self.weight_zero_point)
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_perm is not None:
            x = x.index_select(-1, self.input_perm)
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if self.triton_layout and triton_support.serves(x.device):
            w4a16 = triton_support.kernel_module("triton_w4a16")
            out = w4a16.quantized_matmul(x2, self.weight_packed, self.weight_scale, self.weight_zero_point,
                                         self.bias, self.bits, self.group_size)  # fmt: skip
        elif self.use_qgemv and x2.shape[0] <= qgemv.MAX_ROWS and x.device.type == "cpu":
            bias = None if self.bias is None else self.bias.to(x.dtype)
            out = qgemv.qgemv(x2, self.weight_packed, self.weight_scale, self.weight_zero_point, bias,
                              self.bits, self.qgemv_group)  # fmt: skip
        elif (
            self.int8_qgemv
            and x.dtype == torch.bfloat16
            and x2.shape[0] <= qgemv.MAX_ROWS
            and x.device.type == "cpu"
        ):
            bias = None if self.bias is None else self.bias.to(x.dtype)
            out = qgemv.qgemv(x2, self.weight_int8.view(torch.int32), self.weight_scale, None, bias, 8,
                              self.qgemv_group, signed=True)  # fmt: skip
        elif self.int8_route and x.dtype == torch.bfloat16 and x.device.type == "cpu":
            out = torch._weight_int8pack_mm(x2, self.weight_int8, self.weight_scale.view(-1).to(x.dtype))
            if self.bias is not None:
                out = out + self.bias
        else:
            out = F.linear(x2, self.dequantized_weight(x.dtype), self.bias)
        return out.view(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        group = "channel" if self.group_size == PER_CHANNEL else self.group_size
        return f"in={self.in_features}, out={self.out_features}, bits={self.bits}, group={group}"


def fuse(parts: list[QuantizedWeight], name: str) -> QuantizedWeight:
    """Concatenate quantized weights along the output dim (q/k/v, gate/up), scales and zero points too.
    Rows are quantized independently, so this is exact; ValueError naming the layer if the parts' bits,
    group size, symmetry or input size differ."""
    first = parts[0]
    for p in parts[1:]:
        same = (p.bits, p.group_size, p.symmetric, p.qweight.shape[1]) == (
            first.bits,
            first.group_size,
            first.symmetric,
            first.qweight.shape[1],
        )
        if not same:
            raise ValueError(
                f"{name}: the fused parts are quantized differently (bits, group size or symmetry)"
            )
    if len(parts) == 1:
        return first
    zero = None if first.symmetric else torch.cat([p.zero_point for p in parts])
    return QuantizedWeight(
        torch.cat([p.qweight for p in parts]),
        torch.cat([p.scale for p in parts]),
        zero,
        first.bits,
        first.group_size,
    )
