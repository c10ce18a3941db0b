"""CPU linears by row count: shoal's gemm kernel (over packed panels, and over the plain weight) against the
routes PackedLinear had before it (oneDNN pre-packed weights, torch's F.linear, i.e. MKL) on SmolLM2-135M's
linear shapes, in GF/s; float32, or bfloat16 (--dtype bfloat16: the bf16 panels on vdpbf16ps against
oneDNN's pre-packed bf16 linear, the fp32 GEMM over an fp32 copy that PackedLinear runs for big batches,
and F.linear in bf16).

    flock /work/notes/bench.lock python bench/gemm.py [--threads 2] [--rows 5,8,16,32,48,64,128,256]
    flock /work/notes/bench.lock python bench/gemm.py --dtype bfloat16 [--rows ...,512]
    flock /work/notes/bench.lock python bench/gemm.py --step 32,64 [--model DIR] [--dtype bfloat16]

--step: whole batched decode steps of SmolLM2 instead: one LLMEngine, N sequences of 32 prompt tokens
decoding together; steps alternate between every PackedLinear routing its rows as now (5+ rows to the gemm
kernel's panels, up to its limit for the dtype) and routing them as before the kernel (float32: a oneDNN
copy below 48 rows, MKL above; bfloat16: the oneDNN bf16 copy, or from 48 rows the fp32 copy where the
engine made one), and each side reports its median step.

Each (shape, rows) times the routes interleaved, call after call, and reports each one's best and median
call (a shared machine slows all of them alike at a given moment; with 2 threads on 2 busy cores the
median is mostly OpenMP threads waiting for a core, the best is what the code can do); the weight is the
same tensor for all,
so whether it sits in cache is the same too (the 49152x576 lm_head, 113 MB, never does). Prints a markdown
table and the CPU's flags that matter (AVX2, FMA, AVX512*).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.nn.functional as F

from shoal.kernels import gemm
from shoal.model.packed_linear import BIG_BATCH_ROWS, PACK_ROWS_HINT, _linear, _pack

# (name, N, K): SmolLM2-135M's qkv, o_proj, gate_up, down and lm_head as nn.Linear weights [N, K].
SHAPES = [
    ("qkv", 960, 576),
    ("o_proj", 576, 576),
    ("gate_up", 3072, 576),
    ("down", 576, 1536),
    ("lm_head", 49152, 576),
]


def cpu_flags() -> str:
    try:
        line = next(s for s in open("/proc/cpuinfo") if s.startswith("flags"))
    except (OSError, StopIteration):
        return "unknown"
    wanted = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16")
    return " ".join(f for f in line.split()[2:] if f in wanted)


def measure(
    n: int, k: int, rows: int, budget_s: float, dtype: torch.dtype = torch.float32
) -> dict[str, tuple[float, float]]:
    """(best, median) seconds per call of each route for x [rows, k] @ w [n, k].T + bias, in dtype."""
    g = torch.Generator().manual_seed(0)
    w, bias, x = torch.randn(n, k, generator=g) * 0.02, torch.randn(n, generator=g), torch.randn(rows, k)
    w, bias, x = w.to(dtype), bias.to(dtype), x.to(dtype)
    packed, panels = _pack(w, PACK_ROWS_HINT), gemm.pack_panels(w)
    if dtype == torch.float32:
        routes = {
            "panels": lambda: gemm.gemm_panels(x, panels, n, bias),
            "plain": lambda: gemm.gemm(x, w, bias),
            "onednn_packed": lambda: _linear(x, packed, bias),
            "f_linear": lambda: F.linear(x, w, bias),
        }
    else:  # as PackedLinear builds them: oneDNN's bf16 copy for 32 rows, the fp32 copy for BIG_BATCH_ROWS
        packed_fp32, bias_fp32 = _pack(w.float(), BIG_BATCH_ROWS), bias.float()
        routes = {
            "panels": lambda: gemm.gemm_panels(x, panels, n, bias),
            "fp32_copy": lambda: _linear(x.float(), packed_fp32, bias_fp32).to(dtype),
            "onednn_packed": lambda: _linear(x, packed, bias),
            "f_linear": lambda: F.linear(x, w, bias),
        }
    times: dict[str, list[float]] = {name: [] for name in routes}
    for fn in routes.values():
        fn()  # warm-up
    deadline = time.perf_counter() + budget_s
    while len(times["panels"]) < 5 or (time.perf_counter() < deadline and len(times["panels"]) < 200):
        for name, fn in routes.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return {name: (min(ts), statistics.median(ts)) for name, ts in times.items()}


def step_times(model: str, seqs: int, steps: int, dtype: str = "float32") -> dict[str, float]:
    """Median seconds of a decode step with `seqs` sequences, with the gemm kernel and without."""
    from shoal.engine.config import EngineConfig
    from shoal.engine.llm_engine import LLMEngine
    from shoal.engine.sampling_params import SamplingParams
    from shoal.model import packed_linear

    engine = LLMEngine(EngineConfig(model=model, dtype=dtype, kv_cache_memory=256 << 20))
    params = SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=2 * steps + 8)
    g = torch.Generator().manual_seed(seqs)
    for i in range(seqs):
        engine.add_request(f"s{i}", torch.randint(100, 20000, (32,), generator=g).tolist(), params)
    layers = [m for m in engine.model.modules() if isinstance(m, packed_linear.PackedLinear)]
    assert layers and all(m.panels is not None for m in layers), "the gemm kernel's panels were not made"
    onednn = [_pack(m.weight, PACK_ROWS_HINT) for m in layers]
    times: dict[str, list[float]] = {"gemm": [], "before": []}
    with torch.inference_mode():
        full = 0
        while full < 3:  # prompts in, then 3 steps in a row that advance every sequence
            full = full + 1 if len(engine.step()) == seqs else 0
        for i in range(2 * steps):
            side = "gemm" if i % 2 == 0 else "before"
            for m, copy in zip(layers, onednn, strict=True):
                m.use_gemm, m.packed = (True, None) if side == "gemm" else (False, copy)
            t = time.perf_counter()
            outs = engine.step()
            times[side].append(time.perf_counter() - t)
            assert len(outs) == seqs, f"{len(outs)} sequences in a step, expected {seqs}"
    return {side: statistics.median(ts) for side, ts in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rows", default="5,8,16,32,48,64,128,256")
    parser.add_argument("--shapes", default=",".join(s[0] for s in SHAPES))
    parser.add_argument("--budget-s", type=float, default=1.0, help="time per (shape, rows) cell")
    parser.add_argument("--step", default="", help="sequence counts: time decode steps instead")
    parser.add_argument("--steps", type=int, default=20, help="--step: steps per side")
    parser.add_argument("--model", default="models/SmolLM2-135M-Instruct")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    print(f"CPU flags: {cpu_flags()}; threads {args.threads}; {args.dtype}; load {os.getloadavg()[0]:.2f}")
    if args.step:
        print("| sequences | step ms, gemm | step ms, before | speed-up |\n|---|---|---|---|")
        for seqs in (int(n) for n in args.step.split(",")):
            t = step_times(args.model, seqs, args.steps, args.dtype)
            print(
                f"| {seqs} | {t['gemm'] * 1e3:.1f} | {t['before'] * 1e3:.1f} | {t['before'] / t['gemm']:.2f}x |"
            )
        print(f"load after: {os.getloadavg()[0]:.2f}")
        return
    if dtype == torch.bfloat16 and not gemm.bf16_available():
        raise SystemExit("gemm.c was built without AVX512-BF16 here: no bf16 kernel to measure")
    second = "gemm plain" if dtype == torch.float32 else "fp32 copy"
    print("GF/s of the best call (of the median call in brackets)")
    print(
        f"| linear | N x K | rows | gemm panels | {second} | oneDNN packed | F.linear | panels vs the faster other |"
    )
    print("|---|---|---|---|---|---|---|---|")
    wanted = args.shapes.split(",")
    for name, n, k in (s for s in SHAPES if s[0] in wanted):
        for rows in (int(r) for r in args.rows.split(",")):
            t = measure(n, k, rows, args.budget_s, dtype)
            gf = [
                f"{2 * rows * n * k / b / 1e9:.1f} ({2 * rows * n * k / m / 1e9:.1f})" for b, m in t.values()
            ]
            best_other = min(b for route, (b, _) in t.items() if route not in ("panels", "plain"))
            print(
                f"| {name} | {n}x{k} | {rows} | {' | '.join(gf)} | {best_other / t['panels'][0]:.2f}x |",
                flush=True,
            )
    print(f"load after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
