"""A traffic spike against shoal with its traffic policy on, and the same spike without it (issue 20).

Per run, one `shoal serve` at a time on 127.0.0.1 (the same model, dtype and threads):
1. **sustainable rate**: requests per second the server completes at a closed-loop concurrency of 8,
   with the spike's request shape (`request_body`), measured on the first server run;
2. **unloaded premium TTFT**: premium requests one at a time, each sent 0.1 s after the previous
   answer ended, so that nothing else runs (until 2026-11-30 they were sent 0.3 s apart, which on a
   machine whose 16-token answer takes longer than that made each wait for the previous one's step);
   this P95 is the goal's denominator (measured again after the spike, "after" in the report: a machine
   whose speed changed during the run shows as two different baselines);
3. **premium alone** (unless `premium_alone=False`): the spike's premium arrivals, on the same plan,
   without the flood. Premium requests then wait for each other's steps as they do in the spike,
   so its P95 against the spike's isolates what the flood adds; against the one-at-a-time P95 it shows
   what premium traffic costs itself;
4. **spike**: open-loop Poisson arrivals at `factor` x the sustainable rate for `spike_s` seconds
   (bounded by `max_requests`), a `premium_share` of them premium, the rest standard; every request
   streamed, `max_tokens` tokens, cut at `request_timeout_s`.

With the policy: API keys of class `premium` (priority 0) and `standard` (priority 10),
`--scheduling-policy priority`, and shedding (`max_waiting_requests`; standard is shed at a quarter of
it), and `--urgent-threads` where `urgent_threads` is given. Without it, the two classes are only labels on
identical requests. Both servers run with the same
`--max-num-seqs` (the batch a step runs): with the default 256, every arrival is admitted at once and
TTFT is set by the size of the batch, which no queue order can help; a batch sized to the machine makes
the overload wait in the queue, where priorities and shedding act. The report gives, per server and class, the
success rate, TTFT P50/P95/P99 of the successes, and rejections (429/503) and timeouts; the goal is a
premium TTFT P95 under the spike within 25% of its unloaded value.

Two clients, each a child process, as on a real network the flood comes from other clients on other
machines than the premium one: the **flood** (the spike's standard requests) at the lowest CPU priority
(nice 19, unless `nice_flood=False`), so that on this machine it runs on what the server leaves idle; and
the **premium client** (the premium requests of the spike, the unloaded ones and the sustainable-rate
loop) at the bench's own priority. Both start their plans at the same instant. Neither uses a client
library: every request is serialized beforehand and written on a keep-alive HTTP/1.1 connection
(`ConnectionPool`), so that a request costs the client a write and the reads of its answer. Each
client's send lags (how late each request left against its planned arrival) and achieved rate (its
requests over the time to its last send, beside the planned rate) are reported: a starved flood shows
as lags and a rate below the plan, a starved premium client as TTFTs that include its own waiting.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from multiprocessing import get_context
from pathlib import Path
from urllib.parse import urlsplit

from shoal import live_stats
from shoal import metric_names as mn
from shoal.bench import workload
from shoal.bench.http_cpu import server_cpu_s
from shoal.bench.serve_compare import Server, machine, percentile, shoal_server

CLASSES = ("premium", "standard")
UNLOADED_GAP_S = 0.1  # between one unloaded premium answer and the next request
POLICY = """\
classes:
  premium: {{priority: 0}}
  standard: {{priority: 10}}
default_class: standard
auth:
  keys_file: {keys_file}
shedding:
  max_waiting_requests: {max_waiting}
  protected_priority: 0
  low_priority_share: 0.25
"""


@dataclass
class Outcome:
    """One request as the client saw it."""

    request_class: str
    status: int  # HTTP status; 0: no answer before the client's timeout (or the connection failed)
    ttft_s: float | None
    send_lag_s: float = 0.0  # how much later than planned the request was sent (seconds)
    planned_s: float = 0.0  # when it was planned, from the plan's start (seconds)


def arrival_times(rate: float, seconds: float, max_requests: int, seed: int = 0) -> list[float]:
    """Poisson arrivals (exponential gaps) at `rate` per second over `seconds`, at most max_requests."""
    rng = random.Random(seed)
    times, t = [], 0.0
    while len(times) < max_requests:
        t += rng.expovariate(rate)
        if t >= seconds:
            break
        times.append(t)
    return times


def class_schedule(n: int, premium_share: float, seed: int = 1) -> list[str]:
    rng = random.Random(seed)
    return ["premium" if rng.random() < premium_share else "standard" for _ in range(n)]


def request_body(i: int, max_tokens: int) -> dict:
    """Request i of every phase (the sustainable rate, unloaded and spike): the same shape, a prompt of
    about a dozen tokens that differs per request (no prefix-cache hit of a whole prompt)."""
    return {"prompt": f"Request {i}: tell me a story about the sea.", "max_tokens": max_tokens,
            "temperature": 0, "ignore_eos": True, "stream": True}  # fmt: skip


def http_request(url: str, body: dict, headers: dict[str, str]) -> bytes:
    """One HTTP/1.1 POST of `body` (JSON) to url, serialized in full (bytes written as they are)."""
    parts = urlsplit(url)
    payload = json.dumps(body, separators=(",", ":")).encode()
    head = [f"POST {parts.path} HTTP/1.1", f"Host: {parts.netloc}", "Content-Type: application/json",
            f"Content-Length: {len(payload)}", *(f"{k}: {v}" for k, v in headers.items())]  # fmt: skip
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + payload


class _Closed(Exception):
    """The server closed the connection before the status line (a keep-alive connection it timed out)."""


async def _read_response(reader: asyncio.StreamReader, t0: float) -> tuple[int, float | None, bool]:
    """Read one HTTP/1.x response: (status, seconds from t0 to the first chunk carrying text (200 only),
    whether the connection may be reused). Bodies: Content-Length, chunked, or up to EOF."""
    status_line = await reader.readline()
    if not status_line:
        raise _Closed
    version, status = status_line.split(None, 2)[:2]
    status = int(status)
    length, chunked, reusable = None, False, version == b"HTTP/1.1"
    while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
        name, _, value = line.partition(b":")
        name, value = name.strip().lower(), value.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"transfer-encoding":
            chunked = b"chunked" in value
        elif name == b"connection" and value == b"close":
            reusable = False
    ttft = None
    if chunked:
        while size := int((await reader.readline()).split(b";")[0], 16):
            data = await reader.readexactly(size + 2)
            # The first SSE data line without empty text (a chunk may hold several events).
            if (
                ttft is None
                and status == 200
                and any(line.startswith(b"data:") and b'"text":""' not in line for line in data.split(b"\n"))
            ):
                ttft = time.perf_counter() - t0
        while (await reader.readline()) not in (b"\r\n", b"\n", b""):  # trailers
            pass
    elif length is not None:
        await reader.readexactly(length)
    else:
        await reader.read()
        reusable = False
    return status, ttft, reusable


class ConnectionPool:
    """Keep-alive HTTP/1.1 connections to one server, opened as needed (an open loop needs as many as it
    has requests in flight) and reused: a request costs the client one write and the reads of its answer,
    not a client library's per-request work."""

    def __init__(self, url: str):
        parts = urlsplit(url)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        self.idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        self.opened = 0

    async def exchange(self, data: bytes, timeout_s: float) -> tuple[int, float | None]:
        """Send one serialized request, read its answer: (status, TTFT s); (0, None) on a timeout or a
        failed connection (which is then closed: the server sees the client go)."""
        t0 = time.perf_counter()
        while True:
            reused = bool(self.idle)
            conn = self.idle.pop() if reused else None
            try:
                async with asyncio.timeout(max(timeout_s - (time.perf_counter() - t0), 0.001)):
                    if conn is None:
                        conn = await asyncio.open_connection(self.host, self.port)
                        self.opened += 1
                    conn[1].write(data)
                    status, ttft, reusable = await _read_response(conn[0], t0)
            except (_Closed, ConnectionError):
                conn[1].close()
                if reused:
                    continue  # the server had closed it while idle: the same request on another
                return 0, None
            except (OSError, EOFError, ValueError, IndexError, TimeoutError):
                if conn is not None:
                    conn[1].close()
                return 0, None
            if reusable:
                self.idle.append(conn)
            else:
                conn[1].close()
            return status, ttft

    def close(self) -> None:
        for _, writer in self.idle:
            writer.close()
        self.idle.clear()


def _perf_start(start_at: float | None) -> float:
    """perf_counter() at wall-clock time start_at (time.time() seconds; now when None): processes that
    share a start_at start their plans together."""
    return time.perf_counter() + (0.0 if start_at is None else max(0.0, start_at - time.time()))


async def _send(
    server_url: str,
    plan: list[tuple[int, float, str]],
    headers: dict,
    max_tokens: int,
    timeout_s: float,
    id_prefix: str | None = None,
    start_at: float | None = None,
) -> list[Outcome]:
    """Send `plan` ((request index i, offset s, class) triples) open-loop from start_at (time.time();
    now when None), each request serialized beforehand and written on a keep-alive connection; with
    id_prefix, request i of class c carries `X-Request-Id: {id_prefix}-{c}-{i}` (found again in the
    server's access log)."""
    requests = _serialized(server_url, plan, headers, max_tokens, id_prefix)
    pool = ConnectionPool(server_url)
    t0 = _perf_start(start_at)

    async def at(k: int, offset: float, request_class: str) -> Outcome:
        await asyncio.sleep(max(0.0, t0 + offset - time.perf_counter()))
        lag = time.perf_counter() - t0 - offset
        status, ttft = await pool.exchange(requests[k], timeout_s)
        return Outcome(request_class, status, ttft, lag, offset)

    try:
        return await asyncio.gather(*(at(k, off, cls) for k, (_, off, cls) in enumerate(plan)))
    finally:
        pool.close()


async def _send_one_at_a_time(
    server_url: str,
    count: int,
    request_class: str,
    headers: dict,
    max_tokens: int,
    timeout_s: float,
    id_prefix: str,
) -> list[Outcome]:
    """Send `count` requests of request_class (indices 0..count-1, ids as _send's) one at a time, each
    UNLOADED_GAP_S after the previous answer ended: nothing else runs in the server while one is served."""
    plan = [(k, 0.0, request_class) for k in range(count)]
    requests = _serialized(server_url, plan, headers, max_tokens, id_prefix)
    pool = ConnectionPool(server_url)
    outcomes = []
    try:
        for request in requests:
            await asyncio.sleep(UNLOADED_GAP_S)
            status, ttft = await pool.exchange(request, timeout_s)
            outcomes.append(Outcome(request_class, status, ttft, 0.0, 0.0))
    finally:
        pool.close()
    return outcomes


def _serialized(
    server_url: str, plan: list[tuple[int, float, str]], headers: dict, max_tokens: int, id_prefix: str | None
) -> list[bytes]:
    url = f"{server_url}/v1/completions"
    requests = []
    for i, _, request_class in plan:
        sent = dict(headers.get(request_class, {}))
        if id_prefix is not None:
            sent["X-Request-Id"] = f"{id_prefix}-{request_class}-{i}"
        requests.append(http_request(url, request_body(i, max_tokens), sent))
    return requests


async def _closed_loop_rate(
    server_url: str, headers: dict, max_tokens: int, seconds: float, concurrency: int = 8
) -> float:
    """Requests completed per second by `concurrency` clients that each send the next request when one
    ends; the spike's request shape (request_body), on keep-alive connections."""
    url = f"{server_url}/v1/completions"
    pool = ConnectionPool(server_url)
    done = 0
    deadline = time.perf_counter() + seconds

    async def worker(w: int) -> None:
        nonlocal done
        i = 0
        while time.perf_counter() < deadline:
            body = request_body(1_000_000 + w * 100_000 + i, max_tokens)  # not an index of the spike
            status, _ = await pool.exchange(http_request(url, body, headers), 120.0)
            done += status == 200
            i += 1

    t0 = time.perf_counter()
    try:
        await asyncio.gather(*(worker(w) for w in range(concurrency)))
    finally:
        pool.close()
    return done / (time.perf_counter() - t0)


def _run(coroutine_function: Callable, *args):
    """asyncio.run(coroutine_function(*args)): a picklable call for a client's process."""
    return asyncio.run(coroutine_function(*args))


def _lowest_priority() -> None:
    os.nice(19)  # the kernel clamps at 19 whatever the starting niceness


class Client:
    """A child process that sends requests: at the lowest CPU priority (nice 19) with `nice=True`, at
    this process's otherwise. A context manager; `submit(fn, *args)` runs the picklable top-level
    fn(*args) there (a Future), `call` waits for its result. The process is started (and this module
    imported there) on entry, so that a first call is not late by a process start."""

    def __init__(self, nice: bool = True):
        self.nice = nice
        self._pool: ProcessPoolExecutor | None = None

    def __enter__(self) -> Client:
        init = _lowest_priority if self.nice else None
        self._pool = ProcessPoolExecutor(1, mp_context=get_context("spawn"), initializer=init)
        self._pool.submit(os.getpid).result()
        return self

    def __exit__(self, *exc) -> None:
        if self._pool is not None:
            self._pool.shutdown()

    def submit(self, fn: Callable, *args) -> Future:
        assert self._pool is not None, "use Client as a context manager"
        return self._pool.submit(fn, *args)

    def call(self, fn: Callable, *args):
        return self.submit(fn, *args).result()


def summarize(outcomes: list[Outcome]) -> dict:
    """Per class: sent, ok, rejected (429/503), timed out, other errors, success rate, TTFT P50/P95/P99."""
    report = {}
    for request_class in CLASSES:
        mine = [o for o in outcomes if o.request_class == request_class]
        ttfts = [o.ttft_s for o in mine if o.status == 200 and o.ttft_s is not None]
        ok = sum(o.status == 200 for o in mine)
        report[request_class] = {
            "sent": len(mine),
            "ok": ok,
            "rejected": sum(o.status in (429, 503) for o in mine),
            "timed_out": sum(o.status == 0 for o in mine),
            "other_errors": sum(o.status not in (0, 200, 429, 503) for o in mine),
            "success_rate": ok / len(mine) if mine else None,
            **{f"ttft_p{q}_s": percentile(ttfts, q) for q in (50, 95, 99)},
        }
    return report


def _keys(keys_file: Path) -> dict[str, dict]:
    from shoal.policy.keys import create_key

    headers = {}
    for request_class in CLASSES:
        _, secret = create_key(keys_file, f"tenant-{request_class}", request_class)
        headers[request_class] = {"Authorization": f"Bearer {secret}"}
    return headers


@dataclass(frozen=True)
class _Served:
    """One successful request from the access log: its arrival (unix seconds, the line's time less its
    latency; the time is logged to the millisecond), queue (arrival to first engine step) and TTFT."""

    arrival: float
    queue: float
    ttft: float


def server_side(log_path: Path, id_prefix: str) -> dict:
    """Per class, from the server's JSON access lines of the successful requests whose id starts with
    id_prefix (ids made by _send: `{prefix}-{class}-{i}`): their number, and P50/P95 seconds of the queue
    (HTTP arrival to its first engine step), of TTFT (to its first token) and of their difference (the
    step or steps that computed the prompt); and how many of the slowest tenth by TTFT arrived while
    another request of the class was in its prompt step (`slowest_tenth`, `behind_own_class`): a wait that
    the class's own traffic causes, whatever else the server does."""
    rows: dict[str, list[_Served]] = {c: [] for c in CLASSES}
    for line in log_path.read_text().splitlines():
        if f'"request_id": "{id_prefix}' not in line:
            continue
        entry = json.loads(line)
        parts = str(entry["request_id"]).split("-")
        if len(parts) != 3 or parts[1] not in rows or entry.get("status") != 200:
            continue
        if entry.get("queue_s") is not None and entry.get("ttft_s") is not None:
            arrival = datetime.fromisoformat(entry["time"]).timestamp() - entry["latency_s"]
            rows[parts[1]].append(_Served(arrival, entry["queue_s"], entry["ttft_s"]))
    report = {}
    for request_class, served in rows.items():
        parts = {
            "queue": [r.queue for r in served],
            "ttft": [r.ttft for r in served],
            "prompt_step": [r.ttft - r.queue for r in served],
        }
        slowest = sorted(served, key=lambda r: -r.ttft)[: max(len(served) // 10, 1)] if served else []
        report[request_class] = {
            "n": len(served),
            **{f"{name}_p{q}_s": percentile(values, q) for name, values in parts.items() for q in (50, 95)},
            "slowest_tenth": len(slowest),
            "behind_own_class": sum(_in_a_prompt_step(r, served) for r in slowest),
        }
    return report


def _in_a_prompt_step(request: _Served, served: list[_Served]) -> bool:
    """Whether request arrived while another one of served was in its prompt step (1 ms of slack each
    side: the log's resolution)."""
    slack = 0.001
    return any(
        other is not request
        and other.arrival + other.queue - slack <= request.arrival <= other.arrival + other.ttft + slack
        for other in served
    )


def _start(model: str, dtype: str, threads: int, workdir: Path, name: str, extra: list[str]) -> Server:
    server = shoal_server(model, dtype, threads, None, workdir, name)
    # JSON access lines (one per request, as at the default --log-level info) for server_side().
    server.cmd += ["--log-level", "info", "--log-format", "json", *extra]
    server.log_path = workdir / f"{name}.log"
    server.start()
    server.wait_ready()
    return server


@dataclass(frozen=True)
class SpikeLoad:
    """What the client sends to each server (see run_spike)."""

    factor: float
    spike_s: float
    premium_share: float
    max_tokens: int
    max_requests: int
    request_timeout_s: float
    unloaded_requests: int
    premium_alone: bool = True


def run_spike(
    model: str,
    dtype: str = "auto",
    threads: int = 2,
    factor: float = 10.0,
    spike_s: float = 30.0,
    premium_share: float = 0.1,
    max_tokens: int = 16,
    max_requests: int = 6000,
    max_waiting: int = 64,
    max_num_seqs: int = 8,
    request_timeout_s: float = 30.0,
    unloaded_requests: int = 20,
    nice_flood: bool = True,
    rate: float | None = None,
    without_policy: bool = True,
    urgent_threads: int | None = None,
    premium_alone: bool = True,
) -> dict:
    """The whole benchmark (see the module docstring); returns a JSON-able result. `rate` (req/s) is
    taken as the sustainable rate instead of measuring it (runs to compare then get the same spike);
    `without_policy=False` runs only the server with the policy; `nice_flood=False` runs the standard
    flood's process at this process's priority instead of nice 19; `urgent_threads` is the policy
    server's --urgent-threads; `premium_alone=False` skips that baseline (spike_s seconds per server)."""
    workdir = Path(tempfile.mkdtemp(prefix="shoal-spike-"))
    keys_file = workdir / "keys.json"
    headers = _keys(keys_file)
    policy = workdir / "policy.yaml"
    policy.write_text(POLICY.format(keys_file=keys_file, max_waiting=max_waiting))
    batch = ["--max-num-seqs", str(max_num_seqs)]
    with_policy = [*batch, "--policy", str(policy), "--scheduling-policy", "priority"]
    if urgent_threads is not None:
        with_policy += ["--urgent-threads", str(urgent_threads)]
    sides = {"without policy": (batch, {c: {} for c in CLASSES}), "with policy": (with_policy, headers)}
    if not without_policy:
        del sides["without policy"]
    load = SpikeLoad(factor, spike_s, premium_share, max_tokens, max_requests, request_timeout_s,
                     unloaded_requests, premium_alone)  # fmt: skip
    result = {
        "machine": machine(threads),
        "model": model,
        "dtype": dtype,
        "factor": factor,
        "spike_s": spike_s,
        "premium_share": premium_share,
        "max_tokens": max_tokens,
        "max_num_seqs": max_num_seqs,
        "max_waiting_requests": max_waiting,
        "nice_flood": nice_flood,
        "urgent_threads": urgent_threads,
    }
    if rate is not None:
        result["sustainable_rate_rps"], result["rate_given"] = rate, True
    with Client(nice=False) as premium, Client(nice=nice_flood) as flood:
        for side, (extra, side_headers) in sides.items():
            server = _start(model, dtype, threads, workdir, side.replace(" ", "-"), extra)
            try:
                if "sustainable_rate_rps" not in result:
                    result["sustainable_rate_rps"] = premium.call(
                        _run, _closed_loop_rate, server.url, side_headers["standard"], max_tokens, 8.0
                    )
                result[side] = _measure(
                    premium, flood, server, side_headers, load, result["sustainable_rate_rps"]
                )
            finally:
                server.stop()
    return result


def _measure(
    premium: Client, flood: Client, server: Server, headers: dict, load: SpikeLoad, rate: float
) -> dict:
    """The unloaded premium TTFT, premium alone, then the spike at load.factor x rate (req/s): its
    standard requests sent by the `flood` client, its premium ones by the `premium` client, both from the
    same instant; then the unloaded premium TTFT again. One server's result."""

    def one_at_a_time(label: str) -> list[Outcome]:  # the unloaded premium baseline, before and after
        return premium.call(_run, _send_one_at_a_time, server.url, load.unloaded_requests, "premium", headers,
                            load.max_tokens, load.request_timeout_s, label)  # fmt: skip

    unloaded = one_at_a_time("unloaded")
    times = arrival_times(load.factor * rate, load.spike_s, load.max_requests)
    classes = class_schedule(len(times), load.premium_share)
    plan = [(i, t, c) for i, (t, c) in enumerate(zip(times, classes, strict=True))]
    premium_plan = [p for p in plan if p[2] == "premium"]
    alone = None
    if load.premium_alone:
        alone = premium.call(_run, _send, server.url, premium_plan, headers, load.max_tokens,
                             load.request_timeout_s, "alone")  # fmt: skip
    before = live_stats.fetch(server.url)
    loadavg_before = workload.load_average()
    cpu0, wall0 = server_cpu_s(server), time.perf_counter()
    start_at = time.time() + 0.5  # both clients' plans start at this instant
    rest = (headers, load.max_tokens, load.request_timeout_s, "spike", start_at)
    flooding = flood.submit(_run, _send, server.url, [p for p in plan if p[2] == "standard"], *rest)
    premium_outcomes = premium.call(_run, _send, server.url, premium_plan, *rest)
    flood_outcomes = flooding.result()
    cpu1, wall = server_cpu_s(server), time.perf_counter() - wall0
    loadavg_after = workload.load_average()
    after = live_stats.fetch(server.url)
    server_ttft = live_stats.summarize(before, after).percentiles["TTFT"]
    steps = after.minus(before)
    time.sleep(1.0)  # the access lines of the last answers
    # The unloaded baseline again: a machine whose speed changed during the run (a shared host) shows as
    # two different baselines, and the ratio is then not the spike's doing alone.
    unloaded_after = one_at_a_time("after")
    spike_side = server_side(server.log_path, "spike")
    unloaded_side = server_side(server.log_path, "unloaded")["premium"]
    # Every premium TTFT (s) of each phase, for pool(): a P95 of the 15-30 premium requests of one 30 s
    # spike is its second or third slowest.
    ttfts = {"unloaded": _ttfts(unloaded), "spike": _ttfts(premium_outcomes), "alone": _ttfts(alone or []),
             "after": _ttfts(unloaded_after)}  # fmt: skip
    base = percentile(ttfts["unloaded"], 95)
    summary = summarize(premium_outcomes + flood_outcomes)
    p95 = summary["premium"]["ttft_p95_s"]
    return _premium_alone(alone, p95, spike_side, server.log_path) | {
        "premium_ttfts_s": ttfts,
        "requests": len(plan),
        "planned_rate_rps": load.factor * rate,
        "unloaded_premium_ttft_p95_s": base,
        "unloaded_after_premium_ttft_p95_s": percentile(ttfts["after"], 95),
        "premium_ttft_p95_ratio": _ratio(p95, base),
        # The server's own TTFT histogram over the spike (all classes; from arrival at the HTTP
        # side to the first token): beside the client's, it shows how much of the wait is the client's.
        "server_ttft_p50_s": server_ttft[0.5],
        "server_ttft_p95_s": server_ttft[0.95],
        # Per client: how late it sent its requests against the plan (seconds; large lags mean the
        # planned rate was not delivered) and the rate it achieved (requests over the time from the plan's
        # start to its last send).
        "flood": _sending(flood_outcomes),
        "premium_client": _sending(premium_outcomes),
        "loadavg_before": loadavg_before,
        "loadavg_after": loadavg_after,
        # CPU seconds per second of wall time over the spike: the HTTP process's and the engine core's.
        "http_cpu_share": (cpu1[0] - cpu0[0]) / wall,
        "core_cpu_share": (cpu1[1] - cpu0[1]) / wall,
        "http_cpu_ms_per_request": 1000 * (cpu1[0] - cpu0[0]) / max(len(plan), 1),
        # Engine steps over the spike: completed, and abandoned for a more urgent arrival (interrupt.py).
        "steps_completed": steps.total(mn.STEP_DURATION + "_count"),
        "steps_interrupted": steps.total(mn.STEPS_INTERRUPTED),
        "classes": summary,
        # Per class, from the server's access log: where the successful requests' TTFT went; and the
        # unloaded premium requests' (the server's own premium TTFT P95 ratio, without the client's part).
        "server_side": spike_side,
        "unloaded_server_side": unloaded_side,
        "premium_server_ttft_p95_ratio": _ratio(
            spike_side["premium"]["ttft_p95_s"], unloaded_side["ttft_p95_s"]
        ),
    }


def _ttfts(outcomes: list[Outcome]) -> list[float]:
    return [o.ttft_s for o in outcomes if o.status == 200 and o.ttft_s is not None]


def pool(results: list[dict], side: str = "with policy") -> dict:
    """Several runs' premium TTFTs pooled per phase (results: run_spike's, with `premium_ttfts_s`): per
    phase the number of answers and their P95 (s), and the spike's P95 over the unloaded, after and
    alone ones. ValueError when a result lacks the side or its TTFTs (written before 2026-12-01)."""
    phases: dict[str, list[float]] = {"unloaded": [], "spike": [], "alone": [], "after": []}
    for result in results:
        ttfts = result.get(side, {}).get("premium_ttfts_s")
        if ttfts is None:
            raise ValueError(
                f"a result has no premium TTFTs for {side!r} (older bench, or that side not run)"
            )
        for phase, values in phases.items():
            values.extend(ttfts.get(phase, []))
    p95 = {phase: percentile(values, 95) for phase, values in phases.items()}
    return {
        "runs": len(results),
        "n": {phase: len(values) for phase, values in phases.items()},
        "p95_s": p95,
        "over_unloaded": _ratio(p95["spike"], p95["unloaded"]),
        "over_after": _ratio(p95["spike"], p95["after"]),
        "over_alone": _ratio(p95["spike"], p95["alone"]),
    }


def pool_markdown(pooled: dict) -> str:
    n, p95 = pooled["n"], pooled["p95_s"]
    return (
        f"Premium TTFT pooled over {pooled['runs']} runs: under the spike P95 {_ms(p95['spike'])} ({n['spike']} "
        f"answers); unloaded {_ms(p95['unloaded'])} ({n['unloaded']}), after the spike {_ms(p95['after'])} "
        f"({n['after']}), premium alone {_ms(p95['alone'])} ({n['alone']}). Spike / unloaded "
        f"**{_x(pooled['over_unloaded'])}**, / after {_x(pooled['over_after'])}, / alone {_x(pooled['over_alone'])}."
    )


def _premium_alone(alone: list[Outcome] | None, p95: float | None, spike_side: dict, log_path: Path) -> dict:
    """The premium-alone baseline's TTFT P95, client and server side, and the spike's over it; {} when it
    did not run."""
    if alone is None:
        return {}
    base = summarize(alone)["premium"]
    server = server_side(log_path, "alone")["premium"]
    return {
        "alone_premium": {"ok": base["ok"], "sent": base["sent"], "ttft_p95_s": base["ttft_p95_s"]},
        "alone_server_side": server,
        "premium_ttft_p95_over_alone": _ratio(p95, base["ttft_p95_s"]),
        "premium_server_ttft_p95_over_alone": _ratio(
            spike_side["premium"]["ttft_p95_s"], server["ttft_p95_s"]
        ),
    }


def _sending(outcomes: list[Outcome]) -> dict:
    """One client's sends: send lag P50/P95/max (s), and its planned and achieved rates (req/s): its
    requests over the time from the plan's start to its last planned arrival, and to its last send."""
    lags = [o.send_lag_s for o in outcomes]
    planned = max((o.planned_s for o in outcomes), default=0.0)
    sent = max((o.planned_s + o.send_lag_s for o in outcomes), default=0.0)
    return {
        "requests": len(outcomes),
        "send_lag_p50_s": percentile(lags, 50),
        "send_lag_p95_s": percentile(lags, 95),
        "send_lag_max_s": max(lags, default=None),
        "planned_rate_rps": len(outcomes) / planned if planned > 0 else None,
        "achieved_rate_rps": len(outcomes) / sent if sent > 0 else None,
    }


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def markdown(result: dict) -> str:
    lines = [
        f"Spike: {result['factor']:g}x the sustainable rate ({result['sustainable_rate_rps']:.1f} req/s"
        + (", given" if result.get("rate_given") else "")
        + f") for "
        f"{result['spike_s']:g} s; model {result['model']}, dtype {result['dtype']}; standard flood from its "
        + ("own process at nice 19" if result.get("nice_flood") else "own process")
        + ", premium from another (not niced)"
        + (
            f"; policy server with --urgent-threads {result['urgent_threads']}."
            if result.get("urgent_threads")
            else "."
        ),
        "",
        "| server | class | sent | ok | rejected | timed out | success | TTFT P50 | P95 | P99 | P95 / unloaded "
        "| P95 / alone |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    sides = [side for side in ("without policy", "with policy") if side in result]
    for side in sides:
        r = result[side]
        for request_class, c in r["classes"].items():
            premium = request_class == "premium"
            ratios = [
                r.get(k) if premium else None
                for k in ("premium_ttft_p95_ratio", "premium_ttft_p95_over_alone")
            ]
            cells = [side, request_class, c["sent"], c["ok"], c["rejected"], c["timed_out"],
                     _pct(c["success_rate"]), _ms(c["ttft_p50_s"]), _ms(c["ttft_p95_s"]), _ms(c["ttft_p99_s"]),
                     *(f"{x:.2f}x" if x else "" for x in ratios)]  # fmt: skip
            lines.append("| " + " | ".join(str(x) for x in cells) + " |")
    lines.append("")
    for side in sides:
        r = result[side]
        lines.append(
            f"Server-side TTFT over the spike, {side} (all classes, `{mn.TIME_TO_FIRST_TOKEN}`): "
            f"P50 {_ms(r.get('server_ttft_p50_s'))}, P95 {_ms(r.get('server_ttft_p95_s'))}; unloaded premium TTFT "
            f"P95 {_ms(r.get('unloaded_premium_ttft_p95_s'))}"
            + (
                f" before the spike, {_ms(r['unloaded_after_premium_ttft_p95_s'])} after it."
                if r.get("unloaded_after_premium_ttft_p95_s")
                else "."
            )
        )
        for name in ("flood", "premium_client"):
            if name in r:
                c = r[name]
                lines.append(
                    f"- {side}, {name.replace('_', ' ')}: {c['requests']} requests, {_rps(c['achieved_rate_rps'])} "
                    f"achieved of {_rps(c['planned_rate_rps'])} planned; send lag P50 "
                    f"{_ms(c['send_lag_p50_s'])}, P95 {_ms(c['send_lag_p95_s'])}, max {_ms(c['send_lag_max_s'])}."
                )
        if "loadavg_before" in r:
            lines.append(
                f"- {side}, load average (1, 5, 15 min) before the spike {_loadavg(r['loadavg_before'])}, "
                f"after {_loadavg(r['loadavg_after'])}."
            )
        if "http_cpu_share" in r:
            lines.append(
                f"- {side}, CPU over the spike: HTTP process {r['http_cpu_share']:.2f} cores "
                f"({r['http_cpu_ms_per_request']:.1f} ms per request sent), engine core {r['core_cpu_share']:.2f} cores."
            )
        if "steps_interrupted" in r:
            lines.append(
                f"- {side}, engine steps over the spike: {r['steps_completed']:.0f} completed, "
                f"{r['steps_interrupted']:.0f} interrupted for a more urgent request."
            )
        unloaded, ratio = r.get("unloaded_server_side"), r.get("premium_server_ttft_p95_ratio")
        if unloaded:
            lines.append(
                f"- {side}, unloaded premium, from the server's access log: queue P95 {_ms(unloaded['queue_p95_s'])}, "
                f"prompt step P95 {_ms(unloaded['prompt_step_p95_s'])}, server TTFT P95 {_ms(unloaded['ttft_p95_s'])}"
                + (
                    f"; premium server TTFT P95 under the spike / unloaded: **{ratio:.2f}x**."
                    if ratio
                    else "."
                )
            )
        if "alone_premium" in r:
            a, server = r["alone_premium"], r["alone_server_side"]
            lines.append(
                f"- {side}, premium alone (the spike's premium arrivals without the flood; {a['ok']} of "
                f"{a['sent']} answered): client TTFT P95 {_ms(a['ttft_p95_s'])}, server {_ms(server['ttft_p95_s'])} "
                f"(queue P95 {_ms(server['queue_p95_s'])}); under the spike / alone: "
                f"**{_x(r['premium_ttft_p95_over_alone'])}** (server {_x(r['premium_server_ttft_p95_over_alone'])})."
            )
        for request_class, c in r.get("server_side", {}).items():
            lines.append(
                f"- {side}, {request_class} ({c['n']} answered), from the server's access log: queue (HTTP "
                f"arrival to first engine step) P50 {_ms(c['queue_p50_s'])}, P95 {_ms(c['queue_p95_s'])}; "
                f"prompt step(s) P50 {_ms(c['prompt_step_p50_s'])}, P95 {_ms(c['prompt_step_p95_s'])}; "
                f"server TTFT P50 {_ms(c['ttft_p50_s'])}, P95 {_ms(c['ttft_p95_s'])}"
                + (
                    f"; of the {c['slowest_tenth']} slowest, {c['behind_own_class']} arrived during another "
                    f"{request_class} request's prompt step."
                    if request_class == "premium" and c.get("slowest_tenth")
                    else "."
                )
            )
    return "\n".join(lines)


def _x(x: float | None) -> str:
    return "?" if x is None else f"{x:.2f}x"


def _rps(x: float | None) -> str:
    return "" if x is None else f"{x:.1f} req/s"


def _loadavg(values: list[float] | None) -> str:
    return "?" if values is None else " ".join(f"{v:.2f}" for v in values)


def _pct(x: float | None) -> str:
    return "" if x is None else f"{100 * x:.0f}%"


def _ms(x: float | None) -> str:
    return "" if x is None else f"{1000 * x:.0f} ms"
