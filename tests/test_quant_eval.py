"""`shoal quant eval` and `shoal quant recommend` (issue 18): the perplexity protocol against transformers,
the eval outputs on stories260K, and the recommender's choices on synthetic measurements."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from shoal.cli import app
from shoal.quant.eval import EvalSettings, run_eval
from shoal.quant.hardware import Gpu, Hardware, detect
from shoal.quant.perplexity import eval_tokens, perplexity, window_size, windows
from shoal.quant.quantize import Calibration
from shoal.quant.recommend import from_framework, from_measured, recommend

EVAL_TEXT = Path(__file__).resolve().parents[2] / "shared" / "eval" / "tinystories-sample.txt"
CALIB_TEXT = Path(__file__).resolve().parents[2] / "shared" / "eval" / "wikitext2-valid.txt"
COLUMNS = {
    "method", "bits", "linear_bytes", "linear_ratio", "total_bytes", "total_ratio", "decode_tok_s",
    "best_decode_tok_s", "speed_ratio", "perplexity", "ppl_ratio", "agreement", "calibration_s",
}  # fmt: skip


def _need_text(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"{path} is missing")
    return path


@pytest.mark.timeout(60)
def test_perplexity_matches_transformers(stories_dir):
    """shoal's windows through prompt_logits give transformers' exp(mean NLL) within 1e-3 relative; each
    window fills the engine's whole context (max_model_len 256), as the issue's protocol wants."""
    from transformers import AutoModelForCausalLM

    from shoal.engine.config import EngineConfig
    from shoal.engine.llm_engine import LLMEngine

    config = EngineConfig(
        model=str(stories_dir), dtype="float32", kv_cache_memory=64 << 20, max_model_len=256
    )
    engine = LLMEngine(config)
    tokens = eval_tokens(engine.tokenizer, _need_text(EVAL_TEXT), 600)
    size = window_size(engine.config.max_model_len)
    assert size == 256  # 600 tokens: windows of 256, 256 and 88
    ours = perplexity(engine, tokens, size)

    model = AutoModelForCausalLM.from_pretrained(stories_dir, dtype=torch.float32).eval()
    nll, count = 0.0, 0
    with torch.inference_mode():
        for w in windows(tokens, size):
            ids = torch.tensor([w])
            loss = model(ids, labels=ids).loss  # mean NLL of tokens 1.. of the window
            nll += float(loss) * (len(w) - 1)
            count += len(w) - 1
    assert count == 597
    assert ours == pytest.approx(math.exp(nll / count), rel=1e-3)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("n_tokens", [1, 700, 5000])
def test_eval_tokens_are_the_whole_files_first_tokens(stories_dir, tmp_path, n_tokens):
    """eval_tokens tokenizes only a prefix of the text: its ids are still the whole file's first ones, also
    for a file with no line end after the first cut, and a file too short to score is refused."""
    from shoal.model.tokenizer import Tokenizer

    tokenizer = Tokenizer(stories_dir)
    text = _need_text(EVAL_TEXT).read_text(encoding="utf-8")
    one_line = tmp_path / "one_line.txt"
    one_line.write_text(text[:40000].replace("\n", " "), encoding="utf-8")
    for path in (EVAL_TEXT, one_line):
        whole = tokenizer.encode(path.read_text(encoding="utf-8"))
        assert eval_tokens(tokenizer, path, n_tokens) == whole[:n_tokens]
    (tmp_path / "empty.txt").write_text("", encoding="utf-8")
    with pytest.raises(ValueError, match="fewer than 2 tokens"):
        eval_tokens(tokenizer, tmp_path / "empty.txt", 10)


@pytest.mark.timeout(30)
def test_prompt_logits_fills_the_whole_context(stories_dir):
    """A prompt of max_model_len tokens is scored (even with a KV cache of exactly one such sequence), as
    an engine with room to spare scores it; one token more is refused."""
    from tiny_models import make_engine

    ids = list(range(5, 69))
    full = make_engine(stories_dir, kv_tokens=64, max_model_len=64, max_num_batched_tokens=32)
    roomy = make_engine(stories_dir, kv_tokens=1024, max_model_len=128, max_num_batched_tokens=32)
    logits = full.prompt_logits(ids)
    assert logits.shape == (64, 512)
    assert torch.equal(logits, roomy.prompt_logits(ids))
    with pytest.raises(ValueError, match="65 tokens, more than max_model_len"):
        full.prompt_logits(ids + [5])


@pytest.mark.timeout(60)
def test_eval_writes_table_json_png(stories_dir, tmp_path):
    settings = EvalSettings(
        methods=["rtn", "gptq", "nosuch"],
        eval_text=_need_text(EVAL_TEXT),
        eval_tokens=1024,
        calibration=Calibration(_need_text(CALIB_TEXT), 4, 64, 0),
        decode_tokens=8,
        decode_iters=1,
        agreement_prompts=2,
        agreement_tokens=4,
    )
    result = run_eval(stories_dir, settings, tmp_path, log=lambda m: None)
    data = json.loads((tmp_path / "quant_eval.json").read_text())
    assert (tmp_path / "quant_eval.png").stat().st_size > 1000
    assert [r["method"] for r in data["rows"]] == ["base", "rtn", "gptq"]
    assert data["skipped"][0]["method"] == "nosuch" and data["skipped"][0]["reason"]
    for r in data["rows"]:
        assert COLUMNS <= set(r)
        assert r["perplexity"] > 1 and 0 <= r["agreement"] <= 1 and r["decode_tok_s"] > 0
    base = data["rows"][0]
    assert base["ppl_ratio"] == base["linear_ratio"] == base["speed_ratio"] == base["agreement"] == 1.0
    assert all(r["linear_ratio"] < 1 for r in data["rows"][1:])
    assert result["rows"][1]["calibration_s"] >= 0


def _row(method, bits, total, ppl_ratio):
    return {"method": method, "bits": bits, "total_bytes": total, "total_ratio": total / 1000,
            "ppl_ratio": ppl_ratio, "speed_ratio": 1.0}  # fmt: skip


MEASURED = {
    "eval_tokens": 8192,
    "rows": [
        _row("base", 16, 1000, 1.0),
        _row("w8a8", 8, 550, 1.01),
        _row("gptq", 4, 300, 1.08),
        _row("awq", 4, 300, 1.04),
        _row("rtn", 4, 300, 1.2),
    ],
}


@pytest.mark.parametrize(
    ("budget", "floor", "method"),
    [
        (None, 1.05, "awq"),  # smallest within the floor
        (None, 1.02, "w8a8"),
        (None, 1.10, "awq"),  # same size as gptq: the better perplexity
        (400, 1.02, "awq"),  # nothing meets both: the best that fits
        (None, 1.001, "none"),  # the 16-bit model fits and nothing is good enough
        (100, 1.05, "none"),  # nothing fits
    ],
)
def test_recommend_from_measured(budget, floor, method):
    rec = from_measured(MEASURED, budget, floor)
    assert rec.method == method and rec.source == "measured" and rec.reasons


def test_recommend_measured_skips_emulated_fp8():
    measured = {"rows": MEASURED["rows"] + [_row("fp8", 8, 500, 1.005), _row("rtn:8", 8, 560, 1.002)]}
    gpu = Hardware(gpus=[Gpu("NVIDIA H100", 80 << 30, (9, 0))])
    assert from_measured(measured, None, 1.02, hw=gpu).method == "fp8"
    rec = from_measured(measured, None, 1.02, hw=CPU)
    assert rec.method == "w8a8" and "fp8 left out" in rec.reasons[0]
    rec = from_measured(measured, None, 1.003, Path("m"), hw=CPU)
    assert rec.method == "rtn:8" and "--method rtn --bits 8" in rec.command


def test_recommend_command_reads_quant_eval_json(tmp_path):
    (tmp_path / "quant_eval.json").write_text(json.dumps(MEASURED))
    out = CliRunner().invoke(app, ["quant", "recommend", str(tmp_path), "--quality-floor", "1.02"])
    assert out.exit_code == 0, out.output
    assert "method: w8a8" in out.output and "perplexity 1.010x" in out.output
    out = CliRunner().invoke(app, ["quant", "recommend", str(tmp_path), "--json"])
    assert json.loads(out.output)["recommendation"]["method"] == "awq"


CPU = Hardware("cpu", ["avx2", "avx512_vnni"], 2, 8 << 30, 4 << 30, [])
ALL = ("rtn", "gptq", "awq", "w8a8", "fp8")


@pytest.mark.parametrize(
    ("hw", "budget", "method", "bits"),
    [
        (CPU, None, "w8a8", 8),  # INT8: simple, 2x is enough
        (Hardware("cpu", ["avx2"], 2), None, "rtn", 8),  # no int8 dot products: W8A16
        (CPU, 400, "awq", 4),  # 0.4x of 16-bit needs 4 bits
        (CPU, 150, "gptq", 3),  # below 4 bits' 0.30x: maximum compression
        (Hardware(gpus=[Gpu("NVIDIA H100", 80 << 30, (9, 0))]), None, "fp8", 8),
        (Hardware(gpus=[Gpu("NVIDIA A100", 80 << 30, (8, 0))]), None, "w8a8", 8),
        (Hardware(gpus=[Gpu("NVIDIA H100", 80 << 30, (9, 0))]), 400, "awq", 4),
    ],
)
def test_recommend_framework(hw, budget, method, bits):
    rec = from_framework(hw, budget, 1.05, 1000, ALL)
    assert (rec.method, rec.bits, rec.source) == (method, bits, "framework")
    assert len(rec.reasons) >= 2


def test_recommend_framework_falls_back_to_implemented_and_reads_the_model(stories_dir):
    rec = from_framework(CPU, None, 1.05, 1000, ("rtn", "gptq", "awq"))
    assert rec.method == "rtn" and rec.bits == 8 and any("not implemented" in r for r in rec.reasons)
    rec = recommend(CPU, stories_dir, 10, 1.05)  # no quant_eval.json there: the framework, on its bytes
    assert rec.source == "framework" and rec.method == "gptq"


def test_detect_hardware_is_sane():
    hw = detect()
    assert hw.cores >= 1
    assert hw.ram_bytes is None or hw.ram_bytes > 1 << 28
    assert set(hw.cpu_flags) <= {
        "avx2",
        "avx512f",
        "avx512_vnni",
        "avx512_bf16",
        "amx_tile",
        "amx_bf16",
        "amx_int8",
    }
    assert all(g.memory_bytes > 0 for g in hw.gpus)
    assert json.dumps(hw.to_json())


@pytest.mark.timeout(60)
def test_speed_only_eval_skips_quality(stories_dir, tmp_path):
    """quality=False (bench quant --speed-only): decode speed and memory measured, no perplexity or
    agreement computed (NaN), so a speed run does not pay for them."""
    settings = EvalSettings(
        methods=["rtn:8"],
        eval_text=_need_text(EVAL_TEXT),
        eval_tokens=256,
        decode_tokens=8,
        decode_iters=1,
        quality=False,
    )
    rows = run_eval(stories_dir, settings, tmp_path, log=lambda m: None)["rows"]
    assert [r["method"] for r in rows] == ["base", "rtn:8"]
    for r in rows:
        assert r["decode_tok_s"] > 0 and r["speed_ratio"] > 0
        assert math.isnan(r["perplexity"]) and math.isnan(r["agreement"])
    assert 0.4 < rows[1]["linear_ratio"] < 0.6
