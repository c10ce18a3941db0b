"""`shoal stats`: percentiles from a live server's histograms agree with the client's own timings of the
same requests to within one histogram bucket, and the command prints them as a table."""

from __future__ import annotations

import bisect
import json
import math
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from typer.testing import CliRunner

from shoal import metric_names as mn
from shoal.cli import app
from shoal.live_stats import QUANTILES, Scrape, bucket_quantile, fetch, summarize
from shoal.server.metrics import LATENCY_BUCKETS, TOKEN_LATENCY_BUCKETS

try:
    from server_fixture import SERVED_NAME, live_server  # noqa: F401 - fixture
except ImportError:  # tests/ became a package
    from tests.server_fixture import SERVED_NAME, live_server  # type: ignore[no-redef]  # noqa: F401

NUM_REQUESTS = 200
CONCURRENCY = 2  # a stall of the machine hits this many requests at once; P99 of 200 survives two
MAX_TOKENS = 8
BUCKETS = {"TTFT": LATENCY_BUCKETS, "TPOT": TOKEN_LATENCY_BUCKETS, "E2E": LATENCY_BUCKETS}


def test_bucket_quantile_is_prometheus_histogram_quantile():
    """Linear interpolation inside the bucket (from 0 in the first), the last finite bound for +Inf."""
    buckets = [(0.1, 10.0), (0.2, 30.0), (0.4, 40.0), (math.inf, 50.0)]
    assert bucket_quantile(0.1, buckets) == pytest.approx(0.05)
    assert bucket_quantile(0.5, buckets) == pytest.approx(0.175)
    assert bucket_quantile(0.7, buckets) == pytest.approx(0.3)
    assert bucket_quantile(0.99, buckets) == 0.4
    assert math.isnan(bucket_quantile(0.5, [(0.1, 0.0), (math.inf, 0.0)]))


def _timed_stream(http: httpx.Client, i: int) -> dict[str, float]:
    """One streamed completion, timed by the client: TTFT, TPOT and E2E in seconds."""
    body = {"model": SERVED_NAME, "prompt": f"Once upon a time {i}", "max_tokens": MAX_TOKENS,
            "ignore_eos": True, "stream": True}  # fmt: skip
    start = time.monotonic()
    first = last = None
    with http.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: {"):
                now = time.monotonic()
                first = first or now
                if json.loads(line[6:])["choices"][0]["finish_reason"]:
                    last = now
    end = time.monotonic()
    assert first is not None and last is not None
    return {"TTFT": first - start, "TPOT": (last - first) / (MAX_TOKENS - 1), "E2E": end - start}


def _percentile(values: list[float], q: float) -> float:
    """The nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[max(math.ceil(q * len(ordered)) - 1, 0)]


def _bucket(value: float, bounds: tuple[float, ...]) -> int:
    return bisect.bisect_left(bounds, value)


@pytest.mark.timeout(90)
def test_stats_percentiles_agree_with_client_timings(live_server):
    with live_server.client() as http, ThreadPoolExecutor(CONCURRENCY) as pool:
        # Open the connections first: a TCP connect is client time the server never sees.
        list(pool.map(lambda i: _timed_stream(http, i), range(CONCURRENCY)))
        before = fetch(live_server.url)
        timings = list(pool.map(lambda i: _timed_stream(http, i), range(NUM_REQUESTS)))
        after = fetch(live_server.url)
    summary = summarize(before, after)
    assert not summary.whole_life
    assert after.minus(before).total(mn.E2E_LATENCY + "_count") == NUM_REQUESTS
    assert summary.requests_per_s > 0 and summary.output_tokens_per_s > 0
    for label, bounds in BUCKETS.items():
        client = [t[label] for t in timings]
        for q in QUANTILES:
            server_value, client_value = summary.percentiles[label][q], _percentile(client, q)
            gap = abs(_bucket(server_value, bounds) - _bucket(client_value, bounds))
            assert gap <= 1, f"{label} P{q * 100:g}: server {server_value:.4f}s, client {client_value:.4f}s"


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
