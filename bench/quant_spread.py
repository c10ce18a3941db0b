"""Issue 18's FP8/W8A8 comparison at its resolution: a thin wrapper of `shoal bench quant-spread` (logic in
shoal/bench/quant_spread.py): the quantized model's perplexity ratio, plain and with its quantized linears'
inputs jittered by float32 rounding, seeds 1..N.

    python bench/quant_spread.py /tmp/q/fp8 --base models/SmolLM2-135M-Instruct --seeds 4 --threads 2
"""

from __future__ import annotations

import sys

from shoal.bench.cli import bench_app


def main() -> None:
    bench_app(["quant-spread", *sys.argv[1:]], prog_name="bench/quant_spread.py")


if __name__ == "__main__":
    main()
