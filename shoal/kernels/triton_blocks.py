"""Building blocks shared by shoal's Triton attention and GEMM kernels (`@triton.jit` helpers).

- `dot`: a @ b with fp32 accumulation: fp32 operands in IEEE precision (not TF32), 16-bit operands as they
  are (tensor cores); which one a kernel takes is triton_support.dot_in_fp32's choice.
- `load_kv`: a tile of keys and values of one KV head, read in place at their cache slots.
- `softmax_step`: one step of the online softmax (FlashAttention, Dao et al. 2022) over a tile of scores.
Importing this module imports triton: only the kernel modules import it.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def dot(a, b, DOT_F32: tl.constexpr):
    """a @ b, accumulated in fp32."""
    if DOT_F32:
        return tl.dot(a, b, input_precision="ieee")
    return tl.dot(a, b)


@triton.jit
def load_kv(k_ptr, v_ptr, slot, valid, kvh, d, HKV: tl.constexpr, D: tl.constexpr, DOT_F32: tl.constexpr):
    """K and V rows [BLOCK_N, BLOCK_D] of KV head kvh at cache slots `slot` (int64, [BLOCK_N]) of caches
    [num_slots, HKV, D]; zeros where `valid` is false or past D. fp32 when DOT_F32, else the cache dtype."""
    kv_off = slot[:, None] * (HKV * D) + kvh * D + d[None, :]
    mask = valid[:, None] & (d < D)[None, :]
    k = tl.load(k_ptr + kv_off, mask=mask, other=0.0)
    v = tl.load(v_ptr + kv_off, mask=mask, other=0.0)
    if DOT_F32:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    return k, v


@triton.jit
def softmax_step(m, l_sum, acc, s, v, DOT_F32: tl.constexpr):
    """Fold scores s [rows, BLOCK_N] (-inf where masked) and values v [BLOCK_N, BLOCK_D] into the running
    max m, sum l_sum and output acc of each row; returns the new (m, l_sum, acc). The probabilities are
    rounded to v's dtype before P @ V (FlashAttention's 16-bit route)."""
    m_new = tl.maximum(m, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with no key yet: keep zeros
    p = tl.exp(s - m_safe[:, None])
    alpha = tl.exp(m - m_safe)
    l_sum = l_sum * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + dot(p.to(v.dtype), v, DOT_F32)
    return m_new, l_sum, acc
