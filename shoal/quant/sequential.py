"""GPTQ and AWQ over a whole model, block by block, as their reference recipes run them ("sequential"):
each decoder block is calibrated on the outputs of the blocks before it, already quantized.

What it decides: the order of work and what each block sees. The 16-bit model is loaded with shoal's own
loader in float32 with plain (unpacked) linears; `BlockwiseCalibration` (calibration.py) runs one block
at a time over the calibration windows. For each block: capture the inputs of its four fused linears
(qkv, o, gate_up, down) once, quantize each with gptq.py from its Hessian, write the weight the served
model will compute with (scales rounded to the checkpoint's dtype) back into the linear, then run the block
to produce the next block's input. q/k/v and gate/up share their input and so their Hessian; GPTQ treats
rows independently given the Hessian, so quantizing the fused weight equals quantizing each part, and
the result is split back into the checkpoint's q/k/v and gate/up rows.
Layers the group plan keeps 16-bit are left as they are. Memory: the model in float32, the residual stream
of every window, and one block's Hessians ([in, in] float64 each).

AWQ (awq.py finds per-input-channel scales s and clipping; asymmetric, as in the paper) must also move 1/s
into whatever produces each linear's input, so that the saved model computes (x / s) Q(W s)^T, as
llm-awq's `apply_scale` does: qkv's 1/s goes into input_layernorm's weight, gate_up's into
post_attention_layernorm's, down_proj's into the rows of up_proj (its input is act(gate) * up), and
o_proj's into the rows of v_proj where they match one to one (no grouped-query attention; otherwise o_proj
gets clipping only). The folds into up and v rows happen before those are quantized, so each block runs in
the order o_proj, down_proj, then qkv and gate_up. The changed norm weights are returned with the
quantized weights, to be saved in the checkpoint.
"""

from __future__ import annotations

from pathlib import Path

import torch

from shoal.model.loader import load_model
from shoal.quant.awq import awq_quantize
from shoal.quant.calibration import BlockwiseCalibration
from shoal.quant.gptq import GPTQOptions, QuantResult, gptq_quantize
from shoal.quant.rtn import QuantizedWeight

# our fused linear -> the checkpoint linears it is made of, in row order
BLOCK_LINEARS = {
    "self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "self_attn.o_proj": ("self_attn.o_proj",),
    "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"),
    "mlp.down_proj": ("mlp.down_proj",),
}


def gptq_model(
    model_dir: Path,
    group_sizes: dict[str, int],
    bits: int,
    symmetric: bool,
    calib_ids: torch.Tensor,
    scale_dtype: torch.dtype,
    progress=None,
    options: GPTQOptions | None = None,
    smooth=None,
    threads: int | None = None,
) -> dict[str, QuantizedWeight]:
    """Checkpoint linear name -> its GPTQ-quantized weight, for every linear in group_sizes.

    group_sizes: as groups.plan_groups gives them (checkpoint names, PER_CHANNEL for one group a row).
    calib_ids: [samples, seq_len] int64 calibration windows. scale_dtype: the dtype scales are stored in.
    progress: optional callable(block_index, num_blocks) after each block. options: observer, act-order,
    dampening and true-sequential capture (default GPTQOptions()). smooth: optional callable(block_index,
    layer, stats) run on each block's first capture before anything is quantized, which may change the
    block's weights and rescale the captured Hessians (smoothquant.smooth_block); not with true-sequential
    capture (ValueError). threads: torch threads for the block forwards (BlockwiseCalibration)."""
    options = options or GPTQOptions()
    if smooth is not None and options.true_sequential:
        raise ValueError("smoothing inside GPTQ's pass needs one capture per block, not --true-sequential")
    model, cfg = load_model(model_dir, torch.float32, torch.device("cpu"), pack=False)
    blocks = BlockwiseCalibration(model, calib_ids, threads=threads)
    result: dict[str, QuantizedWeight] = {}
    for i in range(cfg.num_layers):
        todo = {
            f"layers.{i}.{fused}": [f"model.layers.{i}.{p}" for p in parts]
            for fused, parts in BLOCK_LINEARS.items()
            if f"model.layers.{i}.{parts[0]}" in group_sizes
        }
        stats = blocks.capture(list(todo)) if todo and not options.true_sequential else {}
        if smooth is not None and stats:
            smooth(i, model.layers[i], stats)
        for name, parts in todo.items():
            if options.true_sequential:  # this linear's inputs, after the ones before it were quantized
                stats = blocks.capture([name])
            linear = model.get_submodule(name)
            qw = _gptq_linear(linear.weight, stats[name].hessian.hessian(), bits, group_sizes[parts[0]],
                              symmetric, scale_dtype, options)  # fmt: skip
            with torch.no_grad():
                linear.weight.copy_(qw.dequantize(torch.float32))
            result.update(zip(parts, _split_rows(qw, [_rows(model, cfg, p) for p in parts]), strict=True))
        blocks.advance()
        if progress is not None:
            progress(i + 1, cfg.num_layers)
    return result


def _gptq_linear(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    bits: int,
    size: int,
    symmetric: bool,
    scale_dtype: torch.dtype,
    options: GPTQOptions,
) -> QuantizedWeight:
    q = gptq_quantize(
        weight,
        hessian,
        bits,
        size or -1,
        symmetric=symmetric,
        percdamp=options.dampening_frac,
        act_order=options.act_order,
        scale_dtype=scale_dtype,
        observer=options.observer,
        static_groups=options.act_order,  # act-order keeps plain groups: the checkpoint needs no g_idx
    )
    return QuantizedWeight(q.qweight, q.scales.to(scale_dtype), None if symmetric else q.zeros, bits, size)


# input rows kept per linear for the scale and clipping searches: 512 scored SmolLM2 g64 at 1.267x perplexity
# on the full protocol (128 x 512 calibration), 4096 at 1.165x, for 426 s of calibration against 321 s
# (Xeon, float32; the searches then scored candidates as x @ w^T: awq.py's Gram form made the reduced 16 x 256
# calibration 3.6x faster on the AVX512-BF16 EPYC, 232 -> 65 s, same choices)
AWQ_SAMPLE_ROWS = 4096


def awq_model(
    model_dir: Path,
    group_sizes: dict[str, int],
    bits: int,
    calib_ids: torch.Tensor,
    scale_dtype: torch.dtype,
    progress=None,
) -> tuple[dict[str, QuantizedWeight], dict[str, torch.Tensor]]:
    """(checkpoint linear name -> AWQ-quantized weight, checkpoint norm weight name -> new value in
    scale_dtype) for every linear in group_sizes; arguments as gptq_model. A fused linear is searched as
    one group (its parts share their input); all parts must be in group_sizes or none."""
    model, cfg = load_model(model_dir, torch.float32, torch.device("cpu"), pack=False)
    blocks = BlockwiseCalibration(model, calib_ids)
    weights: dict[str, QuantizedWeight] = {}
    norms: dict[str, torch.Tensor] = {}
    mha = cfg.num_heads == cfg.num_kv_heads
    order = ("self_attn.o_proj", "mlp.down_proj", "self_attn.qkv_proj", "mlp.gate_up_proj")
    for i in range(cfg.num_layers):
        layer = model.layers[i]
        todo = [f for f in order if f"model.layers.{i}.{BLOCK_LINEARS[f][0]}" in group_sizes]
        names = [f"layers.{i}.{f}" for f in todo]
        stats = blocks.capture(names, hessian=False, max_sample_rows=AWQ_SAMPLE_ROWS) if names else {}
        for fused in todo:
            parts = [f"model.layers.{i}.{p}" for p in BLOCK_LINEARS[fused]]
            linear = model.get_submodule(f"layers.{i}.{fused}")
            rows = [_rows(model, cfg, p) for p in parts]
            x, mean = stats[f"layers.{i}.{fused}"].sample_rows(), stats[f"layers.{i}.{fused}"].abs_mean()
            search = fused != "self_attn.o_proj" or mha
            clip = [False, False, True] if fused == "self_attn.qkv_proj" else True
            pieces = list(linear.weight.split(rows))
            result = awq_quantize(
                pieces, x, mean, bits, group_sizes[parts[0]] or -1, clip, scale_dtype, search
            )
            s = result.input_scales
            with torch.no_grad():
                _fold(layer, fused, s, cfg, norms, i, scale_dtype)
                deq = torch.cat([q.dequantized for q in result.weights])
                linear.weight.copy_(deq)
            for part, q in zip(parts, result.weights, strict=True):
                weights[part] = _from_result(q, scale_dtype)
        blocks.advance()
        if progress is not None:
            progress(i + 1, cfg.num_layers)
    return weights, norms


def _fold(layer, fused: str, s: torch.Tensor, cfg, norms: dict, i: int, dtype: torch.dtype) -> None:
    """Divide the producer of a linear's input by s (see the module docstring)."""
    if fused == "self_attn.qkv_proj":
        norm, name = layer.input_layernorm, f"model.layers.{i}.input_layernorm.weight"
    elif fused == "mlp.gate_up_proj":
        norm, name = layer.post_attention_layernorm, f"model.layers.{i}.post_attention_layernorm.weight"
    else:
        if bool((s == 1).all()):
            return
        if fused == "mlp.down_proj":  # up rows are the second half of gate_up
            producer, start = layer.mlp.gate_up_proj, cfg.intermediate_size
        else:  # o_proj without grouped-query attention: v rows follow q and k
            producer, start = layer.self_attn.qkv_proj, 2 * cfg.num_kv_heads * cfg.head_dim
        producer.weight[start : start + s.numel()] /= s[:, None]
        if producer.bias is not None:
            producer.bias[start : start + s.numel()] /= s
        return
    value = (norm.weight.float() / s).to(dtype)
    norm.weight.copy_(value.to(norm.weight.dtype))
    norms[name] = value


def _from_result(q: QuantResult, scale_dtype: torch.dtype) -> QuantizedWeight:
    return QuantizedWeight(
        q.qweight, q.scales.to(scale_dtype), q.zeros, q.bits, q.group_size if q.group_size > 0 else 0
    )


def _rows(model, cfg, checkpoint_name: str) -> int:
    leaf = checkpoint_name.rsplit(".", 1)[1]
    return {
        "q_proj": cfg.num_heads * cfg.head_dim,
        "k_proj": cfg.num_kv_heads * cfg.head_dim,
        "v_proj": cfg.num_kv_heads * cfg.head_dim,
        "gate_proj": cfg.intermediate_size,
        "up_proj": cfg.intermediate_size,
        "o_proj": cfg.hidden_size,
        "down_proj": cfg.hidden_size,
    }[leaf]


def _split_rows(qw: QuantizedWeight, rows: list[int]) -> list[QuantizedWeight]:
    def part(t: torch.Tensor | None, start: int, n: int):
        return None if t is None else t[start : start + n].contiguous()

    starts = [sum(rows[:k]) for k in range(len(rows))]
    return [
        QuantizedWeight(
            part(qw.qweight, s, n), part(qw.scale, s, n), part(qw.zero_point, s, n), qw.bits, qw.group_size
        )
        for s, n in zip(starts, rows, strict=True)
    ]
