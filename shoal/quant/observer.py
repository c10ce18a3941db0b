"""The MSE weight observer: shrink each group's range while that lowers its own rounding error.

What it decides: for every row of w [rows, cols] (a weight group, or a whole channel), a factor p in
(0, 1] that multiplies the row's range [min(w, 0), max(w, 0)] (max|w| when symmetric) before scale and
zero point are computed from it. p = 1 is the min/max observer. A smaller range spends the integer levels
on the bulk of the weights and clips the few largest, which often lowers the error of the whole group:
the factor with the smallest sum of |w - w_hat|^norm over the row wins (norm 2.4, between the mean
squared and the max error, as both references use).

Sources: GPTQ's reference `Quantizer.find_params` with `mse=True` (IST-DASLab/gptq `quant.py`: grid 100,
norm 2.4, maxshrink 0.8) and llm-compressor's `mse` observer (vllm-project/llm-compressor
`src/llmcompressor/observers/mse.py` `calculate_mse_min_max`: grid 100, norm 2.4, maxshrink 0.2, stop
after 5 steps without improvement). shoal searches the whole grid (no early stop: each row keeps its own
best, so stopping early can only miss a better factor) with llm-compressor's default maxshrink 0.2.
The weight is given with its scales' storage dtype, so the error measured is the one the checkpoint makes.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

OBSERVERS = ("minmax", "mse")
MSE_GRID = 100  # factors 1, 0.99, 0.98, ...
MSE_MAX_SHRINK = 0.2  # ... down to 0.81 (llm-compressor's default)
MSE_NORM = 2.4

# (w [rows, cols], lo [rows], hi [rows]) -> w_hat [rows, cols]: quantize with the range [lo, hi]
RangeQuantizer = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def check_observer(name: str) -> None:
    """ValueError naming the choices for an observer that is not minmax or mse."""
    if name not in OBSERVERS:
        raise ValueError(f"observer {name!r} is unknown; choose one of {', '.join(OBSERVERS)}")


def mse_shrink(
    w: torch.Tensor,
    quantize: RangeQuantizer,
    max_shrink: float = MSE_MAX_SHRINK,
    grid: int = MSE_GRID,
    norm: float = MSE_NORM,
) -> torch.Tensor:
    """Per-row shrink factor p [rows] float32 in (1 - max_shrink, 1] minimizing sum |w - quantize(w)|^norm.

    w: [rows, cols] float32. quantize(w, p * lo, p * hi) must return the dequantized w for the range
    [p * lo, p * hi] with lo = min(w, 0), hi = max(w, 0) per row (each method brings its own grid, so the
    storage rounding of its scales is part of the error). Ties keep the larger factor (min/max first).
    Raises ValueError for max_shrink outside [0, 1) or grid < 1."""
    if not 0 <= max_shrink < 1 or grid < 1:
        raise ValueError(f"max_shrink {max_shrink} must be in [0, 1) and grid {grid} at least 1")
    lo = w.amin(dim=1).clamp(max=0)
    hi = w.amax(dim=1).clamp(min=0)
    best_err = torch.full((w.shape[0],), float("inf"))
    best_p = torch.ones(w.shape[0])
    for step in range(int(round(max_shrink * grid))):
        p = 1 - step / grid
        err = (quantize(w, p * lo, p * hi) - w).abs().pow(norm).sum(dim=1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_p = torch.where(better, torch.full_like(best_p, p), best_p)
    return best_p
