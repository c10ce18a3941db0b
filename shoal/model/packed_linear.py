"""CPU linears through oneDNN with weights pre-packed once at load time, for float32 and bfloat16, and
shoal's own kernels: matrix-vector for decode, a small-batch GEMM for float32 batches and (on AVX512-BF16)
bfloat16 batches.

Measured facts about torch's CPU matmuls that this module exists for:
- For a few rows (decode), torch's stock linear re-lays out or streams the weight poorly: pre-packed
  oneDNN weights are faster. bf16 on an AVX512-BF16 Xeon: SmolLM2 decode linears 22 -> 16 ms per step.
  fp32 on a 2-core AVX2 EPYC, 32 rows: 1.2-1.4x faster per layer matmul, 1.7x for the 49152-row lm_head.
- For many rows (a prompt chunk) the packed route loses its edge or falls behind:
  - bf16: oneDNN's bf16 GEMM ran at about half its fp32 speed on the AVX512-BF16 CPU without AMX where
    this was first measured (3072x576 weight, 512 rows: 10.5 ms bf16 vs 5.6 ms fp32). There a big batch
    runs as an fp32 GEMM over an fp32 copy of the same bf16 weights: products of bf16 values are exact in
    fp32, accumulation is fp32 as in a bf16 GEMM, and the result is rounded back to bf16, so numerically it
    is the same bf16 matmul up to summation order. On the 2-core Zen4 EPYC (AVX512-BF16, no AMX) it is the
    other way round: that fp32 route runs at half of oneDNN's bf16 speed (same shape, 512 rows, 1 thread:
    98 vs 197 GF/s; 2 threads: 32 ms vs 12 ms). So the choice is measured at load (fp32_gemm_is_faster),
    against the bf16 GEMM that would otherwise run.
  - fp32: MKL's GEMM through F.linear is 5-15% faster than oneDNN's packed one at 512 rows (shoal's gemm
    panels, below, are faster than both).
- For 1-4 rows both stream the weight below memory bandwidth, so those run on shoal's own matrix-vector
  kernel (shoal/kernels/gemv.c): fp32 on that AVX2 EPYC about 24 GB/s instead of 11; bf16 (vdpbf16ps) on
  a 2-core AVX512-BF16 EPYC 1.0-1.3x oneDNN's packed linears per weight, SmolLM2 decode step 1.21-1.25x
  faster with one thread (numbers in shoal/kernels/gemv.py). bf16 where the gemm kernel's panels are made
  (below): 1-4 rows run on those panels instead, which gemm.c streams faster than gemv.c streams the plain
  weight: on the 2-core Zen4 EPYC, bf16, weights from memory, 1 and 2 threads, SmolLM2's 120 decoder
  linears 10.6 -> 16.1-17.6 and 20.4 -> 28.3-30.5 GB/s, its 49152-row lm_head 10.0 -> 22.4-23.5 and
  20.3 -> 41.2-46.4 GB/s (1.4-2.9x; numbers in shoal/kernels/gemm.py). So a bf16 row's output is then
  the same in a batch of any size.
- For float32 batches of 5-256 rows (a batched decode step), oneDNN and MKL reach a third to two thirds of
  the FMA peak on that AVX2 EPYC; shoal's gemm kernel (shoal/kernels/gemm.c) over the weight packed in
  16-row panels runs 1.0-2.5x oneDNN's packed linears per weight (numbers in shoal/kernels/gemm.py), so
  for float32 its panels replace the oneDNN copy and serve prompt chunks too (0.97-1.13x MKL at 512-1024
  rows); where no copy fits in RAM it runs over the plain weight up to 256 rows, MKL beyond.
- For bfloat16 batches on the 2-core Zen4 EPYC (AVX512-BF16, no AMX), shoal's gemm kernel over bf16
  panels (vdpbf16ps, 8x32 tiles) runs per SmolLM2 weight, against oneDNN's pre-packed bf16 linear, 1 and
  2 threads: 1.2-1.6x at 5-8 rows, 1.1-1.3x at 16, 1.04-1.23x at 32, 0.93-1.19x at 64-512 (below 1.0 only
  the lm_head at 128-512 rows, 0.93-0.98x); the fp32-copy route runs at about half the panels' speed at
  every size from 5 to 512 rows, F.linear below oneDNN (numbers in shoal/kernels/gemm.py). So where the kernel is built its panels replace the oneDNN copy for every bf16
  batch of 5+ rows; the fp32 route takes rows from BIG_BATCH_ROWS on only where fp32_gemm_is_faster()
  measures it faster than the panels (not on that EPYC: 32 vs 16 ms at 512 rows, 2 threads).
The kernels read the plain weight, so the plain weight stays wherever it serves; the copies for mid-size
batches (oneDNN's, or gemm's panels, which serve every bf16 batch of 5+ rows) and the fp32 copy for big
ones cost weight memory and are made only when small next to free RAM (bf16 without the kernel: the packed
weight replaces the plain one, as before the kernel).
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

from shoal.kernels import gemm, gemv

log = logging.getLogger(__name__)
BIG_BATCH_ROWS = 48  # from here on the big-batch route runs (measured crossover 32-64 rows)
# float32 over the plain weight (no panels: no room for a copy): 5 to GEMM_MAX_ROWS - 1 rows run on shoal's
# gemm kernel, which reads the plain weight 0.75-1.15x oneDNN at 32-128 rows, and MKL takes bigger batches.
# float32 over the panels: every batch of 5+ rows. Measured on the 2-core AVX2 EPYC, 2 threads, SmolLM2's
# shapes: faster than oneDNN's packed copy and MKL at every size from 5 to 256 rows (1.0-2.5x up to 128
# rows, numbers in kernels/gemm.py), and for prompt chunks at 512 and 1024 rows 0.97-1.13x MKL's best call
# on the decoder's shapes (only the lm_head, which a prompt chunk runs for its last rows alone, was once
# below MKL at 512); a 512-token prefill step (16 prompts of 32) 0.89-1.06x MKL's time over four
# alternating runs. One kernel for every batch size also keeps a row's result independent of the batch.
GEMM_MAX_ROWS = 257
# Over the gemm kernel's panels, float32 (above) or bfloat16 where it has its AVX512-BF16 panels: every batch
# of 5+ rows runs on them (for bf16 none of oneDNN's bf16 copy, the fp32-copy route or F.linear was faster
# at 5-1024 rows, see the module docstring), except that for bf16 from BIG_BATCH_ROWS on the fp32 route
# takes over where fp32_gemm_is_faster() measured it faster than the panels on this CPU.
GEMM_PANELS_MAX_ROWS = 2**31
COPY_MAX_SHARE_OF_RAM = 0.15
PACK_ROWS_HINT = 32


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
def fp32_gemm_is_faster(
    in_features: int = 576, out_features: int = 3072, rows: int = 512, panels: bool = False
) -> bool:
    """Time one big bf16 GEMM against the fp32 route on this CPU (about 50 ms, once per process): the bf16
    GEMM that would otherwise run, oneDNN's packed one or (panels) shoal's gemm kernel's bf16 panels."""
    w = torch.randn(out_features, in_features, dtype=torch.bfloat16) * 0.02
    x = torch.randn(rows, in_features, dtype=torch.bfloat16)
    packed_bf16, packed_fp32 = _pack(w, rows), _pack(w.float(), rows)
    gemm_panels = gemm.pack_panels(w) if panels else None

    def best(fn) -> float:
        times = []
        for _ in range(3):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return min(times)

    if gemm_panels is not None:
        bf16 = best(lambda: gemm.gemm_panels(x, gemm_panels, out_features))
    else:
        bf16 = best(lambda: _linear(x, packed_bf16, None))
    fp32 = best(lambda: _linear(x.float(), packed_fp32, None).to(torch.bfloat16))
    log.info(
        "CPU GEMM %dx%dx%d: bf16 (%s) %.2f ms, fp32 route %.2f ms",
        rows,
        in_features,
        out_features,
        "gemm panels" if panels else "oneDNN",
        bf16 * 1e3,
        fp32 * 1e3,
    )
    return fp32 < 0.8 * bf16


class PackedLinear(nn.Module):
    """A linear that routes each call by its number of rows:
    - up to gemv.MAX_ROWS: bfloat16 with the gemm kernel's panels (below), those panels (faster, see the
      module docstring); else the native matrix-vector kernel over the plain weight (decode), where kept;
    - float32 where the gemm kernel is built: that kernel over its packed panels for every batch, where a
      copy fits in RAM, else over the plain weight below GEMM_MAX_ROWS;
    - bfloat16 where the kernel has its AVX512-BF16 panels and a copy fits in RAM: those panels, for every
      row count (below BIG_BATCH_ROWS only, where the big-batch route is "fp32");
    - below BIG_BATCH_ROWS: the oneDNN pre-packed weight, where one was made;
    - otherwise the big-batch route: "fp32" (bf16 weights as an fp32 GEMM) or "plain" (torch's own linear).
    """

    def __init__(self, linear: nn.Linear, packed: bool, big_route: str | None, keep_weight: bool):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.bias = linear.bias
        # torch.compile traces F.linear over the plain weight (inductor packs it itself when freezing).
        self.weight = linear.weight if keep_weight else None
        self.use_gemv = self.weight is not None and gemv.supported(self.weight)
        fp32 = linear.weight.dtype == torch.float32
        # bfloat16 has no kernel over the plain weight: only over panels, made where a copy fits.
        self.use_gemm = self.weight is not None and gemm.supported(self.weight) and (fp32 or packed)
        # With the gemm kernel its panels take the place of oneDNN's copy (faster over the whole range the
        # copy served); float32 without room for a copy runs the kernel over the plain weight.
        self.panels = gemm.pack_panels(self.weight) if packed and self.use_gemm else None
        # bf16 decode rows (1 to gemv.MAX_ROWS) run on the panels where they are made: faster than gemv.
        self.decode_on_panels = not fp32 and self.panels is not None
        if fp32:
            self.gemm_max_rows = GEMM_MAX_ROWS if self.panels is None else GEMM_PANELS_MAX_ROWS
        else:
            self.gemm_max_rows = BIG_BATCH_ROWS if big_route == "fp32" else GEMM_PANELS_MAX_ROWS
        # oneDNN lays the weight out for the batch size it is told: 1 where it serves decode, else the
        # middle of its range (fp32, 5-47 rows: 10-35% faster than packed for 1, measured at 8 and 32 rows).
        hint = PACK_ROWS_HINT if self.use_gemv else 1
        self.packed = _pack(linear.weight, hint) if packed and not self.use_gemm else None
        self.big_route = big_route
        with_fp32 = big_route == "fp32"
        self.packed_fp32 = _pack(linear.weight.float(), BIG_BATCH_ROWS) if with_fp32 else None
        self.bias_fp32 = linear.bias.float() if with_fp32 and linear.bias is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        rows = x2.shape[0]
        if self.decode_on_panels and rows <= gemv.MAX_ROWS and not torch.compiler.is_compiling():
            out = gemm.gemm_panels(x2.contiguous(), self.panels, self.out_features, self.bias)
        elif self.use_gemv and rows <= gemv.MAX_ROWS:
            out = gemv.gemv(x2, self.weight, self.bias)
        elif torch.compiler.is_compiling() and self.weight is not None:
            out = F.linear(x2, self.weight, self.bias)
        elif self.use_gemm and rows < self.gemm_max_rows:
            x2 = x2.contiguous()
            if self.panels is not None:
                out = gemm.gemm_panels(x2, self.panels, self.out_features, self.bias)
            else:
                out = gemm.gemm(x2, self.weight, self.bias)
        elif self.packed is not None and (self.big_route is None or rows < BIG_BATCH_ROWS):
            out = _linear(x2, self.packed, self.bias)
        elif self.big_route == "fp32":
            out = _linear(x2.float(), self.packed_fp32, self.bias_fp32).to(x.dtype)
        else:
            out = F.linear(x2, self.weight, self.bias)
        return out.view(*shape[:-1], self.out_features)


def _copy_fits(weight_bytes_fp32: int, available_ram: int | None) -> bool:
    return available_ram is not None and weight_bytes_fp32 < COPY_MAX_SHARE_OF_RAM * available_ram


def pack_linears(model: nn.Module, available_ram: int | None = None, keep_weights: bool = False) -> nn.Module:
    """Replace every nn.Linear in model by a PackedLinear (in place); keep_weights for torch.compile.

    The plain weight stays where the gemv kernel serves its dtype (decode, and MKL for fp32 prompt chunks)
    and the copy for mid-size batches (with the gemm kernel for the dtype: its panels; else oneDNN's) is
    made if it fits in RAM. bfloat16 without the gemv kernel: the packed weight replaces the plain one.
    bfloat16's fp32 copy for big batches is made if it fits and is measured faster than the bf16 GEMM it
    would replace (the gemm kernel's panels where they are made, else oneDNN's; see the module docstring)."""
    linears = [(m, n, c) for m in model.modules() for n, c in m.named_children() if type(c) is nn.Linear]
    if not linears:
        return model
    fp32_bytes = sum(c.weight.numel() * 4 for _, _, c in linears)
    fits = _copy_fits(fp32_bytes, available_ram)
    weight = linears[0][2].weight
    keep = keep_weights or weight.dtype == torch.float32 or gemv.supported(weight)
    if weight.dtype == torch.float32:
        packed, big_route = fits, "plain"
    else:
        packed = fits or not keep  # without the plain weight the packed one is the only one
        panels = packed and keep and gemm.supported(weight)  # PackedLinear then runs the bf16 panels
        big_route = "fp32" if fits and fp32_gemm_is_faster(panels=panels) else None
    if big_route == "fp32":
        log.info(
            "batched CPU matmuls run as fp32 GEMMs over the bf16 weights (%.0f MB copy)", fp32_bytes / 1e6
        )
    for module, name, child in linears:
        setattr(module, name, PackedLinear(child, packed, big_route, keep))
    return model
