"""Quantization toolkit (issue 18): W8A8 (int8 weights and activations, optional SmoothQuant, dynamic
per-token or static per-tensor activation scales) and FP8 (E4M3 weights, dynamic per-token activations).

compressed-tensors 0.20 (a dev dependency) is the oracle: its `IntQuantizationCompressor` /
`FloatQuantizationCompressor` (compressors/naive_quantized/base.py) must decompress shoal's checkpoint to
the weights shoal dequantizes. Tolerances are stated where a float rescale follows an exact integer product.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from shoal.model.loader import load_model
from shoal.quant.activation_recipe import ActivationOptions
from shoal.quant.calibration import BlockwiseCalibration, forward_windows, load_calibration_tokens
from shoal.quant.fp8 import FP8_DTYPE, FP8Linear, quantize_fp8_weight
from shoal.quant.perplexity import eval_tokens
from shoal.quant.quantize import Calibration, quantize_model
from shoal.quant.rtn import quantize_rtn
from shoal.quant.smoothquant import activation_absmax, smooth_block, smooth_checkpoint
from shoal.quant.w8a8 import (
    W8A8Linear,
    affine_params,
    int8_matmul,
    int8_matmul_float,
    int8_matmul_reference,
    quantize_per_tensor,
    quantize_per_token,
    quantize_per_token_affine,
    reference_forward,
    union_affine,
)

CPU = torch.device("cpu")
EVAL = Path(__file__).resolve().parents[2] / "shared" / "eval"
FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def _activations(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    """Activation-like inputs: correlated features, four channels at 10x magnitude."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols // 4, generator=g) @ torch.randn(cols // 4, cols, generator=g) / 4
    x[:, torch.randperm(cols, generator=g)[:4]] *= 10
    return x


@pytest.mark.timeout(10)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_round_trip_within_the_scale_bound(dtype):
    w = (torch.randn(96, 160) * torch.rand(96, 1) * 0.1).to(dtype)
    qw = quantize_rtn(w, None, 8, 0)
    err = (w.float() - qw.dequantize(torch.float32)).abs()
    assert qw.qweight.dtype == torch.int8 and qw.scale.shape == (96, 1)
    assert bool((err <= qw.scale.float() / 2 + 1e-7).all())
    x = _activations(33, 160)
    xq, xs = quantize_per_token(x)
    assert xs.shape == (33, 1) and bool((xq.float() * xs - x).abs().le(xs / 2 + 1e-6).all())
    fq = quantize_fp8_weight(w)
    assert fq.qweight.dtype == FP8_DTYPE
    # E4M3 has 3 mantissa bits: relative error <= 2^-4 for normal values, absolute <= scale * 2^-9 below
    fe = (w.float() - fq.dequantize(torch.float32)).abs()
    bound = torch.maximum(w.float().abs() * 2**-4, fq.scale.float() * 2**-9)
    assert bool((fe <= bound * 1.0001).all())


@pytest.mark.timeout(10)
def test_int8_matmul_float_is_exact_past_float32_integers():
    # k = 2,148: the extreme rows' sums (2148 * 128 * 128 ~ 2^25) pass float32's exact integers (2^24), so
    # only the slicing by FLOAT_EXACT_K features (each slice's sum <= 2^24) keeps them exact
    g = torch.Generator().manual_seed(0)
    xq = torch.randint(-128, 128, (5, 2148), generator=g, dtype=torch.int8)
    wq = torch.randint(-128, 128, (7, 2148), generator=g, dtype=torch.int8)
    xq[0], wq[0] = -128, -128
    xq[1], wq[1, 1:] = 127, -128
    exact = xq.to(torch.int64) @ wq.to(torch.int64).t()
    assert exact[0, 0] == 2148 * 128 * 128
    assert torch.equal(int8_matmul_float(xq, wq).to(torch.int64), exact)
    assert int8_matmul_float(xq[:, :0], wq[:, :0]).shape == (5, 7)


@pytest.mark.timeout(10)
@pytest.mark.parametrize("rows", [1, 4, 37])
def test_int8_matmul_is_exact_and_rescaled_output_matches_the_dequantized_reference(rows):
    g = torch.Generator().manual_seed(rows)
    xq = torch.randint(-128, 128, (rows, 576), generator=g, dtype=torch.int8)
    wq = torch.randint(-128, 128, (192, 576), generator=g, dtype=torch.int8)
    exact = xq.to(torch.int64) @ wq.to(torch.int64).t()
    assert torch.equal(int8_matmul(xq, wq).to(torch.int64), exact)
    assert torch.equal(int8_matmul_reference(xq, wq).to(torch.int64), exact)
    w = torch.randn(192, 576) * 0.05
    layer = W8A8Linear(quantize_rtn(w, None, 8, 0), bias=torch.randn(192))
    x = _activations(rows, 576, seed=rows)
    out, ref = layer(x), reference_forward(layer, x)
    # the int32 product is exact; the float32 rescale adds one rounding of each product and the bias
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    dense = x @ w.t() + layer.bias
    rel = (out - dense).norm() / dense.norm()
    assert rel < 0.05, rel  # per-token int8 is coarse with 10x outlier channels (SmoothQuant's point)
    static = W8A8Linear(quantize_rtn(w, None, 8, 0), input_scale=x.abs().max() / 127)
    torch.testing.assert_close(static(x), reference_forward(static, x), rtol=1e-5, atol=1e-5)
    fp8 = FP8Linear(quantize_fp8_weight(w))
    assert (fp8(x) - x @ w.t()).norm() / (x @ w.t()).norm() < 0.06


@pytest.mark.timeout(10)
def test_affine_activations_match_compressed_tensors_and_beat_symmetric_on_one_sided_inputs():
    """The asymmetric (affine) int8 form, scale = (max - min) / 255 with a zero point: parameters and
    fake-quantized values equal to compressed-tensors 0.20's (`calculate_qparams`, `fake_quantize`), the
    round trip within half a step, a smaller error than the symmetric form on a one-sided input (SiLU's),
    and W8A8Linear's exact integer path (the zero point folded into the weights' row sums) on its float
    reference, static and dynamic."""
    x = torch.nn.functional.silu(_activations(64, 256, seed=3))  # one-sided: min about -0.28
    scale, zp = affine_params(x.min().reshape(1), x.max().reshape(1))
    q = quantize_per_tensor(x, scale, zp)
    x_hat = (q.float() - zp.float()) * scale
    assert bool(((x - x_hat).abs() <= scale / 2 * (1 + 1e-5)).all())
    sym = x.abs().max() / 127
    sym_err = (x - quantize_per_tensor(x, sym.reshape(1)).float() * sym).norm()
    assert (x - x_hat).norm() < 0.75 * sym_err, ((x - x_hat).norm(), sym_err)  # nearly twice the levels

    ct = pytest.importorskip("compressed_tensors.quantization")
    from compressed_tensors.quantization.utils.helpers import calculate_qparams

    args = ct.QuantizationArgs(num_bits=8, type="int", symmetric=False, strategy="tensor")
    ct_scale, ct_zp = calculate_qparams(x.min().reshape(1), x.max().reshape(1), args)
    assert torch.equal(ct_scale.float(), scale) and torch.equal(ct_zp.to(torch.int32), zp)
    assert torch.equal(ct.fake_quantize(x, ct_scale, ct_zp, args), x_hat)

    w = torch.randn(96, 256) * 0.05
    static = W8A8Linear(quantize_rtn(w, None, 8, 0), scale, symmetric=False, input_zero_point=zp)
    dynamic = W8A8Linear(quantize_rtn(w, None, 8, 0), symmetric=False)
    for layer in (static, dynamic):
        torch.testing.assert_close(layer(x), reference_forward(layer, x), rtol=1e-5, atol=1e-5)
        assert (layer(x) - x @ w.t()).norm() / (x @ w.t()).norm() < 0.05  # 10x outlier channels
    rq, rs, rz = quantize_per_token_affine(x)
    assert rs.shape == rz.shape == (64, 1) and bool(
        ((rq.float() - rz) * rs - x).abs().le(rs / 2 + 1e-6).all()
    )
    with pytest.raises(ValueError, match="zero point"):
        W8A8Linear(quantize_rtn(w, None, 8, 0), scale, symmetric=False)
    # fused parts: equal parameters come back as they are; different ones give a range covering both
    assert union_affine([scale, scale], [zp, zp]) == (scale, zp)
    wide_scale, wide_zp = union_affine([scale, scale * 2], [zp, torch.tensor([0], dtype=torch.int32)])
    lo, hi = (-128 - wide_zp) * wide_scale, (127 - wide_zp) * wide_scale
    for s, z in (
        (scale, zp),
        (scale * 2, torch.tensor([0], dtype=torch.int32)),
    ):  # both parts' ranges covered
        assert lo <= (-128 - z) * s + 1e-6 and hi >= (127 - z) * s - 1e-6


def _logits(model_dir: Path, ids: torch.Tensor) -> torch.Tensor:
    model, _ = load_model(model_dir, torch.float32, CPU)
    with torch.inference_mode():
        return model.logits(forward_windows(model, ids)).float()


@pytest.mark.timeout(30)
def test_smoothquant_folding_keeps_the_model_function(stories_dir, tmp_path):
    """fp32, before quantization: x/s through the folded norm / up rows, times W*s, is the same model."""
    ids = load_calibration_tokens(stories_dir, EVAL / "tinystories-sample.txt", 4, 64, 0)
    model, cfg = load_model(stories_dir, torch.float32, CPU, pack=False)
    absmax = activation_absmax(model, ids)
    tensors = load_file(str(stories_dir / "model.safetensors"))
    original = dict(tensors)
    factors = smooth_checkpoint(tensors, absmax, 0.5, cfg.num_layers, gqa=cfg.num_heads != cfg.num_kv_heads)
    assert sorted(k.split(".", 2)[2] for k in factors if k.startswith("layers.0.")) == [
        "mlp.down_proj",
        "mlp.gate_up_proj",
        "self_attn.qkv_proj",
    ]  # stories260K has grouped-query attention: o_proj is not smoothed
    assert not torch.equal(
        tensors["model.layers.0.input_layernorm.weight"], original["model.layers.0.input_layernorm.weight"]
    )
    out = tmp_path / "smoothed"
    out.mkdir()
    for f in stories_dir.iterdir():
        if f.is_file() and not f.name.endswith(".safetensors"):
            (out / f.name).write_bytes(f.read_bytes())
    save_file(tensors, str(out / "model.safetensors"))
    base, smoothed = _logits(stories_dir, ids[:2]), _logits(out, ids[:2])
    torch.testing.assert_close(smoothed, base, rtol=1e-4, atol=1e-4)


@pytest.mark.timeout(30)
def test_smooth_block_keeps_the_block_function_and_rescales_its_hessians(stories_dir):
    """Smoothing inside GPTQ's pass: after smooth_block, the block's linears see x / s (their inputs captured
    again equal the old ones rescaled, Hessians included) and the block's output is unchanged (fp32)."""
    ids = load_calibration_tokens(stories_dir, EVAL / "tinystories-sample.txt", 4, 64, 0)
    runs = []
    for smoothed in (False, True):
        model, cfg = load_model(stories_dir, torch.float32, CPU, pack=False)
        blocks = BlockwiseCalibration(model, ids)
        names = [
            f"layers.0.{f}"
            for f in ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")
        ]
        stats = blocks.capture(names)
        norms = smooth_block(model.layers[0], stats, 0.5, 0, cfg) if smoothed else {}
        runs.append((blocks, stats, norms, blocks.capture(names), model))
    (plain, before, _, _, base), (smooth, rescaled, norms, again, model) = runs
    assert sorted(norms) == [
        "model.layers.0.input_layernorm.weight",
        "model.layers.0.post_attention_layernorm.weight",
    ]
    assert torch.equal(norms["model.layers.0.input_layernorm.weight"], model.layers[0].input_layernorm.weight)
    assert not torch.equal(model.layers[0].input_layernorm.weight, base.layers[0].input_layernorm.weight)

    def close(a: torch.Tensor, b: torch.Tensor) -> None:  # float32 products: at the largest entry's precision
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5 * float(b.abs().max()))

    for name in ("layers.0.self_attn.qkv_proj", "layers.0.mlp.gate_up_proj", "layers.0.mlp.down_proj"):
        assert not torch.allclose(again[name].abs_max, before[name].abs_max)  # the inputs did change
        close(again[name].hessian.sum, rescaled[name].hessian.sum)
    # stories260K has grouped-query attention: o_proj's input is left alone
    close(again["layers.0.self_attn.o_proj"].hessian.sum, before["layers.0.self_attn.o_proj"].hessian.sum)
    plain.advance()
    smooth.advance()
    for (x0, r0), (x1, r1) in zip(plain.states, smooth.states, strict=True):
        torch.testing.assert_close(x1, x0, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(r1, r0, rtol=1e-4, atol=1e-5)


VARIANTS = {
    "w8a8": ("w8a8", ActivationOptions()),
    "w8a8-sq-static": ("w8a8", ActivationOptions(smoothquant_alpha=0.5, activation_scales="static")),
    "w8a8-gptq": ("w8a8", ActivationOptions(weight_method="gptq")),
    # the affine form: static scales and zero points from the smoothed inputs' [min, max]
    "w8a8-sq-static-affine": (
        "w8a8",
        ActivationOptions(smoothquant_alpha=0.5, activation_scales="static", activation_symmetric=False),
    ),
    # SmoothQuant inside GPTQ's pass (smoothquant.smooth_block): float32 norm weights in the checkpoint
    "w8a8-sq-gptq": ("w8a8", ActivationOptions(weight_method="gptq", smoothquant_alpha=0.5)),
    "fp8": ("fp8", ActivationOptions()),
}


@pytest.fixture(scope="module")
def stories_8bit(stories_dir, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("quant_8bit")
    calibration = Calibration(EVAL / "wikitext2-valid.txt", 8, 128, 0)
    return {
        k: quantize_model(stories_dir, root / k, m, calibration=calibration, activation_options=o).output
        for k, (m, o) in VARIANTS.items()
    }


def _ct_decompressed(model_dir: Path) -> dict[str, torch.Tensor]:
    """module name -> weight, as compressed-tensors 0.20 decompresses shoal's checkpoint."""
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors.naive_quantized import (
        FloatQuantizationCompressor,
        IntQuantizationCompressor,
    )
    from compressed_tensors.quantization import QuantizationConfig

    config = QuantizationConfig.model_validate(
        json.loads((model_dir / "config.json").read_text())["quantization_config"]
    )
    compressor = {"int-quantized": IntQuantizationCompressor, "float-quantized": FloatQuantizationCompressor}[
        config.format
    ]
    weights = {}
    with safe_open(str(model_dir / "model.safetensors"), framework="pt") as f:
        for scheme in config.config_groups.values():
            for module in scheme.targets:
                state = {k: f.get_tensor(f"{module}.{k}") for k in compressor.compression_param_names(scheme)}
                weights[module] = compressor.decompress(state, scheme)["weight"]
    return weights


def _shoal_dequantized(model: torch.nn.Module, cfg) -> dict[str, torch.Tensor]:
    weights = {}
    for path, module in model.named_modules():
        if not isinstance(module, (W8A8Linear, FP8Linear)):
            continue
        head, _, leaf = path.rpartition(".")
        parts = FUSED.get(leaf, (leaf,))
        w = module.dequantized_weight(torch.float32)
        if leaf == "qkv_proj":
            kv = cfg.num_kv_heads * cfg.head_dim
            sizes = [cfg.num_heads * cfg.head_dim, kv, kv]
        else:
            sizes = [w.shape[0] // len(parts)] * len(parts)
        for part, chunk in zip(parts, w.split(sizes), strict=True):
            weights[f"model.{head}.{part}"] = chunk
    return weights


@pytest.mark.timeout(60)
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_stories_checkpoint_reloads_matches_compressed_tensors_and_generates(stories_8bit, variant):
    from shoal.engine.config import EngineConfig
    from shoal.engine.llm_engine import LLMEngine
    from shoal.engine.sampling_params import SamplingParams

    model_dir = stories_8bit[variant]
    qc = json.loads((model_dir / "config.json").read_text())["quantization_config"]
    acts = qc["config_groups"]["group_0"]["input_activations"]
    if variant == "fp8":
        assert qc["format"] == "float-quantized" and acts == {
            **acts,
            "type": "float",
            "dynamic": True,
            "strategy": "token",
        }
    else:
        assert qc["format"] == "int-quantized" and acts["type"] == "int"
        assert acts["symmetric"] == ("affine" not in variant)
        assert (acts["dynamic"], acts["strategy"]) == (
            ("static" not in variant),
            "tensor" if "static" in variant else "token",
        )
    model, cfg = load_model(model_dir, torch.float32, CPU)
    kinds = {type(m).__name__ for m in model.modules() if type(m).__name__.endswith("Linear")}
    assert kinds >= ({"FP8Linear"} if variant == "fp8" else {"W8A8Linear"})
    if "affine" in variant:  # every layer applies a zero point, read from an int8 input_zero_point tensor
        layers = [m for m in model.modules() if isinstance(m, W8A8Linear)]
        assert layers and all(not m.symmetric and m.input_zero_point is not None for m in layers)
        with safe_open(str(model_dir / "model.safetensors"), framework="pt") as f:
            zps = [f.get_tensor(k) for k in f.keys() if k.endswith(".input_zero_point")]
        assert len(zps) == 35 and all(z.dtype == torch.int8 and z.shape == (1,) for z in zps)
    ours, theirs = _shoal_dequantized(model, cfg), _ct_decompressed(model_dir)
    assert sorted(ours) == sorted(theirs) and len(ours) == 35
    for name, w in theirs.items():
        assert torch.equal(ours[name], w.float()), name
    engine = LLMEngine(EngineConfig(model=str(model_dir), dtype="float32", kv_cache_memory=4 << 20))
    ids = engine.tokenizer.encode("Once upon a time")
    out = engine.generate([ids], SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))
    assert len(out[0].outputs[0].token_ids) == 12


@pytest.mark.timeout(90)
@pytest.mark.parametrize("variant", ["w8a8", "fp8"])
def test_serve_8bit_stories_over_openai_api(stories_8bit, variant):
    import httpx

    from shoal.engine.async_engine import AsyncEngine
    from shoal.engine.config import EngineConfig
    from shoal.server.app import build_app
    from shoal.server.settings import ServerSettings

    engine = AsyncEngine.from_config(
        EngineConfig(model=str(stories_8bit[variant]), dtype="float32", kv_cache_memory=4 << 20)
    )
    app = build_app(engine, ServerSettings(served_model_name=f"stories-{variant}"))

    async def run() -> httpx.Response:
        await engine.start()
        try:
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=60) as client:
                body = {
                    "model": f"stories-{variant}",
                    "prompt": "Once upon a time",
                    "max_tokens": 8,
                    "temperature": 0,
                }
                return await client.post("/v1/completions", json=body)
        finally:
            await engine.shutdown()

    r = asyncio.run(run())
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["usage"]["completion_tokens"] == 8 and out["choices"][0]["text"]


def _engine_perplexity(model_dir: Path, tokens: int = 1024) -> float:
    """issue 18's measure: the first `tokens` tokens of wikitext2-test (2,048 in its protocol), in
    non-overlapping windows of min(1024, max_model_len), every token after a window's first scored,
    exp(mean NLL)."""
    from shoal.engine.config import EngineConfig
    from shoal.engine.llm_engine import LLMEngine

    # one 1,024-token window needs 47 MiB of KV cache in float32 (dtype auto on an AVX2-only CPU)
    engine = LLMEngine(EngineConfig(model=str(model_dir), kv_cache_memory=128 << 20))
    ids = eval_tokens(engine.tokenizer, EVAL / "wikitext2-test.txt", tokens)
    window = min(1024, engine.config.max_model_len or 1024)
    nll = []
    for start in range(0, len(ids) - 1, window):
        chunk = ids[start : start + window]
        logits = engine.prompt_logits(chunk)
        target = torch.tensor(chunk[1:])
        nll.append(-torch.log_softmax(logits[:-1].float(), -1).gather(-1, target[:, None]).flatten())
    return float(torch.cat(nll).mean().exp())


@pytest.mark.timeout(240)
def test_smollm2_w8a8_dynamic_perplexity_and_weight_memory(smollm2_dir, tmp_path):
    """SmolLM2-135M-Instruct, W8A8 with dynamic per-token int8 activations, engine default dtype, on half
    of issue 18's protocol (perplexity on the first 1,024 tokens of wikitext2-test, one window; SmoothQuant
    calibrated on 8 x 256 tokens of wikitext2-valid). `make bench-quant` runs the whole protocol (2,048
    tokens, 16 x 256), where SmoothQuant measured 0.999x of 16-bit and plain round to nearest 1.030x.
    - With SmoothQuant alpha 0.8 (llm-compressor's W8A8 recipe): within 1.03x of 16-bit (measured 1.011x
      on an AVX2-only EPYC in float32; 16 x 256 calibration: 1.004x). Plain round to nearest without
      smoothing measured 1.040x on these tokens: the bound tells the two apart.
    - Stored int8 weights + 16-bit scales <= 0.55x of bfloat16 (0.501x), with and without smoothing.
    Cost: 38-40 s on the AVX2-only EPYC (calibration ~12 s, two perplexity runs of one 1,024-token window
    ~7 s each, two engines); the whole protocol took this test 70-100 s there."""
    calibration = Calibration(EVAL / "wikitext2-valid.txt", 8, 256, 0)
    plain = quantize_model(smollm2_dir, tmp_path / "w8a8", "w8a8")
    assert not plain.ignored and plain.ratio_to_16bit <= 0.55, plain.ratio_to_16bit
    smooth = quantize_model(
        smollm2_dir, tmp_path / "w8a8-sq", "w8a8", calibration=calibration,
        activation_options=ActivationOptions(smoothquant_alpha=0.8),
    )  # fmt: skip
    assert smooth.ratio_to_16bit <= 0.55
    base, ppl_smooth = _engine_perplexity(smollm2_dir), _engine_perplexity(smooth.output)
    assert ppl_smooth / base <= 1.03, (base, ppl_smooth)


def _edited(model_dir: Path, tmp_path: Path, edit) -> Path:
    dst = tmp_path / "edited"
    dst.mkdir()
    for f in model_dir.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    raw = json.loads((dst / "config.json").read_text())
    edit(raw["quantization_config"]["config_groups"]["group_0"])
    (dst / "config.json").write_text(json.dumps(raw))
    return dst


MALFORMED = {
    "strategy": (
        "w8a8",
        lambda g: g["input_activations"].update(strategy="group"),
        r"input_activations\.strategy",
    ),
    "act_type": (
        "w8a8",
        lambda g: g["input_activations"].update(type="float"),
        r"input_activations\.type='float'",
    ),
    "weight_type": ("fp8", lambda g: g["weights"].update(type="int"), r"weights\.type='int'"),
    "fp8_asymmetric": (
        "fp8",
        lambda g: g["input_activations"].update(symmetric=False),
        r"input_activations\.symmetric=False",
    ),
    "weight_group": (
        "w8a8",
        lambda g: g["weights"].update(strategy="group", group_size=32),
        r"group_0\.weights",
    ),
}


@pytest.mark.timeout(30)
@pytest.mark.parametrize("field", sorted(MALFORMED))
def test_malformed_8bit_config_names_the_field(stories_8bit, tmp_path, field):
    from shoal.model.config import ModelConfigError, load_config

    variant, edit, message = MALFORMED[field]
    with pytest.raises(ModelConfigError, match=message):
        load_config(_edited(stories_8bit[variant], tmp_path, edit))


@pytest.mark.timeout(30)
def test_static_scales_missing_input_scale_is_named(stories_8bit, tmp_path):
    from shoal.model.loader import WeightLoadError

    src = stories_8bit["w8a8"]  # dynamic: no input_scale tensors; claim static scales
    edit = _edited(src, tmp_path, lambda g: g["input_activations"].update(dynamic=False, strategy="tensor"))
    with pytest.raises(WeightLoadError, match=r"input_scale is missing"):
        load_model(edit, torch.float32, CPU)


@pytest.mark.timeout(30)
def test_static_asymmetric_scales_missing_zero_point_is_named(stories_8bit, tmp_path):
    from shoal.model.loader import WeightLoadError

    src = stories_8bit["w8a8-sq-static"]  # symmetric static: input_scale only; claim asymmetric
    edit = _edited(src, tmp_path, lambda g: g["input_activations"].update(symmetric=False))
    with pytest.raises(WeightLoadError, match=r"input_zero_point is missing"):
        load_model(edit, torch.float32, CPU)


@pytest.mark.timeout(30)
def test_cli_quantize_w8a8_options(stories_dir, tmp_path):
    from typer.testing import CliRunner

    from shoal.cli import app

    runner = CliRunner()
    args = ["quant", "quantize", str(stories_dir), "--method", "w8a8", "--smoothquant-alpha", "0.5"]
    args += ["--activation-scales", "static", "--calib-text", str(EVAL / "wikitext2-valid.txt")]
    ok = runner.invoke(app, [*args, "--num-samples", "4", "--seq-len", "64", "--output", str(tmp_path / "q")])
    assert ok.exit_code == 0, ok.output
    acts = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]["config_groups"]
    assert acts["group_0"]["input_activations"]["strategy"] == "tensor"
    asym = runner.invoke(app, [*args[:5], "--activation-asymmetric", "--output", str(tmp_path / "a")])
    assert asym.exit_code == 0, asym.output
    acts = json.loads((tmp_path / "a" / "config.json").read_text())["quantization_config"]["config_groups"]
    assert acts["group_0"]["input_activations"]["symmetric"] is False
    model, _ = load_model(tmp_path / "a", torch.float32, CPU)  # dynamic: a zero point a row, nothing stored
    layers = [m for m in model.modules() if isinstance(m, W8A8Linear)]
    assert layers and all(not m.symmetric and m.input_zero_point is None for m in layers)
    rtn = runner.invoke(
        app, [*args[:3], "--method", "rtn", "--activation-asymmetric", "--output", str(tmp_path / "r")]
    )
    assert rtn.exit_code == 1 and "--activation-asymmetric goes with w8a8" in rtn.output
    fp8 = runner.invoke(
        app, [*args[:3], "--method", "fp8", "--activation-asymmetric", "--output", str(tmp_path / "f")]
    )
    assert fp8.exit_code == 1 and "--activation-asymmetric" in fp8.output
    bad = runner.invoke(app, [*args[:5], "--activation-scales", "weird", "--output", str(tmp_path / "b")])
    assert bad.exit_code == 1 and "--activation-scales 'weird'" in bad.output


@pytest.mark.timeout(30)
def test_percentile_observer_clips_below_minmax(stories_dir, tmp_path):
    """Static per-tensor scales: the percentile observer (99.99th of |x|) never exceeds min/max's max|x|,
    and clips somewhere; the checkpoint loads and runs."""
    calibration = Calibration(EVAL / "wikitext2-valid.txt", 8, 128, 0)

    def scales(observer: str) -> dict[str, torch.Tensor]:
        options = ActivationOptions(activation_scales="static", observer=observer)
        out = quantize_model(
            stories_dir, tmp_path / observer, "w8a8", calibration=calibration, activation_options=options
        )
        with safe_open(str(out.output / "model.safetensors"), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys() if k.endswith(".input_scale")}

    minmax, pct = scales("minmax"), scales("percentile")
    assert sorted(minmax) == sorted(pct) and len(pct) == 35
    assert all(bool(pct[k] <= minmax[k]) for k in pct) and any(bool(pct[k] < minmax[k]) for k in pct)
    model, _ = load_model(tmp_path / "percentile", torch.float32, CPU)
    ids = load_calibration_tokens(stories_dir, EVAL / "tinystories-sample.txt", 1, 32, 0)
    with torch.inference_mode():
        assert torch.isfinite(model.logits(forward_windows(model, ids))).all()
    with pytest.raises(ValueError, match="--observer 'p99'"):
        ActivationOptions(activation_scales="static", observer="p99").check("w8a8")
