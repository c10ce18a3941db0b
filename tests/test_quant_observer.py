"""GPTQ's options (the MSE observer, act-order with static groups, true-sequential capture, dampening) and
the MSE observer in round to nearest, measured as in test_quant_algorithms.py: the output error
||X W^T - X W_hat^T|| on held-out inputs shaped like real activations (correlated features, a few channels
10x larger), or the weight error the observer minimizes."""

from __future__ import annotations

import pytest
import torch
from conftest import STORIES, require_model
from test_quant_algorithms import EVAL_DIR, _activations, _hessian, _output_error, _weight

from shoal.quant.gptq import GPTQOptions, gptq_quantize, grid_params, integer_range, rtn_quantize
from shoal.quant.observer import MSE_NORM, mse_shrink
from shoal.quant.rtn import quantize_rtn


@pytest.fixture(scope="module")
def synthetic():
    return _weight(), _activations(2048, seed=1), _activations(2048, seed=2)


def _group_errors(w: torch.Tensor, w_hat: torch.Tensor, group_size: int) -> torch.Tensor:
    """sum |w - w_hat|^2.4 per group [out * groups], the quantity the MSE observer minimizes."""
    return (w - w_hat).abs().pow(MSE_NORM).reshape(-1, group_size).sum(1)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.bfloat16])
def test_mse_observer_error_is_at_most_minmax_in_every_group(synthetic, symmetric, scale_dtype):
    w, _, held_out = synthetic
    w = w.clone()
    w[3, 17] = 0.6  # a group with one outlier weight: its min/max range wastes levels
    minmax = rtn_quantize(w, 4, 32, symmetric, scale_dtype)
    mse = rtn_quantize(w, 4, 32, symmetric, scale_dtype, observer="mse")
    err_minmax, err_mse = _group_errors(w, minmax.dequantized, 32), _group_errors(w, mse.dequantized, 32)
    assert (err_mse <= err_minmax).all()
    assert err_mse.sum() < 0.95 * err_minmax.sum()  # it does shrink ranges, and it pays
    assert (mse.scales <= minmax.scales).all() and (mse.scales < minmax.scales).any()
    assert _output_error(held_out, w, mse.dequantized) < _output_error(held_out, w, minmax.dequantized)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("symmetric", [False, True])
def test_rtn_methods_mse_observer_matches_the_gptq_modules(symmetric):
    """shoal.quant.rtn (the rtn method's checkpoints) and gptq.rtn_quantize choose the same ranges."""
    w = _weight().bfloat16()
    theirs = quantize_rtn(w, None, 4, 32, symmetric, observer="mse")
    ours = rtn_quantize(w, 4, 32, symmetric, scale_dtype=torch.bfloat16, observer="mse")
    assert torch.equal(ours.qweight, theirs.qweight) and torch.equal(ours.scales, theirs.scale.float())
    qmin, qmax = integer_range(4)
    assert qmin <= theirs.qweight.min() and theirs.qweight.max() <= qmax


def test_mse_shrink_keeps_min_max_where_nothing_clips():
    """Weights already on a uniform 4-bit lattice spanning their range: min/max (p = 1) is exact."""
    w = (torch.arange(-7, 8).float() * 0.01).repeat(4, 1)

    def fake(x, lo, hi):
        scale, zero = grid_params(torch.stack([lo, hi], 1), 4, True)
        return torch.clamp(torch.round(x / scale[:, None]), -8, 7) * scale[:, None]

    assert torch.equal(mse_shrink(w, fake), torch.ones(4))
    with pytest.raises(ValueError, match="max_shrink"):
        mse_shrink(w, fake, max_shrink=1.0)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("observer", ["minmax", "mse"])
def test_gptq_with_each_observer_beats_round_to_nearest(synthetic, observer):
    w, calib, held_out = synthetic
    q = gptq_quantize(w, _hessian(calib), 4, 32, symmetric=True, observer=observer)
    rtn = rtn_quantize(w, 4, 32, True)
    assert _output_error(held_out, w, q.dequantized) <= 0.9 * _output_error(held_out, w, rtn.dequantized)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("observer", ["minmax", "mse"])
def test_act_order_with_static_groups_keeps_plain_groups(synthetic, observer):
    """Static groups: every group's scale comes from the uncorrected weight by input column, so g_idx stays
    arange // group_size however the columns are processed, and the checkpoint needs no g_idx."""
    w, calib, held_out = synthetic
    h = _hessian(calib)
    q = gptq_quantize(w, h, 4, 32, symmetric=True, act_order=True, static_groups=True, observer=observer)
    assert torch.equal(q.g_idx, (torch.arange(w.shape[1]) // 32).int())
    assert torch.equal(q.scales, rtn_quantize(w, 4, 32, True, observer=observer).scales)
    g = q.g_idx.long()
    torch.testing.assert_close(q.scales[:, g] * q.qweight.float(), q.dequantized, rtol=0, atol=1e-6)
    plain = gptq_quantize(w, h, 4, 32, symmetric=True, static_groups=True, observer=observer)
    assert not torch.equal(q.qweight, plain.qweight)  # act-order did change the order of the work
    rtn = rtn_quantize(w, 4, 32, True)
    assert _output_error(held_out, w, q.dequantized) <= 0.9 * _output_error(held_out, w, rtn.dequantized)


def test_an_unknown_observer_is_refused_by_name(synthetic):
    w, calib, _ = synthetic
    with pytest.raises(ValueError, match="observer 'p99' is unknown"):
        gptq_quantize(w, _hessian(calib), 4, 32, observer="p99")
    with pytest.raises(ValueError, match="observer 'p99' is unknown"):
        quantize_rtn(w, None, 4, 32, observer="p99")


@pytest.mark.timeout(60)
def test_true_sequential_captures_each_linear_after_the_ones_before_it(monkeypatch):
    """On stories260K: the first block's qkv sees the same inputs either way (nothing before it is
    quantized), so its weights are equal; o_proj's inputs come from the quantized qkv only when
    true-sequential, so its weights differ."""
    from shoal.model import loader
    from shoal.quant.calibration import calibration_windows
    from shoal.quant.sequential import gptq_model

    monkeypatch.setattr(loader, "packing_available", lambda *args: False)
    model_dir = require_model(STORIES)
    ids = calibration_windows(list(range(1, 500)), 4, 64, seed=0)
    names = [f"model.layers.0.self_attn.{p}_proj" for p in "qkvo"]
    sizes = dict.fromkeys(names, 32)

    def run(options: GPTQOptions):
        return gptq_model(model_dir, sizes, 4, True, ids, torch.float32, options=options)

    one, true = run(GPTQOptions()), run(GPTQOptions(true_sequential=True, dampening_frac=0.01))
    for p in names[:3]:
        assert torch.equal(one[p].qweight, true[p].qweight)
    assert not torch.equal(one[names[3]].qweight, true[names[3]].qweight)


@pytest.mark.timeout(180)
@pytest.mark.parametrize(
    "args",
    [
        ["--method", "gptq", "--act-order", "--weight-observer", "mse", "--true-sequential"],
        ["--method", "rtn", "--weight-observer", "mse", "--asymmetric"],
    ],
)
def test_cli_options_give_checkpoints_compressed_tensors_accepts(tmp_path, args):
    """stories260K through `shoal quant quantize` with the new options: the checkpoint keeps plain groups
    (act-order with static groups writes no g_idx), compressed-tensors 0.20 decompresses it to exactly the
    weights shoal's loader dequantizes, and a wrong observer fails with the option named."""
    from quant_helpers import shoal_dequantized
    from safetensors import safe_open
    from test_quant_format import _ct_decompressed
    from typer.testing import CliRunner

    from shoal.cli import app
    from shoal.model.loader import load_model

    stories = require_model(STORIES)
    text = EVAL_DIR / "tinystories-sample.txt"
    if not text.exists():
        pytest.skip(f"{text} not found (set SHOAL_EVAL_TEXT)")
    calib = ["--calib-text", str(text)]
    runner = CliRunner()
    out = tmp_path / "q"
    common = [
        "quant",
        "quantize",
        str(stories),
        "--output",
        str(out),
        "--num-samples",
        "4",
        "--seq-len",
        "64",
    ]
    ok = runner.invoke(app, [*common, *calib, *args])
    assert ok.exit_code == 0, ok.output
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        assert not [k for k in f.keys() if "g_idx" in k]
    model, cfg = load_model(out, torch.float32, torch.device("cpu"))
    ours, theirs = shoal_dequantized(model, cfg, torch.float32), _ct_decompressed(out)
    assert sorted(ours) == sorted(theirs) and all(torch.equal(ours[n], w) for n, w in theirs.items())
    bad = runner.invoke(app, [*common, "--weight-observer", "p99"])
    assert bad.exit_code == 1 and "observer 'p99' is unknown" in bad.output
