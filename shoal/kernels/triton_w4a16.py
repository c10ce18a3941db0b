"""Weight-only quantized GEMM (W4A16, and W8A16 by the same code) on a GPU, in Triton.

It reads the packed layout every quantized checkpoint is converted to at load (shoal/quant/format.py,
compressed-tensors' pack-quantized; GPTQ and AWQ files are converted into it by quant/upstream_format.py):
- packed int32 [N, K * bits / 32]: word j of row n holds columns j * (32 / bits) .. in its low bits first,
  each an unsigned code c = q + 2^(bits-1) for the signed integer q;
- scale [N, K / group] (any float dtype), zero point int8 [N, K / group] in q's range, or None (symmetric);
- w_hat[n, k] = (q - zero) * scale[n, k // group], the reference (quant/rtn.py `dequantize`).
One program computes a BLOCK_M x BLOCK_N tile of y = x @ w_hat.T: per BLOCK_K step it loads each weight
word once per column it holds (repeated addresses are served by the cache), shifts and masks the codes out,
dequantizes them with the step's one group of scales (BLOCK_K divides the group size) and accumulates the
dot in fp32. The weight is never dequantized into memory, so a decode step reads bits/16 of a 16-bit
weight's bytes. As in Marlin (Frantar et al. 2024) and vLLM's GPTQ Triton kernel, without their reordered
weight layouts: the checkpoint's layout is read as it is.

Numerics: the dequantized weight is rounded to x's dtype before the dot, exactly as the reference
dequantize-then-F.linear does, then accumulated in fp32 (triton_support.dot_in_fp32 for the operands).
Importing this module imports triton: go through triton_support.kernel_module.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from shoal.kernels.triton_blocks import dot
from shoal.kernels.triton_support import dot_in_fp32, w4a16_block_k


@triton.jit
def _round_to_bf16(x):
    """fp32 x rounded to the nearest bfloat16 (ties to even), kept in fp32: the interpreter's own cast
    truncates, so its bfloat16 route rounds this way (finite values only: weights)."""
    bits = x.to(tl.int32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536  # -65536: 0xFFFF0000 as an int32
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _quantized_matmul_kernel(
    x_ptr,
    w_ptr,
    s_ptr,
    z_ptr,
    bias_ptr,
    out_ptr,
    M,
    N,
    K,
    stride_xm,
    GROUP: tl.constexpr,
    BITS: tl.constexpr,
    HAS_ZERO: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_F32: tl.constexpr,
    ROUND_BF16: tl.constexpr,
):
    PER_WORD: tl.constexpr = 32 // BITS
    pm = tl.program_id(0)
    pn = tl.program_id(1)
    rm = pm * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pn * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_mask = rm < M
    n_mask = rn < N
    groups = K // GROUP
    words_per_row = K // PER_WORD
    shifts = (rk % PER_WORD) * BITS  # where column k sits in its word
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        x = tl.load(x_ptr + rm[:, None] * stride_xm + (k0 + rk)[None, :], mask=m_mask[:, None], other=0.0)
        word_off = rn[None, :].to(tl.int64) * words_per_row + ((k0 + rk) // PER_WORD)[:, None]
        words = tl.load(w_ptr + word_off, mask=n_mask[None, :], other=0)  # [BLOCK_K, BLOCK_N]
        q = ((words >> shifts[:, None]) & ((1 << BITS) - 1)) - (1 << (BITS - 1))
        g = k0 // GROUP
        if HAS_ZERO:
            zero = tl.load(z_ptr + rn * groups + g, mask=n_mask, other=0).to(tl.int32)
            q = q - zero[None, :]
        scale = tl.load(s_ptr + rn * groups + g, mask=n_mask, other=0.0).to(tl.float32)
        w = q.to(tl.float32) * scale[None, :]
        if DOT_F32:  # fp32 inputs, or bfloat16 under the interpreter: round w as the reference does
            if ROUND_BF16:
                w = _round_to_bf16(w)
            acc += dot(x.to(tl.float32), w, True)
        else:
            acc += dot(x, w.to(x_ptr.dtype.element_ty), False)  # the reference's rounding
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    out_off = rm[:, None] * N + rn[None, :]
    tl.store(out_ptr + out_off, acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


def _check(x, packed, scale, zero, bias, bits: int, group: int) -> None:
    rows_ok = x.dim() == 2 and packed.dim() == 2 and x.shape[1] * bits == packed.shape[1] * 32
    ok = (
        rows_ok
        and w4a16_block_k(bits, group, x.shape[1]) is not None
        and x.dtype in (torch.float32, torch.bfloat16, torch.float16)
        and x.stride(1) == 1
        and packed.dtype == torch.int32
        and packed.is_contiguous()
        and scale.shape == (packed.shape[0], x.shape[1] // group)
        and scale.is_contiguous()
        and (
            zero is None or (zero.dtype == torch.int8 and zero.shape == scale.shape and zero.is_contiguous())
        )
        and (bias is None or (bias.shape == (packed.shape[0],) and bias.is_contiguous()))
        and len({t.device for t in (x, packed, scale, zero, bias) if t is not None}) == 1
    )
    if not ok:
        raise ValueError(
            "triton quantized_matmul: x [M, K] (float32/bfloat16/float16, last dim contiguous), packed int32 "
            "[N, K * bits / 32], scale [N, K / group], zero int8 like scale or None, bias [N] or None, one "
            f"device, bits 4 or 8, group a multiple of 16 dividing K; got x {x.dtype} {tuple(x.shape)}, "
            f"packed {packed.dtype} {tuple(packed.shape)}, scale {tuple(scale.shape)}, bits {bits}, "
            f"group {group}"
        )


def _tiles(rows: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps): decode-sized batches take 16-row tiles (tl.dot's least) over wide
    column blocks; larger ones square tiles."""
    return (16, 64, 4) if rows <= 16 else (64, 64, 4)


def quantized_matmul(
    x: torch.Tensor,
    packed: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor | None,
    bias: torch.Tensor | None,
    bits: int,
    group_size: int,
) -> torch.Tensor:
    """x [M, K] @ w_hat[N, K].T + bias[N] -> [M, N] in x's dtype (fp32 accumulation, one rounding).

    packed: int32 [N, K * bits / 32] (pack-quantized); scale: [N, K / group] (any float dtype); zero: int8
    [N, K / group] or None (symmetric); group_size: columns per scale, 0 for one group per row (per channel).
    Raises ValueError for a layout the kernel does not serve (triton_support.w4a16_block_k) or tensors out
    of contract."""
    group = group_size or x.shape[-1]
    _check(x, packed, scale, zero, bias, bits, group)
    rows, cols = x.shape
    n = packed.shape[0]
    out = torch.empty(rows, n, dtype=x.dtype, device=x.device)
    if rows == 0:
        return out
    bm, bn, warps = _tiles(rows)
    _quantized_matmul_kernel[(triton.cdiv(rows, bm), triton.cdiv(n, bn))](
        x,
        packed,
        scale,
        zero if zero is not None else scale,  # an unread stand-in: HAS_ZERO is False
        bias if bias is not None else scale,
        out,
        rows,
        n,
        cols,
        x.stride(0),
        GROUP=group,
        BITS=bits,
        HAS_ZERO=zero is not None,
        HAS_BIAS=bias is not None,
        BLOCK_M=bm,
        BLOCK_N=bn,
        BLOCK_K=w4a16_block_k(bits, group, cols),
        DOT_F32=dot_in_fp32(x.dtype),
        ROUND_BF16=x.dtype == torch.bfloat16,
        num_warps=warps,
    )
    return out
