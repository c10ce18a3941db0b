"""GPU decode benchmark (issue 23): decode time per token against the memory-bandwidth limit, and FP8 and
W4A16 decode against bfloat16, on random-weight models of real shapes (Llama-3.2-1B, Qwen3-0.6B).

Why random weights: the GPU machine reaches no Hub, and decode speed depends on shapes and dtypes only.
The model is shoal's own Transformer built from the configuration's numbers (MODELS below, from the
published config.json files), its weights drawn on the device; the W4A16 variant quantizes every decoder
linear with round-to-nearest int4, groups of 128, asymmetric (QuantizedLinear: Triton GEMM on CUDA), the
FP8 one to per-channel E4M3 weights with dynamic per-token activations (FP8Linear: torch._scaled_mm on CUDA).
Embeddings and lm_head stay bfloat16, as in the published quantized checkpoints.

What is timed: ModelRunner.run over the paged KV cache (the engine's forward: metadata, attention through
the Triton kernels on CUDA, logits of the sampled rows), without scheduling or sampling: `batch` sequences
decoding after a prompt of `context` tokens, the median of `steps` steps after warm-up, synchronized.
The limit: a decode step reads every weight byte at least once, so it takes at least weight bytes /
bandwidth, with the bandwidth measured here as a large device-to-device copy (bytes read + written over
time, the best of several). ratio = step time / that limit (issue 23's target: at most 2x for the 1B model
in bfloat16 at batch 1).

The module needs torch and shoal's model and engine only (the GPU machine has no FastAPI or typer);
`--device cpu --tiny` runs the same code on scaled-down shapes (tests).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

# Published config.json numbers (meta-llama/Llama-3.2-1B, Qwen/Qwen3-0.6B).
MODELS = {
    "llama-3.2-1b": {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 64,
        "vocab_size": 128256,
        "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "rope_scaling": {
            "rope_type": "llama3",
            "factor": 32.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        "tie_word_embeddings": True,
        "torch_dtype": "bfloat16",
    },
    "qwen3-0.6b": {
        "architectures": ["Qwen3ForCausalLM"],
        "model_type": "qwen3",
        "hidden_size": 1024,
        "intermediate_size": 3072,
        "num_hidden_layers": 28,
        "num_attention_heads": 16,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "vocab_size": 151936,
        "max_position_embeddings": 40960,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "tie_word_embeddings": True,
        "torch_dtype": "bfloat16",
    },
}
# --tiny: the same structure at toy sizes, so that the code path runs on a CPU in a test.
TINY = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "vocab_size": 512,
    "head_dim": 16,
}
TINY_HEADS = {"num_attention_heads": 4, "num_key_value_heads": 2}
VARIANTS = ("bf16", "w4a16", "fp8")
W4A16_GROUP = 128


@dataclass
class Result:
    model: str
    variant: str
    batch: int
    context: int
    step_ms: float
    weight_bytes: int
    limit_ms: float

    @property
    def ratio(self) -> float:
        return self.step_ms / self.limit_ms


def model_config(name: str, tiny: bool):
    from shoal.model.config import parse_config

    raw = dict(MODELS[name])
    if tiny:
        raw.update(TINY, **TINY_HEADS, max_position_embeddings=512)
        raw.pop("rope_scaling", None)
    return parse_config(raw, where=name)


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 30, repeats: int = 5) -> float:
    """Bytes per second of a large copy on device (bytes read + bytes written over the best time)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(repeats + 1):  # the first warms up
        _sync(device)
        t = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * nbytes / best


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_model(cfg, device: torch.device, dtype: torch.dtype, variant: str, seed: int = 0):
    """shoal's Transformer for cfg with random weights on device (std 0.02, norms 1), its decoder linears
    quantized as variant says."""
    from shoal.model.rope import RotaryEmbedding
    from shoal.model.transformer import Transformer

    torch.manual_seed(seed)
    with torch.device(device):
        model = Transformer(cfg).to(dtype)
        for p in model.parameters():
            p.requires_grad_(False)
            if p.dim() > 1:
                p.normal_(0.0, 0.02)
        if cfg.tie_word_embeddings:
            model.lm_head.weight = model.embed_tokens.weight
        model.rope = RotaryEmbedding(
            cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta, cfg.rope_scaling
        )
    if variant != "bf16":
        quantize_linears(model, variant)
    return model.eval()


def quantize_linears(model: nn.Module, variant: str) -> None:
    """Swap every decoder nn.Linear (not lm_head) for QuantizedLinear (w4a16) or FP8Linear (fp8), in place."""
    from shoal.quant.fp8 import FP8Linear, quantize_fp8_weight
    from shoal.quant.linear import QuantizedLinear
    from shoal.quant.rtn import quantize_rtn

    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if type(child) is not nn.Linear or f"{name}.{child_name}".endswith("lm_head"):
                continue
            if variant == "w4a16":
                group = W4A16_GROUP if child.in_features % W4A16_GROUP == 0 else 0
                new = QuantizedLinear(quantize_rtn(child.weight, None, 4, group, symmetric=False), child.bias)
            else:
                new = FP8Linear(quantize_fp8_weight(child.weight), bias=child.bias)
            setattr(module, child_name, new.to(child.weight.device))


def weight_bytes(model: nn.Module) -> int:
    """Bytes a decode step must read: every parameter once (tied embeddings once) and the quantized buffers."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    return total + sum(m.weight_bytes() for m in model.modules() if hasattr(m, "weight_bytes"))


@torch.inference_mode()
def decode_step_ms(model, device, dtype, batch: int, context: int, steps: int, block_size: int = 16) -> float:
    """Median ms of one decode step of `batch` sequences after `context` prompt tokens each."""
    from shoal.engine.model_runner import ModelRunner, StepInput

    per_seq = -(-(context + steps + 2) // block_size)
    runner = ModelRunner(model, batch * per_seq, block_size, device, dtype)
    tables = [list(range(b * per_seq, (b + 1) * per_seq)) for b in range(batch)]
    vocab = model.config.vocab_size
    prompts = torch.randint(3, vocab, (batch, context)).tolist()
    for b in range(batch):  # one prompt a step: the prefill is not what is measured
        runner.run(StepInput([prompts[b]], [0], [tables[b]], [[context - 1]]))
    times = []
    for i in range(steps + 2):  # two warm-up steps
        step = StepInput([[7]] * batch, [context + i] * batch, tables, [[0]] * batch)
        _sync(device)
        t = time.perf_counter()
        runner.run(step)
        _sync(device)
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times[2:])


def run(args: argparse.Namespace) -> list[Result]:
    device = torch.device(args.device)
    dtype = torch.bfloat16
    bandwidth = copy_bandwidth(device, args.copy_bytes)
    print(f"{device}: large-copy bandwidth {bandwidth / 1e9:.1f} GB/s")
    results = []
    for name in args.models:
        cfg = model_config(name, args.tiny)
        for variant in args.variants:
            model = build_model(cfg, device, dtype, variant)
            nbytes = weight_bytes(model)
            for batch in args.batch:
                ms = decode_step_ms(model, device, dtype, batch, args.context, args.steps)
                r = Result(name, variant, batch, args.context, ms, nbytes, 1e3 * nbytes / bandwidth)
                print(
                    f"{name} {variant} batch {batch}: {ms:.3f} ms/step, limit {r.limit_ms:.3f} ms, {r.ratio:.2f}x"
                )
                results.append(r)
            del model
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return results


def markdown(results: list[Result]) -> str:
    """One row per run, with each variant's speed against bf16 at the same model and batch."""
    bf16 = {(r.model, r.batch): r.step_ms for r in results if r.variant == "bf16"}
    lines = [
        "| model | weights | batch | context | ms / step | weight MB | limit ms | x limit | speed vs bf16 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        base = bf16.get((r.model, r.batch))
        speed = f"{base / r.step_ms:.2f}x" if base else "-"
        lines.append(
            f"| {r.model} | {r.variant} | {r.batch} | {r.context} | {r.step_ms:.3f} | {r.weight_bytes / 1e6:.1f} "
            f"| {r.limit_ms:.3f} | {r.ratio:.2f} | {speed} |"
        )
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench/gpu.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--batch", nargs="+", type=int, default=[1, 8, 32])
    p.add_argument("--context", type=int, default=512, help="prompt tokens before decoding")
    p.add_argument("--steps", type=int, default=50, help="timed decode steps (median)")
    p.add_argument("--copy-bytes", type=int, default=1 << 30, help="bytes of the bandwidth copy")
    p.add_argument("--tiny", action="store_true", help="toy sizes of the same structure (CPU tests)")
    p.add_argument("--out", type=Path, help="write the results here as JSON")
    return p


def main(argv: list[str] | None = None) -> list[Result]:
    args = parser().parse_args(argv)
    results = run(args)
    print(markdown(results))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        rows = [{**asdict(r), "ratio": r.ratio} for r in results]
        args.out.write_text(
            json.dumps({"device": _device_name(torch.device(args.device)), "results": rows}, indent=2)
        )
    return results


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    return f"cpu, torch {torch.__version__}"
