"""A decode step of a whole decoder stack in one native call (decode_step.c): 1-4 tokens, or batched
steps of up to MAX_TOKENS where every linear has a gemm route (`Dense`).

The layer loop runs in C and calls the gemv, qgemv, fused-op and paged-attention kernels through function
pointers taken from their own libraries, so the results are those of the per-op path bit for bit, without
its ~1,000 torch ops and ~300 Python-to-C calls a step (see decode_step.c for the data flow).

`DecodeStack` is built once per model from plain tensors (`LayerWeights`, the caches, the rotary table),
checks every dtype, shape and stride then, and allocates one set of scratch buffers, grown to the largest step
run (float32 SmolLM2-135M: 31.5 KB a token, 2 MB at 64, 8 MB at 256). Each linear's weight is a dense tensor
of the model dtype (gemv.c, 1-4 rows), `Dense` (the same, plus the gemm kernel PackedLinear runs for 5-256
rows: gemm.c's panels kernel over its panels, or its plain-weight one; bfloat16 with panels runs 1-4 rows on
them too, as PackedLinear does) or `Quantized` (int4/int8
pack-quantized, qgemv.c, 1-4 rows). `DecodeStack.max_tokens` is MAX_TOKENS where every linear is Dense with
its kernel built (float32; bfloat16 where shoal_gemm_bf16_panels is, with panels), capped by the rows each
route takes in the per-op path (Dense.max_rows), else GEMV_ROWS: the runner sends larger steps to the per-op
forward. Measured (SmolLM2-135M, 2 threads, 2-core Zen 4 EPYC, bench/decode_step.py): a step of 8/32/64
sequences float32 1.18/1.15/1.08x the per-op path's, bfloat16 1.45/1.25/1.22x; 128-256 1.00-1.11x
(docs/performance.md).
`run` checks the step's own tensors each call; positions and slots are checked against their tables in C,
block ids and context lengths by the attention kernel, before anything is written (ValueError). On a
machine without a C compiler or with SHOAL_NATIVE_KERNELS=0, `available()` is False and the model keeps
its per-op path.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from dataclasses import dataclass

import torch

from shoal import kernels
from shoal.kernels import fused_ops, gemm, gemv, qgemv
from shoal.kernels import paged_attention as attention_kernel

GEMV_ROWS = gemv.MAX_ROWS  # the matrix-vector kernels' limit (also qgemv's): beyond it a linear is a gemm
# The most tokens a step takes where every linear has a gemm route (`Dense`): at most
# packed_linear.GEMM_MAX_ROWS - 1, the most rows the per-op path sends to the gemm kernel over a plain weight
# (past it, MKL: results would differ; over panels it sends every batch). The step only removes per-op
# overhead, so it is not slower than the per-op path at any size (measured at 4-256, docs/performance.md);
# 256 is also the engine's default max_num_seqs.
MAX_TOKENS = 256
# the model dtypes, each also the kind of a dense linear in decode_step.c (LINEAR_F32, LINEAR_BF16)
_DTYPES = {torch.float32: 0, torch.bfloat16: 1}
_QUANTIZED = 2  # LINEAR_QUANT
_P, _I64, _F = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
_BetweenLayers = ctypes.CFUNCTYPE(ctypes.c_int)
_STOPPED = 3  # SHOAL_STOPPED: between_layers stopped the step


def _fields(ctype, names: str) -> list[tuple[str, type]]:
    """ctypes fields of one type, in the order decode_step.c declares them (names space-separated)."""
    return [(name, ctype) for name in names.split()]


class _Kernels(ctypes.Structure):
    _fields_ = _fields(
        _P,
        "gemv_f32 gemv_bf16 rms_norm rotary silu_and_mul attention qgemv gemm_f32 gemm_f32_panels gemm_bf16_panels",
    )


class _Linear(ctypes.Structure):
    _fields_ = (
        _fields(_I64, "kind")
        + _fields(_P, "w bias scale zero")
        + _fields(_I64, "bits group scale_bf16")
        + _fields(_P, "panels")
        + _fields(_I64, "gemm signed_codes")
    )


class _Layer(ctypes.Structure):
    _fields_ = (
        _fields(_P, "input_norm post_norm")
        + _fields(_Linear, "qkv o gate_up down")
        + _fields(_P, "k_cache v_cache")
        + _fields(_I64, "window")
    )


class _Dims(ctypes.Structure):
    _fields_ = _fields(
        _I64, "hidden heads kv_heads head_dim intermediate num_layers num_slots block_size max_positions bf16"
    ) + _fields(_F, "eps scale")


class _Step(ctypes.Structure):
    _fields_ = (
        _fields(
            _P,
            "embeddings final_norm cos_sin positions slots block_tables context_lens "
            "residual x qkv q attn gate_up act",
        )
        + _fields(_I64, "tokens table_width threads")
        + [("between_layers", _BetweenLayers)]
    )


@dataclass
class Quantized:
    """A pack-quantized weight [out, in] as qgemv.c takes it (QuantizedLinear's buffers): packed int32
    [out, in * bits / 32]; scale [out, in / group_size] float32 or bfloat16; zero int8 [out, in / group_size]
    or None (symmetric); bits 4 or 8; group_size a multiple of 32 that divides in. signed: 8 bits, packed
    is torch's int8 weight [out, in] viewed as int32 (the codes q as signed bytes, QuantizedLinear's int8
    route), which qgemv takes on bfloat16 x with groups of a multiple of 64 (`qgemv.signed_supported`)."""

    packed: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None
    bits: int
    group_size: int
    signed: bool = False

    @property
    def shape(self) -> tuple[int, int]:
        return self.packed.shape[0], self.packed.shape[1] * 32 // self.bits


@dataclass
class Dense:
    """A dense weight [out, in] of the model dtype that also serves steps of more than GEMV_ROWS tokens,
    through the gemm kernel PackedLinear runs for those rows: float32 over panels = gemm.pack_panels(weight)
    (float32 [ceil(out / 16), in, 16]) or, with panels None, over the weight itself (gemm.gemm); bfloat16
    over its panels = gemm.pack_panels(weight) (bfloat16 [ceil(out / 32), ceil(in / 2), 32, 2]) where that
    kernel is built (`gemm_bf16_available()`), for 1-GEMV_ROWS tokens as well (as PackedLinear's
    decode_on_panels: the panels stream faster than gemv). max_rows: the most rows that route takes in the
    per-op path (PackedLinear.gemm_max_rows - 1): a step takes at most the smallest of its linears' (and
    MAX_TOKENS). A
    bare weight tensor, or a Dense without a kernel built for it (bfloat16 without panels or the kernel),
    serves 1-GEMV_ROWS tokens only."""

    weight: torch.Tensor
    panels: torch.Tensor | None = None
    max_rows: int = MAX_TOKENS

    @property
    def shape(self) -> tuple[int, int]:
        return self.weight.shape[0], self.weight.shape[1]


@dataclass
class LayerWeights:
    """One decoder layer as plain tensors: norms [hidden]; qkv [(H + 2 Hkv) D, hidden]; o [hidden, H D];
    gate_up [2 I, hidden]; down [hidden, I], each dense in the model dtype (a tensor, or Dense with its gemm
    route) or Quantized; biases [out] of the model dtype or None; window in keys or None."""

    input_norm: torch.Tensor
    qkv: torch.Tensor | Dense | Quantized
    qkv_bias: torch.Tensor | None
    o: torch.Tensor | Dense | Quantized
    o_bias: torch.Tensor | None
    post_norm: torch.Tensor
    gate_up: torch.Tensor | Dense | Quantized
    gate_up_bias: torch.Tensor | None
    down: torch.Tensor | Dense | Quantized
    down_bias: torch.Tensor | None
    window: int | None


def _address(library: str, symbol: str) -> int | None:
    lib = kernels.load(library)
    if lib is None or not hasattr(lib, symbol):
        return None
    return ctypes.cast(getattr(lib, symbol), ctypes.c_void_p).value


def _gemm_addresses() -> tuple[int | None, int | None, int | None]:
    """gemm_f32, gemm_f32_panels, gemm_bf16_panels (None where not built: the bf16 one only exists where
    gemm.c was compiled with AVX512-BF16, gemm.bf16_available())."""
    return tuple(
        _address("gemm", s) for s in ("shoal_gemm_f32", "shoal_gemm_f32_panels", "shoal_gemm_bf16_panels")
    )


def gemm_bf16_available() -> bool:
    """Whether the bf16 panels gemm kernel (shoal_gemm_bf16_panels) is built here."""
    return _gemm_addresses()[2] is not None


def _step_function():
    return kernels.function("decode_step", "shoal_decode_step", (_P, _P, _P, _P), ctypes.c_int)


def available() -> bool:
    """Whether the step kernel and every kernel a dense model needs are built here (quantized linears also
    need qgemv's: `qgemv.supported`)."""
    return _step_function() is not None and None not in _kernel_addresses()


def _kernel_addresses() -> tuple[int | None, ...]:
    return (
        _address("gemv", "shoal_gemv_f32"),
        _address("gemv", "shoal_gemv_bf16"),
        _address("fused_ops", "shoal_rms_norm"),
        _address("fused_ops", "shoal_rotary"),
        _address("fused_ops", "shoal_silu_and_mul"),
        _address("paged_decode_attention", "shoal_paged_decode_attention"),
    )


def _matrix(name: str, t: torch.Tensor, rows: int, cols: int, dtype: torch.dtype) -> None:
    if not (t.dtype is dtype and t.is_cpu and t.shape == (rows, cols) and t.is_contiguous()):
        raise ValueError(
            f"decode_step: {name} must be a contiguous CPU {dtype} [{rows}, {cols}]; got {_desc(t)}"
        )


def _quantized(name: str, q: Quantized, rows: int, cols: int, dtype: torch.dtype) -> None:
    groups = cols // q.group_size if q.group_size > 0 else 0
    packed, scale, zero = q.packed, q.scale, q.zero
    if not (
        qgemv.supported(q.bits, q.group_size, cols, scale)
        and (not q.signed or (q.bits == 8 and zero is None and qgemv.signed_supported(dtype, q.group_size)))
        and packed.dtype is torch.int32
        and packed.is_cpu
        and packed.shape == (rows, cols * q.bits // 32)
        and packed.is_contiguous()
        and scale.shape == (rows, groups)
        and scale.is_contiguous()
        and (zero is None or (zero.dtype is torch.int8 and zero.is_cpu and zero.shape == (rows, groups) and zero.is_contiguous()))
    ):  # fmt: skip
        raise ValueError(
            f"decode_step: {name} must be qgemv's layout for [{rows}, {cols}] (4/8 bits, groups of a multiple of "
            f"32 dividing {cols}, contiguous CPU tensors; signed codes: 8 bits, symmetric, groups of a multiple "
            f"of 64 on AVX512-BF16); got bits {q.bits}, group {q.group_size}, signed {q.signed}, packed "
            f"{_desc(packed)}, scale {_desc(scale)}, zero {_desc(zero)}"
        )


def _panels(name: str, d: Dense, rows: int, cols: int, dtype: torch.dtype) -> None:
    """Dense's panels, None or gemm.pack_panels' layout: float32 [ceil(rows / 16), cols, 16], bfloat16
    [ceil(rows / 32), ceil(cols / 2), 32, 2]."""
    p = d.panels
    if dtype is torch.float32:
        shape = (-(-rows // gemm.PANEL), cols, gemm.PANEL)
    else:
        shape = (-(-rows // gemm.PANEL_BF16), -(-cols // 2), gemm.PANEL_BF16, 2)
    ok = p is None or (p.dtype is dtype and p.is_cpu and p.is_contiguous() and p.shape == shape)
    if not (ok and type(d.max_rows) is int):
        raise ValueError(
            f"decode_step: {name} panels must be the gemm kernel's for a {dtype} [{rows}, {cols}] weight and "
            f"max_rows an int; got {_desc(p)}, max_rows {d.max_rows!r}"
        )


def _gemm_for(d: Dense, dtype: torch.dtype, gemms: tuple[int | None, ...]) -> int | None:
    """The address of the gemm kernel decode_step.c's linear() calls for d past GEMV_ROWS rows (None: not
    built here, or bfloat16 without panels)."""
    if dtype is torch.float32:
        return gemms[0] if d.panels is None else gemms[1]
    return gemms[2] if d.panels is not None else None


def _linear(w: torch.Tensor | Dense | Quantized, bias: torch.Tensor | None) -> _Linear:
    if isinstance(w, Quantized):
        scale_bf16 = int(w.scale.dtype is torch.bfloat16)
        out = _Linear(_QUANTIZED, w.packed.data_ptr(), _ptr(bias), w.scale.data_ptr(), _ptr(w.zero), w.bits,
                      w.group_size, scale_bf16)  # fmt: skip
        out.signed_codes = int(w.signed)
        return out
    if isinstance(w, Dense):
        out = _Linear(_DTYPES[w.weight.dtype], w.weight.data_ptr(), _ptr(bias))
        out.panels, out.gemm = _ptr(w.panels), 1
        return out
    return _Linear(_DTYPES[w.dtype], w.data_ptr(), _ptr(bias))


def _vector(name: str, t: torch.Tensor | None, size: int, dtype: torch.dtype, optional: bool = False) -> None:
    if t is None and optional:
        return
    if t is None or not (t.dtype is dtype and t.is_cpu and t.shape == (size,) and t.is_contiguous()):
        raise ValueError(f"decode_step: {name} must be a contiguous CPU {dtype} [{size}]; got {_desc(t)}")


def _desc(t: torch.Tensor | None) -> str:
    return "None" if t is None else f"{t.dtype} {tuple(t.shape)} on {t.device}, strides {t.stride()}"


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


class DecodeStack:
    """The whole decoder stack of one model for decode steps of 1 to max_tokens tokens (module docstring).

    heads, kv_heads, head_dim, intermediate, eps and scale describe the model; caches are per layer (K, V),
    each [num_slots, kv_heads, head_dim] of the weights' dtype; cos_sin float32 [max_positions, head_dim];
    final_norm [hidden]. ValueError if any tensor is not as described (see decode_step.c for every layout).
    The tensors must outlive this object (it keeps them referenced)."""

    def __init__(
        self,
        layers: list[LayerWeights],
        caches: list[tuple[torch.Tensor, torch.Tensor]],
        final_norm: torch.Tensor,
        cos_sin: torch.Tensor,
        *,
        heads: int,
        kv_heads: int,
        head_dim: int,
        eps: float,
        scale: float,
        block_size: int,
    ):
        dtype = final_norm.dtype
        if dtype not in _DTYPES or not layers or len(caches) != len(layers):
            raise ValueError(
                f"decode_step: float32/bfloat16 weights and one cache pair per layer; got {dtype}"
            )
        hidden, inter = final_norm.shape[0], layers[0].down.shape[1]
        num_slots = caches[0][0].shape[0]
        if num_slots % block_size:
            raise ValueError(f"decode_step: {num_slots} cache slots are not whole blocks of {block_size}")
        self.dtype, self.hidden = dtype, hidden
        self.sizes = {"qkv": (heads + 2 * kv_heads) * head_dim, "q": heads * head_dim, "gate_up": 2 * inter}
        self.sizes |= {"attn": heads * head_dim, "act": inter, "x": hidden, "residual": hidden}
        self.dims = _Dims(hidden, heads, kv_heads, head_dim, inter, len(layers), num_slots, block_size)
        self.dims.max_positions, self.dims.bf16 = cos_sin.shape[0], _DTYPES[dtype]
        self.dims.eps, self.dims.scale = eps, scale
        _matrix("cos_sin", cos_sin, cos_sin.shape[0], head_dim, torch.float32)
        _vector("final_norm", final_norm, hidden, dtype)
        self.layer_table = (_Layer * len(layers))()
        for i, (layer, cache) in enumerate(zip(layers, caches, strict=True)):
            self._check_layer(i, layer, cache, (num_slots, kv_heads, head_dim))
            self.layer_table[i] = self._layer_struct(layer, cache)
        gemms = _gemm_addresses()
        self.kernels = _Kernels(*_kernel_addresses(), _address("qgemv", "shoal_qgemv"), *gemms)
        self._layers = (layers, caches)  # the table points into them: keep them alive
        self.final_norm, self.cos_sin = final_norm, cos_sin
        # Steps of more than GEMV_ROWS tokens where every linear has a gemm route whose kernel is built.
        linears = [m for w in layers for m in (w.qkv, w.o, w.gate_up, w.down)]
        batched = all(isinstance(m, Dense) and _gemm_for(m, dtype, gemms) for m in linears)
        most = min([MAX_TOKENS] + [m.max_rows for m in linears if isinstance(m, Dense)])
        self.max_tokens = max(GEMV_ROWS, most) if batched else GEMV_ROWS
        # gemm.choose_bf16_decode_loop's result, set by the model's builder (model/fused_decode.py)
        self.bf16_calibration: dict | None = None
        self._scratch: dict[str, torch.Tensor] = {}
        self._capacity = 0

    def _check_layer(self, i: int, w: LayerWeights, cache: tuple[torch.Tensor, torch.Tensor], shape) -> None:
        dt, hidden, s = self.dtype, self.hidden, self.sizes
        for name, norm in (("input_norm", w.input_norm), ("post_norm", w.post_norm)):
            _vector(f"layer {i} {name}", norm, hidden, dt)
        for name, mat, bias, rows, cols in (
            ("qkv", w.qkv, w.qkv_bias, s["qkv"], hidden),
            ("o", w.o, w.o_bias, hidden, s["attn"]),
            ("gate_up", w.gate_up, w.gate_up_bias, s["gate_up"], hidden),
            ("down", w.down, w.down_bias, hidden, s["act"]),
        ):
            if isinstance(mat, Quantized):
                _quantized(f"layer {i} {name}", mat, rows, cols, dt)
            elif isinstance(mat, Dense):
                _matrix(f"layer {i} {name}", mat.weight, rows, cols, dt)
                _panels(f"layer {i} {name}", mat, rows, cols, dt)
            else:
                _matrix(f"layer {i} {name}", mat, rows, cols, dt)
            _vector(f"layer {i} {name} bias", bias, rows, dt, optional=True)
        for name, c in zip(("k_cache", "v_cache"), cache, strict=True):
            if not (c.dtype is dt and c.is_cpu and tuple(c.shape) == shape and c.is_contiguous()):
                raise ValueError(
                    f"decode_step: layer {i} {name} must be a contiguous CPU {dt} {shape}; got {_desc(c)}"
                )

    @staticmethod
    def _layer_struct(w: LayerWeights, cache: tuple[torch.Tensor, torch.Tensor]) -> _Layer:
        linears = (_linear(w.qkv, w.qkv_bias), _linear(w.o, w.o_bias), _linear(w.gate_up, w.gate_up_bias))
        return _Layer(_ptr(w.input_norm), _ptr(w.post_norm), *linears, _linear(w.down, w.down_bias),
                      *map(_ptr, cache), w.window or 0)  # fmt: skip

    def _buffers(self, tokens: int) -> dict[str, torch.Tensor]:
        """One set of scratch buffers [capacity, size] for every step: the first `tokens` rows of each are
        the step's contiguous [tokens, size] (same base address), so its capacity grows by doubling to the
        largest step seen (at most max_tokens; SmolLM2-135M: 31.5 KB a token in float32, 8 MB for 256)."""
        if tokens > self._capacity:
            self._capacity = min(max(GEMV_ROWS, 1 << (tokens - 1).bit_length()), self.max_tokens)
            self._scratch = {
                n: torch.empty(self._capacity, size, dtype=self.dtype) for n, size in self.sizes.items()
            }
        return self._scratch

    def run(
        self,
        embeddings: torch.Tensor,
        positions: torch.Tensor,
        slots: torch.Tensor,
        block_tables: torch.Tensor,
        context_lens: torch.Tensor,
        between_layers: Callable[[], None] | None = None,
    ) -> torch.Tensor:
        """Final hidden states [T, hidden] (a view of a scratch buffer, valid until the next run) for
        embeddings [T, hidden] of the weights' dtype, positions and slots int64 [T], block_tables int32
        [T, W] and context_lens int32 [T] (keys per sequence including the new token); 1 <= T <= max_tokens
        (MAX_TOKENS where every linear is Dense with its gemm kernel built, else GEMV_ROWS). ValueError for
        anything else, and for positions, slots, block ids or lengths out of range, raised before anything
        is written. between_layers: called between every two decoder layers, as the per-op forward calls
        it; what it raises (StepInterrupted, engine/interrupt.py) stops the step there and is raised again
        here."""
        tokens = embeddings.shape[0] if embeddings.dim() == 2 else 0
        self._check_step(embeddings, positions, slots, block_tables, context_lens, tokens)
        buf = self._buffers(tokens)
        step = _Step(
            embeddings.data_ptr(),
            self.final_norm.data_ptr(),
            self.cos_sin.data_ptr(),
            positions.data_ptr(),
            slots.data_ptr(),
            block_tables.data_ptr(),
            context_lens.data_ptr(),
            *(buf[n].data_ptr() for n in ("residual", "x", "qkv", "q", "attn", "gate_up", "act")),
        )
        step.tokens, step.table_width, step.threads = tokens, block_tables.shape[1], torch.get_num_threads()
        raised: list[BaseException] = []
        if between_layers is not None:
            step.between_layers = _BetweenLayers(lambda: _call_catching(between_layers, raised))
        status = _step_function()(
            ctypes.byref(self.kernels), ctypes.byref(self.dims), self.layer_table, ctypes.byref(step)
        )
        if status == _STOPPED and raised:
            raise raised[0]
        kernels.check_status(
            status, "decode_step", lambda: self._explain(positions, slots, block_tables, context_lens)
        )
        return buf["x"][:tokens]

    def _check_step(self, embeddings, positions, slots, block_tables, context_lens, tokens: int) -> None:
        i64, i32 = torch.int64, torch.int32
        if not (
            1 <= tokens <= self.max_tokens
            and embeddings.dtype is self.dtype
            and embeddings.shape == (tokens, self.hidden)
            and all(
                t.is_cpu and t.is_contiguous()
                for t in (embeddings, positions, slots, block_tables, context_lens)
            )
            and positions.dtype is i64
            and slots.dtype is i64
            and positions.shape == (tokens,)
            and slots.shape == (tokens,)
            and block_tables.dtype is i32
            and block_tables.dim() == 2
            and block_tables.shape[0] == tokens
            and block_tables.shape[1] >= 1
            and context_lens.dtype is i32
            and context_lens.shape == (tokens,)
        ):
            raise ValueError(
                f"decode_step: 1-{self.max_tokens} tokens: embeddings {self.dtype} [T, {self.hidden}], positions and "
                "slots int64 [T], block_tables int32 [T, W], context_lens int32 [T], contiguous on the CPU; got "
                + ", ".join(_desc(t) for t in (embeddings, positions, slots, block_tables, context_lens))
            )

    def _explain(self, positions, slots, block_tables, context_lens) -> str:
        """What the C check refused, found again here (only on failure)."""
        d, width = self.dims, block_tables.shape[1]
        for t, (pos, slot, n) in enumerate(
            zip(positions.tolist(), slots.tolist(), context_lens.tolist(), strict=True)
        ):
            if not 0 <= pos < d.max_positions:
                return f"token {t}: position {pos} outside the rotary table [0, {d.max_positions})"
            if not 0 <= slot < d.num_slots:
                return f"token {t}: slot {slot} outside the cache [0, {d.num_slots})"
            if not 1 <= n <= width * d.block_size:
                return f"sequence {t}: context length {n} outside [1, {width * d.block_size}] for its table"
            used = block_tables[t, : -(-n // d.block_size)].tolist()
            if any(not 0 <= b < d.num_slots // d.block_size for b in used):
                return f"sequence {t}: a block id in {used} outside [0, {d.num_slots // d.block_size})"
        return "an input out of range"


def _call_catching(fn: Callable[[], None], raised: list[BaseException]) -> int:
    """fn() from the C layer loop: 0, or 1 with what it raised kept in raised (an exception must not cross
    the C frames: ctypes would print it and go on)."""
    try:
        fn()
    except BaseException as e:  # noqa: BLE001 - raised again by run() once the C call has returned
        raised.append(e)
        return 1
    return 0


def supported(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether decode steps on this device and dtype can run here as one native call."""
    return (
        device.type == "cpu"
        and dtype in _DTYPES
        and fused_ops.supported(device, dtype)
        and attention_kernel.supported(device, dtype)
        and available()
    )
