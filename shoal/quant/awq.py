"""AWQ: scale up the input channels that carry large activations before rounding, then clip each group's
range, both chosen by searching for the smallest output error on calibration inputs.

What it decides: one scale s per input channel, shared by the linears that read the same input (q/k/v
after input_layernorm, gate/up after post_attention_layernorm), and one clipping range per weight group.
The layer then computes (x / s) @ Q(W * s)^T, with 1/s folded into whatever produces x (the RMSNorm's
weight, or the rows of the linear before). Why: a few input channels have activations 10-100x the
others; the weights they multiply matter most, and multiplying them by s > 1 before rounding shrinks
their relative rounding error, while the channels scaled down matter little. s = mean|x|^alpha, with
alpha in 0, 0.05, ..., 0.95 searched on the output error (alpha = 0 is plain round-to-nearest, so the
search never does worse than it on the calibration inputs). Clipping then shrinks each group's max |w| by
up to half, in 20ths, where that lowers the group's output error: fewer levels are spent on outliers.
Lin et al., "AWQ: Activation-aware Weight Quantization for LLM Compression and Acceleration" (2023,
arXiv:2306.00978); reference code mit-han-lab/llm-awq `awq/quantize/auto_scale.py` (`auto_scale_block`,
`_search_module_scale`) and `awq/quantize/auto_clip.py` (`auto_clip_layer`).

Differences from the reference: the loss is the linears' own outputs (concatenated), not the output of
the whole attention or MLP block, so one function serves every group of linears; everything runs in
float32 on whatever device the tensors are on (the CPU included).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from shoal.quant.gptq import QuantResult, grid_params, round_to_grid, rtn_quantize

ALPHA_GRID = 20  # alphas 0, 1/20, ..., 19/20, as the reference
CLIP_GRID = 20  # shrink steps of 1/20 ...
CLIP_MAX_SHRINK = 0.5  # ... down to half the group's max |w|
CLIP_SAMPLE_ROWS = 512  # input rows the clipping search measures on, evenly spaced (as the reference)


@dataclass
class AWQResult:
    """input_scales: [in] float32 s; the quantized layers expect x / s (fold 1/s into the producer of x).
    weights: one QuantResult per linear, of W * s (clipped), in the order given.
    alpha: the exponent chosen. loss: the mean squared output error at that alpha, before clipping."""

    input_scales: torch.Tensor
    weights: list[QuantResult]
    alpha: float
    loss: float


def awq_quantize(
    weights: list[torch.Tensor],
    x: torch.Tensor,
    activation_abs_mean: torch.Tensor | None = None,
    bits: int = 4,
    group_size: int = 128,
    clip: bool | list[bool] = True,
    scale_dtype: torch.dtype = torch.float32,
    search: bool = True,
) -> AWQResult:
    """Search AWQ scales and clipping for linears sharing one input, and quantize them (asymmetric).

    weights: [out_i, in] each, any float dtype. x: calibration inputs [n, in] (a few hundred to a few
    thousand rows are enough; cost grows with n). activation_abs_mean: [in] mean |x| per channel over all
    calibration data (default: from x). group_size: a divisor of `in` (-1 or 0: one group per row).
    clip: search clipping for every linear, or one flag per linear (the reference skips q and k, whose
    errors the attention product amplifies: pass q, k, v as three weights and [False, False, True]).
    scale_dtype: the dtype the group scales will be stored in (see shoal.quant.gptq.grid_params).
    search: False keeps s = 1 (clipping only), for an input whose producer cannot absorb 1/s: o_proj
    under grouped-query attention, where v_proj has fewer rows than o_proj has inputs (the reference
    scales o_proj only when the shapes match).
    Raises ValueError for shapes or flags that disagree or a group size that does not divide `in`.
    """
    in_features = weights[0].shape[1]
    if any(w.shape[1] != in_features for w in weights):
        raise ValueError("linears in one AWQ group must share their input size")
    x = x.detach().reshape(-1, x.shape[-1]).float()
    if x.shape[1] != in_features:
        raise ValueError(f"inputs have {x.shape[1]} features, the weights {in_features}")
    gs = in_features if group_size in (-1, 0) else group_size
    if gs <= 0 or in_features % gs:
        raise ValueError(f"group_size {group_size} does not divide the {in_features} input features")
    w = torch.cat([t.detach().float() for t in weights])
    mean = x.abs().mean(0) if activation_abs_mean is None else activation_abs_mean.float()
    if search:
        scales, alpha, loss = search_scales(w, x, mean, bits, gs, scale_dtype)
    else:
        scales, alpha, loss = torch.ones(in_features), 0.0, float("nan")
    ws, xs = w * scales, x / scales
    outs = [t.shape[0] for t in weights]
    flags = [clip] * len(weights) if isinstance(clip, bool) else list(clip)
    if len(flags) != len(weights):
        raise ValueError(f"clip has {len(flags)} flags for {len(weights)} linears")
    rows = torch.cat([torch.full((n,), f) for n, f in zip(outs, flags, strict=True)])
    max_val = torch.full((w.shape[0], in_features // gs), float("inf"))
    if rows.any():
        max_val[rows] = search_clip(ws[rows], xs, bits, gs, scale_dtype)
    quantized = _quantize_groups(ws, bits, gs, max_val, scale_dtype)
    parts = [
        _split_rows(quantized, start, n, group_size) for start, n in zip(_starts(outs), outs, strict=True)
    ]
    return AWQResult(input_scales=scales, weights=parts, alpha=alpha, loss=loss)


def search_scales(
    w: torch.Tensor,
    x: torch.Tensor,
    abs_mean: torch.Tensor,
    bits: int,
    group_size: int,
    scale_dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, float, float]:
    """The per-channel scales s [in] minimizing ||x w^T - x (Q(w s) / s)^T||^2, their alpha and loss.

    w: [out, in] float32, x: [n, in] float32, abs_mean: [in]. s = abs_mean^alpha, normalized so that
    max(s) * min(s) = 1 (the reference's normalization).
    """
    gram = _gram(x)
    best = (float("inf"), 0.0, torch.ones_like(abs_mean))
    for step in range(ALPHA_GRID):
        alpha = step / ALPHA_GRID
        s = abs_mean.pow(alpha).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        wq = _quantize_groups(w * s, bits, group_size, None, scale_dtype).dequantized / s
        loss = _output_error(wq - w, x, gram).mean().item()
        if loss < best[0]:
            best = (loss, alpha, s)
    loss, alpha, s = best
    return s, alpha, loss


def search_clip(
    w: torch.Tensor, x: torch.Tensor, bits: int, group_size: int, scale_dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Per-group clipping thresholds [out, groups] minimizing each group's output error on x.

    w: [out, in] float32 (already scaled), x: [n, in] float32 (already divided by the scales). Each group
    of `group_size` input columns is clamped to [-t, t], t = max|w_group| * (1 - k / 20), k < 10.
    """
    x = x[:: max(1, x.shape[0] // CLIP_SAMPLE_ROWS)]
    out_features, in_features = w.shape
    n_groups = in_features // group_size
    wg = w.reshape(out_features, n_groups, group_size)
    xg = x.reshape(-1, n_groups, group_size)
    original_max = wg.abs().amax(dim=2)
    best_max = original_max.clone()
    best_err = torch.full_like(original_max, float("inf"))
    for g in range(n_groups):
        xi, wi = xg[:, g, :], wg[:, g, :]
        gram = _gram(xi)
        for step in range(int(CLIP_MAX_SHRINK * CLIP_GRID)):
            limit = original_max[:, g] * (1 - step / CLIP_GRID)
            clipped = torch.maximum(torch.minimum(wi, limit[:, None]), -limit[:, None])
            scale, zero = grid_params(clipped, bits, False, scale_dtype)
            q = (round_to_grid(clipped, scale, zero, bits) - zero[:, None]) * scale[:, None]
            err = _output_error(q - wi, xi, gram)
            better = err < best_err[:, g]
            best_err[:, g] = torch.where(better, err, best_err[:, g])
            best_max[:, g] = torch.where(better, limit, best_max[:, g])
    return best_max


def _gram(x: torch.Tensor) -> torch.Tensor | None:
    """x^T x [in, in] when x [n, in] has more rows than columns, else None (then x itself is cheaper)."""
    return x.T @ x if x.shape[0] > x.shape[1] else None


def _output_error(d: torch.Tensor, x: torch.Tensor, gram: torch.Tensor | None) -> torch.Tensor:
    """Per output row i of a weight error d [out, in]: the mean over x's rows [n, in] of (x d_i)^2, i.e.
    d_i^T (x^T x) d_i / n. With the Gram matrix it costs out * in^2 instead of n * in * out: the searches
    score 20 candidates on n = 4,096 (scales) or 512 (clipping) rows of in = 576-1,536 (or 64) columns, so
    this is 3-8x fewer multiply-adds for the same sums, in another order. [out] float32."""
    if gram is None:
        return (x @ d.T).pow(2).mean(0)
    return ((d @ gram) * d).sum(1) / x.shape[0]


def _quantize_groups(
    w: torch.Tensor, bits: int, group_size: int, max_val: torch.Tensor | None, scale_dtype: torch.dtype
) -> QuantResult:
    """Asymmetric round-to-nearest of w [out, in] per group, after clamping groups to [-max_val, max_val]."""
    if max_val is not None:
        limit = max_val.reshape(-1, 1)
        groups = w.reshape(-1, group_size)
        w = torch.maximum(torch.minimum(groups, limit), -limit).reshape(w.shape)
    return rtn_quantize(w, bits, group_size, False, scale_dtype)


def _starts(sizes: list[int]) -> list[int]:
    return [sum(sizes[:i]) for i in range(len(sizes))]


def _split_rows(q: QuantResult, start: int, rows: int, group_size: int) -> QuantResult:
    end = start + rows
    return QuantResult(
        qweight=q.qweight[start:end].clone(),
        scales=q.scales[start:end].clone(),
        zeros=q.zeros[start:end].clone(),
        g_idx=q.g_idx.clone(),
        dequantized=q.dequantized[start:end].clone(),
        bits=q.bits,
        group_size=group_size,
        symmetric=False,
    )
