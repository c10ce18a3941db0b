"""Time to ready with the model in place, copied into a cold cache, and from a warm cache: a thin wrapper
of `shoal bench coldstart` (logic in shoal/bench/coldstart.py) that writes bench/results/coldstart.json and
prints the markdown table for docs/benchmarks.md:

    python bench/coldstart.py [--model models/SmolLM2-135M-Instruct] [--source s3://...] [--repeats 3]
"""

from __future__ import annotations

import sys
from pathlib import Path

from shoal.bench.cli import run_as_script

RESULTS = Path(__file__).resolve().parent / "results" / "coldstart.json"

if __name__ == "__main__":
    run_as_script("coldstart", RESULTS, sys.argv[1:], prog_name="bench/coldstart.py")
