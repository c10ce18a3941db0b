"""Issue 20's traffic spike: a thin wrapper of `shoal bench spike` (the logic is in shoal/bench/spike.py)
that writes bench/results/spike.json and prints the Markdown table for docs/benchmarks.md:

    python bench/spike.py [--model DIR] [--factor 10] [--spike-s 30] [--premium-share 0.1]
    python bench/spike.py pool RESULT.json ...     # premium TTFTs of several runs pooled (spike-pool)
"""

from __future__ import annotations

import sys
from pathlib import Path

from shoal.bench.cli import bench_app

RESULTS = Path(__file__).resolve().parent / "results" / "spike.json"


def main() -> None:
    args = sys.argv[1:]
    if args[:1] == ["pool"]:
        bench_app(["spike-pool", *args[1:]], prog_name="bench/spike.py pool")
        return
    if "--output-json" not in args:
        args += ["--output-json", str(RESULTS)]
    bench_app(["spike", *args], prog_name="bench/spike.py")


if __name__ == "__main__":
    main()
