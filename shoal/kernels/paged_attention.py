"""Decode attention over the paged KV cache, read in place (paged_decode_attention.c).

`supported` says whether the kernel serves a cache; `paged_decode_attention` runs it. Under torch.compile
the call goes through a custom op (opaque to the compiler, with a shape-only fake); eagerly it calls the
library directly, skipping the dispatcher's per-call cost (30 calls per step).

Every call is checked before the kernel reads memory: dtypes (TypeError), devices, shapes, strides and
sizes here (ValueError); block ids and context lengths in the C code's first, serial pass (a loop over
the used entries of the table, well under a microsecond for a batch, instead of several torch ops per
layer), refused with a ValueError that names the sequence.
"""

from __future__ import annotations

import ctypes

import torch

from shoal import kernels

_DTYPES = {torch.float32: 0, torch.bfloat16: 1}


# q, k_cache, v_cache, tables, lens, out; B, H, Hkv, D, W, block_size, num_blocks, window; scale; bf16,
# threads. Returns a status (kernels.OK, NO_MEMORY, BAD_INPUT).
_ARGTYPES = (ctypes.c_void_p,) * 6 + (ctypes.c_int,) * 8 + (ctypes.c_float, ctypes.c_int, ctypes.c_int)


def _kernel():
    return kernels.function("paged_decode_attention", "shoal_paged_decode_attention", _ARGTYPES, ctypes.c_int)


def supported(device: torch.device, dtype: torch.dtype) -> bool:
    return device.type == "cpu" and dtype in _DTYPES and _kernel() is not None


def _check(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    block_size: int,
    window: int,
) -> None:
    """What the C code assumes of everything but the contents of the tables (q may be strided: it is made
    contiguous), else _refuse raises. One expression of cheap attribute reads, each shape read once
    (`.device` costs 0.5 us, `.shape` 0.2 us): it runs once per layer and step."""
    dt, qs, ks, ts = q.dtype, q.shape, k_cache.shape, block_tables.shape
    int32 = torch.int32
    if not (
        dt in _DTYPES
        and k_cache.dtype is dt
        and v_cache.dtype is dt
        and block_tables.dtype is int32
        and context_lens.dtype is int32
        and q.is_cpu
        and k_cache.is_cpu
        and v_cache.is_cpu
        and block_tables.is_cpu
        and context_lens.is_cpu
        and k_cache.is_contiguous()
        and v_cache.is_contiguous()
        and block_tables.is_contiguous()
        and context_lens.is_contiguous()
        and len(qs) == 3
        and len(ks) == 3
        and v_cache.shape == ks
        and qs[2] == ks[2] >= 1
        and ks[1] >= 1
        and qs[1] % ks[1] == 0
        and len(ts) == 2
        and ts[0] == qs[0]
        and ts[1] >= 1
        and context_lens.shape == qs[:1]
        and block_size >= 1
        and ks[0] >= block_size
        and ks[0] % block_size == 0
        and window >= 0
    ):
        _refuse(q, k_cache, v_cache, block_tables, context_lens, block_size, window)


def _refuse(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    block_size: int,
    window: int,
) -> None:
    """The exception for inputs _check turned down, saying what is wrong."""
    if q.dtype not in _DTYPES or k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        raise TypeError(
            f"paged_decode_attention: q {q.dtype}, caches {k_cache.dtype}/{v_cache.dtype}; expected one "
            "dtype, float32 or bfloat16"
        )
    if block_tables.dtype != torch.int32 or context_lens.dtype != torch.int32:
        raise TypeError(
            f"paged_decode_attention: block_tables {block_tables.dtype}, context_lens "
            f"{context_lens.dtype}; expected int32"
        )
    tensors = (q, k_cache, v_cache, block_tables, context_lens)
    if not all(t.is_cpu for t in tensors):
        raise ValueError("paged_decode_attention: all tensors must be on the CPU")
    if not all(t.is_contiguous() for t in tensors[1:]):
        raise ValueError("paged_decode_attention: caches, block_tables and context_lens must be contiguous")
    if q.dim() != 3 or k_cache.dim() != 3 or v_cache.shape != k_cache.shape:
        raise ValueError(
            f"paged_decode_attention: q {tuple(q.shape)} must be [B, H, D], caches {tuple(k_cache.shape)} "
            f"and {tuple(v_cache.shape)} the same [num_slots, Hkv, D]"
        )
    b, h, d = q.shape
    slots, kv_heads, dk = k_cache.shape
    if d < 1 or dk != d or kv_heads < 1 or h % kv_heads != 0:
        raise ValueError(
            f"paged_decode_attention: q {tuple(q.shape)} against caches {tuple(k_cache.shape)}: head dims "
            "must match and H be a multiple of Hkv"
        )
    if block_tables.dim() != 2 or block_tables.shape[0] != b or block_tables.shape[1] < 1:
        raise ValueError(
            f"paged_decode_attention: block_tables {tuple(block_tables.shape)}, expected [{b}, W>=1]"
        )
    if context_lens.shape != (b,):
        raise ValueError(f"paged_decode_attention: context_lens {tuple(context_lens.shape)}, expected ({b},)")
    if block_size < 1 or slots < block_size or slots % block_size != 0:
        raise ValueError(
            f"paged_decode_attention: block_size {block_size} must be >= 1 and divide the cache's "
            f"{slots} slots"
        )
    raise ValueError(f"paged_decode_attention: window {window} must be >= 0 (0: no window)")


def _explain(block_tables: torch.Tensor, context_lens: torch.Tensor, block_size: int, num_blocks: int) -> str:
    """Which sequence the kernel refused, and why (run only after a refusal)."""
    width = block_tables.shape[1]
    for b, n in enumerate(context_lens.tolist()):
        if not 1 <= n <= width * block_size:
            return (
                f"sequence {b}: context length {n} outside [1, {width * block_size}] (a table of {width} "
                f"blocks of {block_size})"
            )
        ids = block_tables[b, : -(-n // block_size)]
        bad = ids[(ids < 0) | (ids >= num_blocks)]
        if bad.numel():
            return f"sequence {b}: block id {bad[0].item()} outside the cache's [0, {num_blocks})"
    return "inputs refused (a batch too large for int32 indexing)"


def _run(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    block_size: int,
    window: int,
    scale: float,
) -> torch.Tensor:
    _check(q, k_cache, v_cache, block_tables, context_lens, block_size, window)
    fn = _kernel()
    if fn is None:
        raise RuntimeError("paged_decode_attention: native kernels unavailable")
    q = q.contiguous()
    out = torch.empty_like(q)
    b, h, d = q.shape
    num_blocks = k_cache.shape[0] // block_size
    if b == 0:
        return out
    status = fn(
        q.data_ptr(),
        k_cache.data_ptr(),
        v_cache.data_ptr(),
        block_tables.data_ptr(),
        context_lens.data_ptr(),
        out.data_ptr(),
        b,
        h,
        k_cache.shape[1],
        d,
        block_tables.shape[1],
        block_size,
        num_blocks,
        window,
        scale,
        _DTYPES[q.dtype],
        torch.get_num_threads(),
    )
    kernels.check_status(
        status, "paged_decode_attention", lambda: _explain(block_tables, context_lens, block_size, num_blocks)
    )
    return out


# The same function as a custom op (schema from _run's annotations), for torch.compile.
_op = torch.library.custom_op("shoal::paged_decode_attention", mutates_args=())(_run)


@_op.register_fake
def _(q, k_cache, v_cache, block_tables, context_lens, block_size, window, scale):
    return torch.empty_like(q)


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
    """q [B, H, D]; caches [num_slots, Hkv, D] (contiguous, same dtype as q, float32 or bfloat16, num_slots
    a multiple of block_size); block_tables [B, W] int32 (ids in [0, num_slots / block_size) for the blocks
    a sequence reads; padding after them is never read); context_lens [B] int32 in [1, W * block_size]
    (including the new token). Returns [B, H, D] in q's dtype. -inf scores weigh 0; a sequence whose
    scores are all -inf gets NaN, as torch's softmax.
    Raises TypeError (dtypes), ValueError (anything else out of contract), MemoryError (work buffers)."""
    # Compiled: an opaque op (checks inside it, not traced: a traced is_contiguous() would pin the shapes).
    call = _op if torch.compiler.is_compiling() else _run
    return call(q, k_cache, v_cache, block_tables, context_lens, block_size, window or 0, scale)
