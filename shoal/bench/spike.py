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
"""

from __future__ import annotations

import asyncio
import random
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from shoal import live_stats
from shoal import metric_names as mn
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
    server_url: str, plan: list[tuple[float, str]], headers: dict, max_tokens: int, timeout_s: float
):
    import httpx

    limits = httpx.Limits(max_connections=len(plan) + 8, max_keepalive_connections=64)
    async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(timeout_s), trust_env=False) as client:
        url = f"{server_url}/v1/completions"
        t0 = time.perf_counter()

        async def at(i: int, offset: float, request_class: str) -> Outcome:
            await asyncio.sleep(max(0.0, t0 + offset - time.perf_counter()))
            body = {"prompt": f"Request {i}: tell me a story about the sea.", "max_tokens": max_tokens,
                    "temperature": 0, "ignore_eos": True, "stream": True}  # fmt: skip
            return await _one(client, url, body, headers.get(request_class, {}), request_class)

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


def _start(model: str, dtype: str, threads: int, workdir: Path, name: str, extra: list[str]) -> Server:
    server = shoal_server(model, dtype, threads, None, workdir, name)
    server.cmd += extra
    server.log_path = workdir / f"{name}.log"
    server.start()
    server.wait_ready()
    return server


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
) -> dict:
    """The whole benchmark (see the module docstring); returns a JSON-able result."""
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
    result = {
        "machine": machine(threads),
        "model": model,
        "dtype": dtype,
        "factor": factor,
        "spike_s": spike_s,
        "max_num_seqs": max_num_seqs,
        "max_waiting_requests": max_waiting,
    }
    rate = None
    for side, (extra, side_headers) in sides.items():
        server = _start(model, dtype, threads, workdir, side.replace(" ", "-"), extra)
        try:
            if rate is None:
                rate = asyncio.run(_closed_loop_rate(server.url, side_headers["standard"], max_tokens, 8.0))
                result["sustainable_rate_rps"] = rate
            unloaded = [asyncio.run(_send(server.url, [(0.0, "premium")], side_headers, max_tokens, request_timeout_s))[0]
                        for _ in range(unloaded_requests)]  # fmt: skip
            times = arrival_times(factor * rate, spike_s, max_requests)
            plan = list(zip(times, class_schedule(len(times), premium_share), strict=True))
            before = live_stats.fetch(server.url)
            outcomes = asyncio.run(_send(server.url, plan, side_headers, max_tokens, request_timeout_s))
            server_ttft = live_stats.summarize(before, live_stats.fetch(server.url)).percentiles["TTFT"]
        finally:
            server.stop()
        base = percentile([o.ttft_s for o in unloaded if o.ttft_s is not None], 95)
        summary = summarize(outcomes)
        p95 = summary["premium"]["ttft_p95_s"]
        result[side] = {
            "requests": len(plan),
            "unloaded_premium_ttft_p95_s": base,
            "premium_ttft_p95_ratio": p95 / base if p95 and base else None,
            # The server's own TTFT histogram over the spike (all classes; from arrival at the HTTP
            # side to the first token): beside the client's, it shows how much of the wait is the client's.
            "server_ttft_p50_s": server_ttft[0.5],
            "server_ttft_p95_s": server_ttft[0.95],
            "classes": summary,
        }
    return result


def markdown(result: dict) -> str:
    lines = [
        f"Spike: {result['factor']:g}x the sustainable rate ({result['sustainable_rate_rps']:.1f} req/s) for "
        f"{result['spike_s']:g} s; model {result['model']}, dtype {result['dtype']}.",
        "",
        "| server | class | sent | ok | rejected | timed out | success | TTFT P50 | P95 | P99 | P95 / unloaded |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for side in ("without policy", "with policy"):
        r = result[side]
        for request_class, c in r["classes"].items():
            ratio = r["premium_ttft_p95_ratio"] if request_class == "premium" else None
            cells = [side, request_class, c["sent"], c["ok"], c["rejected"], c["timed_out"],
                     _pct(c["success_rate"]), _ms(c["ttft_p50_s"]), _ms(c["ttft_p95_s"]), _ms(c["ttft_p99_s"]),
                     f"{ratio:.2f}x" if ratio else ""]  # fmt: skip
            lines.append("| " + " | ".join(str(x) for x in cells) + " |")
    lines.append("")
    for side in ("without policy", "with policy"):
        r = result[side]
        lines.append(
            f"Server-side TTFT over the spike, {side} (all classes, `{mn.TIME_TO_FIRST_TOKEN}`): "
            f"P50 {_ms(r.get('server_ttft_p50_s'))}, P95 {_ms(r.get('server_ttft_p95_s'))}."
        )
    return "\n".join(lines)


def _pct(x: float | None) -> str:
    return "" if x is None else f"{100 * x:.0f}%"


def _ms(x: float | None) -> str:
    return "" if x is None else f"{1000 * x:.0f} ms"
