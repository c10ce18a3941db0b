"""Fused element-wise ops of a decoder layer on CPU (fused_ops.c): RMSNorm with residual add, rotary
embedding in place, SiLU-and-mul. Float32 or bfloat16, computed in float32, rounded once.

`supported` says whether the kernels serve a device and dtype; the model keeps its PyTorch formulas for
everything else. Every function checks its inputs here and raises ValueError before any pointer reaches C.
Under torch.compile the calls go through custom ops (opaque to the compiler, with shape-only fakes);
eagerly they call the library directly, skipping the dispatcher's per-call cost (about 120 calls a step).
"""

from __future__ import annotations

import ctypes

import torch

from shoal import kernels

_DTYPES = {torch.float32: 0, torch.bfloat16: 1}
_P, _I, _F = ctypes.c_void_p, ctypes.c_int, ctypes.c_float
# x, residual, weight, out; rows, dim; eps; bf16, add, threads
_NORM_ARGS = (_P, _P, _P, _P, _I, _I, _F, _I, _I, _I)
# x, cos_sin; tokens, heads, head_dim; row_stride; bf16, threads
_ROTARY_ARGS = (_P, _P, _I, _I, _I, ctypes.c_int64, _I, _I)
# gate_up, out; rows, inter; bf16, threads
_SILU_ARGS = (_P, _P, _I, _I, _I, _I)

# torch's intra-op thread count, passed to every call (OpenMP's is per thread); a name tests can replace.
_threads = torch.get_num_threads


def _fn(symbol: str, argtypes: tuple):
    return kernels.function("fused_ops", symbol, argtypes)


def _built() -> bool:
    return _fn("shoal_rms_norm", _NORM_ARGS) is not None


def supported(device: torch.device, dtype: torch.dtype) -> bool:
    return device.type == "cpu" and dtype in _DTYPES and _built()


def _is_rows(t: torch.Tensor, dtype: torch.dtype) -> bool:
    """A contiguous CPU matrix [rows, cols] of dtype."""
    return t.is_cpu and t.dtype == dtype and t.dim() == 2 and t.is_contiguous()


def _desc(t: torch.Tensor) -> str:
    return f"{t.dtype} {tuple(t.shape)} on {t.device}{'' if t.is_contiguous() else ' (strided)'}"


def _check_norm(x: torch.Tensor, weight: torch.Tensor) -> None:
    if not (
        x.dtype in _DTYPES
        and _is_rows(x, x.dtype)
        and weight.is_cpu
        and weight.dtype == x.dtype
        and weight.shape == (x.shape[1],)
        and weight.is_contiguous()
    ):
        raise ValueError(
            "rms_norm: x must be a contiguous CPU [rows, dim] float32/bfloat16 tensor, weight [dim] of the "
            f"same dtype; got x {_desc(x)}, weight {_desc(weight)}"
        )


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    _check_norm(x, weight)
    out = torch.empty_like(x)
    _fn("shoal_rms_norm", _NORM_ARGS)(
        x.data_ptr(),
        None,
        weight.data_ptr(),
        out.data_ptr(),
        x.shape[0],
        x.shape[1],
        eps,
        _DTYPES[x.dtype],
        0,
        _threads(),
    )
    return out


def _add_rms_norm_(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float) -> None:
    _check_norm(x, weight)
    if not (_is_rows(residual, x.dtype) and residual.shape == x.shape):
        raise ValueError(f"add_rms_norm_: residual must match x {_desc(x)}; got {_desc(residual)}")
    _fn("shoal_rms_norm", _NORM_ARGS)(
        x.data_ptr(),
        residual.data_ptr(),
        weight.data_ptr(),
        x.data_ptr(),  # the kernel reads each element of x before writing it
        x.shape[0],
        x.shape[1],
        eps,
        _DTYPES[x.dtype],
        1,
        _threads(),
    )


def _rotary(x: torch.Tensor, cos_sin: torch.Tensor, heads: int, head_dim: int) -> None:
    tokens = x.shape[0] if x.dim() == 2 else -1
    if not (
        x.dtype in _DTYPES
        and _is_rows(x, x.dtype)
        and heads >= 0
        and head_dim > 0
        and head_dim % 2 == 0
        and heads * head_dim <= x.shape[1]
        and _is_rows(cos_sin, torch.float32)
        and cos_sin.shape == (tokens, head_dim)
    ):
        raise ValueError(
            "rotary: x must be a contiguous CPU [tokens, >= heads * head_dim] float32/bfloat16 tensor, "
            f"head_dim even, cos_sin a contiguous float32 [tokens, head_dim]; got x {_desc(x)}, "
            f"cos_sin {_desc(cos_sin)}, heads {heads}, head_dim {head_dim}"
        )
    _fn("shoal_rotary", _ROTARY_ARGS)(
        x.data_ptr(),
        cos_sin.data_ptr(),
        tokens,
        heads,
        head_dim,
        x.shape[1],
        _DTYPES[x.dtype],
        _threads(),
    )


def _silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    if not (gate_up.dtype in _DTYPES and _is_rows(gate_up, gate_up.dtype) and gate_up.shape[1] % 2 == 0):
        raise ValueError(
            "silu_and_mul: gate_up must be a contiguous CPU [rows, 2 * inter] float32/bfloat16 tensor; "
            f"got {_desc(gate_up)}"
        )
    rows, inter = gate_up.shape[0], gate_up.shape[1] // 2
    out = gate_up.new_empty(rows, inter)
    _fn("shoal_silu_and_mul", _SILU_ARGS)(
        gate_up.data_ptr(), out.data_ptr(), rows, inter, _DTYPES[gate_up.dtype], _threads()
    )
    return out


# The same functions as custom ops (schemas from the annotations), for torch.compile.
_rms_norm_op = torch.library.custom_op("shoal::rms_norm", mutates_args=())(_rms_norm)
_add_rms_norm_op = torch.library.custom_op("shoal::add_rms_norm_", mutates_args=("x", "residual"))(
    _add_rms_norm_
)
_rotary_op = torch.library.custom_op("shoal::rotary", mutates_args=("x",))(_rotary)
_silu_and_mul_op = torch.library.custom_op("shoal::silu_and_mul", mutates_args=())(_silu_and_mul)


@_rms_norm_op.register_fake
def _(x, weight, eps):
    return torch.empty_like(x)


@_add_rms_norm_op.register_fake
def _(x, residual, weight, eps):
    return None


@_rotary_op.register_fake
def _(x, cos_sin, heads, head_dim):
    return None


@_silu_and_mul_op.register_fake
def _(gate_up):
    return gate_up.new_empty(gate_up.shape[0], gate_up.shape[1] // 2)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [rows, dim] / sqrt(mean(x^2) + eps) * weight [dim]; float32 or bfloat16 on CPU, contiguous.
    Raises ValueError on any other input."""
    call = _rms_norm_op if torch.compiler.is_compiling() else _rms_norm
    return call(x, weight, eps)


def add_rms_norm_(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float) -> None:
    """vLLM's fused_add_rms_norm, both in place: residual += x (rounded to the dtype), then
    x = rms_norm(residual) * weight. x, residual [rows, dim], weight [dim]; one dtype (float32 or bfloat16),
    contiguous, on CPU. Raises ValueError on any other input."""
    call = _add_rms_norm_op if torch.compiler.is_compiling() else _add_rms_norm_
    call(x, residual, weight, eps)


def rotary_(x: torch.Tensor, cos_sin: torch.Tensor, heads: int, head_dim: int) -> None:
    """Rotates the first `heads` heads of every row of x [tokens, >= heads * head_dim] in place, neox style
    (rotate-half, as Hugging Face's Llama): with cos_sin [tokens, head_dim] float32 holding cos in its first
    half and sin in its second, (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin). q and k heads side by side in
    a fused qkv row go through in one call. Raises ValueError on other inputs."""
    call = _rotary_op if torch.compiler.is_compiling() else _rotary
    call(x, cos_sin, heads, head_dim)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for gate_up [rows, 2 * inter] = [gate | up] (SwiGLU); returns [rows, inter] in
    gate_up's dtype (float32 or bfloat16, contiguous, CPU). Raises ValueError on other inputs."""
    call = _silu_and_mul_op if torch.compiler.is_compiling() else _silu_and_mul
    return call(gate_up)
