"""Prefill attention with a cached prefix on a GPU, in Triton: the CUDA twin of paged_prefill_attention.c.

A prompt chunk's T queries sit at positions context_len .. context_len + T - 1; their keys are every token
of the sequence up to each query (the cached prefix and the causal part of the chunk itself), read in place
from the paged cache through the chunk's slot list (attention.PrefillChunk.slots: the cache slot of every
position 0 .. context_len + T - 1, the chunk's own K/V written before the call). No gathered copy and no
mask tensor: one program serves BLOCK_M queries of one head, walking the keys BLOCK_N at a time with an
online softmax (FlashAttention, Dao et al. 2022), from the window's first key (Mistral) to the block's last
query; causality and the window are applied per score.

Numerics: scores and the softmax in fp32; the dot operands as triton_support.dot_in_fp32 says.
Importing this module imports triton: go through triton_support.kernel_module.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from shoal.kernels.triton_blocks import dot, load_kv, softmax_step
from shoal.kernels.triton_paged_decode import NO_WINDOW
from shoal.kernels.triton_support import dot_in_fp32, next_power_of_2

BLOCK_M = 64  # queries per program (16-bit dots; 32 for fp32's, which compile to FMAs)
BLOCK_N = 64  # keys per step (likewise)


@triton.jit
def _prefill_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    slots_ptr,
    out_ptr,
    stride_qt,
    stride_qh,
    tokens,
    context_len,
    window,
    scale,
    H: tl.constexpr,
    HKV: tl.constexpr,
    D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_F32: tl.constexpr,
):
    mb = tl.program_id(0)
    h = tl.program_id(1)
    kvh = h // (H // HKV)
    qi = mb * BLOCK_M + tl.arange(0, BLOCK_M)
    qpos = context_len + qi
    d = tl.arange(0, BLOCK_D)
    q_mask = (qi < tokens)[:, None] & (d < D)[None, :]
    q = tl.load(q_ptr + qi[:, None] * stride_qt + h * stride_qh + d[None, :], mask=q_mask, other=0.0)
    if DOT_F32:
        q = q.to(tl.float32)
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_sum = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    end = tl.minimum(context_len + (mb + 1) * BLOCK_M, context_len + tokens)  # keys up to the last query
    start = tl.maximum(context_len + mb * BLOCK_M - window + 1, 0)  # the first query's window
    for n0 in range((start // BLOCK_N) * BLOCK_N, end, BLOCK_N):
        kpos = n0 + tl.arange(0, BLOCK_N)
        kvalid = kpos < end
        slot = tl.load(slots_ptr + kpos, mask=kvalid, other=0).to(tl.int64)
        k, v = load_kv(k_ptr, v_ptr, slot, kvalid, kvh, d, HKV, D, DOT_F32)
        s = dot(q, tl.trans(k), DOT_F32) * scale
        causal = (kpos[None, :] <= qpos[:, None]) & (kpos[None, :] > qpos[:, None] - window)
        s = tl.where(kvalid[None, :] & causal, s, float("-inf"))
        m, l_sum, acc = softmax_step(m, l_sum, acc, s, v, DOT_F32)
    out = acc / tl.where(l_sum == 0.0, 1.0, l_sum)[:, None]  # 0 only in padding rows (a query sees itself)
    o_off = qi[:, None] * (H * D) + h * D + d[None, :]
    tl.store(out_ptr + o_off, out.to(out_ptr.dtype.element_ty), mask=q_mask)


def _check(q, k_cache, v_cache, slots, context_len: int, window: int) -> None:
    ok = (
        q.dim() == 3
        and k_cache.dim() == 3
        and v_cache.shape == k_cache.shape
        and q.dtype == k_cache.dtype == v_cache.dtype
        and q.dtype in (torch.float32, torch.bfloat16, torch.float16)
        and slots.dtype == torch.int64
        and slots.is_contiguous()
        and k_cache.is_contiguous()
        and v_cache.is_contiguous()
        and q.shape[0] >= 1
        and q.shape[2] == k_cache.shape[2]
        and q.shape[1] % k_cache.shape[1] == 0
        and q.stride(2) == 1
        and context_len >= 0
        and window >= 0
        and slots.shape == (context_len + q.shape[0],)
        and len({t.device for t in (q, k_cache, v_cache, slots)}) == 1
    )
    if not ok:
        raise ValueError(
            "triton paged_prefill_attention: q [T >= 1, H, D] (last dim contiguous), caches [num_slots, Hkv, "
            "D] (contiguous, q's dtype: float32/bfloat16/float16), slots int64 [context_len + T], window >= "
            f"0, all on one device; got q {q.dtype} {tuple(q.shape)}, caches {k_cache.dtype} "
            f"{tuple(k_cache.shape)}, slots {slots.dtype} {tuple(slots.shape)}, context_len {context_len}, "
            f"window {window}"
        )


def paged_prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
    context_len: int,
    window: int | None,
    scale: float,
) -> torch.Tensor:
    """Causal attention of a chunk's T queries over the keys at positions 0 .. context_len + T - 1, read from
    their cache slots, as kernels.prefill_attention's contract: q [T, H, D] (a view into fused qkv rows is
    fine), caches [num_slots, Hkv, D] (contiguous, q's dtype: float32, bfloat16 or float16), slots int64
    [context_len + T], window: keys per query (None: all). Returns [T, H, D] in q's dtype. Raises
    ValueError for shapes, dtypes or devices out of contract; slot ids are not checked (the engine's)."""
    window = window or 0
    _check(q, k_cache, v_cache, slots, context_len, window)
    tokens, heads, dim = q.shape
    out = torch.empty(tokens, heads, dim, dtype=q.dtype, device=q.device)
    in_fp32 = dot_in_fp32(q.dtype)
    block_m, block_n = (BLOCK_M // 2, BLOCK_N // 2) if in_fp32 else (BLOCK_M, BLOCK_N)
    _prefill_kernel[(triton.cdiv(tokens, block_m), heads)](
        q,
        k_cache,
        v_cache,
        slots,
        out,
        q.stride(0),
        q.stride(1),
        tokens,
        context_len,
        window or NO_WINDOW,
        scale,
        H=heads,
        HKV=k_cache.shape[1],
        D=dim,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_D=max(16, next_power_of_2(dim)),
        DOT_F32=in_fp32,
    )
    return out
