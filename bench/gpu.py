"""Issue 23's GPU decode benchmark: a thin wrapper of shoal/bench/gpu.py (argparse only: the GPU machine has
torch and triton but no FastAPI or typer). On a machine with a GPU:

    python bench/gpu.py --out bench/results/gpu/decode.json           # both models, bf16 / w4a16 / fp8
    python bench/gpu.py --models llama-3.2-1b --variants bf16 --batch 1   # the bandwidth target alone
    python bench/gpu.py --device cpu --tiny --steps 3                   # the same code on toy shapes
"""

from __future__ import annotations

from shoal.bench.gpu import main

if __name__ == "__main__":
    main()
