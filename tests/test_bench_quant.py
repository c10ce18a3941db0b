"""`shoal bench quant` (issue 18's benchmark, shoal/bench/quant.py) end to end on stories260K, tiny sizes."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from shoal.bench.cli import bench_app
from shoal.bench.quant import ROWS, settings


@pytest.mark.timeout(90)
def test_bench_quant_rows_windows_and_outputs(stories_dir, tmp_path):
    """rtn-g64 is skipped on stories260K (its down_proj input, 172, has no groups of 64) with the layer named;
    fp8 is measured against the base row; perplexity windows fill the whole context (max_model_len 512)."""
    args = ["quant", "--model", str(stories_dir), "--rows", "rtn-g64,fp8", "--num-tokens", "600"]
    args += ["--num-samples", "2", "--seq-len", "32", "--decode-tokens", "4", "--decode-iters", "1"]
    out = CliRunner().invoke(bench_app, [*args, "--output-dir", str(tmp_path)])
    assert out.exit_code == 0, out.output
    result = json.loads((tmp_path / "quant_eval.json").read_text())
    assert [r["method"] for r in result["rows"]] == ["base", "fp8"]
    assert result["window"] == 512 and result["eval_tokens"] == 600
    assert result["skipped"][0]["method"] == "rtn-g64" and "down_proj" in result["skipped"][0]["reason"]
    fp8 = result["rows"][1]
    assert 0.9 < fp8["ppl_ratio"] < 1.1 and fp8["linear_ratio"] < 0.6
    assert (tmp_path / "quant_eval.png").stat().st_size > 0
    assert "| fp8 |" in out.output and "llm-compressor" in out.output


@pytest.mark.timeout(10)
def test_bench_quant_rows_and_errors():
    s = settings(list(ROWS), num_tokens=1000, num_samples=8, seq_len=64)
    specs = {m.label: m for m in s.method_specs()}
    assert {specs[r].group_size for r in ("rtn-g64", "gptq-g64", "awq-g64")} == {64}
    assert specs["gptq-auto"].group_size == "auto"
    assert (specs["w8a16"].method, specs["w8a16"].bits, specs["w8a16"].group_size) == ("rtn", 8, "auto")
    assert specs["w8a16-channel"].group_size == 0  # PER_CHANNEL
    w8a8 = specs["w8a8-sq-gptq"].activation
    assert (w8a8.weight_method, w8a8.smoothquant_alpha, w8a8.activation_scales) == ("gptq", 0.8, "dynamic")
    assert s.calibration.text_file.name == "wikitext2-valid.txt" and s.eval_text.name == "wikitext2-test.txt"
    assert specs["gptq-g64-mse"].gptq.observer == "mse" and specs["gptq-g64-act"].gptq.act_order
    assert specs["gptq-g64"].gptq is None  # the default row keeps GPTQOptions' defaults
    affine = specs["w8a8-sq-static-affine"].activation
    assert (affine.activation_scales, affine.activation_symmetric, affine.weight_method) == (
        "static",
        False,
        "rtn",
    )
    assert (
        specs["w8a8-sq"].activation.activation_symmetric
        and specs["w8a8-sq"].activation.activation_scales == "dynamic"
    )
    assert specs["gptq-g64-lmhead"].quantize_lm_head and not specs["gptq-g64"].quantize_lm_head
    with pytest.raises(ValueError, match="unknown row 'gptq-g128'"):
        settings(["gptq-g128"])


@pytest.mark.timeout(60)
def test_quant_profile_splits_decode_time_by_linear_kind(stories_dir, tmp_path):
    from shoal.quant.quantize import quantize_model

    w8 = quantize_model(stories_dir, tmp_path / "w8", "rtn", 8, "auto").output
    args = ["quant-profile", f"base={stories_dir}", f"w8={w8}", "--tokens", "8", "--iters", "1"]
    out = CliRunner().invoke(bench_app, args)
    assert out.exit_code == 0, out.output
    lines = {line.split(":")[0]: line for line in out.output.splitlines() if "tok/s," in line}
    assert set(lines) == {"base", "w8"}
    assert "quantized linears" in lines["w8"] and "quantized linears" not in lines["base"]
    assert "linears" in lines["base"] and "lm_head" in lines["base"]


@pytest.mark.timeout(60)
def test_quant_spread_jitters_only_while_it_scores(stories_dir, tmp_path):
    """A zero jitter scores exactly the plain perplexity; a float32-rounding jitter moves an FP8 model's
    perplexity (its activations cross rounding boundaries) by well under 1%; the hooks are gone after, so
    the plain score repeats; the command prints the table; a 16-bit model has nothing to jitter."""
    from shoal.bench import quant_spread as qs
    from shoal.quant import perplexity as ppl
    from shoal.quant.eval import DEFAULT_EVAL_TEXT, eval_engine
    from shoal.quant.quantize import quantize_model

    if not DEFAULT_EVAL_TEXT.exists():
        pytest.skip(f"evaluation text not found: {DEFAULT_EVAL_TEXT}")
    fp8 = quantize_model(stories_dir, tmp_path / "fp8", "fp8", 8, "auto").output
    engine = eval_engine(fp8)
    ids = ppl.eval_tokens(engine.tokenizer, DEFAULT_EVAL_TEXT, 1024)
    plain = ppl.perplexity(engine, ids, 512)
    assert qs.jittered_perplexity(engine, ids, 512, seed=1, rel=0.0) == plain
    jittered = [qs.jittered_perplexity(engine, ids, 512, seed=s) for s in (1, 2)]
    assert all(j != plain and abs(j / plain - 1) < 0.01 for j in jittered) and jittered[0] != jittered[1]
    assert ppl.perplexity(engine, ids, 512) == plain
    base = eval_engine(stories_dir)
    with pytest.raises(ValueError, match="no quantized linear"):
        qs.jittered_perplexity(base, ids, 512, seed=1)
    out = CliRunner().invoke(bench_app, ["quant-spread", str(fp8), "--base", str(stories_dir), "--seeds", "1",
                                         "--num-tokens", "600"])  # fmt: skip
    assert out.exit_code == 0, out.output
    assert "| base ppl | plain ppl |" in out.output
