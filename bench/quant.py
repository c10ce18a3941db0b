"""Issue 18's quantization benchmark: a thin wrapper of `shoal bench quant` (the logic is in
shoal/bench/quant.py, on `shoal quant eval`'s machinery) that writes bench/results/quant/quant_eval.json and
.png and prints the Markdown tables for docs/quantization.md:

    python bench/quant.py [--model DIR] [--num-tokens 65536] [--num-samples 128] [--seq-len 512] [--rows ...]
    make bench-quant ARGS="--num-tokens 4096 --num-samples 16 --seq-len 256"   # a quick run
"""

from __future__ import annotations

import sys

from shoal.bench.cli import bench_app


def main() -> None:
    bench_app(["quant", *sys.argv[1:]], prog_name="bench/quant.py")


if __name__ == "__main__":
    main()
