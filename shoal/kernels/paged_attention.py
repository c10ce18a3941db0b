"""Decode attention over the paged KV cache, read in place (paged_decode_attention.c).

`supported` says whether the kernel serves a cache; `paged_decode_attention` runs it. Under torch.compile
the call goes through a custom op (opaque to the compiler, with a shape-only fake); eagerly it calls the
library directly, skipping the dispatcher's per-call cost (30 calls per step).
"""

from __future__ import annotations

import ctypes

import torch

from shoal import kernels

_DTYPES = {torch.float32: 0, torch.bfloat16: 1}


# q, k_cache, v_cache, tables, lens, out; B, H, Hkv, D, W, block_size, window; scale; bf16, threads
_ARGTYPES = (ctypes.c_void_p,) * 6 + (ctypes.c_int,) * 7 + (ctypes.c_float, ctypes.c_int, ctypes.c_int)


def _kernel():
    return kernels.function("paged_decode_attention", "shoal_paged_decode_attention", _ARGTYPES)


def supported(device: torch.device, dtype: torch.dtype) -> bool:
    return device.type == "cpu" and dtype in _DTYPES and _kernel() is not None


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
    if not (
        q.dtype == k_cache.dtype == v_cache.dtype
        and k_cache.is_contiguous()
        and v_cache.is_contiguous()
        and block_tables.dtype == context_lens.dtype == torch.int32
        and block_tables.is_contiguous()
        and context_lens.is_contiguous()
    ):
        raise ValueError("paged_decode_attention: caches must be contiguous in q's dtype, tables int32")
    q = q.contiguous()
    out = torch.empty_like(q)
    b, h, d = q.shape
    _kernel()(
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
        window,
        scale,
        _DTYPES[q.dtype],
        torch.get_num_threads(),
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
    """q [B, H, D]; caches [num_slots, Hkv, D] (contiguous, same dtype as q); block_tables [B, W] int32;
    context_lens [B] int32 (>= 1, including the new token). Returns [B, H, D]."""
    # Compiled: an opaque op (checks inside it, not traced: a traced is_contiguous() would pin the shapes).
    call = _op if torch.compiler.is_compiling() else _run
    return call(q, k_cache, v_cache, block_tables, context_lens, block_size, window or 0, scale)
