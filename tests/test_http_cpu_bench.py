"""Smoke test of `shoal bench http-cpu` (shoal/bench/http_cpu.py) and of both load clients of
serve_compare (aiohttp, httpx), on stories260K with tiny loads against a real `shoal serve` subprocess.

The CPU figures depend on the machine; what is checked is the harness: both clients get every stream's
tokens and the same greedy text, CPU is read from the server's two processes and from the client, and the
summary and table have a row per load and client. Takes about 15-30 s (one server start).
"""

from __future__ import annotations

import json

import pytest

from shoal.bench import http_cpu
from shoal.bench.serve_compare import http_run

pytest.importorskip("httpx")
pytestmark = pytest.mark.timeout(120)


def test_http_cpu_measures_both_processes_and_both_clients(stories_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(http_cpu, "IDLE_S", 0.5)
    pairs: list[tuple[list[str], list[str]]] = []
    real_run = http_run

    def recording_run(url, model, requests, client="aiohttp", **kw):
        run = real_run(url, model, requests, client=client, **kw)
        if client == "aiohttp":  # the same requests through the other client, for comparison
            other = real_run(url, model, requests, client="httpx", **kw)
            pairs.append(([s.text for s in run["streams"]], [s.text for s in other["streams"]]))
        return run

    monkeypatch.setattr(http_cpu, "http_run", recording_run)
    result = http_cpu.run_http_cpu(
        str(stories_dir), dtype="float32", threads=1, rounds=1, concurrency=(3,), single_output_len=6,
        stream_output_len=5, prompt_len=8, sequential=4, log_dir=tmp_path, log=lambda *a: None,
    )  # fmt: skip
    rows = result["runs"]
    assert {(r["load"], r["client"]) for r in rows} == {
        (load, client) for load in ("single", "streams-3") for client in ("aiohttp", "httpx")
    } | {("requests-4", "http.client")}
    for r in rows:
        assert r["output_tokens"] == {"single": 6, "streams-3": 15, "requests-4": 4}[r["load"]]
        # A run of 6 tokens may fall inside one 10 ms clock tick of a process: each figure may read 0,
        # but the engine core and the client do work in every load, so their totals cannot.
        assert r["http_ms_per_token"] >= 0 and r["core_ms_per_token"] >= 0 and r["client_ms_per_token"] >= 0
        assert r["http_net_ms_per_token"] <= r["http_ms_per_token"]
    assert sum(r["core_ms_per_token"] for r in rows) > 0 and sum(r["client_ms_per_token"] for r in rows) > 0
    # greedy on the same prompts: both clients read the same text from the same server
    assert pairs and all(a == b for a, b in pairs) and any(t for a, _ in pairs for t in a)
    assert len(result["summary"]) == 5
    assert "| single | aiohttp |" in http_cpu.markdown(result)
    assert "| requests-4 | http.client |" in http_cpu.markdown(result)
    json.dumps(result)


def test_unknown_client_is_refused():
    with pytest.raises(ValueError, match="unknown client"):
        http_run("http://127.0.0.1:9", "m", [], client="curl")
    with pytest.raises(ValueError, match="clients must be among"):
        http_cpu.run_http_cpu("unused", clients=("curl",))
