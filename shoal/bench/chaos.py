"""`shoal bench chaos`: load through the gateway to two replicas while one is killed and the other paused.

Two `shoal serve` replicas (each in a process group of its own, so that a signal reaches its engine core
too) behind one `shoal gateway` (`round_robin`, so both always carry load). `concurrency` clients send
requests in a closed loop, streamed and not in turn, each `max_tokens` long, for the whole run. Meanwhile:

1. **pause**: replica B's group gets SIGSTOP (a frozen container, a partitioned host: its sockets stay
   open and nothing answers) for `pause_s`, then SIGCONT;
2. **kill**: once B is back in the gateway's healthy set, replica A's group gets SIGKILL (a crash, an OOM
   kill); after `restart_delay_s` it is started again on the same port;
3. the load goes on until A is back in the healthy set and has served a request, then `tail_s` more.

Every request is recorded as the client saw it: status, the backend that answered (`x-shoal-backend`),
the OpenAI error object of a failure (the body of an error status, or the error event of a stream that
failed after its 200), and its longest silence (to the headers, between chunks, to the end); the client
gives up at `upstream_timeout_s + 3` s of silence. A background watcher polls the gateway's
`/admin/backends`, and each disturbed replica's own `/ready`, every 50 ms.

The goals (issue 22), each reported as passed or not:
- only requests in flight on the killed replica fail, and each failure carries an error object;
- requests on the paused replica complete, or end with a 504 (`upstream_timeout`) within the timeout;
- no request waits longer than the upstream timeout plus 1 s (a longer silence is a hung request);
- full capacity returns within the readiness delay: each replica is back in the gateway's healthy set
  within its own readiness delay (restart or resume to its `/ready` answering 200) plus one probe round
  of the gateway (`scrape_interval_s + health_timeout_s`), and serves through it.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

from shoal.bench.gateway import gateway_server
from shoal.bench.serve_compare import Server, machine, percentile, shoal_server

MODEL_NAME = "chaos"
HANG_MARGIN_S = 1.0  # the goal: no request waits longer than the upstream timeout plus this
# the client gives up this long after the upstream timeout: a hang is seen, not waited out
CLIENT_MARGIN_S = 3.0
POLL_S = 0.05


@dataclass
class Outcome:
    """One request as the client saw it; times in seconds from the start of the load."""

    start_s: float
    end_s: float
    stream: bool
    status: int  # HTTP status; 0: none came
    backend: str | None  # x-shoal-backend
    error: dict | None  # the OpenAI error object: an error status's body, or a stream's error event
    max_gap_s: float  # the longest silence: to the headers, between two chunks, or to the end
    complete: bool  # a 200 with the whole answer (a JSON completion, or a stream through [DONE])
    transport_error: str | None = None  # the connection dropped, or the client gave up (ReadTimeout)


@dataclass
class Watch:
    """What the gateway thought of each backend over time: (time, healthy) at every change."""

    changes: dict[str, list[tuple[float, bool]]] = field(default_factory=dict)
    last_poll: float = 0.0

    def record(self, t: float, backends: list[dict]) -> None:
        for b in backends:
            seen = self.changes.setdefault(b["url"], [])
            if not seen or seen[-1][1] != b["healthy"]:
                seen.append((t, b["healthy"]))
        self.last_poll = t

    def healthy(self, url: str, since: float) -> bool:
        """Healthy in the gateway's last answer, polled after `since`."""
        seen = self.changes.get(url)
        return bool(seen) and seen[-1][1] and self.last_poll > since

    def back_at(self, url: str, since: float) -> float | None:
        """When the gateway took `url` back after `since` (`since` if it never took it out)."""
        seen = self.changes.get(url, [])
        if not seen or not seen[-1][1]:
            return None
        return max(seen[-1][0], since)

    def out_at(self, url: str, since: float) -> float | None:
        """When the gateway first took `url` out after `since`."""
        return next((t for t, h in self.changes.get(url, []) if not h and t >= since), None)


def _body(i: int, stream: bool, max_tokens: int) -> dict:
    return {"model": MODEL_NAME, "prompt": f"Request {i}: once upon a time", "max_tokens": max_tokens,
            "temperature": 0, "ignore_eos": True, "stream": stream}  # fmt: skip


def _error_in(content: bytes, stream: bool, status: int) -> dict | None:
    """The error object of a failed answer: a stream's error event, or the JSON body of an error status."""
    if stream and status == 200:
        for line in content.splitlines():
            if line.startswith(b"data:") and b'"error"' in line:
                try:
                    return json.loads(line[5:])["error"]
                except (ValueError, KeyError, TypeError):
                    return {"message": line.decode(errors="replace")}
        return None
    if status == 200:
        return None
    try:
        return json.loads(content)["error"]
    except (ValueError, KeyError, TypeError):
        return None


async def _request(client, url: str, body: dict, t0: float) -> Outcome:
    start = time.perf_counter()
    last, gap, status, backend, chunks, dropped = start, 0.0, 0, None, [], None
    try:
        async with client.stream("POST", url, json=body) as resp:
            status, backend = resp.status_code, resp.headers.get("x-shoal-backend")
            gap, last = time.perf_counter() - start, time.perf_counter()
            async for chunk in resp.aiter_raw():
                now = time.perf_counter()
                gap, last = max(gap, now - last), now
                chunks.append(chunk)
    except httpx.HTTPError as e:  # ReadTimeout: the client gave up; RemoteProtocolError: dropped
        dropped = type(e).__name__
    end = time.perf_counter()
    gap = max(gap, end - last)
    content = b"".join(chunks)
    error = _error_in(content, body["stream"], status)
    if body["stream"]:
        complete = status == 200 and error is None and b"data: [DONE]" in content
    else:
        complete = status == 200 and b'"choices"' in content
    return Outcome(start - t0, end - t0, body["stream"], status, backend, error, gap, complete and not dropped,
                   dropped)  # fmt: skip


async def _load(url: str, concurrency: int, max_tokens: int, limit_s: float, t0: float, stop: asyncio.Event,
                outcomes: list[Outcome]) -> None:  # fmt: skip
    """`concurrency` clients in a closed loop (each sends the next request when its last one ends)."""
    timeout = httpx.Timeout(limit_s, connect=limit_s)
    async with httpx.AsyncClient(base_url=url, timeout=timeout, trust_env=False) as client:

        async def worker(w: int) -> None:
            i = w
            while not stop.is_set():
                outcomes.append(
                    await _request(client, "/v1/completions", _body(i, i % 2 == 1, max_tokens), t0)
                )
                i += concurrency

        await asyncio.gather(*(worker(w) for w in range(concurrency)))


async def _watch(gateway: str, watch: Watch, t0: float, stop: asyncio.Event) -> None:
    async with httpx.AsyncClient(timeout=1.0, trust_env=False) as client:
        while not stop.is_set():
            try:
                resp = await client.get(gateway + "/admin/backends")
                watch.record(time.perf_counter() - t0, resp.json()["backends"])
            except (httpx.HTTPError, ValueError, KeyError):
                pass
            await asyncio.sleep(POLL_S)


async def _until(predicate, timeout_s: float, what: str) -> None:
    """Until `predicate()` (a bool, or an awaitable of one) holds; RuntimeError past `timeout_s`."""
    deadline = time.perf_counter() + timeout_s
    while True:
        held = predicate()
        if held if isinstance(held, bool) else await held:
            return
        if time.perf_counter() > deadline:
            raise RuntimeError(f"chaos: {what} not within {timeout_s:g} s")
        await asyncio.sleep(POLL_S)


async def _own_ready(server: Server, t0: float, timeout_s: float) -> float:
    """When the replica's own /ready answers 200 (seconds from t0)."""
    async with httpx.AsyncClient(timeout=0.5, trust_env=False) as client:

        async def ready() -> bool:
            if server.proc.poll() is not None:
                raise RuntimeError(
                    f"{server.name} exited with {server.proc.returncode}:\n{server.log_tail()}"
                )
            try:
                return (await client.get(server.url + "/ready")).status_code == 200
            except httpx.HTTPError:
                return False

        await _until(ready, timeout_s, f"{server.name} ready")
    return time.perf_counter() - t0


def _signal(server: Server, sig: signal.Signals) -> None:
    os.killpg(server.proc.pid, sig)  # the group: the HTTP process and its engine core alike


def _served_since(outcomes: list[Outcome], url: str, since: float) -> bool:
    return any(o.backend == url and o.complete and o.start_s >= since for o in outcomes)


async def _in_flight(gateway: str, url: str) -> bool:
    """Whether the gateway has a request in flight on `url` now (asked right before the kill: the
    watcher's view may be 50 ms old)."""
    async with httpx.AsyncClient(timeout=1.0, trust_env=False) as client:
        backends = (await client.get(gateway + "/admin/backends")).json()["backends"]
    return any(b["url"] == url and b["in_flight"] > 0 for b in backends)


async def _disturb(a: Server, b: Server, gateway: str, watch: Watch, outcomes: list[Outcome], t0: float,
                   opts: dict) -> dict:  # fmt: skip
    """Pause B, then kill A while it has a request in flight, and restart it; the events' times (seconds
    from t0)."""

    def now() -> float:
        return time.perf_counter() - t0

    async def back(server: Server, since: float) -> None:
        """Until the gateway has it healthy again and it has served a request begun since `since`."""
        await _until(lambda: watch.healthy(server.url, since), 30, f"{server.name} back in the gateway")
        await _until(lambda: _served_since(outcomes, server.url, since), 30, f"{server.name} serving")

    ev: dict[str, float] = {}
    await asyncio.sleep(opts["warmup_s"])
    await _until(lambda: watch.healthy(a.url, 0) and watch.healthy(b.url, 0), 10, "both replicas healthy")
    _signal(b, signal.SIGSTOP)
    ev["pause"] = now()
    await asyncio.sleep(opts["pause_s"])
    _signal(b, signal.SIGCONT)
    ev["resume"] = now()
    ev["b_ready"] = await _own_ready(b, t0, 30)
    await back(b, ev["resume"])
    await asyncio.sleep(opts["settle_s"])
    await _until(lambda: _in_flight(gateway, a.url), 10, f"a request in flight on {a.name}")
    _signal(a, signal.SIGKILL)
    ev["kill"] = now()  # after the signal: a request begun by then was in flight on A, or routed around it
    await asyncio.to_thread(a.proc.wait)
    await asyncio.sleep(opts["restart_delay_s"])
    a.log_path = a.log_path.with_name(a.log_path.stem + "-restarted.log")
    a.start()
    ev["restart"] = now()
    ev["a_ready"] = await _own_ready(a, t0, opts["start_timeout_s"])
    await back(a, ev["restart"])
    await asyncio.sleep(opts["tail_s"])
    return ev


async def _drive(a: Server, b: Server, gateway: str, opts: dict) -> tuple[list[Outcome], Watch, dict]:
    t0, stop = time.perf_counter(), asyncio.Event()
    outcomes: list[Outcome] = []
    watch = Watch()
    limit_s = opts["upstream_timeout_s"] + CLIENT_MARGIN_S
    tasks = [asyncio.create_task(_watch(gateway, watch, t0, stop)),
             asyncio.create_task(_load(gateway, opts["concurrency"], opts["max_tokens"], limit_s, t0, stop, outcomes))]  # fmt: skip
    try:
        events = await _disturb(a, b, gateway, watch, outcomes, t0, opts)
    finally:
        stop.set()
        await asyncio.gather(*tasks)
    return outcomes, watch, events


def classify(o: Outcome, ev: dict, a: str, b: str) -> str:
    """ok, killed_in_flight (on A across the kill), paused_timeout (a 504 upstream_timeout from B across
    the pause), or unexpected."""
    if o.complete:
        return "ok"
    if o.backend == a and o.start_s <= ev["kill"] <= o.end_s:
        return "killed_in_flight"
    timeout = (o.error or {}).get("code") == "upstream_timeout" and (o.status == 504 or o.stream)
    if o.backend == b and timeout and o.start_s <= ev["resume"] and o.end_s >= ev["pause"]:
        return "paused_timeout"
    return "unexpected"


def _recovery(
    url: str, event: float, ready: float, watch: Watch, outcomes: list[Outcome], since: float
) -> dict:
    back = watch.back_at(url, event)
    out = watch.out_at(url, since)
    served = min(
        (o.end_s for o in outcomes if o.backend == url and o.complete and o.start_s >= event), default=None
    )
    return {
        "replica": url,
        "taken_out_after_s": None if out is None else out - since,
        "readiness_delay_s": ready - event,
        "back_in_gateway_s": None if back is None else back - event,
        "serving_s": None if served is None else served - event,
    }


def analyze(outcomes: list[Outcome], watch: Watch, ev: dict, a: str, b: str, opts: dict) -> dict:
    """The report: requests by outcome, the failures, recovery per replica, and the goals."""
    limit = opts["upstream_timeout_s"] + HANG_MARGIN_S
    probe_round = opts["scrape_interval_s"] + opts["health_timeout_s"] + 2 * POLL_S
    classes = [classify(o, ev, a, b) for o in outcomes]
    failures = [asdict(o) | {"class": c} for o, c in zip(outcomes, classes, strict=True) if c != "ok"]
    recovery = {
        "paused": _recovery(b, ev["resume"], ev["b_ready"], watch, outcomes, ev["pause"]),
        "killed": _recovery(a, ev["restart"], ev["a_ready"], watch, outcomes, ev["kill"]),
    }
    back_in_time = all(
        r["back_in_gateway_s"] is not None and r["serving_s"] is not None
        and r["back_in_gateway_s"] <= r["readiness_delay_s"] + probe_round
        for r in recovery.values()
    )  # fmt: skip
    hung = [o for o in outcomes if o.max_gap_s > limit or o.transport_error == "ReadTimeout"]
    across_pause = [o for o in outcomes if o.backend == b and o.start_s < ev["pause"] < o.end_s]
    return {
        "requests": {
            "total": len(outcomes),
            "streamed": sum(o.stream for o in outcomes),
            **{c: classes.count(c) for c in ("ok", "killed_in_flight", "paused_timeout", "unexpected")},
            "in_flight_on_paused_then_completed": sum(o.complete for o in across_pause),
            "hung": len(hung),
            "max_wait_s": max((o.max_gap_s for o in outcomes), default=None),
            "latency_p50_s": percentile([o.end_s - o.start_s for o in outcomes if o.complete], 50),
        },
        "failures": failures,
        "recovery": recovery,
        "goals": {
            "only_killed_in_flight_or_paused_fail": "unexpected" not in classes,
            "every_failure_has_an_error_body": all(f["error"] is not None for f in failures),
            "paused_answered_within_timeout": all(
                f["max_gap_s"] <= limit for f in failures if f["class"] == "paused_timeout"
            ),
            "no_request_waits_past_timeout_plus_1s": not hung,
            "full_capacity_within_readiness_delay": back_in_time,
        },
    }


def run_chaos(
    model: str,
    dtype: str = "float32",
    threads: int = 1,
    concurrency: int = 4,
    max_tokens: int = 64,
    upstream_timeout_s: float = 2.0,
    pause_s: float = 3.0,
    restart_delay_s: float = 0.5,
    warmup_s: float = 1.0,
    settle_s: float = 0.5,
    tail_s: float = 0.5,
    scrape_interval_s: float = 1.0,
    health_timeout_s: float = 1.0,
    kv_cache_memory: int | None = 32 << 20,
    start_timeout_s: float = 120.0,
    log=print,
) -> dict:
    """The whole run (see the module docstring); a JSON-able result with `passed` set when every goal is."""
    opts = {k: v for k, v in locals().items() if k not in ("model", "log")}
    load_before = os.getloadavg()[0]
    log_dir = Path(tempfile.mkdtemp(prefix="shoal-bench-chaos-"))
    replicas = [shoal_server(model, dtype, threads, kv_cache_memory, log_dir, MODEL_NAME, log_name=f"replica-{n}")
                for n in "ab"]  # fmt: skip
    a, b = replicas
    for name, r in zip(("replica A (killed)", "replica B (paused)"), replicas, strict=True):
        r.name, r.new_session = name, True
    settings = {"upstream_timeout_s": upstream_timeout_s, "scrape_interval_s": scrape_interval_s,
                "health_timeout_s": health_timeout_s}  # fmt: skip
    config = {"gateway": settings,
              "models": {MODEL_NAME: {"routing": "round_robin", "versions": {"v1": {"backends": [a.url, b.url]}}}}}  # fmt: skip
    gateway = gateway_server(config, log_dir, "gateway")
    started: list[Server] = []
    try:
        for server in (a, b, gateway):  # all at once: the gateway probes the replicas until they are up
            server.start()
            started.append(server)
        for server in (a, b):
            server.wait_ready(start_timeout_s)
        gateway.wait_ready(30)
        log(f"chaos: {concurrency} clients through {gateway.url} to {a.url} (killed) and {b.url} (paused)")
        outcomes, watch, events = asyncio.run(_drive(a, b, gateway.url, opts))
    finally:
        if b.proc is not None and b.proc.poll() is None:
            _signal(b, signal.SIGCONT)  # a stopped process never handles the SIGTERM of stop()
        for server in reversed(started):
            server.stop()
    result = {
        "config": {"model": model, **opts},
        "events_s": events,
        **analyze(outcomes, watch, events, a.url, b.url, opts),
        "logs": str(log_dir),
        "machine": machine(threads),
        "load_average_before_after": [load_before, os.getloadavg()[0]],
    }
    result["passed"] = all(result["goals"].values())
    return result


def _s(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f} s"


def markdown(result: dict) -> str:
    c, r, rec = result["config"], result["requests"], result["recovery"]
    lines = [
        f"Chaos: {c['concurrency']} clients (streamed and not, {c['max_tokens']} tokens), gateway "
        f"`--upstream-timeout {c['upstream_timeout_s']:g}`, replica B paused {c['pause_s']:g} s, replica A "
        f"killed and restarted; model {c['model']}, dtype {c['dtype']}.",
        "",
        "| requests | ok | failed: in flight on the killed replica | on the paused replica: 504 | completed after "
        "resume | other failures | hung | longest wait |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| {r['total']} | {r['ok']} | {r['killed_in_flight']} | {r['paused_timeout']} "
        f"| {r['in_flight_on_paused_then_completed']} | {r['unexpected']} | {r['hung']} | {_s(r['max_wait_s'])} |",
        "",
        "| replica | taken out after | readiness delay | back in the gateway | serving again |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, x in (("paused (from SIGCONT)", rec["paused"]), ("killed (from restart)", rec["killed"])):
        lines.append(f"| {name} | {_s(x['taken_out_after_s'])} | {_s(x['readiness_delay_s'])} "
                     f"| {_s(x['back_in_gateway_s'])} | {_s(x['serving_s'])} |")  # fmt: skip
    lines += ["", "Goals: " + ", ".join(f"{k} {'yes' if v else 'NO'}" for k, v in result["goals"].items())]
    return "\n".join(lines)
