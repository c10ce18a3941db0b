"""Serving on CPU: shoal over HTTP, shoal in process and llama.cpp's llama-server, one run, same machine.

A thin wrapper of `shoal bench serve-compare` (the logic is in shoal/bench/serve_compare.py) that writes
bench/results/serve_compare.json and prints the markdown table for docs/benchmarks.md:

    python bench/serve_compare.py [--model DIR] [--threads 2] [any `shoal bench serve-compare` option]

Build the peer first (about 10 min on 2 cores; never a dependency of shoal):

    bash ../shared/tools/build-llama-server.sh models/SmolLM2-135M-Instruct bf16   # f32 without AVX512-BF16
"""

from __future__ import annotations

import sys
from pathlib import Path

from shoal.bench.cli import run_as_script

RESULTS = Path(__file__).resolve().parent / "results" / "serve_compare.json"


def main() -> None:
    run_as_script("serve-compare", RESULTS, sys.argv[1:], prog_name="bench/serve_compare.py")


if __name__ == "__main__":
    main()
