"""Attention of a prompt chunk over its cached context, read in place from the paged KV cache
(paged_prefill_attention.c): chunked prefill with a cached prefix without gathering the context.

`supported` says whether the kernel serves a cache; `paged_prefill_attention` runs it. Under torch.compile
the call goes through a custom op (opaque to the compiler, with a shape-only fake); eagerly it calls the
library directly. Shapes, dtypes and strides are checked here, the slot ids in C before any read: anything
else raises ValueError.
"""

from __future__ import annotations

import ctypes

import torch

from shoal import kernels

_DTYPES = {torch.float32: 0, torch.bfloat16: 1}
_P, _I, _I64 = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64
# q, q_stride, k_cache, v_cache, slots, out; T, H, Hkv, D; num_slots; context_len, window; scale; bf16,
# threads. Returns a status (kernels.OK, NO_MEMORY, BAD_INPUT).
_ARGTYPES = (_P, _I64, _P, _P, _P, _P, _I, _I, _I, _I, _I64, _I, _I, ctypes.c_float, _I, _I)
# q, q_stride, k_cache, v_cache, slots, chunk table, chunks, out; H, Hkv, D; num_slots; window; scale; bf16,
# threads. Returns a status.
_CHUNKS_ARGTYPES = (_P, _I64, _P, _P, _P, _P, _I, _P, _I, _I, _I, _I64, _I, ctypes.c_float, _I, _I)
HEAD_DIM_MULTIPLE = 16  # the kernel's vector width over keys and head dims


def _kernel():
    return kernels.function(
        "paged_prefill_attention", "shoal_paged_prefill_attention", _ARGTYPES, ctypes.c_int
    )


def supported(device: torch.device, dtype: torch.dtype, head_dim: int) -> bool:
    return (
        device.type == "cpu"
        and dtype in _DTYPES
        and head_dim % HEAD_DIM_MULTIPLE == 0
        and _kernel() is not None
    )


def _check(q, k_cache, v_cache, slots, context_len: int, window: int) -> None:
    dtype = q.dtype
    ok = (
        dtype in _DTYPES
        and k_cache.dtype == v_cache.dtype == dtype
        and slots.dtype == torch.int64
        and all(t.is_cpu for t in (q, k_cache, v_cache, slots))
        and q.dim() == 3
        and k_cache.dim() == 3
        and v_cache.shape == k_cache.shape
        and k_cache.is_contiguous()
        and v_cache.is_contiguous()
        and slots.is_contiguous()
    )
    if ok:
        tokens, heads, d = q.shape
        kv_heads = k_cache.shape[1]
        ok = (
            tokens >= 1
            and d == k_cache.shape[2]
            and d % HEAD_DIM_MULTIPLE == 0
            and kv_heads >= 1
            and heads % kv_heads == 0
            and q.stride(2) == 1
            and q.stride(1) == d
            and context_len >= 0
            and window >= 0
            and slots.shape == (context_len + tokens,)
        )
    if not ok:
        raise ValueError(
            "paged_prefill_attention: q [T, H, D] (rows of heads contiguous) and caches [num_slots, Hkv, D] "
            "(contiguous) of one dtype, float32 or bfloat16, D a multiple of 16, H a multiple of Hkv, "
            "slots int64 [context_len + T] on the CPU, window >= 0; got q "
            f"{q.dtype} {tuple(q.shape)} strides {q.stride()}, caches {k_cache.dtype} {tuple(k_cache.shape)}"
            f"/{tuple(v_cache.shape)}, slots {slots.dtype} {tuple(slots.shape)}, context_len {context_len}, "
            f"window {window}"
        )


def _explain(slots: torch.Tensor, num_slots: int) -> str:
    bad = slots[(slots < 0) | (slots >= num_slots)]
    return f"slot {bad[0].item()} outside the cache's [0, {num_slots})" if bad.numel() else "inputs refused"


def _run(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
    context_len: int,
    window: int,
    scale: float,
) -> torch.Tensor:
    _check(q, k_cache, v_cache, slots, context_len, window)
    tokens, heads, d = q.shape
    out = torch.empty(tokens, heads, d, dtype=q.dtype)
    status = _kernel()(
        q.data_ptr(),
        q.stride(0),
        k_cache.data_ptr(),
        v_cache.data_ptr(),
        slots.data_ptr(),
        out.data_ptr(),
        tokens,
        heads,
        k_cache.shape[1],
        d,
        k_cache.shape[0],
        context_len,
        window,
        scale,
        _DTYPES[q.dtype],
        torch.get_num_threads(),
    )
    kernels.check_status(status, "paged_prefill_attention", lambda: _explain(slots, k_cache.shape[0]))
    return out


# The same function as a custom op (schema from _run's annotations), for torch.compile.
_op = torch.library.custom_op("shoal::paged_prefill_attention", mutates_args=())(_run)


@_op.register_fake
def _(q, k_cache, v_cache, slots, context_len, window, scale):
    return q.new_empty(q.shape)


def paged_prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
    context_len: int,
    window: int | None,
    scale: float,
) -> torch.Tensor:
    """Causal attention of a chunk's T queries at positions context_len .. context_len + T - 1 over the keys
    at positions 0 .. context_len + T - 1, all read from their cache slots (the chunk's own keys included:
    write them first). q [T, H, D] (a view into fused qkv rows is fine), caches [num_slots, Hkv, D]
    (contiguous, q's dtype: float32 or bfloat16), slots [context_len + T] int64, window (keys per query,
    None: all). Returns [T, H, D] in q's dtype. Raises ValueError for anything else, a slot outside the
    cache included, and MemoryError if the work buffers cannot be allocated."""
    call = _op if torch.compiler.is_compiling() else _run
    return call(q, k_cache, v_cache, slots, context_len, window or 0, scale)


def _chunks_kernel():
    return kernels.function(
        "paged_prefill_attention",
        "shoal_paged_prefill_attention_chunks",
        _CHUNKS_ARGTYPES,
        ctypes.c_int,
    )


def paged_prefill_attention_chunks(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    chunks: list[tuple[int, int, int, torch.Tensor]],
    window: int | None,
    scale: float,
    out: torch.Tensor,
) -> None:
    """paged_prefill_attention for several chunks (of different sequences) in one native call, written into
    out: chunk (start, T, context_len, slots) is rows start .. start + T - 1 of q [N, H, D] (a view into
    fused qkv rows is fine) and of out [N, H, D] (contiguous, q's dtype), with slots [context_len + T] int64
    as for one chunk. Rows of out that no chunk covers are left as they are. One parallel loop over the
    tasks of all chunks: a step of many short prompts forks once a layer, not once a prompt.
    Raises ValueError for inputs the kernel cannot take (a slot outside the cache, a chunk outside q),
    MemoryError if its work buffers cannot be allocated."""
    if not chunks:
        return
    start, tokens, context_len, slots = chunks[0]
    _check(q[start : start + tokens], k_cache, v_cache, slots, context_len, window or 0)
    n = q.shape[0]
    if out.dtype != q.dtype or out.shape != q.shape or not out.is_contiguous() or not out.is_cpu:
        raise ValueError(
            f"paged_prefill_attention_chunks: out must be a contiguous CPU {q.dtype} tensor of q's shape "
            f"{tuple(q.shape)}; got {out.dtype} {tuple(out.shape)}"
        )
    table, offset = [], 0
    for start, tokens, context_len, slots in chunks:
        if not (0 <= start and tokens >= 1 and start + tokens <= n and context_len >= 0):
            raise ValueError(
                f"paged_prefill_attention_chunks: chunk rows [{start}, {start + tokens}) of q [{n}]"
            )
        if slots.dtype != torch.int64 or slots.shape != (context_len + tokens,):
            raise ValueError(
                f"paged_prefill_attention_chunks: slots {slots.dtype} {tuple(slots.shape)}, expected int64 "
                f"[{context_len + tokens}]"
            )
        table.extend((start, tokens, context_len, offset))
        offset += context_len + tokens
    all_slots = torch.cat([chunk[3] for chunk in chunks]).contiguous()
    chunk_table = torch.tensor(table, dtype=torch.int64)
    status = _chunks_kernel()(
        q.data_ptr(),
        q.stride(0),
        k_cache.data_ptr(),
        v_cache.data_ptr(),
        all_slots.data_ptr(),
        chunk_table.data_ptr(),
        len(chunks),
        out.data_ptr(),
        q.shape[1],
        k_cache.shape[1],
        q.shape[2],
        k_cache.shape[0],
        window or 0,
        scale,
        _DTYPES[q.dtype],
        torch.get_num_threads(),
    )
    kernels.check_status(status, "paged_prefill_attention", lambda: _explain(all_slots, k_cache.shape[0]))
