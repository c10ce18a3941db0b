"""CPU bfloat16 linears through oneDNN with weights pre-packed once at load time.

Two measured facts about torch's CPU matmuls on AVX512-BF16 machines without AMX (such as this one):
- torch's stock bf16 matmul re-lays out the weight on every call; for single-token decode that costs about
  a third of the step (SmolLM2 decode: 22 ms -> 16 ms of linears per step with pre-packed weights).
- oneDNN's bf16 GEMM runs at about half the speed of its fp32 GEMM once many rows share the weight
  (3072x576 weight, 512 rows: 10.5 ms bf16 vs 5.6 ms fp32), while for a few rows the bf16 weight wins
  because it is half the bytes to stream.
So a big batch (a prompt chunk) runs as an fp32 GEMM over an fp32 copy of the same bf16 weights: the
products of bf16 values are exact in fp32 and accumulation is fp32 as in a bf16 GEMM, and the result is
rounded back to bf16, so numerically it is the same bf16 matmul up to summation order. The copy costs
twice the weight memory, so it is made only when it is small next to free RAM and measured faster here.
Like gpt-fast's quantizers, this is a transformation that swaps nn.Linear modules, not a flag in the model.
"""

from __future__ import annotations

import logging
import time
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)
FP32_MIN_ROWS = 48  # below this, streaming the bf16 weight is faster (measured crossover 32-64 rows)
FP32_COPY_MAX_SHARE_OF_RAM = 0.15


def packing_available(device: torch.device, dtype: torch.dtype) -> bool:
    return device.type == "cpu" and dtype == torch.bfloat16 and onednn_bf16_supported()


@lru_cache
def onednn_bf16_supported() -> bool:
    """oneDNN's bf16 linears need AVX512 (BW/VL/DQ) or AVX-NE-CONVERT; on a plain AVX2 CPU the reorder
    raises, so try it once on a tiny weight rather than parse CPU flags."""
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")):
        return False
    try:
        _pack(torch.zeros(8, 8, dtype=torch.bfloat16), 1)
    except RuntimeError as exc:
        log.info("oneDNN bf16 linears unavailable on this CPU: %s", exc)
        return False
    return True


def _pack(weight: torch.Tensor, rows_hint: int) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), rows_hint)


def _linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


@lru_cache
def fp32_gemm_is_faster(in_features: int = 576, out_features: int = 3072, rows: int = 512) -> bool:
    """Time one big bf16 GEMM against the fp32 route on this CPU (about 50 ms, once per process)."""
    w = torch.randn(out_features, in_features, dtype=torch.bfloat16) * 0.02
    x = torch.randn(rows, in_features, dtype=torch.bfloat16)
    packed_bf16, packed_fp32 = _pack(w, rows), _pack(w.float(), rows)

    def best(fn) -> float:
        times = []
        for _ in range(3):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return min(times)

    bf16 = best(lambda: _linear(x, packed_bf16, None))
    fp32 = best(lambda: _linear(x.float(), packed_fp32, None).to(torch.bfloat16))
    log.info(
        "CPU GEMM %dx%dx%d: bf16 %.2f ms, fp32 route %.2f ms",
        rows,
        in_features,
        out_features,
        bf16 * 1e3,
        fp32 * 1e3,
    )
    return fp32 < 0.8 * bf16


class PackedLinear(nn.Module):
    def __init__(self, linear: nn.Linear, with_fp32: bool, keep_weight: bool = False):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.packed = _pack(linear.weight, 1)
        self.bias = linear.bias
        # torch.compile traces F.linear over the plain weight (inductor packs it itself when freezing).
        self.weight = linear.weight if keep_weight else None
        self.packed_fp32 = _pack(linear.weight.float(), FP32_MIN_ROWS) if with_fp32 else None
        self.bias_fp32 = linear.bias.float() if with_fp32 and linear.bias is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight is not None and torch.compiler.is_compiling():
            return F.linear(x, self.weight, self.bias)
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if self.packed_fp32 is not None and x2.shape[0] >= FP32_MIN_ROWS:
            out = _linear(x2.float(), self.packed_fp32, self.bias_fp32).to(x.dtype)
        else:
            out = _linear(x2, self.packed, self.bias)
        return out.view(*shape[:-1], self.out_features)


def pack_linears(model: nn.Module, available_ram: int | None = None, keep_weights: bool = False) -> nn.Module:
    """Replace every nn.Linear in model by a PackedLinear (in place); keep_weights for torch.compile."""
    linears = [(m, n, c) for m in model.modules() for n, c in m.named_children() if type(c) is nn.Linear]
    fp32_bytes = sum(c.weight.numel() * 4 for _, _, c in linears)
    with_fp32 = (
        available_ram is not None
        and fp32_bytes < FP32_COPY_MAX_SHARE_OF_RAM * available_ram
        and fp32_gemm_is_faster()
    )
    if with_fp32:
        log.info(
            "batched CPU matmuls run as fp32 GEMMs over the bf16 weights (%.0f MB copy)", fp32_bytes / 1e6
        )
    for module, name, child in linears:
        setattr(module, name, PackedLinear(child, with_fp32, keep_weights))
    return model
