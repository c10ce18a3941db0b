"""Decode matmuls over int4/int8 pack-quantized weights (qgemv.c), for 1-4 rows.

`supported` says whether the kernel serves a layer's layout; `qgemv` runs it. As in gemv.py: under
torch.compile the call goes through a custom op with a shape-only fake, eagerly it calls the library
directly, and every call checks its inputs first (the C code trusts them): TypeError for dtypes, ValueError
for devices, shapes and strides. x, bias and the result share one dtype, float32 or bfloat16; conversions
and the per-group sums of x happen in C, so a call costs one check and one allocation in Python (it runs
about 120 times per SmolLM2 decode step).

Measured on the 2-core AMD EPYC (AVX512-BF16; shared, load ~4), 1 row, 1 thread, weights in cache, per
call, 3072x576 g64: int4 x bf16 86 us (vdpbf16ps, 64 columns a step), int8 x bf16 80 us, int4 x fp32
125 us, against shoal's bf16 gemv at 37 us: in cache, unpacking and the per-group scale work cost more than
the bytes saved (9 groups a row at g64). The zero-point sums, then done per group in scalar code, took a
third of that; vectorized over groups (zero_terms) int4 x bf16 went from 80 to 65 us in one session
(3072x576 g64; 576x1536 g128 29 -> 26 us). On an AVX2-only EPYC (no AVX512F; float32, 1 row, 1 thread,
weights from memory, load 4-5) the AVX2 row (`avx2_row`) takes 3072x576 g64 int4 in 0.20-0.22 ms and int8 in
0.20-0.29 ms, against 0.35-0.54 ms for the dense float32 gemv in the same runs (5.8 and 2.5 ms before it).
Whole-model numbers are in docs/quantization.md.

Before 2026-11-30 (2-core AMD EPYC Zen4, AVX512-BF16, bf16 x, 1 row, g64, weights from memory: 60 MB of
copies round-robin; best of 12 interleaved runs, shared machine) int4 reached 5.6-7 GB/s of packed bytes on
1 thread and 10-12 GB/s on 2, int8 8-12 / 13-18 GB/s, while torch reads 20 / 27 GB/s there; with the
weights in cache int4 was no faster: bound by instructions per 64-column group (a cross-lane vpmovzxbw
unpack, two vdpbf16ps, a broadcast scale FMA), and per row by the scales' conversion, the zero-point term
and one horizontal sum. Interleaving 4 output rows lost 5-45% from memory, software prefetch a few rows
ahead changed nothing, int8 as two bf16 nibbles on vdpbf16ps (through the same vpmovzx unpack) matched the
fp32 path.

Now bf16 x with groups of a multiple of 64 (every layer of the issue-18 models) runs row4_plain /
row8_plain over tiles of 16 output rows: the packed bytes loaded plainly (64 bytes a step) and split into
nibbles in place (shift + vpternlogd | 0x4300, no cross-lane op), with x permuted once per call to the
order the nibbles come out in; the row's 16 group scales converted with vector ops and kept in a register
(a block's scale vector is one vpermps), the zero-point term subtracted from the same loads, 16 rows'
accumulators reduced by one transpose-and-add tree and rounded to bf16 as one vector. int8 now takes
vdpbf16ps too (two nibbles a byte, low and high accumulated apart), without the vpmovzx unpack; int4 rows
are prefetched 2 KB ahead; the row count is a constant in each copy of the tile (runtime M kept int8's
accumulators in memory: 1.5x slower than the old path at M = 2-4).

Measured with a C harness calling shoal_qgemv on SmolLM2-135M's shapes (960x576, 576x576, 3072x576 g64 and
576x1536 g64 (int4) / g128 (int8); bf16 scales, symmetric; weights rotated over >= 96 MB of copies; best of
7 per shape; rounds interleaved with the old kernel), as ms for a layer's four calls times 30 layers:
- 1 row, 1 thread (load 4-5): int4 5.4-5.6 -> 3.8-4.7 ms (10-10.5 -> 12-15 GB/s of packed bytes), int8
  8.6-9.4 -> 6.2-6.7 ms (12.5 -> 16-17.6 GB/s); in cache int4 11.0 -> 16.4-17.5 GB/s, int8 20 GB/s;
- 1 row, 2 threads (load 1.5-2.2): int4 3.0-3.4 -> 2.25-2.5 ms (16.5-18.8 -> 22.6-25.3 GB/s), int8
  4.8-6.2 -> 3.5-3.9 ms (17.7-22.7 -> 28-31 GB/s, about what the two cores stream; one run 4.6);
- 2 rows, 2 threads: int4 16.2-17.7 -> 2.9-3.4 ms, int8 12.8-14.0 -> 4.8-5.0; 4 rows: int4 17.1-17.3 ->
  5.3-5.4, int8 23.1-23.3 -> 11.0-11.4.
In cache, 1 thread, an int4 row of 576 columns takes ~18 ns: about three quarters its 4.5 blocks (4
vdpbf16ps and 7 logic ops a 128 columns, ~2.7 ns, from 1536-column rows) and a quarter the per-row work; on 2 threads both formats are near the memory's rate. Tried and dropped:
the row's scales stored to a stack array and read back per block (a failed store-to-load forward every
block: 3072x576 in cache 62-67 against 56.5 us a call, one run each); prefetching int8 rows (3-7% slower); the prefetch
distance (2 or 4 rows, 1-4 KB: the same).
"""

from __future__ import annotations

import ctypes

import torch

from shoal import kernels

MAX_ROWS = 4
_INT_MAX = 2**31 - 1
# x, x_bf16, wq, scale, scale_bf16, zero, bias, y, M, N, K, group, bits, use_dot, threads, signed_codes
_ARGTYPES = (ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int)
_ARGTYPES += (ctypes.c_void_p,) * 3 + (ctypes.c_int,) * 8
_DTYPES = (torch.float32, torch.bfloat16)


def _kernel():
    return kernels.function("qgemv", "shoal_qgemv", _ARGTYPES, None)


def bf16_native() -> bool:
    """Whether int4 x bfloat16 runs on vdpbf16ps here (the library built with __AVX512BF16__)."""
    fn = kernels.function("qgemv", "shoal_qgemv_bf16_native", (), ctypes.c_int)
    return fn is not None and fn() == 1


def avx2_row() -> bool:
    """Whether float32 rows run on qgemv.c's AVX2 + FMA row here (a CPU without AVX512F). Measured on such a
    CPU (AMD EPYC, avx2 only; 1 thread, weights from memory, 3072x576, load 4-7, one run): 8-bit per channel
    (group = K) 0.55 ms a row against torch's _weight_int8pack_mm at 5.7 ms in float32 and 0.79 ms in
    bfloat16, the dense gemv 1.09 / 0.84 ms; so there QuantizedLinear takes qgemv for it."""
    fn = kernels.function("qgemv", "shoal_qgemv_avx2_row", (), ctypes.c_int)
    return fn is not None and fn() == 1


def supported(bits: int, group_size: int, in_features: int, scale: torch.Tensor) -> bool:
    """Whether the kernel serves a layer: 4 or 8 bits, groups of a multiple of 32 columns, float32 or
    bfloat16 scales on the CPU, and the library built."""
    return (
        bits in (4, 8)
        and group_size > 0
        and group_size % 32 == 0
        and in_features % group_size == 0
        and scale.device.type == "cpu"
        and scale.dtype in _DTYPES
        and _kernel() is not None
    )


def _check(x, packed, scale, zero, bias, bits: int, group_size: int) -> None:
    """What qgemv.c assumes, as one expression of cheap reads; _refuse says what is wrong otherwise."""
    xs, ps = x.shape, packed.shape
    if not (
        x.dtype in _DTYPES
        and packed.dtype is torch.int32
        and scale.dtype in _DTYPES
        and x.is_cpu
        and packed.is_cpu
        and scale.is_cpu
        and len(xs) == 2
        and len(ps) == 2
        and 1 <= xs[0] <= MAX_ROWS
        and bits in (4, 8)
        and group_size > 0
        and group_size % 32 == 0
        and xs[1] % group_size == 0
        and 1 <= ps[0] <= _INT_MAX
        and 1 <= xs[1] <= _INT_MAX
        and ps[1] * 32 == xs[1] * bits
        and scale.shape == (ps[0], xs[1] // group_size)
        and packed.is_contiguous()
        and scale.is_contiguous()
        and (zero is None or (zero.dtype is torch.int8 and zero.is_cpu and zero.shape == scale.shape and zero.is_contiguous()))
        and (bias is None or (bias.dtype is x.dtype and bias.is_cpu and bias.shape == ps[:1]))
    ):  # fmt: skip
        _refuse(x, packed, scale, zero, bias, bits, group_size)


def _refuse(x, packed, scale, zero, bias, bits: int, group_size: int) -> None:
    if x.dtype not in _DTYPES or scale.dtype not in _DTYPES or packed.dtype != torch.int32:
        raise TypeError(f"qgemv: x {x.dtype}, scale {scale.dtype}, weight {packed.dtype}: expected float32 or "
                        "bfloat16 x and scale, an int32 packed weight")  # fmt: skip
    if (zero is not None and zero.dtype != torch.int8) or (bias is not None and bias.dtype != x.dtype):
        raise TypeError("qgemv: zero points must be int8 and the bias in x's dtype")
    if not all(t.is_cpu for t in (x, packed, scale, zero, bias) if t is not None):
        raise ValueError("qgemv: every tensor must be on the CPU")
    if bits not in (4, 8) or group_size <= 0 or group_size % 32:
        raise ValueError(f"qgemv: bits {bits}, group {group_size}: need 4 or 8 bits and a multiple of 32")
    if x.dim() != 2 or not 1 <= x.shape[0] <= MAX_ROWS or x.shape[1] % group_size:
        raise ValueError(
            f"qgemv: x shape {tuple(x.shape)}, expected [1..{MAX_ROWS}, a multiple of {group_size}]"
        )
    k = x.shape[1]
    if packed.dim() != 2 or packed.shape[1] * 32 != k * bits or not packed.is_contiguous():
        raise ValueError(
            f"qgemv: packed weight {tuple(packed.shape)}, expected contiguous [N, {k * bits // 32}]"
        )
    raise ValueError(f"qgemv: scale {tuple(scale.shape)}, zero points or bias do not match N={packed.shape[0]}, "
                     f"groups={k // group_size} (contiguous)")  # fmt: skip


def signed_supported(x_dtype: torch.dtype, group_size: int) -> bool:
    """Whether qgemv takes int8 codes as signed bytes (`signed=True`): bfloat16 x and groups of a multiple
    of 64 columns on a CPU with AVX512-BF16, where its row8_plain runs (qgemv.c)."""
    return x_dtype is torch.bfloat16 and group_size % 64 == 0 and bf16_native()


def _run(
    x: torch.Tensor,
    packed: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor | None,
    bias: torch.Tensor | None,
    bits: int,
    group_size: int,
    portable: bool = False,
    signed: bool = False,
) -> torch.Tensor:
    _check(x, packed, scale, zero, bias, bits, group_size)
    if signed and (bits != 8 or portable or not signed_supported(x.dtype, group_size)):
        raise ValueError(
            f"qgemv: signed codes need 8 bits, bfloat16 x, groups of a multiple of 64 and AVX512-BF16 "
            f"(bits {bits}, x {x.dtype}, group {group_size}, portable {portable})"
        )
    fn = _kernel()
    if fn is None:
        raise RuntimeError("qgemv: native kernels unavailable (no C compiler or SHOAL_NATIVE_KERNELS=0)")
    x = x.contiguous()
    rows, k = x.shape
    n = packed.shape[0]
    out = torch.empty(rows, n, dtype=x.dtype)
    fn(
        x.data_ptr(),
        int(x.dtype is torch.bfloat16),
        packed.data_ptr(),
        scale.data_ptr(),
        int(scale.dtype is torch.bfloat16),
        None if zero is None else zero.data_ptr(),
        None if bias is None else bias.contiguous().data_ptr(),
        out.data_ptr(),
        rows,
        n,
        k,
        group_size,
        bits,
        int(not portable),
        torch.get_num_threads(),
        int(signed),
    )
    return out


_op = torch.library.custom_op("shoal::qgemv", mutates_args=())(_run)


@_op.register_fake
def _(x, packed, scale, zero, bias, bits, group_size, portable=False, signed=False):
    return x.new_empty(x.shape[0], packed.shape[0])


def qgemv(
    x: torch.Tensor,
    packed: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor | None,
    bias: torch.Tensor | None,
    bits: int,
    group_size: int,
    portable: bool = False,
    signed: bool = False,
) -> torch.Tensor:
    """x [rows, K] (1 <= rows <= 4) @ w_hat[N, K].T + bias[N] -> [rows, N]; x, bias and the result float32
    or bfloat16 (one dtype; bf16 accumulates in fp32 and rounds once).

    packed: int32 [N, K * bits / 32] (pack-quantized); scale: [N, K / group_size] float32 or bfloat16;
    zero: int8 [N, K / group_size] or None (symmetric). portable: take the fp32 path even where int4 x
    bf16 would run on AVX512-BF16 (for tests). signed: 8-bit codes stored as signed bytes q (torch's int8
    weight viewed as int32) instead of pack-quantized's u = q + 128; only where `signed_supported`.
    Raises TypeError (dtypes) or ValueError (devices, shapes, strides, signed codes where not supported)
    before touching memory."""
    call = _op if torch.compiler.is_compiling() else _run
    return call(x, packed, scale, zero, bias, bits, group_size, portable, signed)
