"""`shoal bench serve`: a load benchmark against any OpenAI-compatible server (shoal, vLLM, llama-server).

Modelled on vLLM's benchmarks/benchmark_serving.py (`vllm bench serve`), with its flag and result names:

- Requests: streamed `POST {base_url}/v1/completions` (`stream_options.include_usage`, temperature 0,
  `ignore_eos` by default so that outputs have the asked length). Prompts are token ids cut from real text
  (workload.TokenSource, the served model's tokenizer), with lengths drawn around `--random-input-len` /
  `--random-output-len` (uniform or normal within +-`--random-range-ratio`; ratio 0: fixed), or the
  `prompt` strings of a JSONL file (vLLM's `custom` dataset).
- Arrivals: open loop at `--request-rate` (Poisson, or gamma with vLLM's `--burstiness`, or a fixed
  interval); `inf` sends every request at once. `--max-concurrency` caps the requests in flight (with an
  infinite rate: a fixed concurrency, closed loop). As in vLLM, a request that arrives while the cap is
  reached waits for a slot, and its latencies start when it is sent.
- Per request: TTFT (the first chunk with a choice, even of empty text, as vLLM), E2E latency (`e2el`, to the end of the stream) and TPOT
  ((E2E - TTFT) / (output tokens - 1), vLLM's definition), from the client's clock.
- Per run: P50/P95/P99 and mean of each (linear interpolation, numpy's default, as vLLM), requests/s and
  input/output tokens/s over the run's duration (first request sent to last one ended), and goodput: the
  requests (and their output tokens) per second that met every target of `--goodput` (vLLM's
  "request_goodput": a request is good when its TTFT, TPOT and E2E are each within their target).
- Errors never stop the run: each failed request is counted by kind (`connect`, `timeout`, `http_<status>`,
  `stream_error`, `connection_lost`, `bad_response`) with the first message of each kind.

The client is aiohttp on one uvloop event loop, reading the stream with serve_compare's read_sse_line; it
needs neither torch nor the engine, so it runs on any box that can reach the server. aiohttp rather than
httpx (serve_compare's client): on this 2-core machine under other load, httpx's async client added up to
twice the server's own TTFT to the TTFT it measured, aiohttp much less (tests/test_stats_cli.py compares
the two within one histogram bucket).
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from shoal.bench import workload
from shoal.bench.serve_compare import (
    ServerError,
    Stream,
    StreamState,
    percentile,
    read_sse_line,
    stream_result,
)

ARRIVALS = ("poisson", "fixed")
GOODPUT_METRICS = {"ttft": "ttft", "tpot": "tpot", "e2el": "e2el", "e2e": "e2el"}  # vLLM's, and e2e
PERCENTILES = (50, 95, 99)
LATENCY_METRICS = ("ttft", "tpot", "e2el")


@dataclass
class Prompt:
    """One request to send: a text or token ids, its length in tokens where known, and max_tokens."""

    prompt: str | list[int]
    prompt_len: int | None
    output_len: int


@dataclass
class LoadSpec:
    """How to send (flag names of `vllm bench serve`); request_rate in requests/s (inf: all at once)."""

    base_url: str
    model: str
    endpoint: str = "/v1/completions"
    api_key: str | None = None
    request_rate: float = math.inf
    arrivals: str = "poisson"
    burstiness: float = 1.0
    max_concurrency: int | None = None
    request_timeout_s: float = 600.0
    ignore_eos: bool = True
    num_warmups: int = 0
    seed: int = 0
    goodput: dict[str, float] = field(default_factory=dict)  # metric -> target in ms

    def __post_init__(self) -> None:
        if self.arrivals not in ARRIVALS:
            raise ValueError(f"arrivals must be one of {ARRIVALS}, got {self.arrivals!r}")
        if not self.request_rate > 0:
            raise ValueError(f"request_rate must be > 0 (inf: all at once), got {self.request_rate}")
        if self.burstiness <= 0:
            raise ValueError(f"burstiness must be > 0, got {self.burstiness}")
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise ValueError(f"max_concurrency must be at least 1, got {self.max_concurrency}")


# ---- the workload -----------------------------------------------------------------------------------
def parse_goodput(items: list[str]) -> dict[str, float]:
    """vLLM's `--goodput ttft:500 tpot:50 e2el:2000` (milliseconds; `e2e` is taken for e2el) ->
    {"ttft": 500.0, ...}. ValueError on an unknown metric or a target that is not a positive number."""
    targets = {}
    for item in items:
        name, sep, value = item.partition(":")
        metric = GOODPUT_METRICS.get(name.strip().lower())
        if not sep or metric is None:
            raise ValueError(f"--goodput takes METRIC:MS with METRIC one of ttft, tpot, e2el; got {item!r}")
        try:
            targets[metric] = float(value)
        except ValueError:
            raise ValueError(f"--goodput {item!r}: {value!r} is not a number of milliseconds") from None
        if not targets[metric] > 0:
            raise ValueError(f"--goodput {item!r}: the target must be > 0 ms")
    return targets


def length_range(mean: int, range_ratio: float) -> tuple[int, int]:
    """vLLM's random dataset range: [mean * (1 - r), mean * (1 + r)], at least 1 token."""
    if mean < 1 or not 0 <= range_ratio < 1:
        raise ValueError(f"lengths need mean >= 1 and 0 <= range ratio < 1, got {mean} and {range_ratio}")
    return max(1, math.floor(mean * (1 - range_ratio))), max(1, math.ceil(mean * (1 + range_ratio)))


def random_prompts(
    tokenizer_dir: Path,
    num_prompts: int,
    input_len: int,
    output_len: int,
    range_ratio: float = 0.0,
    distribution: str = "uniform",
    seed: int = 0,
    text: Path = workload.DEFAULT_DATASET,
) -> list[Prompt]:
    """Token-id prompts of drawn lengths, cut from `text` tokenized by the served model's tokenizer
    (tokenizer.json in tokenizer_dir; FileNotFoundError without it). Random ids when `text` is missing."""
    from shoal.model.tokenizer import Tokenizer  # tokenizers only: no torch

    tokenizer = Tokenizer(tokenizer_dir)
    in_range, out_range = length_range(input_len, range_ratio), length_range(output_len, range_ratio)
    source = workload.TokenSource.load(tokenizer, tokenizer.vocab_size, text, num_prompts * in_range[1])
    requests = workload.build_requests(source, num_prompts, in_range, out_range, seed, distribution)
    return [Prompt(r.prompt_token_ids, len(r.prompt_token_ids), r.output_len) for r in requests]


def dataset_prompts(
    path: Path, num_prompts: int, output_len: int, range_ratio: float = 0.0, distribution: str = "uniform",
    seed: int = 0,
) -> list[Prompt]:  # fmt: skip
    """vLLM's `custom` dataset: a JSONL file whose lines hold a `prompt` string (and optionally
    `output_tokens`); taken in order, repeated if it has fewer lines than num_prompts. ValueError on a line
    without a prompt; FileNotFoundError when missing."""
    rows = []
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        row = json.loads(line)
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
            raise ValueError(f"{path}:{n}: each line must be a JSON object with a string 'prompt'")
        rows.append(row)
    if not rows:
        raise ValueError(f"{path}: no prompts")
    rng = random.Random(seed)
    out_range = length_range(output_len, range_ratio)
    prompts = []
    for i in range(num_prompts):
        row = rows[i % len(rows)]
        drawn = workload.draw_length(rng, *out_range, distribution)
        prompts.append(Prompt(row["prompt"], None, int(row.get("output_tokens") or drawn)))
    return prompts


def arrival_times(n: int, spec: LoadSpec) -> list[float]:
    """When each request arrives, in seconds from the start (the first at 0): gaps drawn from a gamma
    distribution of mean 1/rate and shape `burstiness` (1: exponential, a Poisson process; vLLM's
    get_request), or all equal to 1/rate (fixed); all 0 at an infinite rate."""
    if math.isinf(spec.request_rate):
        return [0.0] * n
    rng = random.Random(spec.seed)
    times, t = [], 0.0
    for _ in range(n):
        times.append(t)
        if spec.arrivals == "fixed":
            t += 1 / spec.request_rate
        else:
            t += rng.gammavariate(spec.burstiness, 1 / (spec.request_rate * spec.burstiness))
    return times


# ---- the client -------------------------------------------------------------------------------------
def _body(spec: LoadSpec, p: Prompt) -> dict:
    return {"model": spec.model, "prompt": p.prompt, "max_tokens": p.output_len, "temperature": 0.0,
            "ignore_eos": spec.ignore_eos, "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip


def _error_kind(e: BaseException) -> str:
    import aiohttp

    if isinstance(e, ServerError):
        return e.kind
    if isinstance(e, asyncio.TimeoutError):  # aiohttp's ServerTimeoutError is one too
        return "timeout"
    if isinstance(e, aiohttp.ClientConnectorError):
        return "connect"
    if isinstance(e, aiohttp.ServerDisconnectedError | aiohttp.ClientPayloadError | aiohttp.ClientOSError):
        return "connection_lost"
    if isinstance(e, ValueError | KeyError | TypeError | AttributeError):
        return "bad_response"  # a chunk that is not JSON, or JSON of another shape
    return type(e).__name__


async def _consume(session, url: str, body: dict, st: StreamState) -> None:
    """serve_compare.consume_stream over aiohttp: under CPU contention its client adds less to the
    latencies it measures than httpx's (measured here: client TTFT nearer the server's histograms)."""
    async with session.post(url, json=body) as resp:
        if resp.status != 200:
            detail = (await resp.text(errors="replace"))[:500]
            raise ServerError(f"http_{resp.status}", f"POST {url}: HTTP {resp.status}: {detail}")
        async for line in resp.content:
            if read_sse_line(st, line.decode().strip(), url):
                break


async def _send(client, url: str, spec: LoadSpec, p: Prompt) -> tuple[Stream, str | None]:
    """One request; never raises for a failure of the server or the network: the Stream carries the
    error kind, and the message comes back beside it."""
    st = StreamState(time.perf_counter())
    try:
        await asyncio.wait_for(_consume(client, url, _body(spec, p), st), spec.request_timeout_s)
        error = message = None
    except Exception as e:  # noqa: BLE001 - every failure is a counted error, never a crash
        error, message = _error_kind(e), f"{type(e).__name__}: {e}"[:300]
    stream = stream_result(st, time.perf_counter(), p.output_len)
    stream.error = error
    if st.first_chunk is not None:  # vLLM's TTFT: the first chunk with a choice, even an empty text
        stream.ttft_s = st.first_chunk - st.t0
    if error is None and stream.ttft_s is None:
        stream.error, message = "no_output", "the stream ended without a chunk"
    return stream, message


async def _run(spec: LoadSpec, prompts: list[Prompt], warmups: list[Prompt]) -> dict:
    import aiohttp

    slots = spec.max_concurrency or len(prompts) or 1
    headers = {"Authorization": f"Bearer {spec.api_key}"} if spec.api_key else {}
    url = spec.base_url.rstrip("/") + spec.endpoint
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=spec.request_timeout_s)
    connector = aiohttp.TCPConnector(limit=slots + 4)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout, headers=headers) as client:
        warm = [await _send(client, url, spec, p) for p in warmups]
        gate = asyncio.Semaphore(slots)

        async def one(at: float, p: Prompt) -> tuple[Stream, str | None]:
            await asyncio.sleep(max(0.0, t0 + at - time.perf_counter()))
            async with gate:
                return await _send(client, url, spec, p)

        t0 = time.perf_counter()
        done = await asyncio.gather(*(one(at, p) for at, p in zip(arrival_times(len(prompts), spec), prompts,
                                                                   strict=True)))  # fmt: skip
        duration = time.perf_counter() - t0
    return {
        "streams": done,
        "duration_s": duration,
        "warmup_errors": sum(s.error is not None for s, _ in warm),
    }


def run_bench_serve(spec: LoadSpec, prompts: list[Prompt], log=print) -> dict:
    """Send the first spec.num_warmups prompts one by one (not measured), then the others as `spec` says;
    the result dict (see metrics()) plus the config."""
    import uvloop  # the client's event loop: less CPU per chunk than asyncio's, on a machine the server shares

    warmups, prompts = prompts[: spec.num_warmups], prompts[spec.num_warmups :]
    rate = "inf" if math.isinf(spec.request_rate) else f"{spec.request_rate:g}/s ({spec.arrivals})"
    log(f"shoal bench serve: {len(prompts)} requests to {spec.base_url}{spec.endpoint}, rate {rate}, "
        f"max concurrency {spec.max_concurrency or 'none'}, {spec.num_warmups} warm-up")  # fmt: skip
    load_before = workload.load_average()
    run = uvloop.run(_run(spec, prompts, warmups))
    result = metrics([s for s, _ in run["streams"]], run["duration_s"], spec.goodput)
    result["error_examples"] = {}
    for stream, message in run["streams"]:
        if stream.error:
            result["error_examples"].setdefault(stream.error, message)
    config = asdict(spec)
    config.pop("api_key")
    config["request_rate"] = "inf" if math.isinf(spec.request_rate) else spec.request_rate
    config["num_prompts"] = len(prompts)
    cpu, _ = workload.cpu_model()
    return {"benchmark": "bench_serve", "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
            "config": config, "warmup_errors": run["warmup_errors"], **result,
            "client_machine": {"cpu": cpu, "load_average_before": load_before,
                               "load_average_after": workload.load_average()}}  # fmt: skip


# ---- the numbers ------------------------------------------------------------------------------------
def request_latencies(s: Stream) -> dict[str, float]:
    """A successful request's TTFT, TPOT and E2E latency in milliseconds (TPOT 0 for one output token)."""
    tpot = (s.latency_s - s.ttft_s) / (s.output_tokens - 1) if s.output_tokens > 1 else 0.0
    return {"ttft": s.ttft_s * 1e3, "tpot": tpot * 1e3, "e2el": s.latency_s * 1e3}


def metrics(streams: list[Stream], duration_s: float, goodput: dict[str, float]) -> dict:
    """vLLM's result fields: completed/failed counts, errors by kind, token totals, throughputs per second
    of the duration, goodput under the `goodput` targets (ms), and mean/P50/P95/P99 of each latency (ms)."""
    ok = [s for s in streams if s.error is None]
    lat = [request_latencies(s) for s in ok]
    good = [s for s, x in zip(ok, lat, strict=True) if all(x[m] <= t for m, t in goodput.items())]
    errors: dict[str, int] = {}
    for s in streams:
        if s.error:
            errors[s.error] = errors.get(s.error, 0) + 1
    per_s = (lambda x: x / duration_s) if duration_s > 0 else (lambda x: 0.0)
    input_tokens = sum(s.prompt_tokens or 0 for s in ok)
    output_tokens = sum(s.output_tokens for s in ok)
    out = {
        "duration_s": duration_s,
        "completed": len(ok),
        "failed": len(streams) - len(ok),
        "errors": dict(sorted(errors.items())),
        "total_input_tokens": input_tokens,
        "total_output_tokens": output_tokens,
        "request_throughput": per_s(len(ok)),
        "input_throughput": per_s(input_tokens),
        "output_throughput": per_s(output_tokens),
        "total_token_throughput": per_s(input_tokens + output_tokens),
        "goodput_targets_ms": dict(goodput),
        "request_goodput": per_s(len(good)) if goodput else None,
        "goodput_output_throughput": per_s(sum(s.output_tokens for s in good)) if goodput else None,
    }
    for m in LATENCY_METRICS:
        values = [x[m] for x in lat]
        out[f"mean_{m}_ms"] = statistics.fmean(values) if values else None
        for q in PERCENTILES:
            out[f"p{q}_{m}_ms"] = percentile(values, q)
    return out
