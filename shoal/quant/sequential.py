"""GPTQ over a whole model, block by block, as its reference recipe runs it ("sequential"): each decoder
block is calibrated on the outputs of the blocks before it, already quantized.

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
"""

from __future__ import annotations

from pathlib import Path

import torch

from shoal.model.loader import load_model
from shoal.quant.calibration import BlockwiseCalibration
from shoal.quant.gptq import gptq_quantize
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
) -> dict[str, QuantizedWeight]:
    """Checkpoint linear name -> its GPTQ-quantized weight, for every linear in group_sizes.

    group_sizes: as groups.plan_groups gives them (checkpoint names, PER_CHANNEL for one group a row).
    calib_ids: [samples, seq_len] int64 calibration windows. scale_dtype: the dtype scales are stored in.
    progress: optional callable(block_index, num_blocks) after each block."""
    model, cfg = load_model(model_dir, torch.float32, torch.device("cpu"), pack=False)
    blocks = BlockwiseCalibration(model, calib_ids)
    result: dict[str, QuantizedWeight] = {}
    for i in range(cfg.num_layers):
        todo = {
            f"layers.{i}.{fused}": [f"model.layers.{i}.{p}" for p in parts]
            for fused, parts in BLOCK_LINEARS.items()
            if f"model.layers.{i}.{parts[0]}" in group_sizes
        }
        stats = blocks.capture(list(todo)) if todo else {}
        for name, parts in todo.items():
            linear = model.get_submodule(name)
            size = group_sizes[parts[0]]
            q = gptq_quantize(
                linear.weight, stats[name].hessian.hessian(), bits, size or -1, symmetric=symmetric
            )
            qw = QuantizedWeight(
                q.qweight, q.scales.to(scale_dtype), None if symmetric else q.zeros, bits, size
            )
            with torch.no_grad():
                linear.weight.copy_(qw.dequantize(torch.float32))
            result.update(zip(parts, _split_rows(qw, [_rows(model, cfg, p) for p in parts]), strict=True))
        blocks.advance()
        if progress is not None:
            progress(i + 1, cfg.num_layers)
    return result


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
