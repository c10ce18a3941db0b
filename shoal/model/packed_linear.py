"""CPU linears through oneDNN with weights pre-packed once at load time, for float32 and bfloat16.

Measured facts about torch's CPU matmuls that this module exists for:
- For a few rows (decode), torch's stock linear re-lays out or streams the weight poorly: pre-packed
  oneDNN weights are faster. bf16 on an AVX512-BF16 Xeon: SmolLM2 decode linears 22 -> 16 ms per step.
  fp32 on a 2-core AVX2 EPYC, 32 rows: 1.2-1.4x faster per layer matmul, 1.7x for the 49152-row lm_head.
- For many rows (a prompt chunk) the packed route loses its edge or falls behind:
  - bf16: oneDNN's bf16 GEMM runs at about half its fp32 speed on AVX512-BF16 without AMX
    (3072x576 weight, 512 rows: 10.5 ms bf16 vs 5.6 ms fp32). So a big batch runs as an fp32 GEMM over an
    fp32 copy of the same bf16 weights: products of bf16 values are exact in fp32, accumulation is fp32 as
    in a bf16 GEMM, and the result is rounded back to bf16, so numerically it is the same bf16 matmul up to
    summation order.
  - fp32: MKL's GEMM through F.linear is 5-15% faster than oneDNN's packed one at 512 rows, so the plain
    weight is kept for big batches.
Either way the big-batch copy costs weight memory, so it is made only when small next to free RAM.
oneDNN's bf16 linears need AVX512 (BW/VL/DQ) or AVX-NE-CONVERT; bf16 models elsewhere keep torch's linears.
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
BIG_BATCH_ROWS = 48  # from here on the big-batch route runs (measured crossover 32-64 rows)
COPY_MAX_SHARE_OF_RAM = 0.15


def packing_available(device: torch.device, dtype: torch.dtype) -> bool:
    if device.type != "cpu" or not onednn_available():
        return False
    return dtype == torch.float32 or (dtype == torch.bfloat16 and onednn_bf16_supported())


def onednn_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


@lru_cache
def onednn_bf16_supported() -> bool:
    """oneDNN's bf16 linears need AVX512 (BW/VL/DQ) or AVX-NE-CONVERT; on a plain AVX2 CPU the reorder
    raises, so try it once on a tiny weight rather than parse CPU flags."""
    if not onednn_available():
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
    """A linear whose small batches run on a oneDNN pre-packed weight, and big ones (BIG_BATCH_ROWS or more)
    on the big-batch route chosen by pack_linears: "fp32" (bf16 weights as an fp32 GEMM), "plain" (torch's
    own linear on the original weight) or None (the packed weight for every batch)."""

    def __init__(self, linear: nn.Linear, big_route: str | None, keep_weight: bool = False):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.packed = _pack(linear.weight, 1)
        self.bias = linear.bias
        # torch.compile traces F.linear over the plain weight (inductor packs it itself when freezing).
        self.weight = linear.weight if keep_weight or big_route == "plain" else None
        self.big_route = big_route
        with_fp32 = big_route == "fp32"
        self.packed_fp32 = _pack(linear.weight.float(), BIG_BATCH_ROWS) if with_fp32 else None
        self.bias_fp32 = linear.bias.float() if with_fp32 and linear.bias is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight is not None and torch.compiler.is_compiling():
            return F.linear(x, self.weight, self.bias)
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if self.big_route is None or x2.shape[0] < BIG_BATCH_ROWS:
            out = _linear(x2, self.packed, self.bias)
        elif self.big_route == "fp32":
            out = _linear(x2.float(), self.packed_fp32, self.bias_fp32).to(x.dtype)
        else:
            out = F.linear(x2, self.weight, self.bias)
        return out.view(*shape[:-1], self.out_features)


def _big_batch_route(dtype: torch.dtype, weight_bytes_fp32: int, available_ram: int | None) -> str | None:
    """Which big-batch route pays for its memory here (see the module docstring)."""
    if available_ram is None or weight_bytes_fp32 >= COPY_MAX_SHARE_OF_RAM * available_ram:
        return None
    if dtype == torch.float32:
        return "plain"
    return "fp32" if fp32_gemm_is_faster() else None


def pack_linears(model: nn.Module, available_ram: int | None = None, keep_weights: bool = False) -> nn.Module:
    """Replace every nn.Linear in model by a PackedLinear (in place); keep_weights for torch.compile."""
    linears = [(m, n, c) for m in model.modules() for n, c in m.named_children() if type(c) is nn.Linear]
    if not linears:
        return model
    dtype = linears[0][2].weight.dtype
    fp32_bytes = sum(c.weight.numel() * 4 for _, _, c in linears)
    big_route = _big_batch_route(dtype, fp32_bytes, available_ram)
    if big_route == "fp32":
        log.info(
            "batched CPU matmuls run as fp32 GEMMs over the bf16 weights (%.0f MB copy)", fp32_bytes / 1e6
        )
    for module, name, child in linears:
        setattr(module, name, PackedLinear(child, big_route, keep_weights))
    return model
