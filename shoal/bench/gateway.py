"""`shoal bench gateway`: what the gateway costs, and what prefix-aware routing buys, in one run.

1. Overhead: one `shoal serve` backend, one gateway in front of it. Latency: sequential requests
   (`max_tokens` 1, so the proxy's share is as large as it can be), alternating direct and through the
   gateway, P50/P99 of each and their difference. Throughput, per workload (`workloads`), direct and gateway
   blocks alternating (ABBA, `rounds` times): requests/s, output tokens/s, the gateway's loss, and the
   gateway process's CPU per request. Goal: < 2 ms P50 added, < 5% loss. The workloads:
   - `tiny`: the worst case, `max_tokens` 1 completions on the small model (a backend answers in a few ms,
     so the proxy's CPU is as large a share as it can be), `concurrency` in flight;
   - `chat`: chat completions of `chat_max_tokens` tokens (EOS ignored) on `chat_model` (a real, if small,
     model: SmolLM2-135M by default), `chat_concurrency` in flight, served by a backend of its own with a
     gateway of its own in front;
   - `chat-stream`: the same, streamed (the gateway then relays every chunk: the harder case).
2. Prefix-aware against round-robin routing over two backends (vLLM production-stack's and the Gateway API
   Inference Extension's argument): `groups` distinct system prompts, each shared by `per_group` questions,
   shuffled and sent `concurrency` at a time through a `routing: prefix` gateway, then through a
   `routing: round_robin` one (each with system prompts of its own, so neither inherits the other's cache).
   The backends' KV cache is small (`kv_cache_memory`), so one backend cannot hold every system prompt:
   prefix cache hit rate (the backends' `vllm:prefix_cache_hits_total / vllm:prefix_cache_queries_total`)
   and requests/s per routing.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
import yaml

from shoal.bench import workload as wl
from shoal.bench.serve_compare import Server, free_port, machine, percentile, shoal_server
from shoal.metric_names import PREFIX_CACHE_HITS, PREFIX_CACHE_QUERIES

WORDS = "river lantern quiet orchard copper meadow harbor velvet summit ember willow granite".split()
WORKLOADS = ("tiny", "chat", "chat-stream")
DEFAULT_CHAT_MODEL = str(wl.REPO / "models" / "SmolLM2-135M-Instruct")


def gateway_server(config: dict, log_dir: Path, name: str) -> Server:
    """`shoal gateway` (config written to log_dir) on a free port of 127.0.0.1; started by the caller."""
    path = log_dir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    port = free_port()
    cmd = [sys.executable, "-m", "shoal.gateway", "--config", str(path), "--port", str(port)]
    return Server(name, cmd, f"http://127.0.0.1:{port}", "/ready", log_dir / f"{name}.log")


def _route(urls: list[str], routing: str = "least_loaded") -> dict:
    return {"models": {"bench": {"routing": routing, "versions": {"v1": {"backends": urls}}}}}


def _body(prompt: str, max_tokens: int) -> dict:
    return {"model": "bench", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}


async def _timed(client: httpx.AsyncClient, url: str, body: dict) -> float:
    start = time.perf_counter()
    resp = await client.post(url + "/v1/completions", json=body)
    resp.raise_for_status()
    return time.perf_counter() - start


async def _latency(direct: str, gateway: str, n: int) -> dict:
    times: dict[str, list[float]] = {"direct": [], "gateway": []}
    async with httpx.AsyncClient(timeout=60, trust_env=False) as client:
        for i in range(n + 10):  # the first 10 pairs warm connections and caches, unrecorded
            for side, url in (("direct", direct), ("gateway", gateway))[:: 1 if i % 2 else -1]:
                t = await _timed(client, url, _body(f"Once upon a time {i % 7}", 1))
                if i >= 10:
                    times[side].append(t)
    out = {
        side: {"p50_ms": percentile(ts, 50) * 1e3, "p99_ms": percentile(ts, 99) * 1e3}
        for side, ts in times.items()
    }
    out["added_p50_ms"] = out["gateway"]["p50_ms"] - out["direct"]["p50_ms"]
    out["added_p99_ms"] = out["gateway"]["p99_ms"] - out["direct"]["p99_ms"]
    return out


@dataclass
class Load:
    """One throughput workload: its bodies for `path`, `concurrency` in flight."""

    name: str
    path: str
    bodies: list[dict]
    concurrency: int

    @property
    def stream(self) -> bool:
        return bool(self.bodies[0].get("stream"))


def tiny_load(n: int, concurrency: int) -> Load:
    """The worst case: `max_tokens` 1 completions (the backend's work is as small as it gets)."""
    return Load(
        "tiny", "/v1/completions", [_body(f"Once upon a time {i % 7}", 1) for i in range(n)], concurrency
    )


def chat_load(n: int, concurrency: int, max_tokens: int, stream: bool) -> Load:
    """Chat completions of exactly `max_tokens` tokens (EOS ignored), each on a prompt of its own."""
    bodies = []
    for i in range(n):
        question = (
            f"Write a short story about a {WORDS[i % len(WORDS)]} and a {WORDS[(i * 5 + 3) % len(WORDS)]}."
        )
        body = {"model": "bench", "messages": [{"role": "user", "content": f"{question} ({i})"}],
                "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}  # fmt: skip
        if stream:
            body |= {"stream": True, "stream_options": {"include_usage": True}}
        bodies.append(body)
    return Load("chat-stream" if stream else "chat", "/v1/chat/completions", bodies, concurrency)


def stream_usage(raw: bytes) -> int:
    """Output tokens of a streamed answer: the usage of its last event that has one (0 when none has)."""
    for line in reversed(raw.split(b"\n")):
        if line.startswith(b"data: {") and b'"usage"' in line:
            usage = json.loads(line[6:]).get("usage")
            if usage:
                return usage["completion_tokens"]
    return 0


async def _send(client: httpx.AsyncClient, url: str, body: dict) -> int:
    """One request to completion; its output tokens (usage.completion_tokens)."""
    if not body.get("stream"):
        resp = await client.post(url, json=body)
        resp.raise_for_status()
        return resp.json()["usage"]["completion_tokens"]
    async with client.stream("POST", url, json=body) as resp:
        resp.raise_for_status()
        raw = b"".join([chunk async for chunk in resp.aiter_raw()])
    return stream_usage(raw)


async def _block(url: str, load: Load) -> tuple[float, int]:
    """(wall seconds, output tokens) for `load`'s bodies sent to `url` `load.concurrency` at a time."""
    limit = asyncio.Semaphore(load.concurrency)
    async with httpx.AsyncClient(timeout=300, trust_env=False) as client:

        async def one(body: dict) -> int:
            async with limit:
                return await _send(client, url + load.path, body)

        start = time.perf_counter()
        tokens = await asyncio.gather(*(one(b) for b in load.bodies))
        return time.perf_counter() - start, sum(tokens)


async def _rate(url: str, bodies: list[dict], concurrency: int) -> float:
    """Requests/s for `bodies` (completions) sent `concurrency` at a time."""
    seconds, _ = await _block(url, Load("rate", "/v1/completions", bodies, concurrency))
    return len(bodies) / seconds


def _cpu_s(pid: int) -> float:
    times = psutil.Process(pid).cpu_times()
    return times.user + times.system


async def _throughput(direct: str, gateway: Server, load: Load, rounds: int) -> dict:
    """`rounds` of ABBA blocks (direct, gateway, gateway, direct: drift on the machine hits both sides),
    after one warm-up wave per side; summarized by `summarize_blocks`."""
    warm = Load(load.name, load.path, load.bodies[: load.concurrency], load.concurrency)
    await _block(direct, warm)
    await _block(gateway.url, warm)
    blocks = []
    for _ in range(rounds):
        for side in ("direct", "gateway", "gateway", "direct"):
            cpu0 = _cpu_s(gateway.proc.pid)
            seconds, tokens = await _block(direct if side == "direct" else gateway.url, load)
            cpu = _cpu_s(gateway.proc.pid) - cpu0
            blocks.append({"side": side, "seconds": seconds, "requests": len(load.bodies), "output_tokens": tokens,
                           "gateway_cpu_s": cpu})  # fmt: skip
    out: dict = {"requests_per_block": len(load.bodies), "concurrency": load.concurrency, "rounds": rounds}
    return out | summarize_blocks(blocks)


def summarize_blocks(blocks: list[dict]) -> dict:
    """ABBA blocks (each: side "direct" or "gateway", seconds, requests, output_tokens, and gateway_cpu_s,
    the gateway process's CPU seconds over the block) to requests/s and output tokens/s per side, the
    loss (1 - gateway requests/s / direct requests/s), the loss of each round of 4 blocks, and the gateway's
    CPU: per request in its blocks (all, and the proxying's: less what it spends idle, with no request
    through it: health probes and /metrics scrapes, read in the direct blocks, in ms/s)."""
    out: dict = {}
    sides = {side: [b for b in blocks if b["side"] == side] for side in ("direct", "gateway")}
    for side, mine in sides.items():
        seconds = sum(b["seconds"] for b in mine)
        out[f"{side}_rps"] = sum(b["requests"] for b in mine) / seconds
        out[f"{side}_tokens_per_s"] = sum(b["output_tokens"] for b in mine) / seconds
    gw, idle_blocks = sides["gateway"], sides["direct"]
    gw_requests, gw_cpu = sum(b["requests"] for b in gw), sum(b["gateway_cpu_s"] for b in gw)
    idle = sum(b["gateway_cpu_s"] for b in idle_blocks) / sum(b["seconds"] for b in idle_blocks)
    out["gateway_cpu_ms_per_request"] = 1e3 * gw_cpu / gw_requests
    out["gateway_idle_cpu_ms_per_s"] = 1e3 * idle
    out["gateway_proxy_cpu_ms_per_request"] = (
        1e3 * (gw_cpu - idle * sum(b["seconds"] for b in gw)) / gw_requests
    )
    out["loss"] = 1 - out["gateway_rps"] / out["direct_rps"]
    # the loss of each ABBA round on its own: the spread says how far one run can be trusted
    out["loss_per_round"] = [
        1 - (r[0]["seconds"] + r[3]["seconds"]) / (r[1]["seconds"] + r[2]["seconds"])
        for r in (blocks[i : i + 4] for i in range(0, len(blocks), 4))
    ]
    out["blocks"] = blocks
    return out


def _prefix_workload(seed: int, groups: int, per_group: int) -> list[dict]:
    rng = random.Random(seed)
    systems = [" ".join(rng.choice(WORDS) for _ in range(60)) + "." for _ in range(groups)]
    bodies = [_body(f"{s}\nQuestion {q}: what comes next?", 8) for s in systems for q in range(per_group)]
    rng.shuffle(bodies)
    return bodies


def _prefix_counters(urls: list[str]) -> tuple[float, float]:
    hits = queries = 0.0
    for url in urls:
        for line in httpx.get(url + "/metrics", trust_env=False).text.splitlines():
            if line.startswith(PREFIX_CACHE_HITS):
                hits += float(line.rsplit(" ", 1)[1])
            elif line.startswith(PREFIX_CACHE_QUERIES):
                queries += float(line.rsplit(" ", 1)[1])
    return hits, queries


async def _prefix_run(gateway: str, backends: list[str], bodies: list[dict], concurrency: int) -> dict:
    hits0, queries0 = _prefix_counters(backends)
    rps = await _rate(gateway, bodies, concurrency)
    hits1, queries1 = _prefix_counters(backends)
    return {"hit_rate": (hits1 - hits0) / max(1.0, queries1 - queries0), "rps": rps}


def parse_workloads(spec: str) -> list[str]:
    """ "tiny,chat,chat-stream" (any of WORKLOADS, comma-separated) as a list; ValueError naming a bad one."""
    names = [w.strip() for w in spec.split(",") if w.strip()]
    bad = [w for w in names if w not in WORKLOADS]
    if bad or not names:
        raise ValueError(f"workloads {spec!r}: each must be one of {', '.join(WORKLOADS)}")
    return names


def run_gateway_bench(
    model: str,
    dtype: str = "float32",
    latency_requests: int = 200,
    throughput_requests: int = 300,
    concurrency: int = 8,
    groups: int = 12,
    per_group: int = 8,
    kv_cache_memory: int = 3 << 20,
    threads: int = 1,
    workloads: str = ",".join(WORKLOADS),
    rounds: int = 1,
    chat_model: str = DEFAULT_CHAT_MODEL,
    chat_max_tokens: int = 32,
    chat_concurrency: int = 8,
    chat_requests: int = 16,
    chat_rounds: int = 2,
    chat_kv_cache_memory: int = 128 << 20,
    log=print,
) -> dict:
    """Run the whole benchmark (see the module's docstring); `rounds` / `chat_rounds`: ABBA repetitions of
    the tiny / chat workloads. Returns the result dict that `markdown` renders. ValueError for a bad
    `workloads`, FileNotFoundError for a missing chat model."""
    names = parse_workloads(workloads)
    chats = [w for w in names if w != "tiny"]
    if chats and not Path(chat_model).exists():
        raise FileNotFoundError(f"chat model {chat_model} not found (workloads {', '.join(chats)})")
    load_before = os.getloadavg()
    log_dir = Path(tempfile.mkdtemp(prefix="shoal-bench-gateway-"))
    dirs = [log_dir / f"backend{i}" for i in range(3 if chats else 2)]
    for d in dirs:
        d.mkdir()
    backends = [shoal_server(model, dtype, threads, kv_cache_memory, d, "bench") for d in dirs[:2]]
    if chats:
        backends.append(shoal_server(chat_model, dtype, threads, chat_kv_cache_memory, dirs[2], "bench"))
    servers: list[Server] = []
    try:
        for b in backends:
            b.start()
            servers.append(b)
        urls = [b.url for b in backends]
        gateways = {
            "overhead": gateway_server(_route(urls[:1]), log_dir, "gw-overhead"),
            "prefix": gateway_server(_route(urls[:2], "prefix"), log_dir, "gw-prefix"),
            "round_robin": gateway_server(_route(urls[:2], "round_robin"), log_dir, "gw-round-robin"),
        }
        if chats:
            gateways["chat"] = gateway_server(_route(urls[2:]), log_dir, "gw-chat")
        for b in backends:
            b.wait_ready()
        for g in gateways.values():
            g.start()
            servers.append(g)
            g.wait_ready()
        log("overhead: latency (sequential) ...")
        latency = asyncio.run(_latency(urls[0], gateways["overhead"].url, latency_requests))
        throughput = {}
        for name in names:
            log(f"overhead: throughput, {name} ...")
            if name == "tiny":
                load, direct, gateway, n = (
                    tiny_load(throughput_requests, concurrency),
                    urls[0],
                    gateways["overhead"],
                    rounds,
                )
            else:
                load = chat_load(chat_requests, chat_concurrency, chat_max_tokens, name == "chat-stream")
                direct, gateway, n = urls[2], gateways["chat"], chat_rounds
            throughput[name] = asyncio.run(_throughput(direct, gateway, load, n))
        prefix = {}
        for seed, routing in enumerate(("prefix", "round_robin")):
            log(f"prefix workload: {routing} ...")
            bodies = _prefix_workload(seed, groups, per_group)
            prefix[routing] = asyncio.run(_prefix_run(gateways[routing].url, urls[:2], bodies, concurrency))
    finally:
        for s in reversed(servers):
            s.stop()
    return {
        "config": {
            "model": model,
            "dtype": dtype,
            "latency_requests": latency_requests,
            "concurrency": concurrency,
            "throughput_requests": throughput_requests,
            "rounds": rounds,
            "workloads": names,
            "chat_model": chat_model if chats else None,
            "chat_max_tokens": chat_max_tokens,
            "chat_concurrency": chat_concurrency,
            "chat_requests": chat_requests,
            "chat_rounds": chat_rounds,
            "chat_kv_cache_memory": chat_kv_cache_memory,
            "groups": groups,
            "per_group": per_group,
            "kv_cache_memory": kv_cache_memory,
            "threads_per_backend": threads,
        },  # fmt: skip
        "latency": latency,
        "throughput": throughput,
        "prefix_routing": prefix,
        "machine": machine(threads),
        "load_average_before_after": [load_before[0], os.getloadavg()[0]],
    }


def markdown(result: dict) -> str:
    lat, thr, pre = result["latency"], result["throughput"], result["prefix_routing"]
    rows = [
        "| measure | direct | through the gateway | difference |",
        "|---|---|---|---|",
        f"| latency P50 (ms) | {lat['direct']['p50_ms']:.2f} | {lat['gateway']['p50_ms']:.2f} | {lat['added_p50_ms']:+.2f} |",
        f"| latency P99 (ms) | {lat['direct']['p99_ms']:.2f} | {lat['gateway']['p99_ms']:.2f} | {lat['added_p99_ms']:+.2f} |",
        "",
        "| throughput workload | direct req/s | gateway req/s | direct output tok/s | gateway output tok/s "
        "| loss | loss per ABBA round | gateway CPU per request (ms): all / proxying | gateway idle CPU (ms/s) |",
        "|---|---:|---:|---:|---:|---:|---|---:|---:|",
        *(
            f"| {name} | {t['direct_rps']:.1f} | {t['gateway_rps']:.1f} | {t['direct_tokens_per_s']:.1f} "
            f"| {t['gateway_tokens_per_s']:.1f} | {t['loss']:.1%} | "
            f"{', '.join(f'{x:.1%}' for x in t['loss_per_round'])} | {t['gateway_cpu_ms_per_request']:.2f} / "
            f"{t['gateway_proxy_cpu_ms_per_request']:.2f} | {t['gateway_idle_cpu_ms_per_s']:.1f} |"
            for name, t in thr.items()
        ),
        "",
        "| routing (2 replicas) | prefix cache hit rate | req/s |",
        "|---|---|---|",
        *(f"| {name} | {r['hit_rate']:.1%} | {r['rps']:.1f} |" for name, r in pre.items()),
    ]
    return "\n".join(rows)
