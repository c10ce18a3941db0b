"""`shoal quant recommend`: which method to quantize with, and why, for this hardware, budget and floor.

Two sources, measured numbers first:
1. Where MODEL_DIR/quant_eval.json exists (written by `shoal quant eval`), the answer is the measured row
   (fp8 only with a native-FP8 GPU: on a CPU it is emulated, for correctness only)
   with the least weight memory (all tensors as stored) whose perplexity ratio to the base model is at most
   the quality floor and whose weights fit the memory budget; ties go to the better perplexity. If no
   method meets both, the base model when it fits, else the best-perplexity method that fits, each said
   as such.
2. Otherwise the seed's decision framework (its Question 1), made concrete:
   - a GPU with native FP8 (compute capability >= 8.9, H100-class): fp8, unless the budget needs more
     than its 2x;
   - a budget that 8 bits meets (or none): INT8 -- simple, 2x smaller, ~1% quality loss; w8a8 where the
     CPU has int8 dot products (avx512_vnni / amx_int8) or there is a GPU, else weight-only W8A16
     (rtn --bits 8);
   - a budget that needs 4 bits: awq (best 4-bit quality, faster calibration than GPTQ);
   - a budget below what 4 bits gives (< 0.22x of 16-bit): gptq at 3 bits, maximum compression when the
     calibration time is affordable.
The quality floor is the largest perplexity ratio to 16-bit that is acceptable (1.05: at most 5% worse);
the budget is bytes of weights as stored. A method shoal does not implement yet is named with the
nearest one that it does.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from shoal.quant.hardware import Hardware

DEFAULT_QUALITY_FLOOR = 1.05
RATIO_8BIT = 0.55  # weights of an 8-bit checkpoint / 16-bit (scales included; issue 18's bound)
RATIO_4BIT = 0.30  # the same at 4 bits
RATIO_3BIT = 0.22


@dataclass
class Recommendation:
    method: str  # rtn, gptq, awq, w8a8, fp8, or "none" (keep the 16-bit model)
    bits: int
    command: str
    source: str  # "measured" (quant_eval.json) or "framework" (the seed's rules)
    reasons: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return asdict(self)


def load_eval(model_dir: Path | None) -> dict | None:
    """MODEL_DIR/quant_eval.json, or None when there is no model directory or no such file."""
    if model_dir is None or not (Path(model_dir) / "quant_eval.json").exists():
        return None
    return json.loads((Path(model_dir) / "quant_eval.json").read_text())


def _command(model_dir: Path | str | None, method: str, bits: int) -> str:
    method = method.partition(":")[0]  # eval's "rtn:8" is rtn at 8 bits
    if method == "none":
        return f"shoal serve --model {model_dir or 'MODEL_DIR'}"
    src = model_dir or "MODEL_DIR"
    return f"shoal quant quantize {src} --method {method} --bits {bits} --output {src}-{method}-w{bits}"


def from_measured(
    result: dict, budget: int | None, floor: float, model_dir: Path | None = None, hw: Hardware | None = None
) -> Recommendation:
    """The smallest measured method within floor and budget (see the module docstring). fp8 rows count
    only where hw has a GPU with native FP8: elsewhere FP8 runs emulated, for correctness only."""
    model_dir = result.get("model", model_dir)
    native_fp8 = hw is None or any(g.fp8 for g in hw.gpus)
    rows = [r for r in result["rows"] if native_fp8 or r["method"].partition(":")[0] != "fp8"]
    base = next(r for r in rows if r["method"] == "base")
    fits = [r for r in rows if r["method"] != "base" and (budget is None or r["total_bytes"] <= budget)]
    good = [r for r in fits if r["ppl_ratio"] <= floor]
    reasons = (
        [] if len(rows) == len(result["rows"]) else ["fp8 left out: no GPU with native FP8 here (emulated)"]
    )
    reasons += [
        f"measured by `shoal quant eval` ({len(rows) - 1} methods; perplexity on "
        f"{result.get('eval_tokens', '?')} tokens, ratio to the base model)"
    ]
    if good:
        pick = min(good, key=lambda r: (r["total_bytes"], r["ppl_ratio"]))
        reasons.append(
            f"{pick['method']}: {pick['total_bytes'] / 1e6:.2f} MB of weights "
            f"({pick['total_ratio']:.2f}x of 16-bit), perplexity {pick['ppl_ratio']:.3f}x <= floor {floor}, "
            f"decode {pick['speed_ratio']:.2f}x of the base model's speed"
        )
        others = [r["method"] for r in good if r is not pick]
        if others:
            reasons.append(f"also within the floor but larger: {', '.join(others)}")
        worse = [f"{r['method']} ({r['ppl_ratio']:.3f}x)" for r in fits if r["ppl_ratio"] > floor]
        if worse:
            reasons.append(f"over the floor: {', '.join(worse)}")
        return Recommendation(
            pick["method"],
            pick["bits"],
            _command(model_dir, pick["method"], pick["bits"]),
            "measured",
            reasons,
        )
    if budget is None or base["total_bytes"] <= budget:
        reasons.append(f"no method is within the quality floor {floor}; the 16-bit model fits, keep it")
        return Recommendation("none", 16, _command(model_dir, "none", 16), "measured", reasons)
    if fits:
        pick = min(fits, key=lambda r: r["ppl_ratio"])
        reasons.append(
            f"no method meets both; {pick['method']} is the best perplexity that fits the budget "
            f"({pick['ppl_ratio']:.3f}x, over the floor {floor})"
        )
        return Recommendation(
            pick["method"],
            pick["bits"],
            _command(model_dir, pick["method"], pick["bits"]),
            "measured",
            reasons,
        )
    reasons.append(
        f"no measured method fits {budget} bytes; the smallest is {min(r['total_bytes'] for r in rows)}"
    )
    return Recommendation("none", 16, "", "measured", reasons)


def from_framework(
    hw: Hardware,
    budget: int | None,
    floor: float,
    bytes_16bit: int | None,
    implemented: tuple[str, ...],
    model_dir: Path | None = None,
) -> Recommendation:
    """The seed's decision framework, on the hardware and the budget's ratio to the 16-bit weights."""
    need = budget / bytes_16bit if budget and bytes_16bit else None
    reasons = [
        "no quant_eval.json for this model: the seed's decision framework (run `shoal quant eval` to measure)"
    ]
    if need is not None:
        reasons.append(
            f"budget {budget / 1e6:.1f} MB is {need:.2f}x of the 16-bit weights ({bytes_16bit / 1e6:.1f} MB)"
        )
    fp8_gpu = next((g for g in hw.gpus if g.fp8), None)
    if need is not None and need >= 1.0:
        reasons.append("the 16-bit model already fits; quantize only for speed")
    if fp8_gpu and (need is None or need >= RATIO_8BIT):
        method, bits = "fp8", 8
        reasons.append(
            f"{fp8_gpu.name} has native FP8 (compute capability {fp8_gpu.capability[0]}.{fp8_gpu.capability[1]}): "
            "hardware support, no calibration, ~100% quality"
        )
    elif need is None or need >= RATIO_8BIT:
        int8_dot = hw.has("avx512_vnni") or hw.has("amx_int8") or bool(hw.gpus)
        method, bits = ("w8a8", 8) if int8_dot else ("rtn", 8)
        reasons.append(
            "INT8: simple, fast calibration, 2x smaller, ~99% of 16-bit quality"
            + (
                " (int8 dot products on this hardware: W8A8)"
                if int8_dot
                else " (no avx512_vnni/amx_int8: weight-only W8A16)"
            )
        )
    elif need >= RATIO_3BIT:
        method, bits = "awq", 4
        reasons.append(
            f"the budget needs 4 bits (8-bit is ~{RATIO_8BIT}x): AWQ, the best 4-bit quality, faster calibration than GPTQ"
        )
    else:
        method, bits = "gptq", 3
        reasons.append(
            f"the budget needs more than 4 bits give (~{RATIO_4BIT}x): GPTQ at 3 bits, maximum "
            "compression, if its calibration time is affordable"
        )
    if floor < 1.02 and bits <= 4:
        reasons.append(
            f"warning: 4-bit methods usually cost more than the floor {floor} allows; measure first"
        )
    if method not in implemented:
        fallback = "rtn" if bits == 8 else "gptq"
        reasons.append(f"{method} is not implemented in this shoal yet; nearest: {fallback} --bits {bits}")
        method = fallback
    if hw.ram_available_bytes and bytes_16bit and bytes_16bit > hw.ram_available_bytes:
        reasons.append(
            "warning: the 16-bit weights exceed the available RAM; calibration loads them block by block"
        )
    return Recommendation(method, bits, _command(model_dir, method, bits), "framework", reasons)


def recommend(
    hw: Hardware, model_dir: Path | None, budget: int | None, floor: float = DEFAULT_QUALITY_FLOOR
) -> Recommendation:
    """Measured numbers where MODEL_DIR has a quant_eval.json, else the framework."""
    result = load_eval(model_dir)
    if result is not None:
        return from_measured(result, budget, floor, model_dir, hw)
    from shoal.quant.quantize import IMPLEMENTED

    bytes_16bit = None
    if model_dir is not None and any(Path(model_dir).glob("*.safetensors")):
        from shoal.quant.eval import weight_bytes

        bytes_16bit = weight_bytes(Path(model_dir))[3] * 2
    return from_framework(hw, budget, floor, bytes_16bit, tuple(IMPLEMENTED), model_dir)
