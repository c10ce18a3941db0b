"""What observability costs: `shoal serve` with metrics off and with tracing on, against the defaults.

A thin wrapper of `shoal bench overhead` (the logic is in shoal/bench/overhead.py) that writes
bench/results/overhead.json and prints the markdown table for docs/benchmarks.md:

    python bench/overhead.py [--model DIR] [--threads 2] [any `shoal bench overhead` option]
"""

from __future__ import annotations

import sys
from pathlib import Path

from shoal.bench.cli import run_as_script

RESULTS = Path(__file__).resolve().parent / "results" / "overhead.json"


def main() -> None:
    run_as_script("overhead", RESULTS, sys.argv[1:], prog_name="bench/overhead.py")


if __name__ == "__main__":
    main()
