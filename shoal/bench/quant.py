"""`make bench-quant` (`shoal bench quant`, bench/quant.py): issue 18's quantization benchmark, run with
`shoal quant eval`'s machinery (shoal/quant/eval.py) on rows of the issue's schemes.

Protocol (the issue's): perplexity over the first `num_tokens` (65,536) tokens of
../shared/eval/wikitext2-test.txt in non-overlapping windows of min(1024, max_model_len), every token after a
window's first scored through `LLMEngine.prompt_logits`; calibration `num_samples` x `seq_len` (128 x 512)
tokens of ../shared/eval/wikitext2-valid.txt. Every engine runs with `--dtype auto`; the base row is the
16-bit model. Smaller `--num-tokens/--num-samples/--seq-len` give a quick run of the same protocol.

Rows (ROWS): round to nearest, GPTQ and AWQ at 4 bits with an explicit group size of 64 (the scheme
llm-compressor's comparison rows use), GPTQ with `auto` groups, W8A8 as llm-compressor's recipe
(SmoothQuant 0.8, GPTQ int8 weights, dynamic per-token int8 activations), FP8 dynamic and weight-only int8
(W8A16, `auto` groups). Each row's perplexity ratio is set beside llm-compressor 0.14's on the same protocol
(LLMCOMPRESSOR, measured by the issue's author on this machine) and the issue's goal (GOALS).
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

from shoal.quant.activation_recipe import ActivationOptions
from shoal.quant.eval import DEFAULT_EVAL_TEXT, EvalSettings, MethodSpec, markdown_table, run_eval
from shoal.quant.gptq import GPTQOptions
from shoal.quant.groups import PER_CHANNEL
from shoal.quant.hardware import detect
from shoal.quant.quantize import DEFAULT_CALIB_TEXT, Calibration

GROUP_SIZE = 64
ROWS = {
    "rtn-g64": MethodSpec("rtn-g64", "rtn", 4, GROUP_SIZE),
    "gptq-g64": MethodSpec("gptq-g64", "gptq", 4, GROUP_SIZE),
    "awq-g64": MethodSpec("awq-g64", "awq", 4, GROUP_SIZE),
    "gptq-auto": MethodSpec("gptq-auto", "gptq", 4, "auto"),
    "w8a8-sq-gptq": MethodSpec(
        "w8a8-sq-gptq", "w8a8", 8, activation=ActivationOptions(weight_method="gptq", smoothquant_alpha=0.8)
    ),
    "fp8": MethodSpec("fp8", "fp8", 8),
    "w8a16": MethodSpec("w8a16", "rtn", 8, "auto"),  # weight-only int8, `auto` groups (`rtn:8`)
    # opt-in rows (`--rows`): W8A16 per channel (torch's int8 route), the weight observer and GPTQ options of issue 18's follow-up
    "rtn-g64-mse": MethodSpec("rtn-g64-mse", "rtn", 4, GROUP_SIZE, gptq=GPTQOptions(observer="mse")),
    "gptq-g64-mse": MethodSpec("gptq-g64-mse", "gptq", 4, GROUP_SIZE, gptq=GPTQOptions(observer="mse")),
    "gptq-g64-act": MethodSpec("gptq-g64-act", "gptq", 4, GROUP_SIZE, gptq=GPTQOptions(act_order=True)),
    "gptq-g64-ts": MethodSpec("gptq-g64-ts", "gptq", 4, GROUP_SIZE, gptq=GPTQOptions(true_sequential=True)),
    "w8a16-channel": MethodSpec("w8a16-channel", "rtn", 8, PER_CHANNEL),
    "gptq-g64-ref": MethodSpec("gptq-g64-ref", "gptq", 4, GROUP_SIZE, gptq=GPTQOptions()),  # the reference's
    # W8A8 activation forms (rtn int8 weights, SmoothQuant 0.8): symmetric or affine, dynamic or static
    **{
        f"w8a8-sq{form}{sym}": MethodSpec(
            f"w8a8-sq{form}{sym}",
            "w8a8",
            8,
            activation=ActivationOptions(
                smoothquant_alpha=0.8,
                activation_scales="static" if form else "dynamic",
                activation_symmetric=not sym,
            ),
        )
        for form in ("", "-static")
        for sym in ("", "-affine")
    },
    # lm_head int8 per channel too (`--quantize-lm-head`): on an AVX512-BF16 machine a bf16 step spends about
    # a fifth of its time in the 16-bit lm_head, which the decoder-only rows keep (docs/quantization.md)
    "rtn-g64-lmhead": MethodSpec("rtn-g64-lmhead", "rtn", 4, GROUP_SIZE, quantize_lm_head=True),
    "gptq-g64-lmhead": MethodSpec("gptq-g64-lmhead", "gptq", 4, GROUP_SIZE, quantize_lm_head=True),
    "w8a16-lmhead": MethodSpec("w8a16-lmhead", "rtn", 8, "auto", quantize_lm_head=True),
}
# llm-compressor 0.14 on the issue's full protocol (SmolLM2-135M-Instruct; the issue's table): perplexity ratio
# to 16-bit, and calibration seconds on 2 cores where measured
LLMCOMPRESSOR = {
    "rtn-g64": (1.39, None),
    "gptq-g64": (1.21, 367.0),
    "awq-g64": (1.30, None),
    "w8a8-sq-gptq": (1.013, None),
    "fp8": (1.03, None),
}
# the issue's goals: perplexity ratio at most, decode speed ratio to the 16-bit model at least
GOALS = {
    "gptq-g64": (1.20, 1.3),
    "awq-g64": (1.20, 1.3),
    "gptq-auto": (None, 1.3),
    "rtn-g64": (None, 1.3),
    "w8a16": (None, 1.15),
    "rtn-g64-lmhead": (None, 1.3),
    "gptq-g64-lmhead": (1.20, 1.3),
    "w8a16-lmhead": (None, 1.15),
    "w8a8-sq-gptq": (1.013, None),
    "fp8": (1.03, None),
}


def settings(
    rows: list[str],
    num_tokens: int = 65536,
    num_samples: int = 128,
    seq_len: int = 512,
    decode_tokens: int = 64,
    decode_iters: int = 12,
    seed: int = 0,
    scale_dtype: str = "auto",
    quality: bool = True,
) -> EvalSettings:
    """The EvalSettings of a benchmark run over rows (names of ROWS); ValueError naming an unknown row.
    scale_dtype (auto or float32) applies to the 4-bit rows (quantize_model's); quality False measures
    decode speed and memory only."""
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        raise ValueError(f"unknown row {unknown[0]!r}; rows: {', '.join(ROWS)}")
    specs = [ROWS[r] for r in rows]
    return EvalSettings(
        methods=list(rows),
        specs=[replace(m, scale_dtype=scale_dtype) if m.bits == 4 else m for m in specs],
        eval_text=DEFAULT_EVAL_TEXT,
        eval_tokens=num_tokens,
        calibration=Calibration(DEFAULT_CALIB_TEXT, num_samples, seq_len, seed),
        decode_tokens=decode_tokens,
        decode_iters=decode_iters,
        seed=seed,
        quality=quality,
    )


def run(model_dir: Path, s: EvalSettings, output_dir: Path, log=print) -> dict:
    """Quantize and measure every row (quant_eval.json/.png into output_dir), with the references added."""
    result = run_eval(model_dir, s, output_dir, keep_models=False, log=log)
    result["cpu_flags"] = detect().cpu_flags
    result["llmcompressor_reference"] = {
        k: {"ppl_ratio": v[0], "calibration_s": v[1]} for k, v in LLMCOMPRESSOR.items()
    }
    result["goals"] = {k: {"max_ppl_ratio": v[0], "min_speed_ratio": v[1]} for k, v in GOALS.items()}
    return result


def _cell(value: float | None, fmt: str) -> str:
    return "" if value is None else format(value, fmt)


def comparison_table(result: dict) -> str:
    """One line a row: shoal's perplexity ratio, llm-compressor's, the goal and whether shoal meets it."""
    lines = [
        "| row | shoal ppl / 16-bit | llm-compressor 0.14 (issue) | goal | met | speed / 16-bit | speed goal |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"][1:]:
        ref = LLMCOMPRESSOR.get(r["method"], (None, None))[0]
        max_ppl, min_speed = GOALS.get(r["method"], (None, None))
        met = (
            ""
            if max_ppl is None or math.isnan(r["ppl_ratio"])
            else ("yes" if r["ppl_ratio"] <= max_ppl else "no")
        )
        lines.append(
            f"| {r['method']} | {r['ppl_ratio']:.3f} | {_cell(ref, '.3f')} | {_cell(max_ppl, '.3f')} | {met} "
            f"| {r['speed_ratio']:.2f} | {_cell(min_speed, '.2f')} |"
        )
    return "\n".join(lines)


def markdown(result: dict) -> str:
    """eval's table, the comparison table, and the run's settings and machine."""
    m, calib = result["machine"], result["settings"]["calibration"]
    return (
        f"{markdown_table(result)}\n\n{comparison_table(result)}\n\n"
        f"{result['eval_tokens']} tokens in windows of {result['window']}, dtype {result['dtype']}, "
        f"calibration {calib['num_samples']} x {calib['seq_len']}; {m['cpu']}, {m['cpu_cores_usable']} cores, "
        f"flags {' '.join(result.get('cpu_flags', []))}, {m['torch_threads']} torch threads, torch {m['torch']}"
    )


def _linear_kind(name: str, module) -> str | None:
    from torch import nn

    from shoal.model.packed_linear import PackedLinear
    from shoal.quant.linear import QuantizedLinear

    if name == "lm_head":
        return "lm_head"
    if isinstance(module, QuantizedLinear):
        return "quantized linears"
    return "linears" if isinstance(module, (PackedLinear, nn.Linear)) else None


def _time_decode_linears(model) -> dict[str, float]:
    """Forward hooks that add each linear's wall time on decode rows (one row) to the returned dict, by kind
    (lm_head, quantized linears, linears). The hooks stay: use a model made for the measurement."""
    import time

    totals: dict[str, float] = {}
    for name, module in model.named_modules():
        kind = _linear_kind(name, module)
        if kind is None:
            continue

        def pre(mod, args):
            x = args[0]
            mod._decode_t0 = time.perf_counter() if x.numel() == x.shape[-1] else None

        def post(mod, args, out, kind=kind):
            if mod._decode_t0 is not None:
                totals[kind] = totals.get(kind, 0.0) + time.perf_counter() - mod._decode_t0

        module.register_forward_pre_hook(pre)
        module.register_forward_hook(post)
    return totals


def decode_profile(models: dict[str, Path], tokens: int = 64, iters: int = 3, log=print) -> dict:
    """Single-stream greedy decode of each model (label -> directory; `--dtype auto` engines, one process),
    iters rounds alternating between them on fresh 32-token prompts: per model, the best round's tok/s and
    its ms per generated token spent in lm_head, quantized linears and 16-bit linears (decode rows only);
    the rest of a step is attention, norms and the engine. Shows where the bytes saved go (issue 18). Every
    model runs the per-op forward: the one-call native decode step (kernels/decode_step.c) that a 16-bit
    model otherwise gets would hide its linears from the timers."""
    from shoal.bench.latency import shoal_once
    from shoal.quant.eval import eval_engine

    engines = {k: eval_engine(d) for k, d in models.items()}
    vocab = min(e.model_config.vocab_size for e in engines.values())

    def prompt(r: int) -> list[int]:  # a fresh prompt each round: the prefix cache must not serve it
        return [(1000 + 37 * r + j) % vocab for j in range(32)]

    for e in engines.values():
        e.runner.decode_stack = None
        e.warm_up()
        shoal_once(e, prompt(0), tokens)
    totals = {k: _time_decode_linears(e.runner.model) for k, e in engines.items()}
    best: dict[str, dict] = {}
    for i in range(iters):
        for k, e in engines.items():
            totals[k].clear()
            run = shoal_once(e, prompt(i + 1), tokens)
            tok_s = run.decode_tokens_per_s
            if tok_s > best.get(k, {}).get("tok_s", 0.0):
                ms = {kind: 1e3 * v / (tokens - 1) for kind, v in totals[k].items()}
                best[k] = {"tok_s": tok_s, "ms_per_token": 1e3 / tok_s, "ms": ms}
        log(f"round {i + 1}: " + ", ".join(f"{k} {v['tok_s']:.1f}" for k, v in best.items()))
    return best
