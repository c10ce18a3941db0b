"""Decode attention over the paged KV cache on a GPU, in Triton: the CUDA twin of paged_decode_attention.c.

Layout (engine/model_runner.py): one cache per layer for K and one for V, [num_slots, Hkv, D], slot =
block_id * block_size + offset; each sequence's block table lists its blocks in order. One program serves
one (sequence, KV head) pair: it loads the H / Hkv query heads that share the KV head (GQA) as the rows of
one tile, padded to 16 (tl.dot's least size), and walks the sequence's keys BLOCK_N at a time through its
block table with an online softmax (FlashAttention's, Dao et al. 2022; paged reads as in vLLM's
PagedAttention, Kwon et al. 2023), so every key and value is read once per KV head, whatever the group size.
Sliding windows (Mistral) start the walk at the window's first key.

Split-K (flash-decoding, Dao et al. 2023): with few sequences, (sequence, KV head) pairs leave most of a GPU's
SMs idle while each program walks a long context alone. Then each pair's keys are cut into `splits` spans,
one program each, that store their unnormalized output with its running max and sum (fp32); a second kernel
combines the spans of each head (weights exp(m_i - max m)). The split count is chosen so that programs
number about twice the SMs (at most MAX_SPLITS), without reading the context lengths on the host (no sync).

Numerics: scores and the softmax in fp32; the dot operands as triton_support.dot_in_fp32 says.
Importing this module imports triton: go through triton_support.kernel_module.
"""

from __future__ import annotations

from functools import lru_cache

import torch
import triton
import triton.language as tl

from shoal.kernels.triton_blocks import dot, load_kv, softmax_step
from shoal.kernels.triton_support import dot_in_fp32, next_power_of_2

BLOCK_N = 32  # keys per step: a multiple of 16 (tl.dot)
NO_WINDOW = 2**30  # the window passed for "attend to all": no branch in the kernel
MAX_SPLITS = 16


@triton.jit
def _paged_decode_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    tables_ptr,
    lens_ptr,
    out_ptr,
    part_ptr,
    ml_ptr,
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
    SPLITS: tl.constexpr,
    DOT_F32: tl.constexpr,
):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
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
    base = (first // BLOCK_N) * BLOCK_N
    span = tl.cdiv(tl.cdiv(ctx - base, SPLITS), BLOCK_N) * BLOCK_N  # this split's keys: a multiple of BLOCK_N
    lo = base + split * span
    for n0 in range(lo, tl.minimum(lo + span, ctx), BLOCK_N):
        pos = n0 + tl.arange(0, BLOCK_N)
        valid = (pos < ctx) & (pos >= first)
        block = tl.load(tables_ptr + b * stride_tb + pos // BLOCK_SIZE, mask=valid, other=0)
        slot = block.to(tl.int64) * BLOCK_SIZE + pos % BLOCK_SIZE
        k, v = load_kv(k_ptr, v_ptr, slot, valid, kvh, d, HKV, D, DOT_F32)
        s = dot(q, tl.trans(k), DOT_F32) * scale
        s = tl.where(valid[None, :], s, float("-inf"))
        m, l_sum, acc = softmax_step(m, l_sum, acc, s, v, DOT_F32)
    out_mask = g_mask[:, None] & d_mask[None, :]
    if SPLITS == 1:
        out = acc / l_sum[:, None]
        o_off = b * stride_ob + heads[:, None] * D + d[None, :]
        tl.store(out_ptr + o_off, out.to(out_ptr.dtype.element_ty), mask=out_mask)
    else:  # this span's share, combined by _combine_kernel: rows (b, head, split)
        row = (b * (HKV * GROUP) + heads) * SPLITS + split
        tl.store(part_ptr + row[:, None] * BLOCK_D + d[None, :], acc, mask=out_mask)
        tl.store(ml_ptr + row * 2, m, mask=g_mask)
        tl.store(ml_ptr + row * 2 + 1, l_sum, mask=g_mask)


@triton.jit
def _combine_kernel(
    part_ptr,
    ml_ptr,
    out_ptr,
    stride_ob,
    H: tl.constexpr,
    D: tl.constexpr,
    SPLITS: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """out[b, h] = sum_i exp(m_i - M) acc_i / sum_i exp(m_i - M) l_i over the splits i of head h (M = max m_i;
    a split without keys has m_i = -inf and weighs 0; the first split always has keys)."""
    b = tl.program_id(0)
    h = tl.program_id(1)
    i = tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    i_mask = i < SPLITS
    row = (b * H + h) * SPLITS + i
    m = tl.load(ml_ptr + row * 2, mask=i_mask, other=float("-inf"))
    l_sum = tl.load(ml_ptr + row * 2 + 1, mask=i_mask, other=0.0)
    acc = tl.load(part_ptr + row[:, None] * BLOCK_D + d[None, :], mask=i_mask[:, None], other=0.0)
    weight = tl.exp(m - tl.max(m, 0))
    out = tl.sum(weight[:, None] * acc, 0) / tl.sum(weight * l_sum, 0)
    tl.store(out_ptr + b * stride_ob + h * D + d, out.to(out_ptr.dtype.element_ty), mask=d < D)


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
    splits: int | None = None,
) -> torch.Tensor:
    """One query token per sequence against its paged context, as kernels.paged_attention's contract:
    q [B, H, D]; caches [num_slots, Hkv, D] (contiguous, q's dtype: float32, bfloat16 or float16); block_tables
    [B, W] int32 (entries past a sequence's last block are never read); context_lens [B] int32 in
    [1, W * block_size], the new token included; window: keys per query (None: all); splits: spans of keys
    per (sequence, KV head), combined after (None: chosen for the device, see the module docstring).
    Returns [B, H, D] in q's dtype. Raises ValueError for shapes, dtypes or devices out of contract; block
    ids are not checked (the engine's block manager owns them)."""
    _check(q, k_cache, v_cache, block_tables, context_lens, block_size)
    batch, heads, dim = q.shape
    kv_heads = k_cache.shape[1]
    out = torch.empty(batch, heads, dim, dtype=q.dtype, device=q.device)
    if batch == 0:
        return out
    group = heads // kv_heads
    splits = splits or _auto_splits(q.device, batch * kv_heads)
    block_d = max(16, next_power_of_2(dim))
    part = ml = out  # unread stand-ins when there is one split
    if splits > 1:
        part = torch.empty(batch * heads * splits, block_d, dtype=torch.float32, device=q.device)
        ml = torch.empty(batch * heads * splits, 2, dtype=torch.float32, device=q.device)
    _paged_decode_kernel[(batch, kv_heads, splits)](
        q,
        k_cache,
        v_cache,
        block_tables,
        context_lens,
        out,
        part,
        ml,
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
        BLOCK_D=block_d,
        BLOCK_N=BLOCK_N,
        SPLITS=splits,
        DOT_F32=dot_in_fp32(q.dtype),
    )
    if splits > 1:
        _combine_kernel[(batch, heads)](
            part,
            ml,
            out,
            out.stride(0),
            H=heads,
            D=dim,
            SPLITS=splits,
            BLOCK_S=next_power_of_2(splits),
            BLOCK_D=block_d,
        )
    return out


def _auto_splits(device: torch.device, pairs: int) -> int:
    """Spans per (sequence, KV head): enough programs for about two per SM on CUDA, at most MAX_SPLITS; one
    elsewhere (the interpreter: tests ask for splits explicitly)."""
    if device.type != "cuda":
        return 1
    return max(1, min(MAX_SPLITS, -(-2 * _sm_count(device.index or 0) // pairs)))


@lru_cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count
