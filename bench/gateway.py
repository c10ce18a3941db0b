"""The gateway's cost and prefix-aware routing's gain, one run: a thin wrapper of `shoal bench gateway`
(logic in shoal/bench/gateway.py) that writes bench/results/gateway.json and prints the markdown table for
docs/benchmarks.md:

    python bench/gateway.py [--model models/stories260K] [--workloads tiny,chat,chat-stream]
        [--chat-model models/SmolLM2-135M-Instruct] [any `shoal bench gateway` option]
"""

from __future__ import annotations

import sys
from pathlib import Path

from shoal.bench.cli import run_as_script

RESULTS = Path(__file__).resolve().parent / "results" / "gateway.json"

if __name__ == "__main__":
    run_as_script("gateway", RESULTS, sys.argv[1:], prog_name="bench/gateway.py")
