"""The resolution of a perplexity ratio: how far a quantized model's perplexity moves when its linears'
inputs change by float32 rounding, so that two runtimes computing the same scheme can be compared.

Why: a scheme with dynamic activation quantization (FP8 dynamic, W8A8 per-token int8) rounds each
activation to a coarse grid (3 mantissa bits for E4M3). A value near a rounding boundary goes one way or
the other on a change of one float32 ulp, and two runtimes that add in different orders (shoal's engine,
transformers) produce such changes everywhere; each flip moves an activation by a whole grid step, and
the flips compound over 30 layers. So the same scheme scores a spread of perplexities whose width is set
by the grid, not by either runtime, and a difference between two runtimes inside that spread says
nothing about their quantization. Measured here by multiplying every quantized linear's input by
(1 + JITTER * N(0, 1)) before it is quantized (JITTER is for float32 inputs; in another dtype the same
number of that dtype's ulps, as a bfloat16 input would not move by 1e-6) (a forward pre-hook, one torch.Generator per seed) and
rescoring with the issue's perplexity protocol (shoal/quant/perplexity.py). bench/llmcompressor_side.py
`--perturb-seeds` does the same on transformers with llm-compressor's fake quantization.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from shoal.quant import perplexity as ppl
from shoal.quant.eval import eval_engine
from shoal.quant.fp8 import FP8Linear
from shoal.quant.linear import QuantizedLinear
from shoal.quant.w8a8 import W8A8Linear

JITTER = 1e-6  # relative, for float32 inputs: about 8 float32 ulps
QUANTIZED = (FP8Linear, W8A8Linear, QuantizedLinear)


@dataclass
class Spread:
    """Perplexities of one model: unjittered, then one per seed (exp of mean NLL, natural log)."""

    plain: float
    jittered: list[float]


def jittered_perplexity(engine, token_ids: list[int], window: int, seed: int, rel: float = JITTER) -> float:
    """Perplexity with every quantized linear's input [rows, in] multiplied by (1 + rel * N(0, 1)), rel
    given for float32 and scaled to the same number of ulps in the input's dtype, noise drawn from a
    generator seeded with seed. ValueError from the protocol (too few tokens) or for a model without
    quantized linears."""
    gen = torch.Generator().manual_seed(seed)

    def jitter(module: nn.Module, args: tuple) -> tuple:
        x = args[0]
        ulps = rel * torch.finfo(x.dtype).eps / torch.finfo(torch.float32).eps
        noise = torch.randn(x.shape, generator=gen, dtype=torch.float32)
        return ((x.float() * (1 + ulps * noise)).to(x.dtype),) + args[1:]

    hooks = [m.register_forward_pre_hook(jitter) for m in engine.model.modules() if isinstance(m, QUANTIZED)]
    if not hooks:
        raise ValueError("the model has no quantized linear layer to jitter")
    try:
        return ppl.perplexity(engine, token_ids, window)
    finally:
        for h in hooks:
            h.remove()


def measure(model_dir: Path, eval_text: Path, num_tokens: int, seeds: int) -> Spread:
    """The model's plain perplexity and one per seed 1..seeds (none for seeds=0, as for the 16-bit base),
    on the first num_tokens of eval_text, through a `--dtype auto` engine."""
    engine = eval_engine(model_dir)
    try:
        ids = ppl.eval_tokens(engine.tokenizer, eval_text, num_tokens)
        window = ppl.window_size(engine.config.max_model_len)
        plain = ppl.perplexity(engine, ids, window)
        return Spread(plain, [jittered_perplexity(engine, ids, window, s) for s in range(1, seeds + 1)])
    finally:
        engine.close()


def markdown(spread: Spread, base: float) -> str:
    """One table: the plain ratio, each seed's, and their min / mean / max (ratios to base)."""
    ratios = [p / base for p in spread.jittered]
    mean = sum(ratios) / len(ratios) if ratios else float("nan")
    lo, hi = (min(ratios), max(ratios)) if ratios else (float("nan"), float("nan"))
    seeds = ", ".join(f"{r:.4f}" for r in ratios)
    return (
        "| base ppl | plain ppl | plain ratio | jittered ratios (seeds 1..) | min | mean | max |\n"
        "|---:|---:|---:|---|---:|---:|---:|\n"
        f"| {base:.3f} | {spread.plain:.3f} | {spread.plain / base:.4f} | {seeds} | {lo:.4f} | {mean:.4f} | "
        f"{hi:.4f} |"
    )
