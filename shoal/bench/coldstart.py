"""`shoal bench coldstart`: time from process start to ready (`/ready` 200), per way of getting the model.

Variants, each started `repeats` times in turn (ABC ABC ..., so that a drift in machine load spreads over
all of them) and reported by their median:
- local: `--model DIR`, the model served in place (the baseline);
- cold cache: `--model SOURCE` with an empty cache (SHOAL_MODEL_CACHE): copy, checksums, then load;
- warm cache: `--model SOURCE` again with the cache the cold start filled: checksums, then load.
SOURCE defaults to the model directory as a `file://` share (shoal/fleet/storage.py); pass an `s3://` URL
(with its AWS_* environment) to time a real bucket. The page cache is not dropped (that needs root): a
"cold" copy reads a source the OS may hold in memory, as an NFS client with a warm cache would.

Then `--load-format mmap` against the default, one server each (engine in a thread, so that the server's
/proc/PID/status is the engine's; a 64 MiB KV cache): time to ready, resident memory (RssAnon, RssFile) after load and after
the first request, first-request latency (`max_tokens` 1), and steady decode speed (one request of
`decode_tokens` tokens, EOS ignored: tokens/s after the first).
"""

from __future__ import annotations

import os
import re
import statistics
import tempfile
import time
from pathlib import Path

import httpx

from shoal.bench.serve_compare import machine, shoal_server

VARIANTS = ("local", "cold cache", "warm cache")
LOAD_FORMATS = ("auto", "mmap")


def run_coldstart(
    model: str,
    source: str | None = None,
    dtype: str = "float32",
    threads: int = 1,
    repeats: int = 3,
    extra: tuple[str, ...] = (),
    decode_tokens: int = 64,
    log=print,
) -> dict:
    """Median time to ready of each variant, with every run's figure kept."""
    source = source or Path(model).resolve().as_uri()
    runs: dict[str, list[float]] = {v: [] for v in VARIANTS}
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="shoal-coldstart-") as tmp:
        for i in range(repeats):
            cache = Path(tmp) / f"cache-{i}"
            for variant in VARIANTS:
                target = model if variant == "local" else source
                runs[variant].append(_time_to_ready(target, dtype, threads, cache, Path(tmp), extra))
                log(f"run {i + 1}/{repeats} {variant}: {runs[variant][-1]:.2f} s")
        load_formats = {
            fmt: _load_format_run(model, dtype, threads, Path(tmp), fmt, decode_tokens)
            for fmt in LOAD_FORMATS
        }
        log(f"load formats: {load_formats}")
    return {
        "model": model,
        "source": source,
        "dtype": dtype,
        "flags": list(extra),
        "runs_s": runs,
        "median_s": {v: statistics.median(t) for v, t in runs.items()},
        "load_formats": load_formats,
        "machine": machine(threads),
        "load_average_before_after": [load_before, os.getloadavg()[0]],
    }


def _time_to_ready(target: str, dtype: str, threads: int, cache: Path, log_dir: Path, extra) -> float:
    server = shoal_server(
        target, dtype, threads, None, log_dir, "bench", extra, extra_env={"SHOAL_MODEL_CACHE": str(cache)}
    )
    server.start()
    try:
        server.wait_ready()
    finally:
        server.stop()
    return server.ready_s


def _load_format_run(
    model: str, dtype: str, threads: int, log_dir: Path, fmt: str, decode_tokens: int
) -> dict:
    """One server with --load-format fmt: ready time, memory, first request, steady decode."""
    dtype = "auto" if fmt == "mmap" else dtype  # mmap serves the checkpoint's dtype
    extra = ("--load-format", fmt, "--engine-mode", "thread")
    # A fixed KV cache: the default (a share of free RAM, zero-filled, anonymous) would hide the weights.
    server = shoal_server(model, dtype, threads, 64 << 20, log_dir, "bench", extra, log_name=f"load-{fmt}")
    server.start()
    try:
        server.wait_ready()
        out = {"dtype": dtype, "ready_s": server.ready_s, "after_load_mib": _rss_mib(server.proc.pid)}
        out["first_request_s"], _ = _complete(server.url, 1)
        out["after_first_request_mib"] = _rss_mib(server.proc.pid)
        total_s, first_s = _complete(server.url, decode_tokens)
        out["decode_tok_s"] = (decode_tokens - 1) / (total_s - first_s)
    finally:
        server.stop()
    return out


def _complete(url: str, max_tokens: int) -> tuple[float, float]:
    """Seconds to the whole answer and to its first token (streamed)."""
    body = {"model": "bench", "prompt": "Once upon a time, in a small village,", "max_tokens": max_tokens,
            "temperature": 0, "ignore_eos": True, "stream": True}  # fmt: skip
    start, first = time.perf_counter(), None
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=300, trust_env=False) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if first is None and line.startswith("data: {"):
                first = time.perf_counter() - start
    return time.perf_counter() - start, first or 0.0


def _rss_mib(pid: int) -> dict:
    """RssAnon and RssFile (proc(5)) in MiB: mapped weights count in RssFile, copies in RssAnon."""
    status = Path(f"/proc/{pid}/status").read_text()
    return {k: int(re.search(rf"{k}:\s+(\d+) kB", status).group(1)) / 1024 for k in ("RssAnon", "RssFile")}


def markdown(result: dict) -> str:
    """The docs/benchmarks.md table: one row per variant."""
    m = result["machine"]
    lines = [
        f"`{result['model']}` ({result['dtype']}), source `{result['source']}`, flags {result['flags'] or 'none'}; "
        f"{m['cpu']}, {m['cpu_cores']} cores, {m['threads_per_side']} thread(s); load average "
        f"{result['load_average_before_after'][0]:.1f} -> {result['load_average_before_after'][1]:.1f}",
        "",
        "| start | time to ready, median (s) | runs (s) |",
        "|---|---:|---|",
    ]
    for v in VARIANTS:
        runs = ", ".join(f"{t:.2f}" for t in result["runs_s"][v])
        lines.append(f"| {v} | {result['median_s'][v]:.2f} | {runs} |")
    lines += [
        "",
        "| --load-format | dtype | ready (s) | RssAnon / RssFile after load (MiB) | after 1st request (MiB) "
        "| 1st request (s) | decode (tok/s) |",
        "|---|---|---:|---|---|---:|---:|",
    ]
    for fmt, r in result["load_formats"].items():
        load, first = r["after_load_mib"], r["after_first_request_mib"]
        lines.append(
            f"| {fmt} | {r['dtype']} | {r['ready_s']:.2f} | {load['RssAnon']:.0f} / {load['RssFile']:.0f} "
            f"| {first['RssAnon']:.0f} / {first['RssFile']:.0f} | {r['first_request_s']:.3f} "
            f"| {r['decode_tok_s']:.1f} |"
        )
    return "\n".join(lines)
