"""`shoal bench gateway`'s workload helpers (the benchmark itself runs in bench/, not here)."""

from __future__ import annotations

import json

import pytest

from shoal.bench.gateway import WORKLOADS, chat_load, parse_workloads, stream_usage


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
