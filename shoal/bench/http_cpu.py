"""CPU per output token of the HTTP side: `shoal serve`'s HTTP process, its engine core and the client.

Throughput on a shared 2-core machine moves by tens of percent with what else runs; CPU time spent for a
fixed workload hardly does. Every CPU millisecond the HTTP process or the benchmark client spends comes
off the two cores the engine's OpenMP threads need, so this is the load-independent cost of serving over
HTTP (issue 17: HTTP keeps >= 0.95x of in-process speed single stream, >= 0.9x at 32 and 64 streams).

One `shoal serve` is started (engine core in its own process, the default); each round runs every load
with every client, one at a time, each run on prompts of its own (no run is served from a prefix another
one cached); the first round only warms up. For each run it
reads, from /proc (utime + stime, all threads):

- `http_ms_per_token`: the server's own process (FastAPI, tokenization, detokenization, SSE);
- `core_ms_per_token`: its children (the engine core: scheduling and the model);
- `client_ms_per_token`: this process during the load (serve_compare's asyncio SSE client);

each in CPU milliseconds per output token, with the median over rounds in the summary. The
`requests-N` load (`sequential`) is the per-request cost instead: N requests of one output token, one
after another, not streamed, from a blocking `http.client` connection (so per token is per request). An idle server
still spends some CPU per second (uvicorn's ticks, the engine core's loop), which a slow run (a loaded
machine) divides among fewer tokens; so the server's idle CPU rate is measured once after the warm-up
(`IDLE_S` seconds without requests) and `http_net_ms_per_token` / `core_net_ms_per_token` are the same
figures less that rate times the run's wall time: the part that scales with tokens.
"""

from __future__ import annotations

import http.client
import json
import os
import random
import statistics
import tempfile
import time
from functools import partial
from pathlib import Path
from urllib.parse import urlsplit

from shoal.bench import workload
from shoal.bench.serve_compare import (
    CLIENTS,
    REQUEST_TIMEOUT_S,
    CpuMeter,
    Server,
    ServerError,
    Stream,
    _distinct_prompts,
    http_run,
    machine,
    pick_dtype,
    shoal_server,
    source_state,
    summarize,
)
from shoal.bench.workload import Request

SEQUENTIAL = "requests"  # the load name's prefix: requests-N
SEQUENTIAL_CLIENT = "http.client"
SETTLE_S = 0.3  # late work of a run (the last chunks' bookkeeping, the access log) counts in it
IDLE_S = 15.0  # long enough to see a few 10 ms ticks of an idle server (about 1-2 ms per second)


def run_http_cpu(
    model: str | None = None,
    dtype: str = "auto",
    threads: int | None = None,
    rounds: int = 3,
    concurrency: tuple[int, ...] = (64,),
    single_output_len: int = 128,
    stream_output_len: int = 64,
    prompt_len: int = 32,
    clients: tuple[str, ...] = CLIENTS,
    sequential: int = 0,
    seed: int = 0,
    dataset: Path | None = workload.DEFAULT_DATASET,
    serve_args: tuple[str, ...] = (),
    log_dir: Path | None = None,
    log=print,
) -> dict:
    """Start `shoal serve`, run one warm-up and `rounds` measured rounds, return the result (JSON-able).

    Loads: a single stream of `single_output_len` tokens (skipped when 0), for each n in `concurrency`, n
    streams of `stream_output_len` tokens, and `sequential` requests of one token one after another
    (skipped when 0); prompts of `prompt_len` tokens of real text. Raises ValueError on a bad argument or an
    unknown client."""
    if rounds < 1 or prompt_len < 1 or sequential < 0 or any(n < 1 for n in concurrency):
        raise ValueError("rounds and prompt_len must be >= 1, every concurrency too; sequential >= 0")
    unknown = [c for c in clients if c not in CLIENTS]
    if unknown or not clients:
        raise ValueError(f"clients must be among {', '.join(CLIENTS)}; got {', '.join(clients) or 'none'}")
    model = model or workload.default_model()
    dtype = pick_dtype(dtype)
    threads = threads or len(os.sched_getaffinity(0))
    log_dir = Path(log_dir or tempfile.mkdtemp(prefix="shoal-http-cpu-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    loads = _loads(
        model,
        dataset,
        (rounds + 1) * len(clients),
        concurrency,
        single_output_len,
        stream_output_len,
        prompt_len,
        seed,
        sequential,
    )
    server = shoal_server(model, dtype, threads, None, log_dir, "shoal", tuple(serve_args))
    log(f"starting: {' '.join(server.cmd)}")
    server.start()
    try:
        server.wait_ready()
        runs = _measure(server, loads, clients, log)
    finally:
        server.stop()
    return {
        "model": model,
        "dtype": dtype,
        "threads": threads,
        "rounds": rounds,
        "command": " ".join(server.cmd),
        "runs": runs,
        "summary": _summary(runs),
        "machine": machine(threads),
        "source": source_state(),
        "load_average": os.getloadavg(),
    }


def _loads(
    model: str,
    dataset: Path | None,
    rounds: int,
    concurrency: tuple[int, ...],
    single_output_len: int,
    stream_output_len: int,
    prompt_len: int,
    seed: int,
    sequential: int = 0,
) -> list[dict[str, list[Request]]]:
    """Per round: load name -> requests, every prompt distinct from all others (no shared first block)."""
    from shoal.model.tokenizer import Tokenizer

    tokenizer = Tokenizer(Path(model))
    per_round = (1 if single_output_len > 0 else 0) + sum(concurrency) + sequential
    source = workload.TokenSource.load(
        tokenizer, tokenizer.vocab_size, dataset, rounds * per_round * prompt_len * 2
    )
    rng, used = random.Random(seed), set()
    out = []
    for _ in range(rounds):
        loads = {}
        if single_output_len > 0:
            (p,) = _distinct_prompts(source, rng, 1, prompt_len, used)
            loads["single"] = [Request(p, single_output_len)]
        for n in concurrency:
            ps = _distinct_prompts(source, rng, n, prompt_len, used)
            loads[f"streams-{n}"] = [Request(p, stream_output_len) for p in ps]
        if sequential:
            ps = _distinct_prompts(source, rng, sequential, prompt_len, used)
            loads[f"{SEQUENTIAL}-{sequential}"] = [Request(p, 1) for p in ps]
        out.append(loads)
    return out


def sequential_run(base_url: str, model_name: str, requests: list[Request]) -> dict:
    """Each request alone, one after another, not streamed (greedy, EOS ignored), on one kept-alive
    `http.client` connection: {"streams": [Stream], "wall_s"}, as http_run returns (TTFT: the whole
    answer). Raises ServerError on an error answer."""
    url = urlsplit(base_url)
    connection = http.client.HTTPConnection(url.hostname, url.port, timeout=REQUEST_TIMEOUT_S)
    streams = []
    start = time.perf_counter()
    try:
        for r in requests:
            body = {"model": model_name, "prompt": r.prompt_token_ids, "max_tokens": r.output_len}
            body |= {"temperature": 0, "ignore_eos": True}
            sent = time.perf_counter()
            connection.request(
                "POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"}
            )
            response = connection.getresponse()
            answer = response.read()
            if response.status != 200:
                raise ServerError(f"http_{response.status}", answer.decode(errors="replace")[:500])
            took = time.perf_counter() - sent
            tokens = json.loads(answer)["usage"]["completion_tokens"]
            streams.append(Stream(took, took, tokens, r.output_len, len(r.prompt_token_ids)))
    finally:
        connection.close()
    return {"streams": streams, "wall_s": time.perf_counter() - start}


def server_cpu_s(server: Server) -> tuple[float, float]:
    """CPU seconds so far of the server's own process and of its children (the engine core), all threads."""
    pid = server.proc.pid
    try:
        children = [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        children = []
    tick = os.sysconf("SC_CLK_TCK")
    return CpuMeter._proc_busy(pid) / tick, sum(CpuMeter._proc_busy(c) for c in children) / tick


def idle_rate(server: Server, seconds: float | None = None) -> tuple[float, float]:
    """CPU seconds per second of the idle server's own process and of its engine core, over `seconds`
    (IDLE_S when None, read at the call so that a caller may shorten it)."""
    (http0, core0), t0 = server_cpu_s(server), time.perf_counter()
    time.sleep(IDLE_S if seconds is None else seconds)
    (http1, core1), t1 = server_cpu_s(server), time.perf_counter()
    return (http1 - http0) / (t1 - t0), (core1 - core0) / (t1 - t0)


def _measure(
    server: Server, loads: list[dict[str, list[Request]]], clients: tuple[str, ...], log
) -> list[dict]:
    runs = []
    idle = (0.0, 0.0)
    for r in range(len(loads) // len(clients)):
        if r == 1:
            idle = idle_rate(server)
            log(
                f"idle: HTTP process {idle[0] * 1000:.1f}, engine core {idle[1] * 1000:.1f} CPU ms per second"
            )
        for name in loads[0]:
            sequential = name.startswith(SEQUENTIAL)
            for c, client in enumerate((SEQUENTIAL_CLIENT,) if sequential else clients):
                requests = loads[r * len(clients) + c][name]  # prompts of its own: no prefix-cache hits
                (http0, core0), client0 = server_cpu_s(server), time.process_time()
                run = sequential_run if sequential else partial(http_run, client=client)
                stats = summarize(**run(server.url, "shoal", requests))
                client_s = time.process_time() - client0
                time.sleep(SETTLE_S)
                http1, core1 = server_cpu_s(server)
                if r == 0:
                    continue  # warm-up
                tokens = max(stats["output_tokens"], 1)
                row = {
                    "round": r,
                    "load": name,
                    "client": client,
                    "output_tokens": stats["output_tokens"],
                    "output_tokens_per_s": stats["output_tokens_per_s"],
                    "http_ms_per_token": 1000 * (http1 - http0) / tokens,
                    "core_ms_per_token": 1000 * (core1 - core0) / tokens,
                    "client_ms_per_token": 1000 * client_s / tokens,
                    "wall_s": stats["wall_s"],
                    "idle_cpu_per_s": {"http": idle[0], "core": idle[1]},
                }
                idle_ms = 1000 * stats["wall_s"] / tokens
                row["http_net_ms_per_token"] = row["http_ms_per_token"] - idle[0] * idle_ms
                row["core_net_ms_per_token"] = row["core_ms_per_token"] - idle[1] * idle_ms
                runs.append(row)
                log(
                    f"round {r} {name} {client}: HTTP {row['http_ms_per_token']:.3f} (net of idle "
                    f"{row['http_net_ms_per_token']:.3f}), core "
                    f"{row['core_ms_per_token']:.3f}, client {row['client_ms_per_token']:.3f} CPU ms/token"
                )
    return runs


def _summary(runs: list[dict]) -> list[dict]:
    """The median over rounds of each (load, client)."""
    keys = (
        "http_ms_per_token",
        "http_net_ms_per_token",
        "core_ms_per_token",
        "core_net_ms_per_token",
        "client_ms_per_token",
        "output_tokens_per_s",
    )
    groups: dict[tuple[str, str], list[dict]] = {}
    for row in runs:
        groups.setdefault((row["load"], row["client"]), []).append(row)
    return [
        {"load": load, "client": client, **{k: statistics.median(r[k] for r in rows) for k in keys}}
        for (load, client), rows in groups.items()
    ]


def markdown(result: dict) -> str:
    lines = [
        "| load | client | HTTP process (net of idle) | engine core (net of idle) | client | tokens/s |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for s in result["summary"]:
        lines.append(
            f"| {s['load']} | {s['client']} | {s['http_ms_per_token']:.3f} ({s['http_net_ms_per_token']:.3f}) "
            f"| {s['core_ms_per_token']:.2f} ({s['core_net_ms_per_token']:.2f}) | {s['client_ms_per_token']:.3f} "
            f"| {s['output_tokens_per_s']:.1f} |"
        )
    lines.append("")
    lines.append("CPU milliseconds per output token, median over rounds.")
    return "\n".join(lines)
