"""What observability costs: `shoal serve` throughput with metrics off and with tracing on, against the
default (metrics on, tracing off), in one run on one machine (issue 19; target: under 3% loss each).

The variants, each a `shoal serve` subprocess of its own, started together and loaded one at a time:

- `baseline`: the defaults: Prometheus metrics on, tracing off;
- `metrics_off`: `--disable-log-stats` (vLLM's flag; skipped, with the reason, where this checkout's
  `shoal serve` does not have it yet);
- `tracing_on`: `--otlp-traces-endpoint` to an OTLP/HTTP receiver on this machine (shoal/bench/otlp_sink.py,
  a process of its own, as a collector sidecar would be), so each request pays for its spans and their
  batch export (protobuf, HTTP POST), and the receiver's CPU comes off the same cores.

The load: `concurrency` streamed completions at once (greedy, EOS ignored, `prompt_len` tokens of real text
each, `output_len` tokens out), through serve_compare's HTTP client. Each round runs it once per variant,
in a rotated order, on prompts fresh to that round (no variant's prefix cache gets work the others did
not); the first round only warms up. A variant's loss is 1 - the median over rounds of its throughput
over the baseline's in the same round: pairing within a round cancels most of the drift of a shared
machine. Each side's output tokens/s is all output tokens over the wall time of the round's load.

Throughput on a shared machine moves by tens of percent from one run to the next, so each run also
records the CPU time the server (both its processes) used for it, per 1k output tokens: the cost of a
feature in CPU, which hardly depends on what else runs. The reading waits `settle_s` after the load, so
that work finishing after the last token (a batch of spans exported) counts in its own run.
"""

from __future__ import annotations

import inspect
import os
import random
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

from shoal.bench import workload
from shoal.bench.serve_compare import (
    CpuMeter,
    Server,
    _distinct_prompts,
    http_run,
    machine,
    percentile,
    pick_dtype,
    shoal_server,
    source_state,
    summarize,
)
from shoal.bench.workload import Request

VARIANTS = ("baseline", "metrics_off", "tracing_on")
TARGET_LOSS = 0.03
# Export every 200 ms instead of the SDK's 5 s (OTEL_BSP_SCHEDULE_DELAY): a run's spans are then exported
# (and received, in this process) during that run, not during the next variant's.
VARIANT_ENV = {"tracing_on": {"OTEL_BSP_SCHEDULE_DELAY": "200"}}
SETTLE_S = 0.4


def variant_flags(variant: str, otlp_endpoint: str) -> tuple[str, ...] | None:
    """The `shoal serve` flags of a variant; None where this checkout cannot run it."""
    if variant == "metrics_off":
        from shoal.cli import serve

        has_flag = "disable_log_stats" in inspect.signature(serve).parameters
        return ("--disable-log-stats",) if has_flag else None
    if variant == "tracing_on":
        return ("--otlp-traces-endpoint", otlp_endpoint)
    return ()


def run_overhead(
    model: str | None = None,
    dtype: str = "auto",
    threads: int | None = None,
    rounds: int = 8,
    concurrency: int = 16,
    prompt_len: int = 32,
    output_len: int = 32,
    seed: int = 0,
    dataset: Path | None = workload.DEFAULT_DATASET,
    log_dir: Path | None = None,
    log=print,
) -> dict:
    """Start the variants, run `rounds` measured rounds (plus one warm-up), return the result."""
    if rounds < 1 or concurrency < 1 or prompt_len < 1 or output_len < 1:
        raise ValueError("rounds, concurrency, prompt_len and output_len must be >= 1")
    model = model or workload.default_model()
    dtype = pick_dtype(dtype)
    threads = threads or len(os.sched_getaffinity(0))
    log_dir = Path(log_dir or tempfile.mkdtemp(prefix="shoal-overhead-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    rounds_of_prompts = _prompts(model, dataset, rounds + 1, concurrency, prompt_len, seed)
    with otlp_receiver() as sink:
        flags = {v: variant_flags(v, sink["endpoint"]) for v in VARIANTS}
        skipped = {v: "`shoal serve` has no --disable-log-stats yet" for v, f in flags.items() if f is None}
        servers = {
            v: shoal_server(
                model, dtype, threads, None, log_dir, v, f, log_name=v, extra_env=VARIANT_ENV.get(v)
            )
            for v, f in flags.items()
            if f is not None
        }
        try:
            runs = _measure(servers, rounds_of_prompts, output_len, log)
        finally:
            for server in servers.values():  # SIGTERM all first: each drains (a few seconds) in parallel
                if server.proc is not None and server.proc.poll() is None:
                    server.proc.terminate()
            for server in servers.values():
                server.stop()
    result = {
        "model": model,
        "dtype": dtype,
        "threads_per_server": threads,
        "load": f"{concurrency} streams at once, prompt {prompt_len}, {output_len} tokens each",
        "rounds": rounds,
        "commands": {v: " ".join(s.cmd) for v, s in servers.items()},
        "skipped": skipped,
        "spans_received": sink.get("spans"),
        "runs": runs,
        "machine": machine(threads),
        "source": source_state(),
    }
    result["summary"] = _summary(runs, [v for v in VARIANTS if v in servers])
    return result


@contextmanager
def otlp_receiver():
    """shoal/bench/otlp_sink.py in a process of its own: yields {"endpoint"}, then "spans" once stopped."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "shoal.bench.otlp_sink"],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(workload.REPO)},
    )
    info = {"endpoint": proc.stdout.readline().strip()}
    try:
        yield info
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=15)
        info["spans"] = int(out.split()[-1]) if out.split() else None


def _prompts(
    model: str, dataset: Path | None, rounds: int, concurrency: int, prompt_len: int, seed: int
) -> list[list[list[int]]]:
    """`concurrency` prompts of real text per round, none sharing a first KV block with another."""
    from shoal.model.tokenizer import Tokenizer

    tokenizer = Tokenizer(Path(model))
    need = rounds * concurrency * prompt_len * 2
    source = workload.TokenSource.load(tokenizer, tokenizer.vocab_size, dataset, need)
    rng, used = random.Random(seed), set()
    return [_distinct_prompts(source, rng, concurrency, prompt_len, used) for _ in range(rounds)]


def _measure(
    servers: dict[str, Server], rounds_of_prompts: list[list[list[int]]], output_len: int, log
) -> list[dict]:
    """One row per (round, variant); round 0 is the warm-up and is not returned."""
    for server in servers.values():
        log(f"starting {server.log_path.stem}: {' '.join(server.cmd)}")
        server.start()
    for server in servers.values():
        server.wait_ready()
    names = list(servers)
    runs = []
    for r, prompts in enumerate(rounds_of_prompts):
        requests = [Request(p, output_len) for p in prompts]
        order = names[r % len(names) :] + names[: r % len(names)]
        for variant in order:
            cpu_before = _cpu_s(servers[variant])
            stats = summarize(**http_run(servers[variant].url, variant, requests))
            time.sleep(SETTLE_S)
            cpu_ms = 1000 * (_cpu_s(servers[variant]) - cpu_before)
            if r == 0:
                continue
            stats["server_cpu_ms_per_1k_tokens"] = 1000 * cpu_ms / max(stats["output_tokens"], 1)
            runs.append({"round": r, "variant": variant, **stats})
            log(
                f"round {r} {variant}: {stats['output_tokens_per_s']:.1f} output tokens/s, "
                f"{stats['server_cpu_ms_per_1k_tokens']:.0f} server CPU ms per 1k tokens"
            )
    return runs


def _cpu_s(server: Server) -> float:
    """CPU seconds used so far by the server: its process and its children (the engine core), all threads.
    Unlike throughput, this hardly moves with what else runs on a shared machine."""
    pid = server.proc.pid
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        children = []
    ticks = sum(CpuMeter._proc_busy(p) for p in [pid, *map(int, children)])
    return ticks / os.sysconf("SC_CLK_TCK")


def _summary(runs: list[dict], variants: list[str]) -> dict:
    """Per variant: median tokens/s, spread, and the median over rounds of its ratio to the baseline."""
    by = {(row["round"], row["variant"]): row for row in runs}
    rounds = sorted({row["round"] for row in runs})
    out = {}
    for variant in variants:
        tps = [by[(r, variant)]["output_tokens_per_s"] for r in rounds]
        ratios = [tps[i] / by[(r, "baseline")]["output_tokens_per_s"] for i, r in enumerate(rounds)]
        cpu = [by[(r, variant)]["server_cpu_ms_per_1k_tokens"] for r in rounds]
        cpu_base = sum(by[(r, "baseline")]["server_cpu_ms_per_1k_tokens"] for r in rounds)
        ratio = percentile(ratios, 50)
        out[variant] = {
            "output_tokens_per_s_median": percentile(tps, 50),
            "output_tokens_per_s_min": min(tps),
            "output_tokens_per_s_max": max(tps),
            "ratio_to_baseline_median": ratio,
            "ratio_to_baseline_p25": percentile(ratios, 25),
            "ratio_to_baseline_p75": percentile(ratios, 75),
            "loss": 1 - ratio,
            "within_target": variant == "baseline" or 1 - ratio < TARGET_LOSS,
            "server_cpu_ms_per_1k_tokens_median": percentile(cpu, 50),
            # total server CPU over all rounds against the baseline's: the cost in CPU, not in time
            "server_cpu_to_baseline": sum(cpu) / cpu_base if cpu_base else None,
        }
    return out


def markdown(result: dict) -> str:
    """The table for docs/benchmarks.md."""
    m = result["machine"]
    lines = [
        f"{result['model']} ({result['dtype']}), {result['threads_per_server']} threads per server, "
        f"{result['load']}, {result['rounds']} rounds after a warm-up; {m['cpu']} "
        f"({m['cpu_cores_usable']} usable cores; flags {', '.join(m['cpu_flags'])}).",
        "",
        "| variant | output tok/s, median (min-max) | throughput vs baseline: median of per-round "
        "ratios (P25-P75) | loss | server CPU ms per 1k output tokens, median | server CPU vs baseline |",
        "|---|---|---|---|---|---|",
    ]
    for variant, s in result["summary"].items():
        lines.append(
            f"| {variant} | {s['output_tokens_per_s_median']:.0f} ({s['output_tokens_per_s_min']:.0f}-"
            f"{s['output_tokens_per_s_max']:.0f}) | {s['ratio_to_baseline_median']:.3f} "
            f"({s['ratio_to_baseline_p25']:.3f}-{s['ratio_to_baseline_p75']:.3f}) | {100 * s['loss']:.1f}% | "
            f"{s['server_cpu_ms_per_1k_tokens_median']:.0f} | {s['server_cpu_to_baseline']:.3f} |"
        )
    for variant, why in result["skipped"].items():
        lines.append(f"| {variant} | skipped: {why} | | | | |")
    return "\n".join(lines)
