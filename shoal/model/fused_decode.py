"""Binds a loaded Transformer to the one-call native decode step (kernels/decode_step.py).

The step kernel takes plain weight tensors, so it serves a model whose every layer is the standard one:
linears that the per-op path would run through the matrix-vector kernels for 1-4 rows, dense float32/
bfloat16 (nn.Linear, or PackedLinear keeping its plain weight; gemv.c) or pack-quantized int4/int8 with
group or channel scales (QuantizedLinear routed to qgemv.c, without an input permutation), in any mix; no
q/k norms (Qwen3 keeps the per-op path), no tensor parallelism, on a CPU where every kernel it calls is
built; 8-bit per-channel linears on torch's int8 route (CPUs with AVX512F) where their own forward runs
qgemv over that int8 weight (bfloat16 on AVX512-BF16: `QuantizedLinear.int8_qgemv`). Anything else (split
linears, the int8 route elsewhere, act-order permutations, W8A8/FP8, LoRA-like wrappers, CUDA) in any layer
gets None for the whole model, and the model's own forward runs as before. Batched steps of 5 to
decode_step.MAX_TOKENS tokens run as one call too where every linear is a PackedLinear that the per-op
path sends to shoal's gemm kernel for those rows (float32: its panels, else its plain weight; bfloat16:
its panels, where gemm.c has the AVX512-BF16 kernel; `decode_step.Dense`, up to the rows that route
takes); other models take 1-4 tokens.
SHOAL_FUSED_DECODE=0 turns it off (for A/B measurements).
"""

from __future__ import annotations

import os

import torch
from torch import nn

from shoal.kernels import decode_step, gemm, gemv
from shoal.model.packed_linear import PackedLinear
from shoal.model.transformer import DecoderLayer, Transformer
from shoal.quant.linear import QuantizedLinear


def enabled() -> bool:
    return os.environ.get("SHOAL_FUSED_DECODE", "1") != "0"


def _plain(
    linear: nn.Module, dtype: torch.dtype
) -> tuple[torch.Tensor | decode_step.Quantized, torch.Tensor | None] | None:
    """(weight, bias [out] in dtype or None) of a linear that the per-op path runs through the gemv or qgemv
    kernel for 1-4 rows, else None: the dense weight [out, in], or QuantizedLinear's buffers as
    decode_step.Quantized (its forward converts the bias to the input's dtype; so does this)."""
    if type(linear) is QuantizedLinear:
        if linear.input_perm is not None:
            return None
        if linear.int8_qgemv and dtype is torch.bfloat16:  # its forward's qgemv over torch's int8, signed
            weight = decode_step.Quantized(linear.weight_int8.view(torch.int32), linear.weight_scale, None, 8,
                                           linear.qgemv_group, signed=True)  # fmt: skip
        elif linear.use_qgemv:
            weight = decode_step.Quantized(linear.weight_packed, linear.weight_scale, linear.weight_zero_point,
                                           linear.bits, linear.qgemv_group)  # fmt: skip
        else:
            return None
    elif type(linear) is PackedLinear and linear.use_gemv:
        weight = linear.weight.detach()
        if linear.use_gemm:  # rows past gemv's go to the gemm kernel, over the panels where it made them
            weight = decode_step.Dense(weight, linear.panels, linear.gemm_max_rows - 1)
    elif type(linear) is nn.Linear and gemv.supported(linear.weight):
        weight = linear.weight.detach()
    else:
        return None
    bias = linear.bias
    return weight, None if bias is None else bias.detach().to(dtype)


def _layer_weights(layer: DecoderLayer, dtype: torch.dtype) -> decode_step.LayerWeights | None:
    attn, mlp = layer.self_attn, layer.mlp
    if attn.q_norm is not None:
        return None
    parts = [_plain(m, dtype) for m in (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)]
    if any(p is None for p in parts):
        return None
    (qkv, qkv_b), (o, o_b), (gate_up, gate_up_b), (down, down_b) = parts
    return decode_step.LayerWeights(
        layer.input_layernorm.weight.detach(),
        qkv,
        qkv_b,
        o,
        o_b,
        layer.post_attention_layernorm.weight.detach(),
        gate_up,
        gate_up_b,
        down,
        down_b,
        attn.window,
    )


def decode_stack(
    model: Transformer, kv_caches: list[tuple[torch.Tensor, torch.Tensor]], block_size: int
) -> decode_step.DecodeStack | None:
    """The one-call decode step for this model and its caches, or None where it does not apply (see the
    module docstring)."""
    weight = model.embed_tokens.weight
    if not (enabled() and type(model) is Transformer and decode_step.supported(weight.device, weight.dtype)):
        return None
    layers = [
        _layer_weights(layer, weight.dtype) if type(layer) is DecoderLayer else None for layer in model.layers
    ]
    if any(layer is None for layer in layers):
        return None
    first = model.layers[0].self_attn
    # Which of gemm.c's bf16 routes streams 1-4 rows faster on this CPU, timed on this model's weights.
    calibration = gemm.choose_bf16_decode_loop(_bf16_panels(model))
    stack = decode_step.DecodeStack(
        layers,
        kv_caches,
        model.norm.weight.detach(),
        model.rope.cos_sin_cache,
        heads=first.num_heads,
        kv_heads=first.num_kv_heads,
        head_dim=first.head_dim,
        eps=model.norm.eps,
        scale=first.scale,
        block_size=block_size,
    )
    stack.bf16_calibration = calibration
    return stack


def _bf16_panels(model: Transformer) -> list[tuple[torch.Tensor, int]]:
    """(panels, out_features) of every bfloat16 packed linear of the model (a decode step's linears)."""
    return [
        (m.panels, m.out_features)
        for m in model.modules()
        if isinstance(m, PackedLinear) and m.panels is not None and m.panels.dtype is torch.bfloat16
    ]
