"""llm-compressor's side of `make bench-quant`: the same rows, calibration windows and perplexity protocol,
quantized by llm-compressor 0.14 and scored by transformers (float32), for a same-machine comparison.

Never a dependency of shoal (llmcompressor pins compressed-tensors 0.19 and transformers <= 5.17): run it in a
throwaway venv, with torch pinned first so that pip keeps the CPU build:

    python3 -m venv /tmp/llmc && /tmp/llmc/bin/pip install torch==2.13.0 && \\
        /tmp/llmc/bin/pip install llmcompressor==0.14.0.1
    /tmp/llmc/bin/python bench/llmcompressor_side.py --model models/SmolLM2-135M-Instruct \\
        --num-tokens 4096 --num-samples 16 --seq-len 256 [--rows rtn-g64,gptq-g64,w8a8-sq-gptq,fp8]

Calibration: num_samples windows of seq_len tokens of ../shared/eval/wikitext2-valid.txt at offsets drawn as
shoal's `calibration_windows` draws them (torch.Generator(seed), randint), so both sides see the same tokens.
Perplexity: the first num_tokens tokens of ../shared/eval/wikitext2-test.txt (`tokenizer(text)`), windows
of 1024, exp(mean NLL) of every token after a window's first. Rows (shoal/bench/quant.py's names):
rtn-g64 and gptq-g64 (4-bit symmetric, groups of 64: QuantizationModifier / GPTQModifier), awq-g64 (4-bit
asymmetric, groups of 64: AWQModifier then QuantizationModifier; opt-in, as its calibration is long),
w8a8-sq-gptq (SmoothQuantModifier 0.8 then GPTQModifier W8A8) and fp8 (QuantizationModifier FP8_DYNAMIC);
lm_head is ignored, as in shoal. llm-compressor's AWQ fails without an accelerator (it pins its cached
activations); `_cpu_only_pinning` skips the pinning on such a machine, nothing else.
Prints a Markdown table: perplexity, ratio to the float32 base, calibration seconds.

`--perturb-seeds K` rescores the `--perturb-rows` models (default fp8) K more times with every quantized linear's input
multiplied by (1 + 1e-6 * N(0, 1)) before it is quantized: float32 rounding-sized changes, which move
values across FP8/int8 rounding boundaries. The spread of those scores is the resolution at which two
runtimes computing the same scheme (transformers here, shoal's engine) can be told apart: a difference
in the last digit of the ratio inside that spread says nothing about either side's quantization.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch

EVAL = Path(__file__).resolve().parents[2] / "shared" / "eval"
PERTURBATION = 1e-6  # relative, about 8 float32 ulps


def w4_g64(symmetric: bool) -> dict:
    weights = {"num_bits": 4, "type": "int", "symmetric": symmetric, "strategy": "group", "group_size": 64}
    return {"group_0": {"targets": ["Linear"], "weights": weights}}


def recipe(row: str):
    from llmcompressor.modifiers.gptq import GPTQModifier
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from llmcompressor.modifiers.smoothquant import SmoothQuantModifier

    if row == "rtn-g64":
        return QuantizationModifier(config_groups=w4_g64(True), ignore=["lm_head"])
    if row == "gptq-g64":
        return GPTQModifier(config_groups=w4_g64(True), ignore=["lm_head"])
    if row == "awq-g64":  # asymmetric, as the paper and shoal's awq: the search, then the quantization
        from llmcompressor.modifiers.transform.awq import AWQModifier

        _cpu_only_pinning()
        return [AWQModifier(), QuantizationModifier(config_groups=w4_g64(False), ignore=["lm_head"])]
    if row == "w8a8-sq-gptq":
        return [
            SmoothQuantModifier(smoothing_strength=0.8),
            GPTQModifier(targets="Linear", scheme="W8A8", ignore=["lm_head"]),
        ]
    if row == "fp8":
        return QuantizationModifier(targets="Linear", scheme="FP8_DYNAMIC", ignore=["lm_head"])
    raise ValueError(f"unknown row {row!r}")


def _cpu_only_pinning() -> None:
    """llm-compressor 0.14's AWQ pins its cached activations (`IntermediatesCache.pin_memory`), which raises
    "Cannot access accelerator device when none is available" on a machine without one. Pinning only speeds
    up copies to an accelerator, so without one it is skipped: the only change this bench makes to it."""
    from llmcompressor.pipelines.cache import IntermediatesCache

    if not torch.accelerator.is_available():
        IntermediatesCache.pin_memory = lambda self, *args, **kwargs: None


def windows(ids: list[int], num_samples: int, seq_len: int, seed: int) -> torch.Tensor:
    """shoal.quant.calibration.calibration_windows' draw (that module needs shoal's venv)."""
    t = torch.tensor(ids, dtype=torch.int64)
    starts = torch.randint(
        0, len(ids) - seq_len + 1, (num_samples,), generator=torch.Generator().manual_seed(seed)
    )
    return torch.stack([t[s : s + seq_len] for s in starts.tolist()])


@torch.inference_mode()
def perplexity(model, ids: list[int], size: int = 1024) -> float:
    nll, count = 0.0, 0
    for i in range(0, len(ids), size):
        w = ids[i : i + size]
        if len(w) < 2:
            continue
        x = torch.tensor([w])
        nll += float(model(x, labels=x).loss) * (len(w) - 1)
        count += len(w) - 1
    return math.exp(nll / count)


def perturbed_perplexities(model, ids: list[int], seeds: int) -> list[float]:
    """Perplexity with each quantized linear's input jittered by PERTURBATION (module docstring), per seed."""
    quantized = [m for m in model.modules() if getattr(m, "quantization_scheme", None) is not None]
    scores = []
    for seed in range(1, seeds + 1):
        gen = torch.Generator().manual_seed(seed)

        def jitter(module, args, gen=gen):
            noise = torch.randn(args[0].shape, generator=gen, dtype=args[0].dtype)
            return (args[0] * (1 + PERTURBATION * noise),) + args[1:]

        hooks = [m.register_forward_pre_hook(jitter) for m in quantized]
        scores.append(perplexity(model, ids))
        for h in hooks:
            h.remove()
    return scores


def main() -> None:
    from datasets import Dataset
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM, AutoTokenizer

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--rows", default="rtn-g64,gptq-g64,w8a8-sq-gptq,fp8")
    p.add_argument("--num-tokens", type=int, default=65536)
    p.add_argument("--num-samples", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--perturb-seeds", type=int, default=0, help="rescore K times, inputs jittered")
    p.add_argument("--perturb-rows", default="fp8", help="the rows --perturb-seeds rescores")
    a = p.parse_args()
    tok = AutoTokenizer.from_pretrained(a.model)
    eval_ids = tok((EVAL / "wikitext2-test.txt").read_text())["input_ids"][: a.num_tokens]
    calib = windows(
        tok((EVAL / "wikitext2-valid.txt").read_text())["input_ids"], a.num_samples, a.seq_len, a.seed
    )
    data = Dataset.from_dict({"input_ids": calib.tolist(), "attention_mask": torch.ones_like(calib).tolist()})

    def load():
        return AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32).eval()

    base = perplexity(load(), eval_ids)
    print("| row | perplexity | ratio to float32 base | calibration s |\n|---|---|---|---|")
    print(f"| base | {base:.3f} | 1.000 | |", flush=True)
    for row in a.rows.split(","):
        model = load()
        t0 = time.perf_counter()
        oneshot(model=model, dataset=data, recipe=recipe(row), max_seq_length=a.seq_len,
                num_calibration_samples=a.num_samples)  # fmt: skip
        secs = time.perf_counter() - t0
        ppl = perplexity(model, eval_ids)
        print(f"| {row} | {ppl:.3f} | {ppl / base:.3f} | {secs:.1f} |", flush=True)
        if a.perturb_seeds and row in a.perturb_rows.split(","):
            jittered = perturbed_perplexities(model, eval_ids, a.perturb_seeds)
            ratios = ", ".join(f"{p / base:.4f}" for p in jittered)
            print(f"|   {row}, inputs jittered 1e-6 ({len(jittered)} seeds) | {ratios} | "
                  f"min {min(jittered) / base:.4f}, mean {sum(jittered) / len(jittered) / base:.4f}, "
                  f"max {max(jittered) / base:.4f} | |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
