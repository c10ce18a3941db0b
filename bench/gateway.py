"""The gateway's cost and prefix-aware routing's gain, one run: a thin wrapper of `shoal bench gateway`
(logic in shoal/bench/gateway.py) that writes bench/results/gateway.json and prints the markdown table for
docs/benchmarks.md:

    python bench/gateway.py [--model models/stories260K] [--concurrency 8] [any `shoal bench gateway` option]
"""

from __future__ import annotations

import sys
from pathlib import Path

from shoal.bench.cli import bench_app

RESULTS = Path(__file__).resolve().parent / "results" / "gateway.json"


def main() -> None:
    args = sys.argv[1:]
    if not any(a == "--output-json" or a.startswith("--output-json=") for a in args):
        args += ["--output-json", str(RESULTS)]
    if "--markdown" not in args:
        args.append("--markdown")
    bench_app(["gateway", *args], prog_name="bench/gateway.py")


if __name__ == "__main__":
    main()
