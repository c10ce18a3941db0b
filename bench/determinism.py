"""What deterministic mode (--deterministic) costs in throughput against the default, on CPU.

A thin wrapper of `shoal bench determinism` (the logic is in shoal/bench/determinism.py) that writes
bench/results/determinism.json and prints the markdown table for docs/benchmarks.md:

    python bench/determinism.py [--model DIR] [--threads 2] [any `shoal bench determinism` option]
"""

from __future__ import annotations

import sys
from pathlib import Path

from shoal.bench.cli import run_as_script

RESULTS = Path(__file__).resolve().parent / "results" / "determinism.json"


def main() -> None:
    run_as_script("determinism", RESULTS, sys.argv[1:], prog_name="bench/determinism.py")


if __name__ == "__main__":
    main()
