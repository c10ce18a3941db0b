"""Row-wise argmax of float32 logits on the CPU (argmax.c): what the greedy sampler picks, equal to
`torch.argmax(logits, dim=-1)` (first index of the largest value; a row's first NaN wins; a row of -inf
answers 0) at a fifth to a tenth of its time. Best of 100 calls, float32, 2 threads, AVX2-only EPYC:
[32, 49152] 0.17 ms against torch's 0.80-1.60 ms, [64, 49152] 0.36 against 1.58-3.27 ms, one row 0.02
against 0.10 ms.

`supported(logits)` says whether the kernel serves a tensor; `argmax(logits)` runs it and raises TypeError
for a dtype other than float32 and ValueError for anything else it cannot take (not 2-D, not on the CPU,
columns not contiguous, no columns), since the C code trusts its arguments.
"""

from __future__ import annotations

import ctypes

import torch

from shoal import kernels

_ARGTYPES = (ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_int)
_INT_MAX = 2**31 - 1


def _kernel():
    return kernels.function("argmax", "shoal_argmax_f32", _ARGTYPES)


def supported(logits: torch.Tensor) -> bool:
    """Whether argmax() takes these logits here (float32 [rows, n] on the CPU, unit column stride) and the
    kernel is built."""
    return (
        logits.dtype is torch.float32
        and logits.is_cpu
        and logits.dim() == 2
        and logits.shape[1] >= 1
        and logits.shape[0] <= _INT_MAX
        and (logits.shape[0] <= 1 or logits.stride(0) >= logits.shape[1])
        and logits.stride(1) == 1
        and _kernel() is not None
    )


def argmax(logits: torch.Tensor) -> torch.Tensor:
    """logits [rows, n] float32 on the CPU (rows may be strided, columns contiguous) -> int64 [rows], the
    index of each row's largest value (torch.argmax(dim=-1)'s answer, ties and NaN included)."""
    if logits.dtype is not torch.float32:
        raise TypeError(f"argmax: logits dtype {logits.dtype}, expected float32")
    if not supported(logits):
        if _kernel() is None:
            raise RuntimeError("argmax: native kernels unavailable (no C compiler or SHOAL_NATIVE_KERNELS=0)")
        raise ValueError(
            "argmax: logits must be a CPU [rows, n] tensor with n >= 1, contiguous columns and rows that do "
            f"not overlap; got shape {tuple(logits.shape)}, strides {logits.stride()}, device {logits.device}"
        )
    rows, n = logits.shape
    out = torch.empty(rows, dtype=torch.int64)
    if rows:
        _kernel()(logits.data_ptr(), out.data_ptr(), rows, n, logits.stride(0), torch.get_num_threads())
    return out
