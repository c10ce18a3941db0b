"""GPTQ and AWQ against round-to-nearest, measured as the output error ||X W^T - X W_hat^T|| on held-out
inputs (never the calibration ones), with inputs shaped like real activations: correlated features plus a
few channels of 10x magnitude (with i.i.d. Gaussian inputs no channel is salient and the gains vanish),
and activations captured from SmolLM2-135M and stories260K."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from conftest import REPO, SMOLLM2, STORIES, require_model

from shoal.model.loader import load_model
from shoal.quant.awq import awq_quantize
from shoal.quant.calibration import (
    BlockwiseCalibration,
    calibration_windows,
    capture_linear_inputs,
    forward_windows,
    linear_names,
    load_calibration_tokens,
)
from shoal.quant.gptq import HessianAccumulator, gptq_quantize, integer_range, rtn_quantize

IN, OUT, OUTLIERS = 256, 192, 6
EVAL_DIR = Path(os.environ.get("SHOAL_EVAL_TEXT", REPO.parent / "shared" / "eval"))


@pytest.fixture(scope="module")
def eval_text_dir() -> Path:
    if not (EVAL_DIR / "wikitext2-valid.txt").exists():
        pytest.skip(f"evaluation text not found under {EVAL_DIR} (set SHOAL_EVAL_TEXT)")
    return EVAL_DIR


def _activations(rows: int, seed: int) -> torch.Tensor:
    """[rows, IN] correlated features (Z @ A plus noise) with OUTLIERS channels 10x larger; the mixing and
    the outlier channels are fixed, only the rows depend on seed (calibration and held-out share them)."""
    fixed = torch.Generator().manual_seed(1234)
    mixing = torch.randn(IN, IN, generator=fixed) / IN**0.5
    gain = torch.ones(IN)
    gain[torch.randperm(IN, generator=fixed)[:OUTLIERS]] = 10.0
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, IN, generator=g) @ mixing + 0.2 * torch.randn(rows, IN, generator=g)) * gain


def _weight(out: int = OUT, seed: int = 7) -> torch.Tensor:
    return torch.randn(out, IN, generator=torch.Generator().manual_seed(seed)) * 0.05


def _output_error(x: torch.Tensor, w: torch.Tensor, w_hat: torch.Tensor) -> float:
    return (x @ w.T - x @ w_hat.T).norm().item()


def _hessian(x: torch.Tensor, block: int = 256) -> torch.Tensor:
    acc = HessianAccumulator(x.shape[1], block=block)
    for batch in x.split(500):
        acc.add(batch)
    return acc.hessian()


@pytest.fixture(scope="module")
def synthetic():
    return _weight(), _activations(2048, seed=1), _activations(2048, seed=2)


@pytest.mark.timeout(30)
@pytest.mark.parametrize(("bits", "group_size"), [(4, 32), (4, -1), (3, 32)])
@pytest.mark.parametrize("symmetric", [False, True])
def test_gptq_beats_round_to_nearest_on_held_out_inputs(synthetic, bits, group_size, symmetric):
    w, calib, held_out = synthetic
    gptq = gptq_quantize(w, _hessian(calib), bits, group_size, symmetric)
    rtn = rtn_quantize(w, bits, group_size, symmetric)
    ratio = _output_error(held_out, w, gptq.dequantized) / _output_error(held_out, w, rtn.dequantized)
    assert ratio <= 0.9, f"GPTQ/RTN output error {ratio:.3f}"


@pytest.mark.timeout(30)
def test_gptq_act_order_gives_a_valid_g_idx(synthetic):
    w, calib, held_out = synthetic
    q = gptq_quantize(w, _hessian(calib), bits=4, group_size=32, act_order=True)
    assert q.g_idx.dtype == torch.int32 and q.g_idx.shape == (IN,)
    assert torch.bincount(q.g_idx.long()).tolist() == [32] * (IN // 32)  # every group has 32 columns
    assert not torch.equal(q.g_idx, (torch.arange(IN) // 32).int())  # act-order did reorder columns
    g = q.g_idx.long()
    rebuilt = q.scales[:, g] * (q.qweight.float() - q.zeros[:, g].float())
    torch.testing.assert_close(rebuilt, q.dequantized, rtol=0, atol=1e-6)
    rtn = rtn_quantize(w, 4, 32, symmetric=False)
    assert _output_error(held_out, w, q.dequantized) <= 0.9 * _output_error(held_out, w, rtn.dequantized)


@pytest.mark.timeout(30)
def test_gptq_with_huge_damping_degenerates_to_round_to_nearest(synthetic):
    """With H + damp I dominated by damp, H^-1 is nearly diagonal: no error is pushed to other columns."""
    w, calib, _ = synthetic
    q = gptq_quantize(w, _hessian(calib), bits=4, group_size=32, percdamp=1e6)
    rtn = rtn_quantize(w, 4, 32, symmetric=False)
    assert (q.qweight == rtn.qweight).float().mean().item() > 0.999
    torch.testing.assert_close(q.dequantized, rtn.dequantized, rtol=0, atol=1e-3)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("bits", [3, 4, 8])
@pytest.mark.parametrize("symmetric", [False, True])
def test_quantized_values_stay_in_the_integer_range(synthetic, bits, symmetric):
    w, calib, _ = synthetic
    qmin, qmax = integer_range(bits)
    for q in (gptq_quantize(w, _hessian(calib), bits, 64, symmetric), rtn_quantize(w, bits, 64, symmetric)):
        assert q.qweight.dtype == torch.int8 and q.zeros.dtype == torch.int8
        assert qmin <= q.qweight.min().item() and q.qweight.max().item() <= qmax
        assert qmin <= q.zeros.min().item() and q.zeros.max().item() <= qmax
        if symmetric:
            assert q.zeros.eq(0).all()
        assert torch.isfinite(q.dequantized).all()


@pytest.mark.parametrize("symmetric", [False, True])
def test_grid_is_compressed_tensors_as_in_rtn(symmetric):
    """The baseline here rounds exactly as shoal.quant.rtn (compressed-tensors' scheme), bf16 scales too."""
    rtn = pytest.importorskip("shoal.quant.rtn")
    w = _weight().bfloat16()
    theirs = rtn.quantize_rtn(w, None, 4, 32, symmetric=symmetric)
    ours = rtn_quantize(w, 4, 32, symmetric, scale_dtype=torch.bfloat16)
    assert torch.equal(ours.qweight, theirs.qweight) and torch.equal(ours.scales, theirs.scale.float())
    assert symmetric or torch.equal(ours.zeros, theirs.zero_point)


@pytest.mark.timeout(30)
def test_gptq_rounds_with_the_scales_as_stored(synthetic):
    """With bf16 scales, the dequantized weight GPTQ corrected for is the one the checkpoint gives."""
    w, calib, held_out = synthetic
    q = gptq_quantize(w, _hessian(calib), bits=4, group_size=32, scale_dtype=torch.bfloat16)
    assert torch.equal(q.scales, q.scales.bfloat16().float())
    g = q.g_idx.long()
    stored = q.scales.bfloat16().float()[:, g] * (q.qweight.float() - q.zeros[:, g].float())
    assert torch.equal(stored, q.dequantized)
    rtn = rtn_quantize(w, 4, 32, symmetric=False, scale_dtype=torch.bfloat16)
    assert _output_error(held_out, w, q.dequantized) <= 0.9 * _output_error(held_out, w, rtn.dequantized)


@pytest.mark.timeout(30)
def test_gptq_handles_dead_inputs():
    w = _weight()
    x = _activations(1024, seed=3)
    x[:, 5] = 0.0
    q = gptq_quantize(w, _hessian(x), bits=4, group_size=32)
    assert q.dequantized[:, 5].eq(0).all()
    assert torch.isfinite(q.dequantized).all()


@pytest.mark.parametrize("block", [256, 50, 7])  # one block; 6 of 43 (the last 41); 37 of 7 (the last 4)
def test_hessian_accumulator_matches_one_big_product(block):
    """Only the blocks on and above the diagonal are multiplied: the mirrored ones must be there too."""
    x = _activations(1000, seed=4)
    got = _hessian(x, block)
    torch.testing.assert_close(got, (2 * x.double().T @ x.double()) / 1000, rtol=1e-5, atol=1e-4)
    assert torch.equal(got, got.T)
    with pytest.raises(ValueError, match="no calibration inputs"):
        HessianAccumulator(IN).hessian()


def test_gptq_rejects_a_group_size_that_does_not_divide_the_input():
    w = _weight()
    with pytest.raises(ValueError, match="does not divide"):
        gptq_quantize(w, torch.eye(IN), group_size=48)
    with pytest.raises(ValueError, match="Hessian has shape"):
        gptq_quantize(w, torch.eye(IN + 1))


@pytest.mark.timeout(30)
def test_awq_beats_round_to_nearest_on_held_out_inputs():
    """Three linears sharing one input, as q/k/v after the input RMSNorm; 4-bit asymmetric, group 32."""
    weights = [_weight(128, seed=10), _weight(64, seed=11), _weight(64, seed=12)]
    calib, held_out = _activations(1024, seed=5), _activations(2048, seed=6)
    result = awq_quantize(weights, calib, bits=4, group_size=32)
    assert result.input_scales.shape == (IN,) and 0 < result.alpha < 1
    assert [q.qweight.shape for q in result.weights] == [t.shape for t in weights]
    w = torch.cat(weights)
    # the quantized layers compute (x / s) @ Q(W s)^T, i.e. x @ (Q(W s) / s)^T
    awq = torch.cat([q.dequantized for q in result.weights]) / result.input_scales
    rtn = rtn_quantize(w, 4, 32, symmetric=False).dequantized
    ratio = _output_error(held_out, w, awq) / _output_error(held_out, w, rtn)
    assert ratio <= 0.95, f"AWQ/RTN output error {ratio:.3f}"
    for q in result.weights:
        assert -8 <= q.qweight.min().item() and q.qweight.max().item() <= 7


@pytest.mark.timeout(30)
def test_awq_clips_only_the_linears_asked():
    """As the reference leaves q and k unclipped: flags per linear; the scales do not depend on them."""
    weights = [_weight(64, seed=10), _weight(64, seed=11)]
    calib = _activations(512, seed=5)
    none = awq_quantize(weights, calib, bits=4, group_size=32, clip=False)
    some = awq_quantize(weights, calib, bits=4, group_size=32, clip=[False, True])
    assert torch.equal(some.input_scales, none.input_scales)
    assert torch.equal(some.weights[0].qweight, none.weights[0].qweight)
    assert not torch.equal(some.weights[1].qweight, none.weights[1].qweight)
    with pytest.raises(ValueError, match="clip has 1 flags for 2 linears"):
        awq_quantize(weights, calib, bits=4, group_size=32, clip=[True])
    fixed = awq_quantize(weights, calib, bits=4, group_size=32, clip=False, search=False)
    assert fixed.input_scales.eq(1).all()
    plain = rtn_quantize(torch.cat(weights), 4, 32, symmetric=False)
    assert torch.equal(torch.cat([q.qweight for q in fixed.weights]), plain.qweight)


def test_calibration_windows_are_deterministic():
    ids = list(range(1000))
    a = calibration_windows(ids, 8, 64, seed=3)
    assert a.shape == (8, 64) and torch.equal(a, calibration_windows(ids, 8, 64, seed=3))
    assert not torch.equal(a, calibration_windows(ids, 8, 64, seed=4))
    assert torch.equal(a[:, 1:] - a[:, :-1], torch.ones(8, 63, dtype=torch.int64))  # contiguous text
    with pytest.raises(ValueError, match="fewer than seq_len"):
        calibration_windows(ids[:10], 8, 64, seed=3)


@pytest.mark.timeout(30)
def test_capture_on_stories260k_feeds_gptq(eval_text_dir):
    model_dir = require_model(STORIES)
    model, _ = load_model(model_dir, torch.float32, torch.device("cpu"))
    ids = load_calibration_tokens(model_dir, eval_text_dir / "wikitext2-valid.txt", 24, 256, seed=0)
    names = linear_names(model)
    stats = capture_linear_inputs(model, ids[:16], names, max_sample_rows=128)
    held = capture_linear_inputs(model, ids[16:], names, hessian=False, max_sample_rows=2048, seed=1)
    assert names[0] == "layers.0.self_attn.qkv_proj" and len(names) == 4 * len(model.layers)
    for name in names:
        module = model.get_submodule(name)
        assert stats[name].rows == 16 * 256 and stats[name].sample_rows().shape == (128, module.in_features)
        w = module.weight.float()
        x = held[name].sample_rows()
        gptq = gptq_quantize(w, stats[name].hessian.hessian(), bits=4, group_size=-1)
        rtn = rtn_quantize(w, 4, -1, symmetric=False)
        assert _output_error(x, w, gptq.dequantized) < _output_error(x, w, rtn.dequantized), name


@pytest.mark.timeout(60)
def test_gptq_and_awq_beat_round_to_nearest_on_smollm2_blocks(eval_text_dir):
    """Blocks 0-2 of SmolLM2-135M, every linear, 4-bit asymmetric with group 64 (576 = 9 x 64): calibrated
    on 16 windows of 256 tokens of wikitext2-valid, measured on activations of 4 other windows. AWQ searches
    on 256 of the calibration rows (measured as good as 512 here, at half the time)."""
    model_dir = require_model(SMOLLM2)
    model, _ = load_model(model_dir, torch.float32, torch.device("cpu"))
    ids = load_calibration_tokens(model_dir, eval_text_dir / "wikitext2-valid.txt", 20, 256, seed=0)
    names = [n for n in linear_names(model) if int(n.split(".")[1]) < 3]
    calib = capture_linear_inputs(model, ids[:16], names, max_sample_rows=256)
    held = capture_linear_inputs(model, ids[16:], names, hessian=False, max_sample_rows=1024, seed=1)
    errors = {"rtn": 0.0, "gptq": 0.0, "awq": 0.0}
    for name in names:
        w = model.get_submodule(name).weight.float()
        x = held[name].sample_rows()
        gptq = gptq_quantize(w, calib[name].hessian.hessian(), bits=4, group_size=64)
        awq = awq_quantize([w], calib[name].sample_rows(), calib[name].abs_mean(), bits=4, group_size=64)
        layer = {
            "rtn": _output_error(x, w, rtn_quantize(w, 4, 64, symmetric=False).dequantized),
            "gptq": _output_error(x, w, gptq.dequantized),
            "awq": _output_error(x, w, awq.weights[0].dequantized / awq.input_scales),
        }
        assert layer["gptq"] < layer["rtn"] and layer["awq"] < layer["rtn"], (name, layer)
        for method, error in layer.items():
            errors[method] += error**2
    assert errors["gptq"] ** 0.5 <= 0.9 * errors["rtn"] ** 0.5, errors
    assert errors["awq"] ** 0.5 <= 0.95 * errors["rtn"] ** 0.5, errors


@pytest.fixture(scope="module")
def stories(eval_text_dir):
    model_dir = require_model(STORIES)
    model, _ = load_model(model_dir, torch.float32, torch.device("cpu"))
    ids = load_calibration_tokens(model_dir, eval_text_dir / "wikitext2-valid.txt", 5, 64, seed=0)
    return model_dir, model, ids


@pytest.mark.timeout(60)
def test_calibration_forward_is_the_engines_forward(stories):
    """forward_windows runs several windows in one flat batch; each must score as the engine scores it."""
    from shoal.engine.config import EngineConfig
    from shoal.engine.llm_engine import LLMEngine

    model_dir, model, ids = stories
    engine = LLMEngine(EngineConfig(model=str(model_dir), dtype="float32", device="cpu"))
    logits = model.logits(forward_windows(model, ids)).view(*ids.shape, -1)
    for window, got in zip(ids, logits, strict=True):
        torch.testing.assert_close(got, engine.prompt_logits(window.tolist()), rtol=1e-5, atol=1e-5)


@pytest.mark.timeout(60)
def test_blockwise_calibration_sees_what_one_forward_sees(stories):
    _, model, ids = stories
    names = linear_names(model)
    first_two = [n for n in names if int(n.split(".")[1]) < 2]
    one_pass = capture_linear_inputs(model, ids, first_two, max_sample_rows=64, batch_size=2)
    blocks = BlockwiseCalibration(model, ids, batch_size=2)
    for i in range(len(model.layers)):
        if i < 2:
            stats = blocks.capture([n for n in first_two if n.startswith(f"layers.{i}.")], max_sample_rows=64)
            for name, got in stats.items():
                want = one_pass[name]
                torch.testing.assert_close(
                    got.hessian.hessian(), want.hessian.hessian(), rtol=1e-6, atol=1e-6
                )
                assert torch.equal(got.sample_rows(), want.sample_rows()) and got.rows == want.rows
        blocks.advance()
    torch.testing.assert_close(blocks.hidden_states(), forward_windows(model, ids), rtol=1e-5, atol=1e-5)
    with pytest.raises(IndexError):
        blocks.advance()


@pytest.mark.timeout(60)
def test_capture_stops_the_block_once_its_linears_have_their_inputs(stories):
    """The rest of the block is not run: capturing qkv alone never reaches o_proj or the MLP, and
    capturing o_proj never reaches the MLP; advance() still runs the whole block."""
    _, model, ids = stories
    calls: list[str] = []
    handles = [
        model.get_submodule(f"layers.0.{n}").register_forward_pre_hook(lambda m, a, n=n: calls.append(n))
        for n in ("self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")
    ]
    try:
        blocks = BlockwiseCalibration(model, ids, batch_size=2)
        assert blocks.capture(["layers.0.self_attn.qkv_proj"])["layers.0.self_attn.qkv_proj"].rows > 0
        assert calls == []
        blocks.capture(["layers.0.self_attn.o_proj"])
        assert set(calls) == {"self_attn.o_proj"}
        calls.clear()
        blocks.advance()
        assert calls.count("mlp.down_proj") == len(blocks.batches)
    finally:
        for handle in handles:
            handle.remove()


def _perplexity(model, token_ids: torch.Tensor) -> float:
    """exp(mean NLL) of every token after the first of each window [windows, len]."""
    with torch.inference_mode():
        logits = model.logits(forward_windows(model, token_ids)).view(*token_ids.shape, -1)
        nll = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), token_ids[:, 1:].reshape(-1)
        )
    return nll.exp().item()


@pytest.mark.timeout(60)
def test_sequential_gptq_and_awq_beat_round_to_nearest_on_stories260k_perplexity(eval_text_dir, monkeypatch):
    """Block by block, each calibrated on the outputs of the blocks before it as already quantized (16
    windows of 256 tokens of wikitext2-valid), 4-bit asymmetric, group 32 (down_proj's 172 inputs: one
    group per row); perplexity on tinystories-sample.txt in windows of 256 tokens."""
    from shoal.model import loader
    from shoal.model.tokenizer import Tokenizer

    monkeypatch.setattr(loader, "packing_available", lambda *args: False)  # plain weights, edited in place
    model_dir = require_model(STORIES)
    calib = load_calibration_tokens(model_dir, eval_text_dir / "wikitext2-valid.txt", 16, 256, seed=0)
    text = (eval_text_dir / "tinystories-sample.txt").read_text()
    ids = Tokenizer(model_dir).encode(text)
    held_out = torch.tensor(ids[: len(ids) // 256 * 256]).view(-1, 256)

    def quantized_perplexity(method: str) -> float:
        model, _ = load_model(model_dir, torch.float32, torch.device("cpu"))
        blocks = BlockwiseCalibration(model, calib)
        for i in range(len(model.layers)):
            names = [n for n in linear_names(model) if n.startswith(f"layers.{i}.")]
            stats = {} if method == "rtn" else blocks.capture(names, method == "gptq", max_sample_rows=512)
            for name in names:
                weight = model.get_submodule(name).weight
                group = 32 if weight.shape[1] % 32 == 0 else -1
                if method == "rtn":
                    w_hat = rtn_quantize(weight, 4, group, symmetric=False).dequantized
                elif method == "gptq":
                    w_hat = gptq_quantize(weight, stats[name].hessian.hessian(), 4, group).dequantized
                else:  # the effective weight Q(W s) / s; o_proj unscaled (GQA: v_proj cannot absorb 1/s)
                    x, mean = stats[name].sample_rows(), stats[name].abs_mean()
                    a = awq_quantize([weight], x, mean, 4, group, search=not name.endswith("o_proj"))
                    w_hat = a.weights[0].dequantized / a.input_scales
                weight.data.copy_(w_hat)
            blocks.advance()
        return _perplexity(model, held_out)

    base = _perplexity(load_model(model_dir, torch.float32, torch.device("cpu"))[0], held_out)
    ppl = {method: quantized_perplexity(method) for method in ("rtn", "gptq", "awq")}
    assert base < ppl["gptq"] < ppl["rtn"] and base < ppl["awq"] < ppl["rtn"], (base, ppl)
