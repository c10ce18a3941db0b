"""A traffic spike against shoal with its traffic policy on, and the same spike without it (issue 20).

Per run, one `shoal serve` at a time on 127.0.0.1 (the same model, dtype and threads):
1. **sustainable rate**: requests per second the server completes at a closed-loop concurrency of 8,
   measured on the server without policy;
2. **unloaded premium TTFT**: sequential premium requests, nothing else running;
3. **spike**: open-loop Poisson arrivals at `factor` x the sustainable rate for `spike_s` seconds
   (bounded by `max_requests`), a `premium_share` of them premium, the rest standard; every request
   streamed, `max_tokens` tokens, cut at `request_timeout_s`.

With the policy: API keys of class `premium` (priority 0) and `standard` (priority 10),
`--scheduling-policy priority`, and shedding (`max_waiting_requests`; standard is shed at a quarter of
it). Without it, the two classes are only labels on identical requests. Both servers run with the same
`--max-num-seqs` (the batch a step runs): with the default 256, every arrival is admitted at once and
TTFT is set by the size of the batch, which no queue order can help; a batch sized to the machine makes
the overload wait in the queue, where priorities and shedding act. The report gives, per server and class, the
success rate, TTFT P50/P95/P99 of the successes, and rejections (429/503) and timeouts; the goal is a
premium TTFT P95 under the spike within 25% of its unloaded value.

The client (every request the bench sends: the rate, the unloaded and the spike requests) runs in a
child process at the lowest CPU priority (nice 19) unless `nice_client=False`: on one machine it shares
the cores with the server under test, where in production clients are elsewhere; niced, it runs on
what the server leaves idle. Each spike request's send lag (how late it left against its planned
arrival) is reported, so a client too starved to keep the planned rate shows. A niced client yields to
every other process, not only the server: when the engine's threads fill every core (`--threads` = the
core count) or other jobs load the machine, it starves (send lags of seconds) and `nice_client=False`
measures better (docs/benchmarks.md, the spike section).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

from shoal import live_stats
from shoal import metric_names as mn
from shoal.bench.http_cpu import server_cpu_s
from shoal.bench.serve_compare import Server, machine, percentile, shoal_server

CLASSES = ("premium", "standard")
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
    status: int  # HTTP status; 0: no answer before the client's timeout
    ttft_s: float | None
    send_lag_s: float = 0.0  # how much later than planned the request was sent (seconds)


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


async def _one(client, url: str, body: dict, headers: dict, request_class: str) -> Outcome:
    import httpx

    t0 = time.perf_counter()
    try:
        async with client.stream("POST", url, json=body, headers=headers) as resp:
            ttft = None
            if resp.status_code == 200:
                async for line in resp.aiter_lines():
                    if ttft is None and line.startswith("data:") and '"text":""' not in line:
                        ttft = time.perf_counter() - t0
            else:
                await resp.aread()
            return Outcome(request_class, resp.status_code, ttft)
    except (httpx.TimeoutException, httpx.TransportError):
        return Outcome(request_class, 0, None)


async def _send(
    server_url: str,
    plan: list[tuple[float, str]],
    headers: dict,
    max_tokens: int,
    timeout_s: float,
    id_prefix: str | None = None,
):
    """Send `plan` ((offset s, class) pairs) open-loop; with id_prefix, request i of class c carries
    `X-Request-Id: {id_prefix}-{c}-{i}` (found again in the server's access log)."""
    import httpx

    limits = httpx.Limits(max_connections=len(plan) + 8, max_keepalive_connections=64)
    async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(timeout_s), trust_env=False) as client:
        url = f"{server_url}/v1/completions"
        t0 = time.perf_counter()

        async def at(i: int, offset: float, request_class: str) -> Outcome:
            await asyncio.sleep(max(0.0, t0 + offset - time.perf_counter()))
            lag = time.perf_counter() - t0 - offset
            body = {"prompt": f"Request {i}: tell me a story about the sea.", "max_tokens": max_tokens,
                    "temperature": 0, "ignore_eos": True, "stream": True}  # fmt: skip
            sent = dict(headers.get(request_class, {}))
            if id_prefix is not None:
                sent["X-Request-Id"] = f"{id_prefix}-{request_class}-{i}"
            outcome = await _one(client, url, body, sent, request_class)
            outcome.send_lag_s = lag
            return outcome

        return await asyncio.gather(*(at(i, off, cls) for i, (off, cls) in enumerate(plan)))


async def _closed_loop_rate(server_url: str, headers: dict, max_tokens: int, seconds: float) -> float:
    """Requests completed per second by 8 clients that each send the next request when one ends."""
    import httpx

    done = 0
    deadline = time.perf_counter() + seconds
    async with httpx.AsyncClient(timeout=httpx.Timeout(120), trust_env=False) as client:

        async def worker(w: int) -> None:
            nonlocal done
            i = 0
            while time.perf_counter() < deadline:
                body = {"prompt": f"Warm {w}-{i}", "max_tokens": max_tokens, "temperature": 0,
                        "ignore_eos": True, "stream": True}  # fmt: skip
                if (
                    await _one(client, f"{server_url}/v1/completions", body, headers, "standard")
                ).status == 200:
                    done += 1
                i += 1

        t0 = time.perf_counter()
        await asyncio.gather(*(worker(w) for w in range(8)))
        return done / (time.perf_counter() - t0)


def _run(coroutine_function: Callable, *args):
    """asyncio.run(coroutine_function(*args)): a picklable call for the client's process."""
    return asyncio.run(coroutine_function(*args))


def _lowest_priority() -> None:
    os.nice(19)  # the kernel clamps at 19 whatever the starting niceness


class Client:
    """Where the bench's requests are sent from: a child process at nice 19 (`nice=True`), or this
    process. A context manager; `call(fn, *args)` runs the picklable top-level fn(*args) there and
    returns its result."""

    def __init__(self, nice: bool = True):
        self.nice = nice
        self._pool: ProcessPoolExecutor | None = None

    def __enter__(self) -> Client:
        if self.nice:
            self._pool = ProcessPoolExecutor(1, mp_context=get_context("spawn"), initializer=_lowest_priority)
        return self

    def __exit__(self, *exc) -> None:
        if self._pool is not None:
            self._pool.shutdown()

    def call(self, fn: Callable, *args):
        return fn(*args) if self._pool is None else self._pool.submit(fn, *args).result()


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


def server_side(log_path: Path, id_prefix: str) -> dict:
    """Per class, from the server's JSON access lines of the successful requests whose id starts with
    id_prefix (ids made by _send: `{prefix}-{class}-{i}`): their number, and P50/P95 seconds of the queue (HTTP arrival to its first engine step), of
    TTFT (to its first token) and of their difference (the step or steps that computed the prompt)."""
    rows: dict[str, list[tuple[float, float]]] = {c: [] for c in CLASSES}
    for line in log_path.read_text().splitlines():
        if f'"request_id": "{id_prefix}' not in line:
            continue
        entry = json.loads(line)
        parts = str(entry["request_id"]).split("-")
        if len(parts) != 3 or parts[1] not in rows or entry.get("status") != 200:
            continue
        if entry.get("queue_s") is not None and entry.get("ttft_s") is not None:
            rows[parts[1]].append((entry["queue_s"], entry["ttft_s"]))
    report = {}
    for request_class, pairs in rows.items():
        parts = {
            "queue": [q for q, _ in pairs],
            "ttft": [t for _, t in pairs],
            "prompt_step": [t - q for q, t in pairs],
        }
        report[request_class] = {
            "n": len(pairs),
            **{f"{name}_p{q}_s": percentile(values, q) for name, values in parts.items() for q in (50, 95)},
        }
    return report


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


def run_spike(
    model: str,
    dtype: str = "auto",
    threads: int = 2,
    factor: float = 10.0,
    spike_s: float = 30.0,
    premium_share: float = 0.1,
    max_tokens: int = 16,
    max_requests: int = 3000,
    max_waiting: int = 64,
    max_num_seqs: int = 8,
    request_timeout_s: float = 30.0,
    unloaded_requests: int = 10,
    nice_client: bool = True,
    rate: float | None = None,
    without_policy: bool = True,
) -> dict:
    """The whole benchmark (see the module docstring); returns a JSON-able result. `rate` (req/s) is
    taken as the sustainable rate instead of measuring it (runs to compare then get the same spike);
    `without_policy=False` runs only the server with the policy."""
    workdir = Path(tempfile.mkdtemp(prefix="shoal-spike-"))
    keys_file = workdir / "keys.json"
    headers = _keys(keys_file)
    policy = workdir / "policy.yaml"
    policy.write_text(POLICY.format(keys_file=keys_file, max_waiting=max_waiting))
    batch = ["--max-num-seqs", str(max_num_seqs)]
    sides = {
        "without policy": (batch, {c: {} for c in CLASSES}),
        "with policy": ([*batch, "--policy", str(policy), "--scheduling-policy", "priority"], headers),
    }
    if not without_policy:
        del sides["without policy"]
    load = SpikeLoad(
        factor, spike_s, premium_share, max_tokens, max_requests, request_timeout_s, unloaded_requests
    )
    result = {
        "machine": machine(threads),
        "model": model,
        "dtype": dtype,
        "factor": factor,
        "spike_s": spike_s,
        "max_num_seqs": max_num_seqs,
        "max_waiting_requests": max_waiting,
        "nice_client": nice_client,
    }
    if rate is not None:
        result["sustainable_rate_rps"], result["rate_given"] = rate, True
    with Client(nice_client) as client:
        for side, (extra, side_headers) in sides.items():
            server = _start(model, dtype, threads, workdir, side.replace(" ", "-"), extra)
            try:
                if "sustainable_rate_rps" not in result:
                    result["sustainable_rate_rps"] = client.call(
                        _run, _closed_loop_rate, server.url, side_headers["standard"], max_tokens, 8.0
                    )
                result[side] = _measure(client, server, side_headers, load, result["sustainable_rate_rps"])
            finally:
                server.stop()
    return result


def _measure(client: Client, server: Server, headers: dict, load: SpikeLoad, rate: float) -> dict:
    """The unloaded premium TTFT, then the spike at load.factor x rate (req/s); one server's result."""
    unloaded = [client.call(_run, _send, server.url, [(0.0, "premium")], headers, load.max_tokens,
                            load.request_timeout_s, f"unloaded{k}")[0] for k in range(load.unloaded_requests)]  # fmt: skip
    times = arrival_times(load.factor * rate, load.spike_s, load.max_requests)
    plan = list(zip(times, class_schedule(len(times), load.premium_share), strict=True))
    before = live_stats.fetch(server.url)
    cpu0, wall0 = server_cpu_s(server), time.perf_counter()
    outcomes = client.call(
        _run, _send, server.url, plan, headers, load.max_tokens, load.request_timeout_s, "spike"
    )
    cpu1, wall = server_cpu_s(server), time.perf_counter() - wall0
    after = live_stats.fetch(server.url)
    server_ttft = live_stats.summarize(before, after).percentiles["TTFT"]
    steps = after.minus(before)
    time.sleep(1.0)  # the access lines of the last answers
    spike_side = server_side(server.log_path, "spike")
    unloaded_side = server_side(server.log_path, "unloaded")["premium"]
    base = percentile([o.ttft_s for o in unloaded if o.ttft_s is not None], 95)
    summary = summarize(outcomes)
    p95 = summary["premium"]["ttft_p95_s"]
    lags = [o.send_lag_s for o in outcomes]
    return {
        "requests": len(plan),
        "unloaded_premium_ttft_p95_s": base,
        "premium_ttft_p95_ratio": _ratio(p95, base),
        # The server's own TTFT histogram over the spike (all classes; from arrival at the HTTP
        # side to the first token): beside the client's, it shows how much of the wait is the client's.
        "server_ttft_p50_s": server_ttft[0.5],
        "server_ttft_p95_s": server_ttft[0.95],
        # How late the client sent its requests against the plan (seconds): large lags mean the planned
        # rate was not delivered (a client starved of CPU).
        "send_lag_p50_s": percentile(lags, 50),
        "send_lag_p95_s": percentile(lags, 95),
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


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def markdown(result: dict) -> str:
    lines = [
        f"Spike: {result['factor']:g}x the sustainable rate ({result['sustainable_rate_rps']:.1f} req/s"
        + (", given" if result.get("rate_given") else "")
        + f") for "
        f"{result['spike_s']:g} s; model {result['model']}, dtype {result['dtype']}; client "
        + ("at nice 19." if result.get("nice_client") else "at the server's priority."),
        "",
        "| server | class | sent | ok | rejected | timed out | success | TTFT P50 | P95 | P99 | P95 / unloaded |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    sides = [side for side in ("without policy", "with policy") if side in result]
    for side in sides:
        r = result[side]
        for request_class, c in r["classes"].items():
            ratio = r["premium_ttft_p95_ratio"] if request_class == "premium" else None
            cells = [side, request_class, c["sent"], c["ok"], c["rejected"], c["timed_out"],
                     _pct(c["success_rate"]), _ms(c["ttft_p50_s"]), _ms(c["ttft_p95_s"]), _ms(c["ttft_p99_s"]),
                     f"{ratio:.2f}x" if ratio else ""]  # fmt: skip
            lines.append("| " + " | ".join(str(x) for x in cells) + " |")
    lines.append("")
    for side in sides:
        r = result[side]
        lines.append(
            f"Server-side TTFT over the spike, {side} (all classes, `{mn.TIME_TO_FIRST_TOKEN}`): "
            f"P50 {_ms(r.get('server_ttft_p50_s'))}, P95 {_ms(r.get('server_ttft_p95_s'))}; client send lag "
            f"P50 {_ms(r.get('send_lag_p50_s'))}, P95 {_ms(r.get('send_lag_p95_s'))}; unloaded premium TTFT "
            f"P95 {_ms(r.get('unloaded_premium_ttft_p95_s'))}."
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
        for request_class, c in r.get("server_side", {}).items():
            lines.append(
                f"- {side}, {request_class} ({c['n']} answered), from the server's access log: queue (HTTP "
                f"arrival to first engine step) P50 {_ms(c['queue_p50_s'])}, P95 {_ms(c['queue_p95_s'])}; "
                f"prompt step(s) P50 {_ms(c['prompt_step_p50_s'])}, P95 {_ms(c['prompt_step_p95_s'])}; "
                f"server TTFT P50 {_ms(c['ttft_p50_s'])}, P95 {_ms(c['ttft_p95_s'])}."
            )
    return "\n".join(lines)


def _pct(x: float | None) -> str:
    return "" if x is None else f"{100 * x:.0f}%"


def _ms(x: float | None) -> str:
    return "" if x is None else f"{1000 * x:.0f} ms"
