"""shoal's Triton kernels (paged decode attention, prefill attention with a cached prefix, the W4A16 GEMM)
against PyTorch references, run by triton's interpreter on CPU tensors; FP8 through torch._scaled_mm
against the dequantized reference; and a whole model routed through the kernels by the CUDA dispatch hooks.

How: the module fixture `ran` builds every case's inputs here, starts tests/triton_interpret_worker.py ONCE
with TRITON_INTERPRET=1 and SHOAL_TRITON_ON_CPU=1 in its own environment (the interpreter must be chosen
before triton is imported, and must not leak into this pytest process), and reads its outputs back; every
reference and assertion is computed here. On a machine with CUDA the same cases run natively as well
(`--device cuda`); without one those tests skip, saying so.

Tolerances (the kernels accumulate in fp32, as the references, but in another order):
- float32: 1e-5 relative to the sum of |terms| (attention: 2e-6 absolute, as the C kernel's test);
- bfloat16: one bf16 ulp, 2^-7 relative: the interpreter's fp32 -> bf16 cast truncates where a GPU rounds
  to nearest (half an ulp), and bf16 computes in fp32 under the interpreter (triton_support);
- float16 (and bfloat16 on a GPU): the 16-bit route (16-bit dot operands; attention probabilities rounded
  to the dtype before P @ V, as FlashAttention does): with u half an ulp, 4u relative + 2u of the largest
  value for attention; u relative + the fp32 summation term for the GEMM, whose operands are exact;
- integer paths exact: the W4A16 GEMM on integer inputs with power-of-two scales (every product and sum is
  exact in fp32) equals the float64 reference bit for bit.
Measured: about 25 s for the worker (triton import, ~40 interpreted launches, two small engines).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from tiny_models import Reference, check_greedy, tie_margin

from shoal.kernels import fp8
from shoal.quant.format import pack_int32
from shoal.quant.fp8 import FP8Linear, quantize_fp8_per_token, quantize_fp8_weight
from shoal.quant.rtn import QuantizedWeight, dequantize, quantize_rtn

pytestmark = pytest.mark.timeout(120)
HAVE_TRITON = __import__("importlib").util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(not HAVE_TRITON, reason="triton not installed (pip install '.[dev]')")
WORKER = Path(__file__).resolve().parent / "triton_interpret_worker.py"
REPO = WORKER.parent.parent
UPSTREAM = WORKER.parent / "fixtures" / "upstream_quant"
UPSTREAM_VARIANTS = ("gptq_v1_sym_g32", "gptq_v1_asym_g32", "gptq_v2_asym_actorder_g32", "awq_gemm_g32")
BF16_REL = 2**-7  # one bf16 ulp: the interpreter's fp32 -> bf16 cast truncates


# ---------------------------------------------------------------------------------------------------------
# Cases and their references


def decode_case(
    seed, lens, heads, kv_heads, dim, dtype, window=None, block_size=16, pad_tables=False, splits=1
):
    """Random caches, each sequence's blocks scattered over them; pad_tables adds garbage block ids after the
    last used column (never to be read); splits: spans of keys per (sequence, KV head) (split-K)."""
    g = torch.Generator().manual_seed(seed)
    width = max(-(-n // block_size) for n in lens)
    num_blocks = len(lens) * width + 3
    tables = (
        torch.randperm(num_blocks, generator=g)[: len(lens) * width].view(len(lens), width).to(torch.int32)
    )
    if pad_tables:
        tables = torch.cat([tables, torch.full((len(lens), 3), 10**6, dtype=torch.int32)], dim=1)
    shape = (num_blocks * block_size, kv_heads, dim)
    kwargs = dict(
        q=torch.randn(len(lens), heads, dim, generator=g).to(dtype),
        k_cache=torch.randn(shape, generator=g).to(dtype),
        v_cache=torch.randn(shape, generator=g).to(dtype),
        block_tables=tables,
        context_lens=torch.tensor(lens, dtype=torch.int32),
        block_size=block_size,
        window=window,
        scale=dim**-0.5,
        splits=splits,
    )
    return {"op": "decode", "kwargs": kwargs}


def decode_reference(q, k_cache, v_cache, block_tables, context_lens, block_size, window, scale, splits):
    out = []
    for b, n in enumerate(context_lens.tolist()):
        pos = torch.arange(n)
        slots = block_tables[b].long()[pos // block_size] * block_size + pos % block_size
        slots = slots[-window:] if window else slots
        k = k_cache[slots].double().transpose(0, 1)
        v = v_cache[slots].double().transpose(0, 1)
        out.append(F.scaled_dot_product_attention(q[b].double()[:, None], k, v, scale=scale, enable_gqa=True))
    return torch.stack(out)[:, :, 0]


def prefill_case(seed, context_len, tokens, heads, kv_heads, dim, dtype, window=None, fused_view=False):
    """A chunk of `tokens` queries after `context_len` cached tokens, all at random slots; fused_view: q is a
    strided view into [T, (H + 2 Hkv) * D] rows, as the model's fused qkv projection hands it over."""
    g = torch.Generator().manual_seed(seed)
    num_slots = 2 * (context_len + tokens) + 16
    q = torch.randn(tokens, (heads + 2 * kv_heads) * dim, generator=g).to(dtype)
    q = (
        q[:, : heads * dim].view(tokens, heads, dim)
        if fused_view
        else q[:, : heads * dim].reshape(-1, heads, dim)
    )
    kwargs = dict(
        q=q,
        k_cache=torch.randn(num_slots, kv_heads, dim, generator=g).to(dtype),
        v_cache=torch.randn(num_slots, kv_heads, dim, generator=g).to(dtype),
        slots=torch.randperm(num_slots, generator=g)[: context_len + tokens],
        context_len=context_len,
        window=window,
        scale=dim**-0.5,
    )
    return {"op": "prefill", "kwargs": kwargs}


def prefill_reference(q, k_cache, v_cache, slots, context_len, window, scale):
    tokens = q.shape[0]
    k = k_cache[slots].double().transpose(0, 1)[None]
    v = v_cache[slots].double().transpose(0, 1)[None]
    qpos = torch.arange(context_len, context_len + tokens)[:, None]
    kpos = torch.arange(context_len + tokens)[None, :]
    mask = (kpos <= qpos) & ((kpos > qpos - window) if window else True)
    qd = q.double().transpose(0, 1)[None]
    out = F.scaled_dot_product_attention(qd, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
    return out[0].transpose(0, 1)


def w4a16_case(seed, rows, out, cols, bits, group_size, symmetric, dtype, exact=False, bias=True):
    """A quantized weight and inputs. exact: integer inputs in [-3, 3] and power-of-two scales, so that the
    float32 result is exact; otherwise a round-to-nearest quantization of a random weight."""
    g = torch.Generator().manual_seed(seed)
    if exact:
        groups = cols // (group_size or cols)
        lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
        q = torch.randint(lo, hi + 1, (out, cols), generator=g).to(torch.int8)
        scale = 2.0 ** -torch.randint(0, 6, (out, groups), generator=g).float()
        zero = None if symmetric else torch.randint(lo, hi + 1, (out, groups), generator=g).to(torch.int8)
        qw = QuantizedWeight(q, scale, zero, bits, group_size)
        x = torch.randint(-3, 4, (rows, cols), generator=g).to(dtype)
        bias_values = torch.randint(-8, 9, (out,), generator=g).float()
    else:
        weight = (torch.randn(out, cols, generator=g) * 0.05).to(
            torch.bfloat16 if dtype != torch.float16 else torch.float32
        )
        qw = quantize_rtn(weight, None, bits, group_size, symmetric)
        x = torch.randn(rows, cols, generator=g).to(dtype)
        bias_values = torch.randn(out, generator=g)
    kwargs = dict(
        x=x,
        packed=pack_int32(qw.qweight, bits),
        scale=qw.scale,
        zero=qw.zero_point,
        bias=bias_values.to(dtype) if bias else None,
        bits=bits,
        group_size=group_size,
    )
    return {"op": "w4a16", "kwargs": kwargs, "qweight": qw.qweight}


def w4a16_reference(case) -> tuple[torch.Tensor, torch.Tensor]:
    """(float64 result of dequantize-to-x's-dtype then matmul, the sum of |terms| per output)."""
    kw = case["kwargs"]
    w = dequantize(case["qweight"], kw["scale"], kw["zero"], kw["x"].dtype).double()
    x = kw["x"].double()
    bias = None if kw["bias"] is None else kw["bias"].double()
    terms = x.abs() @ w.abs().t() + (0 if bias is None else bias.abs())
    return F.linear(x, w, bias), terms


DECODE = {
    "decode_fp32_gqa4": decode_case(1, [1, 2, 15, 16, 17, 40], 8, 2, 16, torch.float32, pad_tables=True),
    "decode_fp32_window": decode_case(2, [1, 7, 20, 21, 50], 8, 2, 16, torch.float32, window=20),
    "decode_bf16_gqa3_d64": decode_case(3, [3, 33, 64], 9, 3, 64, torch.bfloat16),
    "decode_fp16_mha_d24_window": decode_case(4, [5, 30], 4, 4, 24, torch.float16, window=7, block_size=8),
    "decode_fp32_split4": decode_case(16, [1, 40, 100, 130], 8, 2, 16, torch.float32, splits=4),
    "decode_bf16_window_split3": decode_case(17, [70, 129], 4, 2, 32, torch.bfloat16, window=50, splits=3),
}
PREFILL = {
    "prefill_fp32_fresh": prefill_case(5, 0, 37, 6, 2, 24, torch.float32),
    "prefill_fp32_cached_prefix": prefill_case(6, 50, 20, 6, 2, 24, torch.float32, fused_view=True),
    "prefill_fp32_window": prefill_case(7, 70, 90, 6, 2, 16, torch.float32, window=24),
    "prefill_bf16_cached_prefix": prefill_case(8, 33, 40, 4, 1, 64, torch.bfloat16, fused_view=True),
    "prefill_fp16_window": prefill_case(9, 17, 70, 4, 2, 32, torch.float16, window=16),
}
W4A16_EXACT = {
    "w4a16_exact_int4_asym_g32": w4a16_case(10, 5, 48, 128, 4, 32, False, torch.float32, exact=True),
    "w4a16_exact_int4_sym_g16": w4a16_case(11, 17, 40, 64, 4, 16, True, torch.float32, exact=True),
    "w4a16_exact_int8_channel": w4a16_case(12, 3, 24, 96, 8, 0, False, torch.float32, exact=True, bias=False),
}
W4A16_FLOAT = {
    "w4a16_fp32_int8_g32": w4a16_case(13, 3, 48, 128, 8, 32, False, torch.float32),
    "w4a16_bf16_int4_g64_rows33": w4a16_case(14, 33, 72, 128, 4, 64, False, torch.bfloat16),
    "w4a16_fp16_int4_sym_g128": w4a16_case(15, 1, 64, 256, 4, 128, True, torch.float16),
}


def upstream_dir(variant: str, stories_dir: Path, tmp: Path) -> Path:
    """An upstream-packed fixture (tests/test_quant_upstream.py) with stories260K's tokenizer beside it."""
    out = tmp / variant
    shutil.copytree(UPSTREAM / variant, out)
    for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"):
        shutil.copy(stories_dir / f, out / f)
    return out


def prompts(seed: int, lengths: list[int]) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 500, (n,), generator=g).tolist() for n in lengths]


ENGINE_CONFIG = dict(
    dtype="float32",
    max_model_len=256,
    max_num_batched_tokens=32,
    kv_cache_memory=1 << 22,  # CPU
    gpu_memory_utilization=0.2,  # CUDA: the two engines of the native run share the GPU
)
STORIES_PROMPTS = prompts(20, [21, 40])
AWQ_PROMPTS = prompts(21, [19, 37])
NEW_TOKENS = 8


def engine_case(model_dir: Path, prompt_list: list[list[int]]) -> dict:
    return {
        "op": "engine",
        "model_dir": str(model_dir),
        "config": ENGINE_CONFIG,
        "prompts": prompt_list,
        "logit_prompts": prompt_list[-1:],
        "max_tokens": NEW_TOKENS,
    }


def all_cases(stories_dir: Path, tmp: Path) -> dict:
    cases = {**DECODE, **PREFILL, **W4A16_EXACT, **W4A16_FLOAT}
    x = torch.randn(256, generator=torch.Generator().manual_seed(30))
    for variant in UPSTREAM_VARIANTS:
        cases[f"linear_{variant}"] = {"op": "linear", "model_dir": str(UPSTREAM / variant), "x": x}
    cases["engine_stories260K"] = engine_case(stories_dir, STORIES_PROMPTS)
    cases["engine_awq"] = engine_case(upstream_dir("awq_gemm_g32", stories_dir, tmp), AWQ_PROMPTS)
    return cases


# ---------------------------------------------------------------------------------------------------------
# Running the worker


def run_worker(cases: dict, tmp: Path, device: str) -> dict:
    torch.save(cases, tmp / "cases.pt")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    env.pop("TRITON_INTERPRET", None)
    if device == "cpu":
        env.update(TRITON_INTERPRET="1", SHOAL_TRITON_ON_CPU="1")
    cmd = [sys.executable, str(WORKER), str(tmp / "cases.pt"), str(tmp / "out.pt"), "--device", device]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=100, check=False)
    assert done.returncode == 0, f"worker failed:\n{done.stdout}\n{done.stderr[-4000:]}"
    return torch.load(tmp / "out.pt", weights_only=False)


@pytest.fixture(scope="module")
def cases(stories_dir, tmp_path_factory) -> dict:
    return all_cases(stories_dir, tmp_path_factory.mktemp("triton_cases"))


DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU here")),
]


@pytest.fixture(scope="module", params=DEVICES)
def ran(request, cases, tmp_path_factory) -> dict:
    """Every case's output: under the interpreter (cpu), or natively where a GPU is present (cuda)."""
    if not HAVE_TRITON:
        pytest.skip("triton not installed (pip install '.[dev]')")
    outputs = run_worker(cases, tmp_path_factory.mktemp(f"triton_{request.param}"), request.param)
    return {**outputs, "_device": request.param}


def output(ran: dict, name: str):
    result = ran[name]
    assert "error" not in result, f"{name}: {result.get('error')}"
    print(f"{name}: {result['seconds']:.2f} s in the worker")
    return result["out"]


# ---------------------------------------------------------------------------------------------------------
# Tests


def attention_bound(
    want: torch.Tensor, dtype: torch.dtype, v_cache: torch.Tensor, device: str
) -> torch.Tensor:
    """float32: summation order. bfloat16 under the interpreter: computed in fp32, one truncating rounding of
    the output. The 16-bit route (float16; bfloat16 on a GPU): probabilities rounded to the dtype before
    P @ V (u = half an ulp, relative): 4u of the output plus 2u of the largest value."""
    if dtype == torch.float32:
        return torch.full_like(want, 2e-6)
    if dtype == torch.bfloat16 and device == "cpu":
        return want.abs() * BF16_REL + 1e-6
    u = torch.finfo(dtype).eps / 2
    return want.abs() * 4 * u + 2 * u * float(v_cache.abs().max())


@needs_triton
@pytest.mark.parametrize("name", [*DECODE, *PREFILL])
def test_attention_kernels_match_reference(ran, cases, name):
    """Paged decode (one query per sequence, through block tables) and prefill with a cached prefix (a chunk
    of queries over its slots), against float64 SDPA over the gathered keys."""
    kwargs = cases[name]["kwargs"]
    got = output(ran, name)
    want = (decode_reference if name in DECODE else prefill_reference)(**kwargs)
    assert got.dtype == kwargs["q"].dtype and got.shape == kwargs["q"].shape
    err = (got.double() - want).abs()
    print(f"{name}: max |err| {err.max():.2e}")
    assert (err <= attention_bound(want, got.dtype, kwargs["v_cache"], ran["_device"])).all()


@needs_triton
@pytest.mark.parametrize("name", list(W4A16_EXACT))
def test_w4a16_gemm_is_exact_on_integer_inputs(ran, cases, name):
    got = output(ran, name)
    want, _ = w4a16_reference(cases[name])
    assert got.dtype == torch.float32
    assert torch.equal(got.double(), want)


@needs_triton
@pytest.mark.parametrize("name", list(W4A16_FLOAT))
def test_w4a16_gemm_matches_dequantized_reference(ran, cases, name):
    got = output(ran, name)
    want, terms = w4a16_reference(cases[name])
    dtype = cases[name]["kwargs"]["x"].dtype
    assert got.dtype == dtype and got.shape == want.shape
    rel = {torch.float32: 0.0, torch.bfloat16: BF16_REL, torch.float16: 2**-11}[dtype]  # bf16: <= 1 ulp
    err = (got.double() - want).abs()
    print(f"{name}: max |err| {err.max():.2e}")
    assert (err <= want.abs() * rel + terms * 1e-5).all()


@needs_triton
@pytest.mark.parametrize("variant", UPSTREAM_VARIANTS)
def test_gptq_and_awq_layers_dispatch_to_w4a16(ran, cases, variant):
    """Every QuantizedLinear of an upstream-packed checkpoint (GPTQ v1/v2, act-order, AWQ) routes its forward
    to the Triton GEMM, and gives x @ w_hat.T (+ bias) with its dequantized weight (input permuted first)."""
    from shoal.model.loader import load_model
    from shoal.quant.linear import QuantizedLinear

    result = ran[f"linear_{variant}"]
    got = output(ran, f"linear_{variant}")
    model, _ = load_model(UPSTREAM / variant, torch.float32, torch.device("cpu"))
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    assert sorted(got) == sorted(layers) and result["calls"] == {"triton_w4a16": len(layers)}
    x = cases[f"linear_{variant}"]["x"].double()
    for name, m in layers.items():
        xi = x[: m.in_features]
        xi = xi[m.input_perm] if m.input_perm is not None else xi
        w = m.dequantized_weight(torch.float64)
        want = w @ xi + (0 if m.bias is None else m.bias.double())
        err = (got[name].double() - want).abs().max()
        assert err <= 1e-5 * float((w.abs() @ xi.abs()).max()), name


@needs_triton
def test_model_greedy_parity_with_transformers_through_triton_kernels(ran, stories_dir):
    """stories260K (GQA 8/4) served with every attention call on the Triton kernels (decode over block
    tables; prefill chunks of up to 32 tokens over their cached context) keeps greedy parity with transformers,
    under the foundation's near-tie rule, the margin from its own measured logit error."""
    result = ran["engine_stories260K"]
    out = output(ran, "engine_stories260K")
    assert result["calls"].get("triton_paged_decode", 0) > 0 and result["calls"].get("triton_prefill", 0) > 0
    ref = Reference.load(stories_dir)
    error = float((out["logits"][0] - ref.logits(STORIES_PROMPTS[-1])).abs().max())
    print(f"stories260K through Triton: max |logit error| {error:.2e}")
    assert error < 1e-3
    for prompt, tokens in zip(STORIES_PROMPTS, out["tokens"], strict=True):
        assert len(tokens) == NEW_TOKENS
        check_greedy(ref, prompt, tokens, tie_margin(error), "stories260K triton")


@needs_triton
def test_quantized_model_generates_the_same_through_triton_kernels(ran, cases):
    """The AWQ checkpoint with attention and every quantized linear on the Triton kernels gives the greedy
    tokens and prompt logits of shoal's CPU paths (qgemv, dequantized F.linear, the C attention kernels)."""
    from shoal.engine.config import EngineConfig
    from shoal.engine.llm_engine import LLMEngine
    from shoal.engine.sampling_params import SamplingParams

    result = ran["engine_awq"]
    out = output(ran, "engine_awq")
    assert {"triton_paged_decode", "triton_prefill", "triton_w4a16"} <= set(result["calls"])
    engine = LLMEngine(EngineConfig(model=cases["engine_awq"]["model_dir"], device="cpu", **ENGINE_CONFIG))
    logits = engine.prompt_logits(AWQ_PROMPTS[-1])
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
    tokens = [list(o.outputs[0].token_ids) for o in engine.generate(AWQ_PROMPTS, params)]
    assert float((out["logits"][0] - logits).abs().max()) < 1e-4 * float(logits.abs().max())
    assert out["tokens"] == tokens


# ---------------------------------------------------------------------------------------------------------
# FP8 through torch._scaled_mm (no Triton: runs in this process)


def _scaled_mm_runs_here() -> str | None:
    """None where torch._scaled_mm runs on CPU tensors here, else why not."""
    if not hasattr(torch, "_scaled_mm"):
        return f"torch {torch.__version__} has no _scaled_mm"
    a = torch.zeros(16, 16).to(fp8.FP8_DTYPE)
    try:
        torch._scaled_mm(
            a, a.t(), scale_a=torch.ones(16, 1), scale_b=torch.ones(1, 16), out_dtype=torch.float32
        )
    except (RuntimeError, NotImplementedError) as exc:
        return f"torch {torch.__version__}: _scaled_mm does not run on the CPU ({exc})"
    return None


SCALED_MM_SKIP = _scaled_mm_runs_here()


@pytest.mark.skipif(SCALED_MM_SKIP is not None, reason=str(SCALED_MM_SKIP))
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_fp8_scaled_mm_matches_dequantized_reference(out_dtype):
    """Per-token fp8 activations times per-channel fp8 weights through torch._scaled_mm equal the float64
    product of the dequantized operands: fp32 within 1e-5 of the sum of |terms| (summation order); bf16 also
    within half a bf16 ulp of the product and half an ulp of the sum, since the bias is added to the rounded
    product (as CUDA's row-wise _scaled_mm, which produces bf16 only, makes scaled_mm do everywhere)."""
    g = torch.Generator().manual_seed(40)
    w = torch.randn(48, 64, generator=g)
    x = torch.randn(5, 64, generator=g) * 3
    bias = torch.randn(48, generator=g)
    qw = quantize_fp8_weight(w)
    xq, xs = quantize_fp8_per_token(x)
    got = fp8.scaled_mm(xq, xs, qw.qweight, qw.scale, bias, out_dtype)
    xd, wd = xq.double() * xs.double(), qw.qweight.double() * qw.scale.double()
    product = xd @ wd.t()
    want = product + bias.double()
    terms = xd.abs() @ wd.abs().t() + bias.double().abs()
    assert got.dtype == out_dtype and got.shape == (5, 48)
    rel = 2**-8 if out_dtype == torch.bfloat16 else 0.0
    err = (got.double() - want).abs()
    print(f"{out_dtype}: max |err| {err.max():.2e}")
    assert (err <= (product.abs() + want.abs()) * rel + terms * 1e-5).all()


@pytest.mark.skipif(SCALED_MM_SKIP is not None, reason=str(SCALED_MM_SKIP))
def test_fp8_linear_keeps_its_emulation_on_cpu_and_agrees_with_scaled_mm():
    """FP8Linear on the CPU is unchanged (float32 emulation); the _scaled_mm route it takes on CUDA computes
    the same product here."""
    g = torch.Generator().manual_seed(41)
    layer = FP8Linear(quantize_fp8_weight(torch.randn(32, 64, generator=g)))
    x = torch.randn(3, 64, generator=g)
    xq, xs = quantize_fp8_per_token(x)
    routed = fp8.scaled_mm(xq, xs, layer.weight_fp8, layer.weight_scale, None, torch.float32)
    assert layer._scaled_mm_device is None  # the CPU path never asked for _scaled_mm
    assert (layer(x) - routed).abs().max() <= 1e-5 * float(routed.abs().max())
    assert layer._scaled_mm_device is None


def test_scaled_mm_refuses_operands_out_of_contract():
    a = torch.zeros(4, 32).to(fp8.FP8_DTYPE)
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        fp8.scaled_mm(a.float(), torch.ones(4, 1), a, torch.ones(4), None, torch.float32)
