"""Float32 and bfloat16 matmuls for a few dozen rows (gemm.c): y = x @ weight.T + bias, for the batched
decode step on CPUs where torch's matmuls are slow at that size.

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

bfloat16: gemm_panels only, over pack_panels(weight) of a bfloat16 weight, panels of 32 weight rows with
k-pairs interleaved [ceil(N / 32), ceil(K / 2), 32, 2] (zeros past N and K), register tiles of 8 rows of x
by 32 outputs on vdpbf16ps (AVX512-BF16). x, bias and the panels all bfloat16 (TypeError otherwise); returns
a new bfloat16 [M, N]: products and sums in fp32, the bias added in fp32, one rounding to bf16 (nearest
even), so torch's bf16 linear up to summation order (and vdpbf16ps' flushing of denormals, below ~1e-38).
The kernel exists only where gemm.c was compiled with AVX512-BF16 (bf16_available(), asked of the built
library); elsewhere supported() is False for bfloat16 and gemm_panels raises RuntimeError. 1-4 rows (decode)
run a loop of their own that streams each panel once over the whole K with no software prefetch, in the
tiles' summation order (bitwise the same rows), 1.6-2x gemv.py's bf16 kernel over the plain weight there
(numbers at the end).

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

bfloat16, measured on the 2-core AMD EPYC (Zen4: AVX512F/BW/VL + AVX512-BF16, no AMX; 32 KB L1d and 1 MB
L2 a core), best call of 7-200 interleaved, SmolLM2-135M shapes, GF/s; oneDNN is the pre-packed bf16 linear
PackedLinear used before this kernel, fp32 copy the big-batch route (x.float() through oneDNN's fp32 packed
copy, rounded back). 2 threads, load ~1.8-2.3 (before the equal x chunks, which changed only the lm_head
at 512 rows, by about +3%):
    weight [N x K]       rows:    5      8     16     32     64    128    256    512
    qkv 960x576    panels       195    250    312    356    357    374    375    354
                   oneDNN       140    176    256    322    318    332    348    362
                   fp32 copy     74     95    126    157    160    164    169    174
    gate_up 3072x576 panels     294    329    372    355    362    381    398    400
                   oneDNN       224    253    315    289    324    382    387    385
                   fp32 copy    124    140    162    147    157    177    189    192
    down 576x1536  panels       247    294    348    386    391    385    398    405
                   oneDNN       180    222    290    337    330    358    378    390
                   fp32 copy     86    107    133    144    162    171    184    189
    lm_head 49152x576 panels    120    213    269    335    362    377    372    294
                   oneDNN        98    130    213    276    347    370    401    309
                   fp32 copy     52     74    116    148    178    190    158    136
1 thread (load ~2): panels / oneDNN 1.23-1.52x at 5-8 rows, 1.08-1.28x at 16, 1.04-1.11x at 32,
1.00-1.09x at 64-512 except the lm_head (0.97-0.98x at 128-512); the panels reach 190-214 GF/s from 32
rows (in-cache weights: 220 GF/s in a quiet A/B, about one 512-bit vdpbf16ps a cycle at ~3.5 GHz).
(bench/gemm.py --dtype bfloat16; the lm_head's 56 MB come from memory.)

bfloat16 at 1-4 rows (decode), same EPYC, weights streamed from memory, through ctypes (no Python checks),
best of 20 interleaved passes, load ~1.1 (another process on one core at times), GB/s; gemv is gemv.py's
bf16 kernel over the plain weight, "tiles" the panels before the decode loop:
                                  1 thread            2 threads
    rows:                       1     2     4       1     2     4
    120 decoder linears gemv  10.6   9.6   8.3    20.4  18.4  15.4
      (212 MB)          tiles 16.3  15.7  16.5    29.9  27.9  26.7
                        loop  16.1  17.6  16.9    28.7  30.5  28.3
    lm_head 49152x576   gemv  10.0   9.2   7.7    20.3  18.3  15.6
      (56 MB)           tiles 18.9  18.5  19.3    38.4  36.9  35.5
                        loop  23.5  23.0  22.4    45.7  46.4  41.2
One thread reading a 212 MB buffer in plain 512-bit loads reaches about 24 GB/s here. On a 2-core Intel
Xeon (AVX512-BF16, no AMX) it is the other way round: the 120 decoder linears at 1 / 4 rows take 16.3 /
19.7 ms through the tiles against 20.1 / 30.3 through the loop on 1 thread, 7.8 / 9.6 against 10.1 / 14.9
on 2. So the route is chosen per process by timing both on the model's own weights at load
(choose_bf16_decode_loop; the engine reports it as describe()["bf16_decode_route"]). The decoder linears
(0.7-3.5 MB each) stay below the lm_head: each call starts its streams cold, and through gemm_panels each
call costs about 2.5 us (1 thread) to 8 us (2 threads, the other core busy) besides the kernel.
"""

from __future__ import annotations

import ctypes
import time
from functools import lru_cache

import torch

from shoal import kernels

PANEL = 16  # float32: weight rows per panel, as PW in gemm.c
PANEL_BF16 = 32  # bfloat16: weight rows per panel, as BW in gemm.c
_INT_MAX = 2**31 - 1
_ARGTYPES = (ctypes.c_void_p,) * 4 + (ctypes.c_int,) * 4  # x, w or panels, bias, y; M, N, K, threads
_PANEL_SYMBOLS = {torch.float32: "shoal_gemm_f32_panels", torch.bfloat16: "shoal_gemm_bf16_panels"}


def _kernel(symbol: str = "shoal_gemm_f32"):
    return kernels.function("gemm", symbol, _ARGTYPES, None)


@lru_cache
def bf16_available() -> bool:
    """Whether gemm.c was built with the bfloat16 kernel (the compiler had AVX512-BF16 for -march=native):
    asked of the library itself, never of the CPU's flags."""
    probe = kernels.function("gemm", "shoal_gemm_bf16_available", (), ctypes.c_int)
    return probe is not None and probe() == 1


def supported(weight: torch.Tensor) -> bool:
    """Whether the kernels serve this weight (a contiguous [N, K] matrix on the CPU) and are built here:
    float32 (gemm and gemm_panels), or bfloat16 where the AVX512-BF16 kernel was built (gemm_panels only)."""
    if not (weight.device.type == "cpu" and weight.dim() == 2 and weight.is_contiguous()):
        return False
    if weight.dtype == torch.float32:
        return _kernel() is not None
    return weight.dtype == torch.bfloat16 and bf16_available()


def pack_panels(weight: torch.Tensor) -> torch.Tensor:
    """weight [N, K] -> new panels for gemm_panels, in the weight's dtype, zeros past N (and past K):
    - float32: [ceil(N / 16), K, 16], panels[p, k, j] = weight[16p + j, k];
    - bfloat16: [ceil(N / 32), ceil(K / 2), 32, 2], panels[p, i, j, h] = weight[32p + j, 2i + h] (k-pairs
      interleaved for vdpbf16ps). Packing is tensor work, so bfloat16 packs anywhere; gemm_panels needs the
      kernel.
    TypeError for another dtype, ValueError for a weight gemm would refuse (device, shape, strides)."""
    if not _weight_ok(weight, weight.dtype) or weight.dtype not in _PANEL_SYMBOLS:
        _refuse_weight(weight, tuple(_PANEL_SYMBOLS))
    n, k = weight.shape
    if weight.dtype is torch.bfloat16:
        count, pairs = -(-n // PANEL_BF16), -(-k // 2)
        padded = torch.zeros(count * PANEL_BF16, 2 * pairs, dtype=torch.bfloat16)
        padded[:n, :k] = weight.detach()
        return padded.view(count, PANEL_BF16, pairs, 2).transpose(1, 2).contiguous()
    count = -(-n // PANEL)
    padded = torch.zeros(count * PANEL, k, dtype=torch.float32)
    padded[:n] = weight.detach()
    return padded.view(count, PANEL, k).transpose(1, 2).contiguous()


# The checks: cheap attribute reads in one expression each (they run about 120 times per decode step);
# only where one fails does a _refuse function work out which input breaks what, and raise.


def _weight_ok(weight: torch.Tensor, dtype: torch.dtype = torch.float32) -> bool:
    ws = weight.shape
    return (
        weight.dtype is dtype
        and weight.is_cpu
        and len(ws) == 2
        and weight.is_contiguous()
        and 1 <= ws[0] <= _INT_MAX
        and 1 <= ws[1] <= _INT_MAX
    )


def _panels_ok(panels: torch.Tensor, n: int, k: int) -> bool:
    """float32 panels [ceil(n / 16), k, 16] or bfloat16 [ceil(n / 32), ceil(k / 2), 32, 2], contiguous."""
    ps = panels.shape
    f32 = panels.dtype is torch.float32
    return (
        (f32 or panels.dtype is torch.bfloat16)
        and panels.is_cpu
        and type(n) is int
        and 1 <= n <= _INT_MAX
        and 1 <= k <= _INT_MAX
        and panels.is_contiguous()
        and (
            ps == (-(-n // PANEL), k, PANEL)
            if f32
            else ps == (-(-n // PANEL_BF16), -(-k // 2), PANEL_BF16, 2)
        )
    )


def _x_bias_ok(x: torch.Tensor, n: int, k: int, bias: torch.Tensor | None, dtype: torch.dtype) -> bool:
    xs = x.shape
    return (
        x.dtype is dtype
        and x.is_cpu
        and len(xs) == 2
        and x.is_contiguous()
        and xs[0] <= _INT_MAX
        and xs[1] == k
        and (
            bias is None
            or (bias.dtype is dtype and bias.is_cpu and bias.shape == (n,) and bias.is_contiguous())
        )
    )


def _names(dtypes: tuple[torch.dtype, ...]) -> str:
    return " or ".join(str(d).removeprefix("torch.") for d in dtypes)


def _refuse_weight(weight: torch.Tensor, dtypes: tuple[torch.dtype, ...] = (torch.float32,)) -> None:
    if weight.dtype not in dtypes:
        raise TypeError(f"gemm: weight dtype {weight.dtype}, expected {_names(dtypes)}")
    if not weight.is_cpu:
        raise ValueError(f"gemm: weight on {weight.device}, expected the CPU")
    if weight.dim() != 2 or not weight.is_contiguous():
        raise ValueError(f"gemm: weight must be a contiguous [N, K] matrix, got shape {tuple(weight.shape)}")
    raise ValueError(f"gemm: weight shape {tuple(weight.shape)}: N and K must be in [1, 2^31)")


def _refuse_panels(panels: torch.Tensor, n: int, k: int) -> None:
    if panels.dtype not in _PANEL_SYMBOLS:
        raise TypeError(f"gemm: panels dtype {panels.dtype}, expected {_names(tuple(_PANEL_SYMBOLS))}")
    want = (
        f"[ceil({n} / {PANEL}), {k}, {PANEL}]"
        if panels.dtype is torch.float32
        else f"[ceil({n} / {PANEL_BF16}), ceil({k} / 2), {PANEL_BF16}, 2]"
    )
    raise ValueError(
        f"gemm: {panels.dtype} panels of shape {tuple(panels.shape)} on {panels.device} (contiguous: "
        f"{panels.is_contiguous()}) are not pack_panels' contiguous {want} on the CPU for x [M, {k}]"
    )


def _refuse_x_bias(x: torch.Tensor, n: int, k: int, bias: torch.Tensor | None, dtype: torch.dtype) -> None:
    for name, t in (("x", x), ("bias", bias)):
        if t is not None and t.dtype != dtype:
            raise TypeError(f"gemm: {name} dtype {t.dtype}, expected the weight's {dtype}")
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
        if symbol == "shoal_gemm_bf16_panels" and kernels.load("gemm") is not None:
            raise RuntimeError("gemm: no bfloat16 kernel on this CPU (built without AVX512-BF16)")
        raise RuntimeError("gemm: native kernels unavailable (no C compiler or SHOAL_NATIVE_KERNELS=0)")
    rows, k = x.shape
    out = torch.empty(rows, n, dtype=x.dtype)
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
    if not _x_bias_ok(x, n, k, bias, torch.float32):
        _refuse_x_bias(x, n, k, bias, torch.float32)
    return _call("shoal_gemm_f32", x, weight, bias, n)


def gemm_panels(
    x: torch.Tensor, panels: torch.Tensor, out_features: int, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """x [M, K] @ weight[N, K].T + bias[N] -> new [M, N] with N = out_features, over panels =
    pack_panels(weight), in the panels' dtype (float32, or bfloat16 where bf16_available(); module
    docstring: contract, errors, numbers). x and bias must have the panels' dtype (TypeError)."""
    if panels.dtype is torch.bfloat16:
        k = x.shape[-1] if x.dim() else -1  # bf16 panels hold ceil(K / 2) pairs: K is x's
    else:
        k = panels.shape[1] if panels.dim() == 3 else -1
    if not _panels_ok(panels, out_features, k):
        _refuse_panels(panels, out_features, k)
    dtype = panels.dtype
    if not _x_bias_ok(x, out_features, k, bias, dtype):
        _refuse_x_bias(x, out_features, k, bias, dtype)
    return _call(_PANEL_SYMBOLS[dtype], x, panels, bias, out_features)


DECODE_LOOP_ROWS = 4  # DECODE_ROWS in gemm.c: at most this many rows take its decode loop when it is on
_CALIBRATION_ROWS = (1, DECODE_LOOP_ROWS)
# Timed weights: enough to stream from memory as a step does (past any cache), few enough that a large
# model's load does not pay for 20 passes over all of its weights (SmolLM2-135M: all 121 linears).
CALIBRATION_BYTES = 320 << 20
CALIBRATION_GROUP_BYTES = 16 << 20  # timed in turn by both routes (choose_bf16_decode_loop)
_chosen: dict | None = None  # the first choice in this process (the route is process-wide)


def bf16_decode_loop() -> bool | None:
    """Whether 1-4 bf16 rows take gemm.c's decode loop now (True) or its tiles; None without the kernel."""
    getter = kernels.function("gemm", "shoal_gemm_bf16_decode_rows", (), ctypes.c_int)
    return None if getter is None or not bf16_available() else getter() > 0


def set_bf16_decode_loop(on: bool) -> None:
    """Route 1-4 bf16 rows through gemm.c's decode loop (on) or its tiles, for this process (the outputs
    are bitwise the same; choose_bf16_decode_loop picks the faster). RuntimeError without the kernel."""
    setter = kernels.function("gemm", "shoal_gemm_bf16_set_decode_rows", (ctypes.c_int,), None)
    if setter is None or not bf16_available():
        raise RuntimeError("gemm.c's bf16 kernel is not built here")
    setter(DECODE_LOOP_ROWS if on else 0)


def choose_bf16_decode_loop(linears: list[tuple[torch.Tensor, int]], rounds: int = 3) -> dict | None:
    """Time a decode step's bfloat16 linears (panels, out_features), at 1 and 4 rows, through gemm.c's
    decode loop and through its tiles; keep the loop (for 1-4 rows) only if its total is smaller, else
    turn it off for this process (gemm.c: the faster one depends on the CPU). A row's output is bitwise
    the same either way, so only the time changes. Timed on one thread, and in turn on each group of about
    CALIBRATION_GROUP_BYTES of weights, loop-tiles-tiles-loop, `rounds` times: a load is often beside
    another busy process (a server loading its own model), which on 2 cores starves a 2-thread call's
    second thread and favoured the loop every time (4 of 4 loads beside a loading server picked it, and
    the single stream then ran at 72-77 instead of 90-100 tok/s); one thread is not held up by a second,
    and picks the route the 2-thread steps want (the same on both machines measured: gemm.py's numbers
    above). Returns the choice and the one-thread times of one pass in ms ({"decode_loop", "loop_ms",
    "tiles_ms"}), or None where the bf16 kernel is not built or there is nothing to time. The weights
    should be the model's own, streamed from memory as in a step (the first CALIBRATION_BYTES of them).
    The route is process-wide, so only the first call times; later ones (another model loaded in this
    process) return its result without timing or changing it."""
    global _chosen
    if _chosen is not None:
        return _chosen
    if not linears or bf16_decode_loop() is None:
        return None
    calls = [
        (torch.randn(rows, panels.shape[1] * 2, dtype=torch.bfloat16), panels, n)
        for panels, n in _leading(linears, CALIBRATION_BYTES)
        for rows in _CALIBRATION_ROWS
    ]
    total = {True: 0.0, False: 0.0}
    with kernels.torch_threads(1):
        for _ in range(rounds):
            for group in _groups(calls, CALIBRATION_GROUP_BYTES):
                for on in (True, False, False, True):
                    set_bf16_decode_loop(on)
                    t0 = time.perf_counter()
                    for x, panels, n in group:
                        gemm_panels(x, panels, n)
                    total[on] += time.perf_counter() - t0
    loop = total[True] < total[False]
    set_bf16_decode_loop(loop)
    per_pass = 1000 / (2 * rounds)
    _chosen = {"decode_loop": loop, "loop_ms": total[True] * per_pass, "tiles_ms": total[False] * per_pass}
    return _chosen


def _groups(calls: list[tuple[torch.Tensor, torch.Tensor, int]], budget: int) -> list[list]:
    """Consecutive calls (x, panels, n) in groups of about `budget` bytes of panels."""
    groups, size = [[]], 0
    for call in calls:
        if size >= budget:
            groups.append([])
            size = 0
        groups[-1].append(call)
        size += call[1].nbytes
    return groups


def _leading(linears: list[tuple[torch.Tensor, int]], budget: int) -> list[tuple[torch.Tensor, int]]:
    """The first linears whose panels together reach `budget` bytes (all of them if they do not)."""
    taken, size = [], 0
    for panels, n in linears:
        if size >= budget:
            break
        taken.append((panels, n))
        size += panels.nbytes
    return taken
