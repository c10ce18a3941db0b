"""`shoal tune` on stories260K with a KV budget of 10 blocks: it finds the capacity limit without crashing.

The load: 8 requests of 24 prompt + 24 output tokens (3 blocks of 16 each), all at once. The defaults
(max_num_seqs 256) run out of KV blocks and preempt: a row of the table, not a crash. The recommended
max_num_seqs is the largest with zero preemptions: a fresh engine at that value does not preempt and one
at the next value does. A budget too small for one sequence is an error message, not a traceback.

Takes about 10 s on an idle 2-core machine (a dozen engine runs of the tiny model).
"""

from __future__ import annotations

import json
import re

import pytest
from typer.testing import CliRunner

from shoal.bench import workload
from shoal.cli import app
from shoal.ops import tune as tuning

pytestmark = pytest.mark.timeout(120)

LOAD = tuning.Load(num_prompts=8, input_len=24, output_len=24)
MAX_MODEL_LEN = 64  # 4 blocks: the engine's floor for the budget


def _block_bytes(model_dir) -> int:
    """KV bytes of one 16-token block in float32: K and V, per layer, per KV head."""
    cfg = json.loads((model_dir / "config.json").read_text())
    head_dim = cfg.get("head_dim", cfg["hidden_size"] // cfg["num_attention_heads"])
    return 2 * cfg["num_hidden_layers"] * 16 * cfg["num_key_value_heads"] * head_dim * 4


def _cli(model_dir, kv_blocks: int, *extra: str):
    args = ["tune", "--model", str(model_dir), "--num-prompts", str(LOAD.num_prompts), "--input-len",
            str(LOAD.input_len), "--output-len", str(LOAD.output_len), "--max-model-len", str(MAX_MODEL_LEN),
            "--kv-cache-memory", str(kv_blocks * _block_bytes(model_dir)), "--dtype", "float32",
            "--device", "cpu", *extra]  # fmt: skip
    return CliRunner().invoke(app, args)


def _preemptions(model_dir, max_num_seqs: int) -> int:
    engine = workload.build_engine(
        str(model_dir), "float32", "cpu", max_num_seqs=max_num_seqs, max_model_len=MAX_MODEL_LEN,
        kv_cache_memory=10 * _block_bytes(model_dir),
    )  # fmt: skip
    trial = tuning.measure(engine, LOAD, "rerun", {})
    assert trial.error is None
    return trial.preemptions


def test_tune_finds_the_largest_max_num_seqs_without_preemptions(stories_dir, tmp_path):
    out = tmp_path / "tune.json"
    result = _cli(stories_dir, 10, "--output-json", str(out))
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    chosen = report["recommended"]["max_num_seqs"]
    trials = report["trials"]
    defaults = trials[0]
    assert defaults["step"] == "defaults" and defaults["max_num_seqs"] == 256 and defaults["preemptions"] > 0
    by_seqs = {t["flags"]["max_num_seqs"]: t for t in trials if t["step"] in ("raise", "bisect")}
    assert by_seqs[chosen]["preemptions"] == 0 and by_seqs[chosen + 1]["preemptions"] > 0
    assert all(t["preemptions"] == 0 for n, t in by_seqs.items() if n < chosen)
    assert [t["preemptions"] for t in trials if t["step"] == "confirm"] == [0]
    # The command line printed last carries the recommended flags, with vLLM's names.
    command = result.output.strip().splitlines()[-1]
    assert command.startswith(f"shoal serve --model {stories_dir}")
    assert f"--max-num-seqs {chosen}" in command and "--max-num-batched-tokens" in command
    assert re.search(r"--kv-cache-memory \d+", command) and "--max-model-len 64" in command
    # Confirmed by a rerun on fresh engines, outside the tool.
    assert _preemptions(stories_dir, chosen) == 0
    assert _preemptions(stories_dir, chosen + 1) > 0


def test_tune_reports_a_budget_too_small_for_one_sequence(stories_dir):
    result = _cli(stories_dir, 3)  # 3 blocks < one max_model_len sequence (4)
    assert result.exit_code == 1
    assert "raise the KV budget" in result.output and "Traceback" not in result.output
