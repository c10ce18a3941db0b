"""`shoal stats`: percentiles from a live server's histograms agree with the client's own timings of the
same requests (`shoal bench serve` is the client) to within a histogram bucket (two above, in the tail,
where the client's own stalls add to what it sees), and the command prints them as a table."""

from __future__ import annotations

import bisect
import json
import math
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from shoal import metric_names as mn
from shoal.cli import app
from shoal.live_stats import QUANTILES, Scrape, bucket_quantile, fetch, summarize
from shoal.server.metrics import LATENCY_BUCKETS, TOKEN_LATENCY_BUCKETS

try:
    from server_fixture import API_KEY, SERVED_NAME, TINY_MODEL, live_server  # noqa: F401 - fixture
except ImportError:  # tests/ became a package
    from tests.server_fixture import API_KEY, SERVED_NAME, TINY_MODEL, live_server  # type: ignore[no-redef]  # noqa: F401

NUM_REQUESTS = 200
# 4 streams: TTFT then holds the engine's wait for a step (both sides see it), so the client's own
# wake-ups on a loaded machine (a few ms each) stay within a bucket; at 2 streams the server's TTFT P95
# fell under 10 ms and the client's past 20 ms in 2 of 3 runs at load average 18 (4 streams: 7 of 7).
CONCURRENCY = 4
MAX_TOKENS = 8
# Buckets apart the two sides may be, per quantile: (client below the server, client above it).
# The server starts TTFT and E2E when a request arrives and stops them when it sends, so the client's
# own timings of the same requests hold them plus its own send, receive and wake-up: each of its
# quantiles is at least the server's (never more than a bucket below, where interpolation straddles a
# bound). Above, a stall of the client's own process, which the server cannot see, moves its tail: on a
# 2-core AVX2 EPYC slowed by its host, CI runs saw TTFT P99 9.9 ms on the server and 29.4 ms in the
# client, and P95 9.9 ms against 20.2 ms, two buckets. TPOT has no such order (a client stalled before
# its first token then reads the rest at once, so its TPOT is shorter), so it keeps one bucket each way.
_ORDERED = {0.5: (1, 1), 0.95: (1, 2), 0.99: (1, 2)}
_UNORDERED = {0.5: (1, 1), 0.95: (1, 1), 0.99: (2, 2)}
# shoal stats's label -> (shoal bench serve's metric, the server histogram's bucket bounds, tolerance)
BUCKETS = {
    "TTFT": ("ttft", LATENCY_BUCKETS, _ORDERED),
    "TPOT": ("tpot", TOKEN_LATENCY_BUCKETS, _UNORDERED),
    "E2E": ("e2el", LATENCY_BUCKETS, _ORDERED),
}


def test_bucket_quantile_is_prometheus_histogram_quantile():
    """Linear interpolation inside the bucket (from 0 in the first), the last finite bound for +Inf."""
    buckets = [(0.1, 10.0), (0.2, 30.0), (0.4, 40.0), (math.inf, 50.0)]
    assert bucket_quantile(0.1, buckets) == pytest.approx(0.05)
    assert bucket_quantile(0.5, buckets) == pytest.approx(0.175)
    assert bucket_quantile(0.7, buckets) == pytest.approx(0.3)
    assert bucket_quantile(0.99, buckets) == 0.4
    assert math.isnan(bucket_quantile(0.5, [(0.1, 0.0), (math.inf, 0.0)]))


def _bench_serve(live_server, out: Path, num_prompts: int) -> dict:
    """`shoal bench serve` against the live server, closed loop at CONCURRENCY: its result JSON."""
    args = ["bench", "serve", "--base-url", live_server.url, "--model", SERVED_NAME, "--api-key", API_KEY,
            "--tokenizer", str(TINY_MODEL), "--num-prompts", str(num_prompts), "--random-input-len", "8",
            "--random-output-len", str(MAX_TOKENS), "--max-concurrency", str(CONCURRENCY),
            "--num-warmups", "0", "--output-json", str(out)]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    return json.loads(out.read_text())


def _bucket(value: float, bounds: tuple[float, ...]) -> int:
    return bisect.bisect_left(bounds, value)


@pytest.mark.timeout(90)
def test_stats_percentiles_agree_with_bench_serve(live_server, tmp_path):
    """`shoal bench serve` is the client: its P50/P95/P99 of 200 requests against the server's own."""
    _bench_serve(live_server, tmp_path / "warm.json", CONCURRENCY)  # warm the server's paths up
    before = fetch(live_server.url)
    client = _bench_serve(live_server, tmp_path / "run.json", NUM_REQUESTS)
    after = fetch(live_server.url)
    assert client["completed"] == NUM_REQUESTS and client["errors"] == {}
    summary = summarize(before, after)
    assert not summary.whole_life
    assert after.minus(before).total(mn.E2E_LATENCY + "_count") == NUM_REQUESTS
    assert summary.requests_per_s > 0 and summary.output_tokens_per_s > 0
    assert client["total_output_tokens"] == NUM_REQUESTS * MAX_TOKENS
    for label, (key, bounds, tolerance) in BUCKETS.items():
        for q in QUANTILES:
            server_value, client_value = (
                summary.percentiles[label][q],
                client[f"p{round(q * 100)}_{key}_ms"] / 1e3,
            )
            below, above = tolerance[q]
            gap = _bucket(client_value, bounds) - _bucket(server_value, bounds)
            assert -below <= gap <= above, (
                f"{label} P{q * 100:g}: server {server_value:.4f}s, client {client_value:.4f}s"
            )


@pytest.mark.timeout(30)
def test_stats_command_prints_the_table(live_server):
    with live_server.client() as http:
        http.post("/v1/completions", json={"model": SERVED_NAME, "prompt": "Once", "max_tokens": 3})
    result = CliRunner().invoke(app, ["stats", "--url", live_server.url, "--interval", "0.2"])
    assert result.exit_code == 0, result.output
    for word in ("TTFT (ms)", "TPOT (ms)", "E2E (ms)", "P50", "P95", "P99", "requests/s", "output tokens/s"):
        assert word in result.output
    assert Scrape.parse(httpx.get(f"{live_server.url}/metrics").text).total(mn.E2E_LATENCY + "_count") > 0


@pytest.mark.timeout(30)
def test_stats_command_fails_cleanly_without_a_server():
    result = CliRunner().invoke(app, ["stats", "--url", "http://127.0.0.1:9", "--interval", "0.1"])
    assert result.exit_code == 1
    assert "cannot read" in result.output
