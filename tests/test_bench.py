"""Smoke test of the benchmarks (shoal.bench): both run end to end on stories260K with tiny sizes.

Timings are meaningless here; what is checked is the result structure and that the token counts are exact:
shoal produced exactly the requested output tokens for every request, and transformers exactly as many as
asked of each of its generate() calls.
"""

from __future__ import annotations

import json

import pytest

from shoal.bench.latency import print_latency, run_latency
from shoal.bench.throughput import print_throughput, run_throughput
from shoal.bench.workload import write_json

pytest.importorskip("transformers")


def _quiet(*args) -> None:
    pass


def _check_common(result: dict, benchmark: str) -> None:
    assert result["benchmark"] == benchmark
    machine = result["machine"]
    assert machine["cpu"] and machine["cpu_cores"] >= 1 and machine["torch"]
    assert result["config"]["dtype"] == "float32"
    assert result["engine"]["kv_cache_blocks"] > 0
    json.dumps(result)  # all plain data


@pytest.mark.timeout(60)
def test_latency_profile_writes_a_trace(stories_dir, tmp_path):
    trace = tmp_path / "trace.json"
    result = run_latency(
        str(stories_dir), dtype="float32", input_len=8, output_len=4, iters=1, skip_hf=True, profile=trace,
        log=_quiet,
    )  # fmt: skip
    events = json.loads(trace.read_text())["traceEvents"]
    assert any(e.get("name") == "aten::embedding" for e in events)  # the forward's ops are traced
    top = result["profile"]["top_self_cpu"]
    assert top and all(t["calls"] > 0 and t["self_cpu_ms"] >= 0 for t in top)


@pytest.mark.timeout(60)
def test_latency_smoke(stories_dir, tmp_path, capsys):
    result = run_latency(
        str(stories_dir), dtype="float32", input_len=8, output_len=6, iters=2, warmup_iters=1, log=_quiet
    )
    _check_common(result, "latency")
    s, h = result["shoal"], result["hf"]
    assert len(s["runs"]) == len(h["runs"]) == 2
    for run in s["runs"] + h["runs"]:
        assert run["output_tokens"] == 6
        assert 0 < run["ttft_s"] < run["total_s"]
        assert run["decode_tokens_per_s"] > 0
    assert result["ratio"]["decode_tokens_per_s"] == pytest.approx(
        s["decode_tokens_per_s"] / h["decode_tokens_per_s"]
    )
    assert len(result["greedy_agreement_tokens"]) == 2
    print_latency(result)
    assert "decode tokens/s" in capsys.readouterr().out
    write_json(result, tmp_path / "latency.json")
    assert json.loads((tmp_path / "latency.json").read_text())["config"]["output_len"] == 6


@pytest.mark.timeout(60)
def test_throughput_smoke(stories_dir, capsys):
    result = run_throughput(
        str(stories_dir),
        dtype="float32",
        num_prompts=5,
        input_len_range=(4, 24),
        output_len_range=(2, 10),
        hf_batch_size=2,
        max_num_batched_tokens=32,
        log=_quiet,
    )
    _check_common(result, "throughput")
    c, s, h = result["config"], result["shoal"], result["hf"]
    # shoal: exactly the requested tokens, every request (run_throughput raises otherwise), counted once.
    assert s["requests"] == h["requests"] == 5
    assert s["output_tokens"] == h["output_tokens"] == c["output_tokens"]
    assert s["prompt_tokens"] == c["prompt_tokens"]
    assert s["prefill_tokens_computed"] == c["prompt_tokens"]  # nothing from the prefix cache, no recompute
    assert s["prefix_cache_hit_tokens"] == 0 and s["preemptions"] == 0
    assert result["engine"]["max_num_batched_tokens"] == 32
    # transformers: 3 batches (2, 2, 1) each run for the longest output in it; the rest is padding waste.
    assert [b["size"] for b in h["runs"][0]["batches"]] == [2, 2, 1]
    assert h["generated_tokens"] >= h["output_tokens"]
    assert s["output_tokens_per_s"] == pytest.approx(s["output_tokens"] / s["wall_s"])
    assert result["ratio"]["output_tokens_per_s"] == pytest.approx(
        s["output_tokens_per_s"] / h["output_tokens_per_s"]
    )
    print_throughput(result)
    assert "output tokens/s" in capsys.readouterr().out


@pytest.mark.timeout(60)
def test_throughput_skip_hf(stories_dir):
    result = run_throughput(
        str(stories_dir),
        dtype="float32",
        num_prompts=3,
        input_len_range=(4, 8),
        output_len_range=(3, 3),
        skip_hf=True,
        log=_quiet,
    )
    assert result["hf"] is None and result["ratio"]["output_tokens_per_s"] is None
    assert result["shoal"]["output_tokens"] == 9
