"""Issue 22's chaos run: a thin wrapper of `shoal bench chaos` (logic in shoal/bench/chaos.py) that writes
bench/results/chaos.json and prints the markdown tables for docs/benchmarks.md. Load goes through the
gateway to two replicas; one is killed (SIGKILL) and restarted, the other paused (SIGSTOP) and resumed:

    python bench/chaos.py [--model models/stories260K] [--upstream-timeout 2] [--pause-s 3] [any `shoal bench chaos` option]

Exit code 1 when a goal is not met (failures beyond the killed replica's requests in flight, a hang, a
slow recovery).
"""

from __future__ import annotations

import sys
from pathlib import Path

from shoal.bench.cli import run_as_script

RESULTS = Path(__file__).resolve().parent / "results" / "chaos.json"

if __name__ == "__main__":
    run_as_script("chaos", RESULTS, sys.argv[1:], prog_name="bench/chaos.py")
