"""What `shoal bench serve` prints: one run as a table, two runs side by side with their ratio (B / A),
and a markdown table of several runs (docs/benchmarks.md). One list of rows serves all three."""

from __future__ import annotations

import json
from pathlib import Path

from shoal.bench.serve import LATENCY_METRICS, PERCENTILES

LATENCY_LABELS = {"ttft": "TTFT", "tpot": "TPOT", "e2el": "E2E"}
# (label, result key, format): the throughput rows, then one row per latency statistic
ROWS: list[tuple[str, str, str]] = [
    ("completed requests", "completed", "d"),
    ("failed requests", "failed", "d"),
    ("duration (s)", "duration_s", ".1f"),
    ("requests/s", "request_throughput", ".2f"),
    ("input tokens/s", "input_throughput", ".1f"),
    ("output tokens/s", "output_throughput", ".1f"),
    ("goodput (requests/s)", "request_goodput", ".2f"),
    ("goodput (output tokens/s)", "goodput_output_throughput", ".1f"),
] + [
    (f"{LATENCY_LABELS[m]} {stat} (ms)", f"{key}_{m}_ms", ".1f")
    for m in LATENCY_METRICS
    for stat, key in [("mean", "mean"), *((f"P{q}", f"p{q}") for q in PERCENTILES)]
]


def load(path: Path) -> dict:
    """A result JSON of `shoal bench serve --output-json` (ValueError if it is not one)."""
    result = json.loads(Path(path).read_text())
    if not isinstance(result, dict) or result.get("benchmark") != "bench_serve":
        raise ValueError(f"{path}: not a `shoal bench serve` result")
    return result


def cell(result: dict, key: str, spec: str) -> str:
    value = result.get(key)
    return "-" if value is None else format(value, spec)


def ratio(a: dict, b: dict, key: str) -> str:
    x, y = a.get(key), b.get(key)
    return "-" if not x or y is None else f"{y / x:.2f}x"


def describe(result: dict) -> str:
    c = result["config"]
    rate = c["request_rate"] if c["request_rate"] == "inf" else f"{c['request_rate']:g}/s {c['arrivals']}"
    targets = " ".join(f"{k}:{v:g}" for k, v in result["goodput_targets_ms"].items()) or "none"
    return (f"{c['num_prompts']} requests at rate {rate}, max concurrency {c['max_concurrency'] or 'none'}, "
            f"to {c['base_url']} ({c['model']}); goodput targets (ms) {targets}")  # fmt: skip


def errors_line(result: dict) -> str:
    if not result["errors"]:
        return "errors: none"
    parts = [
        f"{kind} x{n} ({result['error_examples'].get(kind, '')})" for kind, n in result["errors"].items()
    ]
    return "errors: " + "; ".join(parts)


def run_table(result: dict):
    """One run as a rich Table: metric | value."""
    from rich.table import Table

    table = Table(title="shoal bench serve")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for label, key, spec in ROWS:
        table.add_row(label, cell(result, key, spec))
    return table


def diff_table(a: dict, b: dict, names: tuple[str, str]):
    """Two runs as a rich Table: metric | A | B | B / A."""
    from rich.table import Table

    table = Table(title="shoal bench serve-diff")
    for col in ("metric", f"A: {names[0]}", f"B: {names[1]}", "B / A"):
        table.add_column(col, justify="left" if col == "metric" else "right")
    for label, key, spec in ROWS:
        table.add_row(label, cell(a, key, spec), cell(b, key, spec), ratio(a, b, key))
    return table


def markdown(results: list[dict], labels: list[str]) -> str:
    """Several runs as one markdown table, a column per run (docs/benchmarks.md); with two runs, a last
    column of ratios (second / first)."""
    pair = len(results) == 2
    heads = [*labels, "B / A"] if pair else labels
    lines = ["| metric | " + " | ".join(heads) + " |", "|---|" + "---:|" * len(heads)]
    for label, key, spec in ROWS:
        cells = [cell(r, key, spec) for r in results] + ([ratio(*results, key)] if pair else [])
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
