"""`shoal bench coldstart`: time from process start to ready (`/ready` 200), per way of getting the model.

Variants, each started `repeats` times in turn (ABC ABC ..., so that a drift in machine load spreads over
all of them) and reported by their median:
- local: `--model DIR`, the model served in place (the baseline);
- cold cache: `--model SOURCE` with an empty cache (SHOAL_MODEL_CACHE): copy, checksums, then load;
- warm cache: `--model SOURCE` again with the cache the cold start filled: checksums, then load.
SOURCE defaults to the model directory as a `file://` share (shoal/fleet/storage.py); pass an `s3://` URL
(with its AWS_* environment) to time a real bucket. The page cache is not dropped (that needs root): a
"cold" copy reads a source the OS may hold in memory, as an NFS client with a warm cache would.
"""

from __future__ import annotations

import os
import statistics
import tempfile
from pathlib import Path

from shoal.bench.serve_compare import machine, shoal_server

VARIANTS = ("local", "cold cache", "warm cache")


def run_coldstart(
    model: str,
    source: str | None = None,
    dtype: str = "float32",
    threads: int = 1,
    repeats: int = 3,
    extra: tuple[str, ...] = (),
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
    return {
        "model": model,
        "source": source,
        "dtype": dtype,
        "flags": list(extra),
        "runs_s": runs,
        "median_s": {v: statistics.median(t) for v, t in runs.items()},
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
    return "\n".join(lines)
