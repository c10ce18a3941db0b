"""Float32 matmuls for a few dozen rows (gemm.c): y = x @ weight.T + bias, for the batched decode step on
CPUs where torch's matmuls are slow at that size.

Two entry points, computing the same product in different (each fixed) summation orders:
- gemm_panels(x, panels, bias): over a copy of the weight packed once by pack_panels(weight), k-major
  panels of 16 weight rows [ceil(N / 16), K, 16] (rows past N zero): register tiles of 6 rows of x by 16
  outputs in outer-product form. The fast one; costs a copy of the weight.
- gemm(x, weight, bias): over the weight in nn.Linear's own layout [N, K], dot-product tiles of 3 x 3; for
  where no packed copy fits in RAM.

Shapes and dtypes: x [M, K], weight [N, K], bias [N] or None, all float32, contiguous, on the CPU; returns a
new float32 [M, N]. Any M >= 0 (0 gives an empty result); built for about 5-128 rows: for 1-4 rows gemv.py
streams the weight faster, and prompt chunks of hundreds of rows go to MKL (model/packed_linear.py).
Errors, raised before any memory is touched: TypeError for a dtype other than float32 (in any input),
ValueError for devices, dimensions, mismatched K or N, non-contiguous tensors, and sizes of 2^31 or more.
RuntimeError where the native kernel cannot be had (no C compiler, or SHOAL_NATIVE_KERNELS=0): callers ask
supported() first.

Numerics: fp32 products and fp32 accumulation in a fixed order per output whatever M and wherever the row
sits in the batch, so a row gives bitwise the same output in any batch (batch-invariant); each differs from
torch's result only by summation order.

Measured on the 2-core AMD EPYC (AVX2 + FMA, no AVX512), float32, 2 threads, best call of 5-100, SmolLM2-135M
shapes, GF/s (oneDNN pre-packed as PackedLinear made it before this kernel; load ~1.6):
    weight [N x K]       rows:    5      8     16     32     64    128
    qkv 960x576    panels       125    118    138    140    144    133
                   plain         78     84     91     98     93     97
                   oneDNN        50     70     88    109    116    109
    gate_up 3072x576 panels      60     73     91    109    124    123
                   plain         60     68     70     86     94     85
                   oneDNN        42     57     72     91    108    117
    down 576x1536  panels       119    118    118    120    123    119
                   plain         75     86    101     97     96     97
                   oneDNN        54     70     80     85     99    102
    lm_head 49152x576 panels     52     57     83    128    150    152
                   plain         45     57     72    122    137    138
                   oneDNN        45     56     83    121    135    148
(bench/gemm.py; the lm_head's 113 MB come from memory: at 5-16 rows it is bound by memory bandwidth.)
"""

from __future__ import annotations

import ctypes

import torch

from shoal import kernels

PANEL = 16  # weight rows per panel, as PW in gemm.c
_INT_MAX = 2**31 - 1
_ARGTYPES = (ctypes.c_void_p,) * 4 + (ctypes.c_int,) * 4  # x, w or panels, bias, y; M, N, K, threads


def _kernel(symbol: str = "shoal_gemm_f32"):
    return kernels.function("gemm", symbol, _ARGTYPES, None)


def supported(weight: torch.Tensor) -> bool:
    """Whether the kernels serve this weight (contiguous float32 [N, K] on the CPU) and are built here."""
    return (
        weight.device.type == "cpu"
        and weight.dtype == torch.float32
        and weight.dim() == 2
        and weight.is_contiguous()
        and _kernel() is not None
    )


def pack_panels(weight: torch.Tensor) -> torch.Tensor:
    """weight [N, K] float32 -> new panels [ceil(N / 16), K, 16], panels[p, k, j] = weight[16p + j, k]
    (zeros past N), for gemm_panels. TypeError/ValueError for a weight gemm would refuse."""
    if not _weight_ok(weight):
        _refuse_weight(weight)
    n, k = weight.shape
    count = -(-n // PANEL)
    padded = torch.zeros(count * PANEL, k, dtype=torch.float32)
    padded[:n] = weight.detach()
    return padded.view(count, PANEL, k).transpose(1, 2).contiguous()


# The checks: cheap attribute reads in one expression each (they run about 120 times per decode step);
# only where one fails does a _refuse function work out which input breaks what, and raise.


def _weight_ok(weight: torch.Tensor) -> bool:
    ws = weight.shape
    return (
        weight.dtype is torch.float32
        and weight.is_cpu
        and len(ws) == 2
        and weight.is_contiguous()
        and 1 <= ws[0] <= _INT_MAX
        and 1 <= ws[1] <= _INT_MAX
    )


def _panels_ok(panels: torch.Tensor, n: int) -> bool:
    ps = panels.shape
    return (
        panels.dtype is torch.float32
        and panels.is_cpu
        and len(ps) == 3
        and ps[2] == PANEL
        and panels.is_contiguous()
        and type(n) is int
        and 1 <= n <= _INT_MAX
        and ps[0] == -(-n // PANEL)
        and 1 <= ps[1] <= _INT_MAX
    )


def _x_bias_ok(x: torch.Tensor, n: int, k: int, bias: torch.Tensor | None) -> bool:
    xs = x.shape
    return (
        x.dtype is torch.float32
        and x.is_cpu
        and len(xs) == 2
        and x.is_contiguous()
        and xs[0] <= _INT_MAX
        and xs[1] == k
        and (
            bias is None
            or (bias.dtype is torch.float32 and bias.is_cpu and bias.shape == (n,) and bias.is_contiguous())
        )
    )


def _refuse_weight(weight: torch.Tensor) -> None:
    if weight.dtype != torch.float32:
        raise TypeError(f"gemm: weight dtype {weight.dtype}, expected float32")
    if not weight.is_cpu:
        raise ValueError(f"gemm: weight on {weight.device}, expected the CPU")
    if weight.dim() != 2 or not weight.is_contiguous():
        raise ValueError(f"gemm: weight must be a contiguous [N, K] matrix, got shape {tuple(weight.shape)}")
    raise ValueError(f"gemm: weight shape {tuple(weight.shape)}: N and K must be in [1, 2^31)")


def _refuse_panels(panels: torch.Tensor, n: int) -> None:
    if panels.dtype != torch.float32:
        raise TypeError(f"gemm: panels dtype {panels.dtype}, expected float32")
    raise ValueError(
        f"gemm: panels of shape {tuple(panels.shape)} on {panels.device} (contiguous: {panels.is_contiguous()}) "
        f"are not pack_panels' contiguous [ceil({n} / {PANEL}), K, {PANEL}] on the CPU"
    )


def _refuse_x_bias(x: torch.Tensor, n: int, k: int, bias: torch.Tensor | None) -> None:
    for name, t in (("x", x), ("bias", bias)):
        if t is not None and t.dtype != torch.float32:
            raise TypeError(f"gemm: {name} dtype {t.dtype}, expected float32")
    if not (x.is_cpu and (bias is None or bias.is_cpu)):
        raise ValueError("gemm: x and bias must be on the CPU")
    if x.dim() != 2 or x.shape[1] != k or x.shape[0] > _INT_MAX:
        raise ValueError(f"gemm: x shape {tuple(x.shape)}, expected [M, {k}] with M < 2^31")
    if not x.is_contiguous():
        raise ValueError(f"gemm: x must be contiguous, got strides {x.stride()}")
    raise ValueError(f"gemm: bias must be a contiguous ({n},) vector, got shape {tuple(bias.shape)}")


def _call(symbol: str, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, n: int) -> torch.Tensor:
    fn = _kernel(symbol)
    if fn is None:
        raise RuntimeError("gemm: native kernels unavailable (no C compiler or SHOAL_NATIVE_KERNELS=0)")
    rows, k = x.shape
    out = torch.empty(rows, n, dtype=torch.float32)
    if rows:
        b = None if bias is None else bias.data_ptr()
        fn(x.data_ptr(), w.data_ptr(), b, out.data_ptr(), rows, n, k, torch.get_num_threads())
    return out


def gemm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] @ weight[N, K].T + bias[N] -> new [M, N], float32 on the CPU, over the plain weight
    (module docstring: contract, errors, numbers)."""
    if not _weight_ok(weight):
        _refuse_weight(weight)
    n, k = weight.shape
    if not _x_bias_ok(x, n, k, bias):
        _refuse_x_bias(x, n, k, bias)
    return _call("shoal_gemm_f32", x, weight, bias, n)


def gemm_panels(
    x: torch.Tensor, panels: torch.Tensor, out_features: int, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """x [M, K] @ weight[N, K].T + bias[N] -> new [M, N] with N = out_features, over panels =
    pack_panels(weight) (module docstring: contract, errors, numbers)."""
    if not _panels_ok(panels, out_features):
        _refuse_panels(panels, out_features)
    k = panels.shape[1]
    if not _x_bias_ok(x, out_features, k, bias):
        _refuse_x_bias(x, out_features, k, bias)
    return _call("shoal_gemm_f32_panels", x, panels, bias, out_features)
