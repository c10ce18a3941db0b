"""CPU per output token of the HTTP side of `shoal serve` (its HTTP process, engine core, and the client).

A thin wrapper of `shoal bench http-cpu` (the logic is in shoal/bench/http_cpu.py) that writes
bench/results/http_cpu.json and prints the markdown table for docs/benchmarks.md:

    python bench/http_cpu.py [--model DIR] [--threads 2] [any `shoal bench http-cpu` option]
"""

from __future__ import annotations

import sys
from pathlib import Path

from shoal.bench.cli import run_as_script

RESULTS = Path(__file__).resolve().parent / "results" / "http_cpu.json"


def main() -> None:
    run_as_script("http-cpu", RESULTS, sys.argv[1:], prog_name="bench/http_cpu.py")


if __name__ == "__main__":
    main()
