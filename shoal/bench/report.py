"""Formatting shared by the benchmark printers: each reports one metric a row, shoal against transformers.

The latency and throughput tables (and the markdown snippet of bench/run_all.py) hold rows of the same
shape, so one helper formats a row and one builds the rich table; a change of layout lands in every report.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rich.table import Table

# metric, shoal, transformers, shoal speed-up: the cells of one row, already formatted
Row = tuple[str, str, str, str]


def fmt(value: float | None, spec: str, suffix: str = "", missing: str = "-") -> str:
    """A number in `spec`, or `missing` where the side did not run (--skip-hf) or a ratio is undefined."""
    return missing if value is None else format(value, spec) + suffix


def metric_row(
    label: str,
    shoal: float | None,
    hf: float | None,
    spec: str,
    speed_up: float | None = None,
    *,
    compared: bool = True,
    times: str = "x",
    missing: str = "-",
) -> Row:
    """Both sides' values in one format and shoal's speed-up in `.2f` followed by `times`.

    compared=False leaves the speed-up cell blank, for metrics where a ratio says nothing (wall time,
    totals); a compared metric without a ratio (no HF side) shows `missing` instead.
    """
    ratio = fmt(speed_up, ".2f", times, missing) if compared else ""
    return (label, fmt(shoal, spec, missing=missing), fmt(hf, spec, missing=missing), ratio)


def comparison_table(title: str, rows: Iterable[Row]) -> Table:
    """A rich table "metric | shoal | transformers | shoal speed-up", numbers right-aligned."""
    from rich.table import Table  # rich is needed only to print, not to run a benchmark

    table = Table(title=title)
    for col in ("metric", "shoal", "transformers", "shoal speed-up"):
        table.add_column(col, justify="left" if col == "metric" else "right")
    for row in rows:
        table.add_row(*row)
    return table


def machine_line(result: dict) -> str:
    """The machine and its load around the run: figures are only comparable on a like machine."""
    m, load = result["machine"], result["load_average"]
    return (
        f"{m['cpu']}, {m['cpu_cores']} cores, {m['torch_threads']} torch threads, torch {m['torch']}, "
        f"transformers {m['transformers']}; load average before {load['before']}, after {load['after']}"
    )
