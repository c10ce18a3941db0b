"""Runs shoal's Triton kernels on the cases tests/test_triton_kernels.py prepares, in a process of its own.

Why a separate process: triton decides at `@triton.jit` time whether kernels run in its interpreter
(TRITON_INTERPRET=1, which must be set before triton is imported), and that choice would leak into every
other test of a pytest process (torch.compile's inductor imports triton too). So the test process builds the
inputs, saves them with torch.save, and starts this script once with TRITON_INTERPRET=1 (and
SHOAL_TRITON_ON_CPU=1, so the model's own dispatch hooks route CPU tensors to the kernels); it runs every case
and saves the outputs, which the test process compares with its PyTorch references. Nothing is asserted here.

With `--device cuda` (on a GPU machine, no TRITON_INTERPRET) the same cases run natively: the inputs are
moved to the GPU and the outputs back (the `model` cases need the engine on CUDA).

Usage: python tests/triton_interpret_worker.py CASES.pt OUT.pt [--device cuda]

A case is {"op": ..., "kwargs": {...}} for one kernel call ("decode", "prefill", "w4a16", "scaled_mm"), or
{"op": "linear", "model_dir": ..., "x": tensor} for every QuantizedLinear of a checkpoint called through its
forward, or {"op": "engine", "model_dir": ..., "prompts": [...], ...} for greedy generation and prompt logits.
Each output is {"out": ..., "calls": {kernel module: calls}} or {"error": "Type: message"}.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from pathlib import Path

import torch

from shoal.kernels import fp8, triton_support

CALLS: Counter = Counter()
KERNEL_FUNCTIONS = {
    "triton_paged_decode": "paged_decode_attention",
    "triton_prefill": "paged_prefill_attention",
    "triton_w4a16": "quantized_matmul",
}


def _count_calls() -> None:
    """Wrap each kernel module's entry point with a call counter, so the model cases can show which kernels
    the dispatch hooks reached (the hooks look the function up on the module at every call)."""
    for name, attr in KERNEL_FUNCTIONS.items():
        module = triton_support.kernel_module(name)
        fn = getattr(module, attr)

        def counted(*args, _fn=fn, _name=name, **kwargs):
            CALLS[_name] += 1
            return _fn(*args, **kwargs)

        setattr(module, attr, counted)


def _to(value, device: torch.device):
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {k: _to(v, device) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to(v, device) for v in value)
    return value


def _kernel_op(case: dict, device: torch.device):
    kwargs = _to(case["kwargs"], device)
    if case["op"] == "scaled_mm":
        return fp8.scaled_mm(**kwargs)
    name = {"decode": "triton_paged_decode", "prefill": "triton_prefill", "w4a16": "triton_w4a16"}[case["op"]]
    return getattr(triton_support.kernel_module(name), KERNEL_FUNCTIONS[name])(**kwargs)


def _linear_op(case: dict, device: torch.device) -> dict:
    from shoal.model.loader import load_model
    from shoal.quant.linear import QuantizedLinear

    model, _ = load_model(Path(case["model_dir"]), case.get("dtype", torch.float32), device)
    x = case["x"]
    return {
        name: m(x[: m.in_features].to(device=device, dtype=case.get("dtype", torch.float32)).unsqueeze(0))[0]
        for name, m in model.named_modules()
        if isinstance(m, QuantizedLinear)
    }


def _engine_op(case: dict, device: torch.device) -> dict:
    from shoal.engine.config import EngineConfig
    from shoal.engine.llm_engine import LLMEngine
    from shoal.engine.sampling_params import SamplingParams

    engine = LLMEngine(EngineConfig(model=case["model_dir"], device=device.type, **case["config"]))
    logits = [engine.prompt_logits(p) for p in case["logit_prompts"]]
    params = SamplingParams(max_tokens=case["max_tokens"], temperature=0.0, ignore_eos=True)
    outputs = engine.generate(case["prompts"], params)
    return {"tokens": [list(o.outputs[0].token_ids) for o in outputs], "logits": logits}


def run(case: dict, device: torch.device) -> dict:
    CALLS.clear()
    started = time.perf_counter()
    try:
        if case["op"] == "linear":
            out = _linear_op(case, device)
        elif case["op"] == "engine":
            out = _engine_op(case, device)
        else:
            out = _kernel_op(case, device)
    except Exception as exc:  # noqa: BLE001  (reported to the test, which decides)
        return {"error": f"{type(exc).__name__}: {exc}"}
    return {
        "out": _to(out, torch.device("cpu")),
        "calls": dict(CALLS),
        "seconds": time.perf_counter() - started,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cases")
    parser.add_argument("out")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cpu" and not triton_support.interpreting():
        sys.exit("on the CPU the kernels need TRITON_INTERPRET=1 (set before this process starts)")
    torch.manual_seed(0)
    _count_calls()
    cases = torch.load(args.cases, weights_only=False)
    torch.save({name: run(case, device) for name, case in cases.items()}, args.out)


if __name__ == "__main__":
    main()
