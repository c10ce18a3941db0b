"""`shoal bench gateway`: what the gateway costs, and what prefix-aware routing buys, in one run.

1. Overhead: one `shoal serve` backend, one gateway in front of it. Latency: sequential requests
   (`max_tokens` 1, so the proxy's share is as large as it can be), alternating direct and through the
   gateway, P50/P99 of each and their difference. Throughput: `concurrency` requests at a time, direct and
   gateway blocks alternating (ABBA), requests/s and the gateway's loss. Goal: < 2 ms P50 added, < 5% loss.
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
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import httpx
import yaml

from shoal.bench.serve_compare import Server, free_port, machine, percentile, shoal_server
from shoal.metric_names import PREFIX_CACHE_HITS, PREFIX_CACHE_QUERIES

WORDS = "river lantern quiet orchard copper meadow harbor velvet summit ember willow granite".split()


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


async def _rate(url: str, bodies: list[dict], concurrency: int) -> float:
    """Requests/s for `bodies` sent `concurrency` at a time."""
    limit = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(timeout=120, trust_env=False) as client:

        async def one(body: dict) -> None:
            async with limit:
                await _timed(client, url, body)

        start = time.perf_counter()
        await asyncio.gather(*(one(b) for b in bodies))
        return len(bodies) / (time.perf_counter() - start)


async def _throughput(direct: str, gateway: str, n: int, concurrency: int) -> dict:
    rates: dict[str, list[float]] = {"direct": [], "gateway": []}
    for side in ("direct", "gateway", "gateway", "direct"):  # ABBA: drift on the machine hits both sides
        bodies = [_body(f"Once upon a time {i % 7}", 1) for i in range(n)]
        rates[side].append(await _rate(direct if side == "direct" else gateway, bodies, concurrency))
    out = {side: sum(r) / len(r) for side, r in rates.items()}
    return {
        "direct_rps": out["direct"],
        "gateway_rps": out["gateway"],
        "loss": 1 - out["gateway"] / out["direct"],
    }


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
    log=print,
) -> dict:
    load_before = os.getloadavg()
    log_dir = Path(tempfile.mkdtemp(prefix="shoal-bench-gateway-"))
    dirs = [log_dir / f"backend{i}" for i in range(2)]
    for d in dirs:
        d.mkdir()
    backends = [shoal_server(model, dtype, threads, kv_cache_memory, d, "bench") for d in dirs]
    servers: list[Server] = []
    try:
        for b in backends:
            b.start()
            servers.append(b)
        urls = [b.url for b in backends]
        gateways = {
            "overhead": gateway_server(_route(urls[:1]), log_dir, "gw-overhead"),
            "prefix": gateway_server(_route(urls, "prefix"), log_dir, "gw-prefix"),
            "round_robin": gateway_server(_route(urls, "round_robin"), log_dir, "gw-round-robin"),
        }
        for b in backends:
            b.wait_ready()
        for g in gateways.values():
            g.start()
            servers.append(g)
            g.wait_ready()
        log("overhead: latency (sequential) ...")
        latency = asyncio.run(_latency(urls[0], gateways["overhead"].url, latency_requests))
        log("overhead: throughput ...")
        throughput = asyncio.run(
            _throughput(urls[0], gateways["overhead"].url, throughput_requests, concurrency)
        )
        prefix = {}
        for seed, routing in enumerate(("prefix", "round_robin")):
            log(f"prefix workload: {routing} ...")
            bodies = _prefix_workload(seed, groups, per_group)
            prefix[routing] = asyncio.run(_prefix_run(gateways[routing].url, urls, bodies, concurrency))
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
        f"| latency P50 (ms) | {lat['direct']['p50_ms']:.2f} | {lat['gateway']['p50_ms']:.2f} | +{lat['added_p50_ms']:.2f} |",
        f"| latency P99 (ms) | {lat['direct']['p99_ms']:.2f} | {lat['gateway']['p99_ms']:.2f} | +{lat['added_p99_ms']:.2f} |",
        f"| throughput (req/s) | {thr['direct_rps']:.1f} | {thr['gateway_rps']:.1f} | {-thr['loss'] * 100:+.1f}% |",
        "",
        "| routing (2 replicas) | prefix cache hit rate | req/s |",
        "|---|---|---|",
        *(f"| {name} | {r['hit_rate']:.1%} | {r['rps']:.1f} |" for name, r in pre.items()),
    ]
    return "\n".join(rows)
