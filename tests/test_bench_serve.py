"""`shoal bench serve` (shoal/bench/serve.py): against a URL that fails it reports the errors by kind instead
of crashing; its load shapes, goodput and comparison mode. Its agreement with `shoal stats` on a live
server is tests/test_stats_cli.py::test_stats_percentiles_agree_with_bench_serve."""

from __future__ import annotations

import asyncio
import itertools
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from typer.testing import CliRunner

from shoal.bench import serve as bs
from shoal.bench.serve_compare import Stream, free_port
from shoal.cli import app

try:
    from server_fixture import TINY_MODEL
except ImportError:  # tests/ became a package
    from tests.server_fixture import TINY_MODEL  # type: ignore[no-redef]


class _Failing(BaseHTTPRequestHandler):
    """POST /v1/completions: HTTP 500 with an OpenAI error body; POST /broken: 200, then an error event."""

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        status, body = 500, b'{"error": {"message": "boom", "type": "server_error", "code": 500}}'
        if self.path == "/broken":
            status, body = 200, b'data: {"error": {"message": "engine died"}}\n\n'
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def failing_url():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Failing)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def _bench(url: str, tmp_path, *extra: str) -> tuple[dict, str]:
    out = tmp_path / "result.json"
    args = ["bench", "serve", "--base-url", url, "--model", "m", "--tokenizer", str(TINY_MODEL),
            "--num-prompts", "6", "--random-input-len", "4", "--random-output-len", "4",
            "--request-timeout", "10", "--output-json", str(out), *extra]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    return json.loads(out.read_text()), result.output


@pytest.mark.timeout(30)
def test_a_refused_connection_is_reported_not_raised(tmp_path):
    result, output = _bench(f"http://127.0.0.1:{free_port()}", tmp_path, "--request-rate", "200")
    assert (result["completed"], result["failed"], result["errors"]) == (0, 6, {"connect": 6})
    assert result["warmup_errors"] == 1 and result["p99_ttft_ms"] is None
    assert "connect x6" in output and "127.0.0.1" in result["error_examples"]["connect"]


@pytest.mark.timeout(30)
def test_http_500_and_error_events_are_counted_by_kind(failing_url, tmp_path):
    result, output = _bench(failing_url, tmp_path, "--max-concurrency", "2")
    assert result["errors"] == {"http_500": 6} and result["request_throughput"] == 0
    assert "boom" in result["error_examples"]["http_500"] and "http_500 x6" in output
    result, _ = _bench(failing_url, tmp_path, "--endpoint", "/broken")
    assert (
        result["errors"] == {"stream_error": 6} and "engine died" in result["error_examples"]["stream_error"]
    )


@pytest.mark.timeout(10)
def test_arrivals_fixed_poisson_and_all_at_once():
    fixed = bs.arrival_times(5, bs.LoadSpec("u", "m", request_rate=4, arrivals="fixed"))
    assert fixed == pytest.approx([0, 0.25, 0.5, 0.75, 1.0])
    assert bs.arrival_times(3, bs.LoadSpec("u", "m")) == [0.0, 0.0, 0.0]
    poisson = bs.arrival_times(4001, bs.LoadSpec("u", "m", request_rate=10, seed=1))
    gaps = [b - a for a, b in zip(poisson, poisson[1:], strict=False)]
    assert sum(gaps) / len(gaps) == pytest.approx(0.1, rel=0.05)  # exponential gaps: mean 1/rate,
    assert sum((g - 0.1) ** 2 for g in gaps) / len(gaps) == pytest.approx(0.01, rel=0.15)  # variance 1/rate²
    with pytest.raises(ValueError, match="arrivals"):
        bs.LoadSpec("u", "m", arrivals="bursty")


@pytest.mark.timeout(10)
def test_goodput_counts_requests_within_every_target():
    """Hand-computed: TPOT = (E2E - TTFT) / (tokens - 1); a request is good when all targets hold."""
    streams = [
        Stream(ttft_s=0.1, latency_s=0.5, output_tokens=5, expected_tokens=5, prompt_tokens=8),  # TPOT 100
        Stream(ttft_s=0.3, latency_s=0.5, output_tokens=5, expected_tokens=5, prompt_tokens=8),  # TTFT 300
        Stream(ttft_s=0.1, latency_s=0.9, output_tokens=5, expected_tokens=5, prompt_tokens=8),  # TPOT 200
        Stream(ttft_s=None, latency_s=0.1, output_tokens=0, expected_tokens=5, error="http_500"),
    ]
    m = bs.metrics(streams, 2.0, bs.parse_goodput(["ttft:200", "tpot:150"]))
    assert (m["completed"], m["failed"], m["errors"]) == (3, 1, {"http_500": 1})
    assert m["request_throughput"] == 1.5 and m["output_throughput"] == 7.5 and m["input_throughput"] == 12
    assert m["request_goodput"] == 0.5 and m["goodput_output_throughput"] == 2.5
    assert m["p50_tpot_ms"] == pytest.approx(100) and m["mean_ttft_ms"] == pytest.approx(500 / 3)
    assert bs.parse_goodput(["e2e:3000"]) == {"e2el": 3000.0}
    for bad in ("ttft", "itl:5", "ttft:fast", "ttft:0"):
        with pytest.raises(ValueError):
            bs.parse_goodput([bad])


@pytest.mark.timeout(10)
def test_prompt_lengths_follow_the_distribution(tmp_path):
    prompts = bs.random_prompts(TINY_MODEL, 200, 20, 10, 0.5, "normal", seed=3)
    lengths = [p.prompt_len for p in prompts]
    assert min(lengths) >= 10 and max(lengths) <= 30 and 18 <= sum(lengths) / 200 <= 22
    assert len({p.output_len for p in bs.random_prompts(TINY_MODEL, 20, 20, 10)}) == 1  # ratio 0: fixed
    data = tmp_path / "prompts.jsonl"
    data.write_text('{"prompt": "Once upon a time"}\n\n{"prompt": "Hi", "output_tokens": 3}\n')
    custom = bs.dataset_prompts(data, 3, 7)
    assert [(p.prompt, p.output_len) for p in custom] == [
        ("Once upon a time", 7),
        ("Hi", 3),
        ("Once upon a time", 7),
    ]
    data.write_text('{"text": "no prompt"}\n')
    with pytest.raises(ValueError, match="prompt"):
        bs.dataset_prompts(data, 1, 7)


@pytest.mark.timeout(10)
def test_serve_diff_shows_ratios(tmp_path):
    base = {"benchmark": "bench_serve", "config": {"num_prompts": 10, "request_rate": "inf", "arrivals": "poisson",
            "max_concurrency": 2, "base_url": "u", "model": "m"}, "goodput_targets_ms": {}}  # fmt: skip
    a = {**base, "request_throughput": 2.0, "p99_ttft_ms": 100.0}
    b = {**base, "request_throughput": 3.0, "p99_ttft_ms": 50.0}
    (tmp_path / "a.json").write_text(json.dumps(a))
    (tmp_path / "b.json").write_text(json.dumps(b))
    result = CliRunner().invoke(app, ["bench", "serve-diff", str(tmp_path / "a.json"), str(tmp_path / "b.json"),
                                      "--markdown"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "| requests/s | 2.00 | 3.00 | 1.50x |" in result.output
    assert "| TTFT P99 (ms) | 100.0 | 50.0 | 0.50x |" in result.output
    result = CliRunner().invoke(
        app, ["bench", "serve-diff", str(tmp_path / "a.json"), str(tmp_path / "b.json")]
    )
    assert result.exit_code == 0 and "1.50x" in result.output
    (tmp_path / "c.json").write_text("{}")
    result = CliRunner().invoke(
        app, ["bench", "serve-diff", str(tmp_path / "a.json"), str(tmp_path / "c.json")]
    )
    assert result.exit_code == 2 and "not a `shoal bench serve` result" in result.output


@pytest.mark.timeout(60)
def test_spike_clients_send_from_children_niced_or_not_and_record_each_send_lag(failing_url):
    """The spike bench's clients (shoal/bench/spike.py) are child processes: the flood's at nice 19, the
    premium one's at this process's niceness. Every request's outcome comes back with its send lag, over
    raw keep-alive HTTP/1.1 (here against an HTTP/1.0 server that closes each connection)."""
    import os

    from shoal.bench import spike

    with spike.Client(nice=True) as client:
        assert client.call(os.getpid) != os.getpid()
        assert client.call(os.nice, 0) == 19
        plan = [(0, 0.0, "premium"), (1, 0.05, "standard"), (2, 0.1, "standard")]
        outcomes = client.call(spike._run, spike._send, failing_url, plan, {}, 4, 10.0)
    assert [(o.request_class, o.status, o.ttft_s, o.planned_s) for o in outcomes] == [
        ("premium", 500, None, 0.0),
        ("standard", 500, None, 0.05),
        ("standard", 500, None, 0.1),
    ]
    assert all(o.send_lag_s >= 0 for o in outcomes)
    sending = spike._sending(outcomes)
    assert sending["requests"] == 3 and sending["planned_rate_rps"] == pytest.approx(30.0)  # 3 in 0.1 s
    last_sent = 0.1 + outcomes[-1].send_lag_s
    assert sending["achieved_rate_rps"] == pytest.approx(3 / last_sent)
    with spike.Client(nice=False) as client:
        assert client.call(os.getpid) != os.getpid()
        assert client.call(os.nice, 0) == os.nice(0)


class _KeepAlive(BaseHTTPRequestHandler):
    """HTTP/1.1 with keep-alive: POST /v1/completions streams two SSE events in chunks (an empty text,
    then a token) when the key is "premium", else answers 503 with Retry-After and a Content-Length body."""

    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        self.rfile.read(int(self.headers["Content-Length"]))
        if self.headers.get("Authorization") != "Bearer premium":
            body = b'{"error": {"message": "overloaded", "type": "server_error", "code": "overloaded"}}'
            self.send_response(503)
            self.send_header("Retry-After", "2")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for event in (b'data: {"choices":[{"text":""}]}\n\n', b'data: {"choices":[{"text":"Hi"}]}\n\n',
                      b"data: [DONE]\n\n"):  # fmt: skip
            self.wfile.write(b"%x\r\n%s\r\n" % (len(event), event))
            self.wfile.flush()
        self.wfile.write(b"0\r\n\r\n")

    def log_message(self, *args) -> None:
        pass


@pytest.mark.timeout(30)
def test_spike_connection_pool_reads_chunked_streams_and_refusals_on_kept_alive_connections():
    """shoal/bench/spike.py's raw client: a streamed 200's TTFT is the first event with text, a 503 body
    is read by its Content-Length, and requests one after another reuse one connection."""
    import asyncio

    from shoal.bench import spike

    server = ThreadingHTTPServer(("127.0.0.1", 0), _KeepAlive)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"

    async def exchanges() -> tuple[list, int]:
        pool = spike.ConnectionPool(url)
        answers = []
        for key in ("premium", "standard", "premium"):
            data = spike.http_request(f"{url}/v1/completions", spike.request_body(0, 4),
                                      {"Authorization": f"Bearer {key}"})  # fmt: skip
            answers.append(await pool.exchange(data, 10.0))
        pool.close()
        return answers, pool.opened

    try:
        answers, opened = asyncio.run(exchanges())
    finally:
        server.shutdown()
    assert [status for status, _ in answers] == [200, 503, 200]
    assert answers[0][1] is not None and answers[0][1] > 0 and answers[1][1] is None
    assert opened == 1


@pytest.mark.timeout(10)
def test_spike_server_side_reads_queue_and_ttft_per_class_from_the_access_log(tmp_path):
    """shoal/bench/spike.py's server_side: only successful requests with the prefix's ids, per class; the
    prompt step is TTFT minus queue, request by request; and whether the slowest arrived during another
    request's prompt step of the same class (arrival: the line's time less its latency)."""
    from datetime import UTC, datetime

    from shoal.bench.spike import server_side

    def line(
        request_id: str, status: int, queue: float | None, ttft: float | None, arrival: float = 0.0
    ) -> str:
        latency = 0.2
        end = datetime.fromtimestamp(1.8e9 + arrival + latency, tz=UTC).isoformat(timespec="milliseconds")
        return json.dumps({"time": end, "logger": "shoal.access", "request_id": request_id, "status": status,
                           "queue_s": queue, "ttft_s": ttft, "latency_s": latency})  # fmt: skip

    log = tmp_path / "server.log"
    log.write_text("\n".join([
        '{"logger": "shoal.server", "message": "engine ready after 1.0 s"}',
        line("spike-premium-0", 200, 0.010, 0.050),  # its prompt step: 0.010-0.050 s after 0
        line("spike-premium-3", 200, 0.030, 0.060, arrival=0.020),  # arrived during it, and the slowest
        line("spike-standard-1", 200, 1.0, 1.5),
        line("spike-standard-2", 503, None, None),  # shed
        line("unloaded0-premium-0", 200, 0.001, 0.020),  # another prefix
        line("other", 200, 0.5, 0.6),
    ]) + "\n")  # fmt: skip
    report = server_side(log, "spike")
    premium, standard = report["premium"], report["standard"]
    assert premium["n"] == 2 and standard["n"] == 1
    assert premium["queue_p50_s"] == pytest.approx(0.020) and premium["ttft_p95_s"] == pytest.approx(0.0595)
    assert premium["prompt_step_p50_s"] == pytest.approx(0.035)  # (0.040 + 0.030) / 2
    assert standard["prompt_step_p95_s"] == pytest.approx(0.5)
    assert premium["slowest_tenth"] == 1 and premium["behind_own_class"] == 1
    assert standard["behind_own_class"] == 0  # alone in its class
    assert server_side(log, "unloaded")["premium"]["ttft_p50_s"] == pytest.approx(0.020)


def test_spike_premium_alone_baseline_gives_the_spikes_p95_over_premium_traffic_alone(tmp_path):
    """shoal/bench/spike.py's premium-alone baseline: its client P95 from its outcomes, its server P95 from
    the access lines of its own id prefix, the spike's P95 over each, and the report's column and line."""
    from shoal.bench import spike

    log = tmp_path / "server.log"
    log.write_text("\n".join(
        json.dumps({"time": "2027-01-15T08:00:00.000+00:00", "request_id": f"alone-premium-{i}", "status": 200,
                    "queue_s": 0.001, "ttft_s": 0.020 + 0.001 * i, "latency_s": 0.2})
        for i in range(20)
    ) + "\n")  # fmt: skip
    alone = [spike.Outcome("premium", 200, 0.030 + 0.001 * i) for i in range(20)]
    spike_side = {"premium": {"ttft_p95_s": 0.0585}}
    got = spike._premium_alone(alone, 0.0975, spike_side, log)
    assert got["alone_premium"] == {"ok": 20, "sent": 20, "ttft_p95_s": pytest.approx(0.04805)}
    assert got["premium_ttft_p95_over_alone"] == pytest.approx(0.0975 / 0.04805)
    assert got["alone_server_side"]["ttft_p95_s"] == pytest.approx(0.03805)
    assert got["premium_server_ttft_p95_over_alone"] == pytest.approx(0.0585 / 0.03805)
    assert spike._premium_alone(None, 0.1, spike_side, log) == {}
    classes = {c: spike.summarize([])[c] for c in spike.CLASSES}
    result = {"factor": 10, "sustainable_rate_rps": 7.0, "spike_s": 30, "model": "m", "dtype": "float32",
              "urgent_threads": 2, "with policy": {"classes": classes, "premium_ttft_p95_ratio": 1.5, **got,
              "unloaded_premium_ttft_p95_s": 0.065, "unloaded_after_premium_ttft_p95_s": 0.080}}  # fmt: skip
    report = spike.markdown(result)
    assert "--urgent-threads 2" in report and "| 1.50x | 2.03x |" in report
    assert "premium alone (the spike's premium arrivals without the flood; 20 of 20 answered)" in report
    assert "under the spike / alone: **2.03x** (server 1.54x)" in report
    assert "unloaded premium TTFT P95 65 ms before the spike, 80 ms after it." in report


def test_spike_pool_takes_the_p95_over_every_runs_premium_ttfts(tmp_path):
    """`shoal bench spike-pool`: the premium TTFTs of several runs' JSON pooled per phase, not their P95s
    averaged; a result without TTFTs is a clear error."""
    from shoal.bench import spike

    def run(spike_ttfts: list[float]) -> dict:
        ttfts = {"unloaded": [0.040] * 10, "spike": spike_ttfts, "alone": [0.060] * 10, "after": [0.050] * 10}
        return {"with policy": {"premium_ttfts_s": ttfts}}

    # Each run's own P95: 0.040 s and 0.100 s (their mean 0.070); pooled, 3 slow answers of 40 are past it.
    runs = [run([0.040] * 20), run([0.040] * 17 + [0.100] * 3)]
    pooled = spike.pool(runs)
    assert pooled["runs"] == 2 and pooled["n"] == {"unloaded": 20, "spike": 40, "alone": 20, "after": 20}
    assert pooled["p95_s"]["spike"] == pytest.approx(0.100)
    assert pooled["over_unloaded"] == pytest.approx(pooled["p95_s"]["spike"] / 0.040)
    assert pooled["over_alone"] == pytest.approx(pooled["p95_s"]["spike"] / 0.060)
    files = []
    for i, result in enumerate(runs):
        files.append(tmp_path / f"run{i}.json")
        files[-1].write_text(json.dumps(result))
    out = CliRunner().invoke(app, ["bench", "spike-pool", *map(str, files)])
    assert out.exit_code == 0, out.output
    assert "Premium TTFT pooled over 2 runs: under the spike P95 100 ms (40 answers)" in out.output
    assert "Spike / unloaded **2.50x**" in out.output
    (tmp_path / "old.json").write_text(json.dumps({"with policy": {}}))
    out = CliRunner().invoke(app, ["bench", "spike-pool", str(tmp_path / "old.json")])
    assert out.exit_code == 2 and "no premium TTFTs" in out.output


@pytest.mark.timeout(30)
def test_cpu_meter_counts_the_servers_child_processes_as_its_own() -> None:
    """serve-compare's CpuMeter subtracts its own processes' CPU from the machine's; `shoal serve`'s engine
    core is a child of the server process it starts, so descendants must count as its own (else every
    HTTP run looks disturbed by ~2 cores and is retried)."""
    import os
    import signal
    import subprocess
    import sys

    from shoal.bench.serve_compare import CpuMeter

    grandchild = "import time; time.sleep(20)"
    child = (
        "import subprocess, sys, time; "
        f"p = subprocess.Popen([sys.executable, '-c', {grandchild!r}]); print(p.pid, flush=True); time.sleep(20)"
    )
    proc = subprocess.Popen([sys.executable, "-c", child], stdout=subprocess.PIPE, text=True)
    grandchild_pid = int(proc.stdout.readline())
    try:
        own = CpuMeter([proc.pid])._own()
        assert {proc.pid, grandchild_pid} <= own
        assert CpuMeter([grandchild_pid])._own() == {grandchild_pid}
    finally:
        os.kill(grandchild_pid, signal.SIGKILL)
        proc.kill()
        proc.wait()


class _Slow(BaseHTTPRequestHandler):
    """Answers every POST with 503 after 0.2 s, recording when each request started and ended."""

    protocol_version = "HTTP/1.1"
    spans: list[tuple[float, float]] = []

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        start = time.monotonic()
        self.rfile.read(int(self.headers["Content-Length"]))
        time.sleep(0.2)
        self.send_response(503)
        self.send_header("Content-Length", "0")
        self.end_headers()
        self.spans.append((start, time.monotonic()))

    def log_message(self, *args) -> None:
        pass


@pytest.mark.timeout(30)
def test_spike_unloaded_requests_go_one_at_a_time():
    """The unloaded baseline's requests never overlap (each would otherwise wait for the previous one's
    steps): each leaves UNLOADED_GAP_S after the previous answer ended."""
    from shoal.bench import spike

    server = ThreadingHTTPServer(("127.0.0.1", 0), _Slow)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        outcomes = asyncio.run(spike._send_one_at_a_time(url, 3, "premium", {}, 4, 10.0, "unloaded"))
    finally:
        server.shutdown()
    assert [o.status for o in outcomes] == [503] * 3
    spans = _Slow.spans
    assert len(spans) == 3
    for (_, ended), (started, _) in itertools.pairwise(spans):
        assert started - ended >= spike.UNLOADED_GAP_S * 0.9
