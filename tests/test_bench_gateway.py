"""`shoal bench gateway`'s workload helpers (the benchmark itself runs in bench/, not here)."""

from __future__ import annotations

import json

import pytest

from shoal.bench.gateway import WORKLOADS, chat_load, parse_workloads, stream_usage, summarize_blocks


def _event(obj: dict) -> bytes:
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


@pytest.mark.timeout(10)
def test_stream_usage_is_the_last_usage_event_s_completion_tokens():
    chunk = {"choices": [{"index": 0, "delta": {"content": "hi"}}], "usage": None}
    usage = {"choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 32, "total_tokens": 41}}
    raw = _event(chunk) * 3 + _event(usage) + b"data: [DONE]\n\n"
    assert stream_usage(raw) == 32
    assert stream_usage(_event(chunk) + b"data: [DONE]\n\n") == 0


@pytest.mark.timeout(10)
def test_parse_workloads_keeps_order_and_names_a_bad_one():
    assert parse_workloads(" chat-stream,tiny ") == ["chat-stream", "tiny"]
    assert parse_workloads(",".join(WORKLOADS)) == list(WORKLOADS)
    with pytest.raises(ValueError, match="'tiny,stream'"):
        parse_workloads("tiny,stream")
    with pytest.raises(ValueError):
        parse_workloads(" , ")


@pytest.mark.timeout(10)
def test_chat_load_asks_for_exactly_max_tokens_on_distinct_prompts():
    plain, streamed = chat_load(16, 8, 32, stream=False), chat_load(16, 8, 32, stream=True)
    assert (plain.name, plain.path, plain.stream) == ("chat", "/v1/chat/completions", False)
    assert (streamed.name, streamed.stream) == ("chat-stream", True)
    assert all(b["max_tokens"] == 32 and b["ignore_eos"] for b in plain.bodies + streamed.bodies)
    assert all(b["stream_options"] == {"include_usage": True} for b in streamed.bodies)
    prompts = [b["messages"][0]["content"] for b in plain.bodies]
    assert len(set(prompts)) == 16


@pytest.mark.timeout(10)
def test_summarize_blocks_loss_rates_and_the_proxying_s_cpu():
    def block(side: str, seconds: float, cpu: float) -> dict:
        return {"side": side, "seconds": seconds, "requests": 10, "output_tokens": 320, "gateway_cpu_s": cpu}

    # round 1: direct 2 s a block, gateway 2.5 s; round 2: 4 s and 4 s. Idle gateway: 0.1 s per 10 s.
    blocks = [block("direct", 2, 0.02), block("gateway", 2.5, 0.125), block("gateway", 2.5, 0.125),
              block("direct", 2, 0.02), block("direct", 4, 0.04), block("gateway", 4, 0.14),
              block("gateway", 4, 0.14), block("direct", 4, 0.04)]  # fmt: skip
    out = summarize_blocks(blocks)
    assert out["direct_rps"] == pytest.approx(40 / 12) and out["gateway_rps"] == pytest.approx(40 / 13)
    assert out["direct_tokens_per_s"] == pytest.approx(32 * 40 / 12)
    assert out["loss"] == pytest.approx(1 - 12 / 13)
    assert out["loss_per_round"] == pytest.approx([1 - 4 / 5, 0.0])
    assert out["gateway_idle_cpu_ms_per_s"] == pytest.approx(10.0)
    assert out["gateway_cpu_ms_per_request"] == pytest.approx(1e3 * 0.53 / 40)
    assert out["gateway_proxy_cpu_ms_per_request"] == pytest.approx(1e3 * (0.53 - 0.13) / 40)
