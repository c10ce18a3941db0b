"""Decode matmuls for 1-4 rows that stream the weight at memory bandwidth (gemv.c), float32 and bfloat16.

`supported` says whether the kernel serves a weight; `gemv` runs it. Under torch.compile the call goes
through a custom op (opaque to the compiler, with a shape-only fake); eagerly it calls the library
directly, skipping the dispatcher's per-call cost (about 120 linears per step). Every call checks its
inputs first (the C code trusts them): TypeError for dtypes, ValueError for devices, shapes and strides.

bfloat16 runs on AVX512-BF16 (vdpbf16ps) where the compiler has it (`avx512_bf16()`), else on a portable
shift-and-FMA path; `gemv(..., portable=True)` runs the portable one anywhere (for tests).

Measured, bfloat16, AMD EPYC (2 cores, AVX512-BF16, 48 KB L1d, 32 MB L3), on a machine shared with other
jobs (load 4-6 on 2 cores), so ratios within one run; weights from memory (cycled through copies
totalling 3x the L3), best of 6 interleaved rounds, per call, 1 thread:
    weight [N, K]       rows  gemv (vdpbf16ps)  portable  oneDNN packed    torch F.linear
    qkv      960x576    1     46 us (24 GB/s)   53 us     53 us (21 GB/s)  103 us
    o_proj   576x576    1     30 us (22 GB/s)   35 us     39 us (17 GB/s)   68 us
    gate_up  3072x576   1    127 us (28 GB/s)  152 us    148 us (24 GB/s)  248 us
    down     576x1536   1     62 us (29 GB/s)   77 us     77 us (23 GB/s)  123 us
    lm_head  49152x576  1   1.99 ms (29 GB/s) 2.34 ms   2.01 ms (28 GB/s) 3.87 ms
    gate_up  3072x576   4    150 us (24 GB/s)  228 us    159 us (22 GB/s)  260 us
    lm_head  49152x576  4   2.12 ms (27 GB/s) 3.50 ms   2.24 ms (25 GB/s) 3.89 ms
With 2 threads (noisier): gate_up 1 row 76 us (47 GB/s) against oneDNN's 96-400 us, down 42 us (42 GB/s)
against 54-208 us; lm_head 4 rows 1.6 ms against oneDNN's 1.4 ms in the one quiet sample.
Whole decode step, SmolLM2-135M-Instruct bf16, one stream of 128 tokens after a 32-token prompt, 1 thread,
two engines in one process alternating (oneDNN packed linears vs gemv for 1-4 rows): 25.1 -> 20.1 and
31.8 -> 26.4 ms a step in two runs (1.21-1.25x median, 1.32-1.40x best run). 2-thread steps were not
measurable on the shared machine (OpenMP barriers with a core taken: 100-400 ms steps on both sides).
"""

from __future__ import annotations

import ctypes

import torch

from shoal import kernels

MAX_ROWS = 4  # as in gemv.c: beyond a few rows the matmul is no longer bound by reading the weight
_INT_MAX = 2**31 - 1

_ARGTYPES = (ctypes.c_void_p,) * 4 + (ctypes.c_int,) * 4  # x, w, bias, y; M, N, K, threads
# dtype -> (symbol, return type): the bf16 functions return a status (the portable path allocates).
_SYMBOLS = {torch.float32: ("shoal_gemv_f32", None), torch.bfloat16: ("shoal_gemv_bf16", ctypes.c_int)}


def _kernel(dtype: torch.dtype, portable: bool = False):
    symbol, restype = _SYMBOLS[dtype]
    symbol += "_portable" if portable and dtype == torch.bfloat16 else ""
    return kernels.function("gemv", symbol, _ARGTYPES, restype)


def avx512_bf16() -> bool:
    """Whether the bf16 kernel runs on vdpbf16ps here (built with __AVX512BF16__), not the portable path."""
    fn = kernels.function("gemv", "shoal_gemv_bf16_native", (), ctypes.c_int)
    return fn is not None and fn() == 1


def supported(weight: torch.Tensor) -> bool:
    return (
        weight.device.type == "cpu"
        and weight.dtype in _SYMBOLS
        and weight.dim() == 2
        and weight.is_contiguous()
        and _kernel(weight.dtype) is not None
    )


def _check(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    """What gemv.c assumes (x may be strided: it is made contiguous), else _refuse raises. One expression
    of cheap attribute reads (about 0.7 us; `.device` costs 0.5 us, `.size(i)` 0.2 us): it runs about
    120 times per decode step."""
    dt, ws, xs = weight.dtype, weight.shape, x.shape
    if not (
        dt in _SYMBOLS
        and x.dtype is dt
        and x.is_cpu
        and weight.is_cpu
        and len(xs) == 2
        and len(ws) == 2
        and weight.is_contiguous()
        and 1 <= xs[0] <= MAX_ROWS
        and xs[1] == ws[1]
        and 1 <= ws[1] <= _INT_MAX
        and 1 <= ws[0] <= _INT_MAX
        and (bias is None or (bias.dtype is dt and bias.is_cpu and bias.shape == ws[:1]))
    ):
        _refuse(x, weight, bias)


def _refuse(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    """The exception for inputs _check turned down, saying which input breaks what."""
    if weight.dtype not in _SYMBOLS:
        raise TypeError(f"gemv: weight dtype {weight.dtype}, expected float32 or bfloat16")
    if x.dtype != weight.dtype or (bias is not None and bias.dtype != weight.dtype):
        got = f"x {x.dtype}, bias {None if bias is None else bias.dtype}"
        raise TypeError(f"gemv: {got}; expected the weight's dtype {weight.dtype}")
    if not (x.is_cpu and weight.is_cpu and (bias is None or bias.is_cpu)):
        raise ValueError("gemv: x, weight and bias must be on the CPU")
    if weight.dim() != 2 or not weight.is_contiguous():
        raise ValueError(f"gemv: weight must be a contiguous [N, K] matrix, got shape {tuple(weight.shape)}")
    n, k = weight.shape
    if not (1 <= n <= _INT_MAX and 1 <= k <= _INT_MAX):
        raise ValueError(f"gemv: weight shape {tuple(weight.shape)}: N and K must be in [1, 2^31)")
    if x.dim() != 2 or not 1 <= x.shape[0] <= MAX_ROWS or x.shape[1] != k:
        raise ValueError(f"gemv: x shape {tuple(x.shape)}, expected [1..{MAX_ROWS}, {k}]")
    raise ValueError(f"gemv: bias shape {tuple(bias.shape)}, expected ({n},)")


def _run(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, portable: bool = False
) -> torch.Tensor:
    _check(x, weight, bias)
    fn = _kernel(weight.dtype, portable)
    if fn is None:
        raise RuntimeError("gemv: native kernels unavailable (no C compiler or SHOAL_NATIVE_KERNELS=0)")
    x = x.contiguous()  # [<= 4, K]: a copy costs nothing next to the weight
    bias = None if bias is None else bias.contiguous()
    rows, k = x.shape
    n = weight.shape[0]
    out = torch.empty(rows, n, dtype=x.dtype)
    status = fn(
        x.data_ptr(),
        weight.data_ptr(),
        None if bias is None else bias.data_ptr(),
        out.data_ptr(),
        rows,
        n,
        k,
        torch.get_num_threads(),
    )
    if status is not None:
        kernels.check_status(status, "gemv")
    return out


# The same function as a custom op (schema from _run's annotations), for torch.compile.
_op = torch.library.custom_op("shoal::gemv", mutates_args=())(_run)


@_op.register_fake
def _(x, weight, bias, portable=False):
    return x.new_empty(x.shape[0], weight.shape[0])


def gemv(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, portable: bool = False
) -> torch.Tensor:
    """x [rows, K] (1 <= rows <= MAX_ROWS) @ weight[N, K].T + bias[N], on CPU, float32 or bfloat16 (all in
    the weight's dtype), returns [rows, N] in that dtype. bfloat16 accumulates in fp32 and rounds once.
    portable: run the bf16 portable path even where AVX512-BF16 is there.
    Raises TypeError (dtypes) or ValueError (devices, shapes, strides) before touching memory."""
    call = _op if torch.compiler.is_compiling() else _run
    return call(x, weight, bias, portable)
