"""Float32 decode matmuls for 1-4 rows that stream the weight at memory bandwidth (gemv.c).

`supported` says whether the kernel serves a weight; `gemv` runs it. Under torch.compile the call goes
through a custom op (opaque to the compiler, with a shape-only fake); eagerly it calls the library
directly, skipping the dispatcher's per-call cost (about 120 linears per step).
"""

from __future__ import annotations

import ctypes

import torch

from shoal import kernels

MAX_ROWS = 4  # as in gemv.c: beyond a few rows the matmul is no longer bound by reading the weight


_ARGTYPES = (ctypes.c_void_p,) * 4 + (ctypes.c_int,) * 4  # x, w, bias, y; M, N, K, threads


def _kernel():
    return kernels.function("gemv", "shoal_gemv_f32", _ARGTYPES)


def supported(weight: torch.Tensor) -> bool:
    return (
        weight.device.type == "cpu"
        and weight.dtype == torch.float32
        and weight.is_contiguous()
        and _kernel() is not None
    )


def _run(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    rows, k = x.shape
    n = weight.shape[0]
    if not (
        1 <= rows <= MAX_ROWS
        and x.dtype == weight.dtype == torch.float32
        and weight.shape[1] == k
        and weight.is_contiguous()
        and (bias is None or (bias.dtype == torch.float32 and bias.shape == (n,)))
    ):
        raise ValueError(f"gemv: float32 x [1..{MAX_ROWS}, K], contiguous weight [N, K], bias [N] or None")
    x = x.contiguous()
    bias = None if bias is None else bias.contiguous()
    out = torch.empty(rows, n, dtype=x.dtype)
    _kernel()(
        x.data_ptr(),
        weight.data_ptr(),
        None if bias is None else bias.data_ptr(),
        out.data_ptr(),
        rows,
        n,
        k,
        torch.get_num_threads(),
    )
    return out


# The same function as a custom op (schema from _run's annotations), for torch.compile.
_op = torch.library.custom_op("shoal::gemv", mutates_args=())(_run)


@_op.register_fake
def _(x, weight, bias):
    return x.new_empty(x.shape[0], weight.shape[0])


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [rows, K] (1 <= rows <= MAX_ROWS) @ weight[N, K].T + bias, float32 on CPU."""
    call = _op if torch.compiler.is_compiling() else _run
    return call(x, weight, bias)
