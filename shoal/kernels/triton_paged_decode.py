"""Decode attention over the paged KV cache on a GPU, in Triton: the CUDA twin of paged_decode_attention.c.

Layout (engine/model_runner.py): one cache per layer for K and one for V, [num_slots, Hkv, D], slot =
block_id * block_size + offset; each sequence's block table lists its blocks in order. One program serves
one (sequence, KV head) pair: it loads the H / Hkv query heads that share the KV head (GQA) as the rows of
one tile, padded to 16 (tl.dot's least size), and walks the sequence's keys BLOCK_N at a time through its
block table with an online softmax (FlashAttention's, Dao et al. 2022; paged reads as in vLLM's
PagedAttention, Kwon et al. 2023), so every key and value is read once per KV head, whatever the group size.
Sliding windows (Mistral) start the walk at the window's first key.

Numerics: scores and the softmax in fp32; the dot operands as triton_support.dot_in_fp32 says.
Importing this module imports triton: go through triton_support.kernel_module.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from shoal.kernels.triton_blocks import dot, load_kv, softmax_step
from shoal.kernels.triton_support import dot_in_fp32, next_power_of_2

BLOCK_N = 32  # keys per step: a multiple of 16 (tl.dot)
NO_WINDOW = 2**30  # the window passed for "attend to all": no branch in the kernel


@triton.jit
def _paged_decode_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    tables_ptr,
    lens_ptr,
    out_ptr,
    stride_qb,
    stride_qh,
    stride_tb,
    stride_ob,
    scale,
    window,
    HKV: tl.constexpr,
    GROUP: tl.constexpr,
    D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_F32: tl.constexpr,
):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    ctx = tl.load(lens_ptr + b)
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    g_mask = g < GROUP
    d_mask = d < D
    heads = kvh * GROUP + g
    q_off = b * stride_qb + heads[:, None] * stride_qh + d[None, :]
    q = tl.load(q_ptr + q_off, mask=g_mask[:, None] & d_mask[None, :], other=0.0)
    if DOT_F32:
        q = q.to(tl.float32)
    m = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_sum = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    first = tl.maximum(ctx - window, 0)  # the window's first key (window: NO_WINDOW when there is none)
    for n0 in range((first // BLOCK_N) * BLOCK_N, ctx, BLOCK_N):
        pos = n0 + tl.arange(0, BLOCK_N)
        valid = (pos < ctx) & (pos >= first)
        block = tl.load(tables_ptr + b * stride_tb + pos // BLOCK_SIZE, mask=valid, other=0)
        slot = block.to(tl.int64) * BLOCK_SIZE + pos % BLOCK_SIZE
        k, v = load_kv(k_ptr, v_ptr, slot, valid, kvh, d, HKV, D, DOT_F32)
        s = dot(q, tl.trans(k), DOT_F32) * scale
        s = tl.where(valid[None, :], s, float("-inf"))
        m, l_sum, acc = softmax_step(m, l_sum, acc, s, v, DOT_F32)
    out = acc / l_sum[:, None]
    o_off = b * stride_ob + heads[:, None] * D + d[None, :]
    tl.store(out_ptr + o_off, out.to(out_ptr.dtype.element_ty), mask=g_mask[:, None] & d_mask[None, :])


def _check(q, k_cache, v_cache, block_tables, context_lens, block_size: int) -> None:
    ok = (
        q.dim() == 3
        and k_cache.dim() == 3
        and v_cache.shape == k_cache.shape
        and q.dtype == k_cache.dtype == v_cache.dtype
        and q.dtype in (torch.float32, torch.bfloat16, torch.float16)
        and block_tables.dtype == context_lens.dtype == torch.int32
        and block_tables.dim() == 2
        and block_tables.shape[0] == q.shape[0]
        and context_lens.shape == (q.shape[0],)
        and q.shape[2] == k_cache.shape[2]
        and q.shape[1] % k_cache.shape[1] == 0
        and block_size >= 1
        and k_cache.shape[0] % block_size == 0
        and k_cache.is_contiguous()
        and v_cache.is_contiguous()
        and block_tables.is_contiguous()
        and q.stride(2) == 1
        and len({t.device for t in (q, k_cache, v_cache, block_tables, context_lens)}) == 1
    )
    if not ok:
        raise ValueError(
            "triton paged_decode_attention: q [B, H, D] (last dim contiguous), caches [num_slots, Hkv, D] "
            "(contiguous, q's dtype: float32/bfloat16/float16, num_slots a multiple of block_size), "
            "block_tables [B, W] int32, context_lens [B] int32, all on one device; got q "
            f"{q.dtype} {tuple(q.shape)}, caches {k_cache.dtype} {tuple(k_cache.shape)}, tables "
            f"{block_tables.dtype} {tuple(block_tables.shape)}, lens {context_lens.dtype} "
            f"{tuple(context_lens.shape)}, block_size {block_size}"
        )


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    block_size: int,
    window: int | None,
    scale: float,
) -> torch.Tensor:
    """One query token per sequence against its paged context, as kernels.paged_attention's contract:
    q [B, H, D]; caches [num_slots, Hkv, D] (contiguous, q's dtype: float32, bfloat16 or float16); block_tables
    [B, W] int32 (entries past a sequence's last block are never read); context_lens [B] int32 in
    [1, W * block_size], the new token included; window: keys per query (None: all). Returns [B, H, D] in
    q's dtype. Raises ValueError for shapes, dtypes or devices out of contract; block ids are not checked
    (the engine's block manager owns them)."""
    _check(q, k_cache, v_cache, block_tables, context_lens, block_size)
    batch, heads, dim = q.shape
    kv_heads = k_cache.shape[1]
    out = torch.empty(batch, heads, dim, dtype=q.dtype, device=q.device)
    if batch == 0:
        return out
    group = heads // kv_heads
    _paged_decode_kernel[(batch, kv_heads)](
        q,
        k_cache,
        v_cache,
        block_tables,
        context_lens,
        out,
        q.stride(0),
        q.stride(1),
        block_tables.stride(0),
        out.stride(0),
        scale,
        window or NO_WINDOW,
        HKV=kv_heads,
        GROUP=group,
        D=dim,
        BLOCK_SIZE=block_size,
        BLOCK_G=max(16, next_power_of_2(group)),
        BLOCK_D=max(16, next_power_of_2(dim)),
        BLOCK_N=BLOCK_N,
        DOT_F32=dot_in_fp32(q.dtype),
    )
    return out
