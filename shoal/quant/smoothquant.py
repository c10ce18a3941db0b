"""SmoothQuant (Xiao et al. 2022, arXiv:2211.10438): move activation outliers into the weights before
8-bit quantization, with per-input-channel factors s_j = max|X_j|^alpha / max|W_j|^(1 - alpha).

The linear then sees x / s and computes with W * s (columns), the same product; 1/s is folded into what
produces x, so the served model costs nothing extra. Folded here, on the checkpoint's tensors:
- qkv (q/k/v_proj share their input): 1/s into `input_layernorm.weight` (RMSNorm: y = norm(x) * g);
- gate/up: into `post_attention_layernorm.weight`;
- down_proj: into the rows of up_proj (down's input is act(gate) * up, linear in up's rows);
- o_proj: into the rows of v_proj only without grouped-query attention (o's input channel j is v's row j
  only when every head has its own v); with GQA (SmolLM2: 9 heads, 3 KV heads) o_proj is not smoothed.
max|X_j| comes from one pass of the 16-bit model in float32 over calibration windows (smooth_checkpoint);
max|W_j| is over the rows of every linear that shares the input. s is clamped to >= 1e-5, as in the
reference implementation (smoothquant/smooth.py).

With GPTQ weights, `smooth_block` does the same inside GPTQ's block-by-block pass instead (as
llm-compressor's sequential pipeline does): each block is smoothed from the inputs captured for its
Hessians (the outputs of the blocks before it, already quantized), in float32, and the Hessians are
rescaled to the smoothed inputs x / s (diag(1/s) X^T X diag(1/s), exact), so no separate pass of the model
and no rounding of the smoothed weights to the checkpoint's dtype before they are quantized.
"""

from __future__ import annotations

import torch
from torch import nn

from shoal.quant.calibration import LinearInputs, forward_windows

# our fused linear -> (the checkpoint linears it reads, the producer of its input, fold kind)
SMOOTH_TARGETS = {
    "self_attn.qkv_proj": (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "input_layernorm"),
    "mlp.gate_up_proj": (("mlp.gate_proj", "mlp.up_proj"), "post_attention_layernorm"),
    "mlp.down_proj": (("mlp.down_proj",), "mlp.up_proj"),
    "self_attn.o_proj": (("self_attn.o_proj",), "self_attn.v_proj"),
}


def activation_absmax(
    model: nn.Module,
    token_ids: torch.Tensor,
    batch_size: int = 4,
    samples: dict[str, torch.Tensor] | None = None,
    max_rows: int = 512,
    ranges: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> dict[str, torch.Tensor]:
    """Fused linear name (e.g. layers.0.self_attn.qkv_proj) -> float32 [in] max |x_j| over every input row
    the model's decoder linears see on token_ids [samples, seq_len].
    samples: if given, filled with name -> float32 [<= max_rows, in], input rows spread evenly over the
    batches, drawn with a fixed seed (for a percentile observer).
    ranges: if given, filled with name -> (min_j x_j, max_j x_j), float32 [in] each (for asymmetric scales);
    max |x_j| is derived from them, max(-min_j, max_j)."""
    bounds: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    kept: dict[str, list[torch.Tensor]] = {}
    generator = torch.Generator().manual_seed(0)
    batches = token_ids.split(batch_size)
    rows_per_batch = max(1, max_rows // len(batches))

    def hook(name: str):
        def record(module, args, output) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1])
            lo, hi = x.amin(0).float(), x.amax(0).float()
            if name in bounds:
                lo, hi = torch.minimum(bounds[name][0], lo), torch.maximum(bounds[name][1], hi)
            bounds[name] = (lo, hi)
            if samples is not None:
                rows = torch.randperm(x.shape[0], generator=generator)[:rows_per_batch]
                kept.setdefault(name, []).append(x[rows].float())

        return record

    handles = [
        model.get_submodule(f"layers.{i}.{fused}").register_forward_hook(hook(f"layers.{i}.{fused}"))
        for i in range(len(model.layers))
        for fused in SMOOTH_TARGETS
    ]
    try:
        with torch.inference_mode():
            for batch in batches:
                forward_windows(model, batch)
    finally:
        for h in handles:
            h.remove()
    if samples is not None:
        samples.update({name: torch.cat(rows) for name, rows in kept.items()})
    if ranges is not None:
        ranges.update(bounds)
    return {name: torch.maximum(-lo, hi) for name, (lo, hi) in bounds.items()}


def check_alpha(alpha: float) -> None:
    """ValueError for a smoothing strength outside [0, 1]."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"--smoothquant-alpha={alpha}: must lie in [0, 1]")


def smoothing_factors(act_absmax: torch.Tensor, weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """s [in] float32 = max|X_j|^alpha / max|W_j|^(1-alpha), W_j over all weights' column j; >= 1e-5.
    act_absmax float [in]; weights [out_i, in] each. ValueError for alpha outside [0, 1]."""
    check_alpha(alpha)
    w_max = torch.cat([w.float().abs() for w in weights]).amax(0).clamp(min=1e-5)
    s = act_absmax.float().clamp(min=1e-5).pow(alpha) / w_max.pow(1 - alpha)
    return s.clamp(min=1e-5)


def smooth_checkpoint(
    tensors: dict[str, torch.Tensor],
    act_absmax: dict[str, torch.Tensor],
    alpha: float,
    num_layers: int,
    gqa: bool,
    skip: set[str] = frozenset(),
) -> dict[str, torch.Tensor]:
    """Fold SmoothQuant factors into checkpoint tensors (names as in the safetensors file), in place, each
    tensor kept in its dtype. act_absmax: as activation_absmax gives it. gqa: o_proj is then left alone.
    skip: checkpoint linear names not to smooth (e.g. layers kept 16-bit).
    Returns fused linear name -> the s it used (float32 [in]), to rescale static activation ranges."""
    used: dict[str, torch.Tensor] = {}
    for i in range(num_layers):
        prefix = f"model.layers.{i}."
        for fused, (parts, producer) in SMOOTH_TARGETS.items():
            if fused == "self_attn.o_proj" and gqa:
                continue
            if any(prefix + p in skip for p in parts):
                continue
            names = [f"{prefix}{p}.weight" for p in parts]
            s = smoothing_factors(act_absmax[f"layers.{i}.{fused}"], [tensors[n] for n in names], alpha)
            for n in names:
                tensors[n] = (tensors[n].float() * s).to(tensors[n].dtype)
            _divide_producer(tensors, prefix + producer, s)
            used[f"layers.{i}.{fused}"] = s
    return used


def _divide_producer(tensors: dict[str, torch.Tensor], producer: str, s: torch.Tensor) -> None:
    """Norm weight [in] / s, or a linear's rows (and bias) / s for up_proj / v_proj."""
    for suffix in ("weight", "bias"):
        name = f"{producer}.{suffix}"
        if name not in tensors:
            continue
        t = tensors[name]
        divisor = s if t.dim() == 1 else s[:, None]
        tensors[name] = (t.float() / divisor).to(t.dtype)


# the producer of each fused linear's input inside shoal's decoder block: a norm, or rows of a fused linear
_BLOCK_PRODUCERS = {
    "self_attn.qkv_proj": "input_layernorm",
    "mlp.gate_up_proj": "post_attention_layernorm",
    "mlp.down_proj": "mlp.gate_up_proj",  # its up rows
    "self_attn.o_proj": "self_attn.qkv_proj",  # its v rows
}


@torch.no_grad()
def smooth_block(
    layer: nn.Module, stats: dict[str, LinearInputs], alpha: float, block: int, cfg
) -> dict[str, torch.Tensor]:
    """Fold SmoothQuant into decoder block `block` (`layer`, shoal's fused float32 modules) in place, from the
    captured inputs `stats` (name -> LinearInputs with Hessians, as BlockwiseCalibration.capture gives them),
    whose Hessians are rescaled to the smoothed inputs. Every fused linear in stats is smoothed, o_proj only
    without grouped-query attention. Returns checkpoint norm weight name -> its new value (float32 [hidden]).
    ValueError for alpha outside [0, 1]."""
    norms: dict[str, torch.Tensor] = {}
    gqa = cfg.num_heads != cfg.num_kv_heads
    for fused, producer in _BLOCK_PRODUCERS.items():
        name = f"layers.{block}.{fused}"
        if name not in stats or (fused == "self_attn.o_proj" and gqa):
            continue
        linear = layer.get_submodule(fused)
        s = smoothing_factors(stats[name].abs_max, [linear.weight], alpha)
        linear.weight.mul_(s)
        stats[name].hessian.scale_inputs(1 / s)
        module = layer.get_submodule(producer)
        if producer.endswith("layernorm"):
            module.weight.div_(s)
            norms[f"model.layers.{block}.{producer}.weight"] = module.weight.detach().float().clone()
            continue
        if fused == "mlp.down_proj":  # up rows follow the gate rows
            start = cfg.intermediate_size
        else:  # v rows follow q and k
            start = (cfg.num_heads + cfg.num_kv_heads) * cfg.head_dim
        module.weight[start : start + s.numel()] /= s[:, None]
        if module.bias is not None:
            module.bias[start : start + s.numel()] /= s
    return norms
