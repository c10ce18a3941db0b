"""GPTQ: round one linear layer's weights column by column, pushing each column's rounding error onto the
columns not yet rounded, weighted by the inverse Hessian of the layer's output error.

What it decides: the integer value of every weight (and, per group, the scale and zero point it is read
with) so that the layer's outputs on calibration inputs X change as little as possible, instead of each
weight merely being as close as possible to its float value (round-to-nearest). The loss is
||X W^T - X Q^T||^2, whose Hessian in each row of W is H = 2 X^T X / n; Optimal Brain Surgeon says that
after rounding column i, the error (w_i - q_i) / [H^-1]_ii times row i of H^-1 is the best correction of
the remaining columns. Frantar et al., "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers" (2022, arXiv:2210.17323), and its reference code, IST-DASLab/gptq `gptq.py`
(`GPTQ.fasterquant`), which this follows:

- one fixed column order for all rows, so one inverse Hessian serves every row;
- the upper Cholesky factor of H^-1 stands for the sequence of shrinking inverses (numerically stable);
  here computed from one Cholesky of H with its rows and columns reversed and a triangular solve;
- lazy batches: corrections inside a block of 128 columns are applied at once, the rest of the matrix is
  updated once per block (a matrix product instead of one rank-1 update per column); inside a block the
  same again over sub-blocks of 16 columns, on the weight transposed so that a column is contiguous
  (the same arithmetic in another order: 3.5x faster on a 3072 x 576 layer, one thread);
- damping: 1% of the mean diagonal added to H's diagonal, so that H stays positive definite;
- dead inputs (a zero diagonal: the input is always 0) get weight 0 and a unit diagonal;
- act-order: columns with the largest Hessian diagonal (the most salient inputs) go first, while the most
  columns remain to absorb their error; g_idx then says which group each input column belongs to.

Groups never straddle a block here (the block is a multiple of the group size), so a group's scale and
zero point are computed from its columns with every earlier correction applied.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from shoal.quant.observer import check_observer, mse_shrink


@dataclass
class QuantResult:
    """One linear layer's quantized weight as GPTQ and AWQ return it; weight ~= scales[:, g_idx] * (qweight - zeros[:, g_idx]).

    The integer convention is compressed-tensors' (as in shoal.quant.rtn): values in
    [-2^(bits-1), 2^(bits-1) - 1] whether symmetric or not.

    qweight: [out, in] int8.
    scales: [out, groups] float32.
    zeros: [out, groups] int8 zero points in the same range (all 0 when symmetric).
    g_idx: [in] int32, the group of each input column (arange(in) // group_size without act-order).
    dequantized: [out, in] float32, the weight as the quantized layer computes with it.
    """

    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    g_idx: torch.Tensor
    dequantized: torch.Tensor
    bits: int
    group_size: int
    symmetric: bool


@dataclass(frozen=True)
class GPTQOptions:
    """How GPTQ runs over a model (shoal.quant.sequential.gptq_model); `observer` also serves rtn.

    observer: "minmax" or "mse", how each group's scale and zero point are found (grid_params).
    act_order: columns by decreasing Hessian diagonal, with static groups (gptq_quantize), so that the
    checkpoint keeps plain groups and needs no g_idx.
    dampening_frac: the fraction of the mean Hessian diagonal added to its diagonal (percdamp;
    llm-compressor's `dampening_frac`).
    true_sequential: within a block, capture each linear's inputs after the linears before it are
    quantized (qkv, then o_proj, gate_up, down_proj), as the reference's `--true-sequential`; otherwise
    one capture serves all four (llm-compressor's pipeline), one block forward instead of four.
    """

    observer: str = "minmax"
    act_order: bool = False
    dampening_frac: float = 0.01
    true_sequential: bool = False


# `--method gptq`'s default: act-order (static groups) with dampening 0.1 gave SmolLM2 g64 1.193x of 16-bit
# perplexity on the quick protocol, against 1.240x with the reference's defaults (GPTQOptions()) and
# llm-compressor's 1.251x; no slower (a permutation, and group scales computed once). docs/quantization.md.
GPTQ_METHOD_DEFAULT = GPTQOptions(act_order=True, dampening_frac=0.1)


def integer_range(bits: int) -> tuple[int, int]:
    """The integer values a weight may take, [-2^(b-1), 2^(b-1) - 1]; ValueError for bits outside 2..8."""
    if not 2 <= bits <= 8:
        raise ValueError(f"bits must be between 2 and 8, got {bits}")
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def grid_params(
    w: torch.Tensor,
    bits: int,
    symmetric: bool,
    scale_dtype: torch.dtype = torch.float32,
    observer: str = "minmax",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point [rows] for the columns of w [rows, cols] (float32), round-to-nearest style.

    Asymmetric: the range [min(w, 0), max(w, 0)] maps onto [-2^(b-1), 2^(b-1) - 1] with an integer zero
    point round(-2^(b-1) - min / scale). Symmetric: scale = max|w| / ((2^b - 1) / 2), zero 0. Both are
    compressed-tensors' `calculate_qparams` (as shoal.quant.rtn). An all-zero row gets scale 1.
    scale_dtype: the dtype scales will be stored in; they are rounded to it (upwards, so no weight leaves
    the range) before the zero point is computed, and returned as float32.
    observer: "minmax" (the range as it is) or "mse" (each row's range shrunk by the factor of least
    rounding error, shoal.quant.observer.mse_shrink). Raises ValueError for another observer.
    """
    check_observer(observer)
    lo = w.amin(dim=1).clamp(max=0)
    hi = w.amax(dim=1).clamp(min=0)
    if observer == "mse":

        def fake_quantize(x: torch.Tensor, lo1: torch.Tensor, hi1: torch.Tensor) -> torch.Tensor:
            scale, zero = _range_params(lo1, hi1, bits, symmetric, scale_dtype)
            q = round_to_grid(x, scale, zero, bits)
            return (q - zero[:, None]) * scale[:, None]

        p = mse_shrink(w, fake_quantize)
        lo, hi = lo * p, hi * p
    return _range_params(lo, hi, bits, symmetric, scale_dtype)


def _range_params(
    lo: torch.Tensor, hi: torch.Tensor, bits: int, symmetric: bool, scale_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point [rows] that map the range [lo, hi] (lo <= 0 <= hi) onto the integers."""
    qmin, qmax = integer_range(bits)
    if symmetric:
        scale = torch.maximum(-lo, hi) / ((qmax - qmin) / 2)
        scale = _storable(torch.where(scale > 0, scale, torch.ones_like(scale)), scale_dtype)
        return scale, torch.zeros_like(scale)
    scale = (hi - lo) / (qmax - qmin)
    scale = _storable(torch.where(scale > 0, scale, torch.ones_like(scale)), scale_dtype)
    zero = torch.round(qmin - lo / scale).clamp(qmin, qmax)
    return scale, zero


def _storable(scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """float32 scale rounded to a value of dtype, upwards where the cast rounded it down."""
    if dtype == torch.float32:
        return scale
    stored = scale.to(dtype)
    bumped = (stored.float() * (1 + torch.finfo(dtype).eps)).to(dtype)
    return torch.where(stored.float() < scale, bumped, stored).float()


def round_to_grid(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer values (float32 tensor) of w [rows, cols] with per-row scale and zero [rows] (or [rows, 1])."""
    qmin, qmax = integer_range(bits)
    scale, zero = scale.reshape(-1, 1), zero.reshape(-1, 1)
    return torch.clamp(torch.round(w / scale + zero), qmin, qmax)  # compressed-tensors: round(w / s + z)


def rtn_quantize(
    weight: torch.Tensor,
    bits: int,
    group_size: int,
    symmetric: bool,
    scale_dtype: torch.dtype = torch.float32,
    observer: str = "minmax",
) -> QuantResult:
    """Round-to-nearest with per-group scales: the baseline GPTQ and AWQ are measured against.

    weight: [out, in], any float dtype. group_size: a divisor of `in`, or -1 (or 0) for one group per row.
    scale_dtype: the dtype the scales will be stored in; observer: minmax or mse (see grid_params).
    Raises ValueError for a group size that does not divide `in`, bits outside 2..8 or another observer.
    """
    w = weight.detach().float()
    out_features, in_features = w.shape
    gs = _group_size(in_features, group_size)
    groups = w.reshape(out_features * (in_features // gs), gs)
    scale, zero = grid_params(groups, bits, symmetric, scale_dtype, observer)
    q = round_to_grid(groups, scale, zero, bits)
    deq = ((q - zero[:, None]) * scale[:, None]).reshape(out_features, in_features)
    return QuantResult(
        qweight=q.reshape(out_features, in_features).to(torch.int8),
        scales=scale.reshape(out_features, -1),
        zeros=zero.reshape(out_features, -1).to(torch.int8),
        g_idx=(torch.arange(in_features) // gs).to(torch.int32),
        dequantized=deq,
        bits=bits,
        group_size=group_size,
        symmetric=symmetric,
    )


class HessianAccumulator:
    """Sums X^T X over batches of a linear layer's inputs; memory is [in, in] float64 whatever the data.

    add(x): x [..., in] any float dtype; each batch's product is computed in float32, summed in float64.
    X^T X is symmetric, so add computes it in k strips of rows of about `block` features, each from its
    diagonal block rightwards, and mirrors them: (k + 1) / 2k of the full product's multiply-adds (0.58
    for SmolLM2's down_proj, 1,536 inputs), in k products rather than one per block (small products lose
    to thread stragglers on a busy machine). In calibration this product costs about as much as a forward
    of the block; on 2 quiet threads a 2,048 x 1,536 batch takes 25 ms against the full product's 36 ms.
    """

    def __init__(self, in_features: int, block: int = 256):
        self.in_features = in_features
        self.sum = torch.zeros(in_features, in_features, dtype=torch.float64)
        self.rows = 0
        blocks = math.ceil(in_features / block)
        width = math.ceil(in_features / blocks)  # equal widths: 576 -> 3 x 192, not 256 + 256 + 64
        self.edges = [(a, min(a + width, in_features)) for a in range(0, in_features, width)]

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        if x.shape[1] != self.in_features:
            raise ValueError(f"inputs have {x.shape[1]} features, the accumulator {self.in_features}")
        for a, b in self.edges:  # one strip per block of rows: its diagonal block and what lies right of it
            strip = (x[:, a:b].T @ x[:, a:]).double()
            # the BLAS may round (i, j) and (j, i) apart (seen on an AVX2 EPYC): H must be exactly symmetric
            diag = strip[:, : b - a]
            strip[:, : b - a] = (diag + diag.T) / 2
            self.sum[a:b, a:] += strip
            self.sum[b:, a:b] += strip[:, b - a :].T
        self.rows += x.shape[0]

    def scale_inputs(self, factors: torch.Tensor) -> None:
        """Make the sum that of the inputs x * factors (factors [in], per input feature): X^T X becomes
        diag(f) X^T X diag(f), exactly what accumulating the scaled inputs would give (SmoothQuant's x / s)."""
        f = factors.double()
        self.sum *= f[:, None] * f[None, :]

    def hessian(self) -> torch.Tensor:
        """H = 2 X^T X / n, [in, in] float64. Raises ValueError when nothing was added."""
        if self.rows == 0:
            raise ValueError("no calibration inputs were added to the Hessian")
        return self.sum * (2.0 / self.rows)


def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    bits: int = 4,
    group_size: int = 128,
    symmetric: bool = False,
    percdamp: float = 0.01,
    act_order: bool = False,
    block_size: int = 128,
    scale_dtype: torch.dtype = torch.float32,
    observer: str = "minmax",
    static_groups: bool = False,
) -> QuantResult:
    """Quantize weight [out, in] (any float dtype) with GPTQ given H [in, in] = 2 X^T X / n.

    group_size: a divisor of `in`, or -1 (or 0) for one scale per output row. act_order: process columns by
    decreasing Hessian diagonal; groups are then formed in that order and g_idx maps columns to them.
    scale_dtype: the dtype the scales will be stored in; GPTQ rounds with the stored scales, so that
    the errors it corrects for are the ones the stored checkpoint makes.
    observer: how each group's scale and zero point are found, "minmax" or "mse" (grid_params).
    static_groups: compute every group's scale and zero point from the weight before any correction, by
    input column (the reference's `--static-groups`): with act_order the columns are still processed by
    decreasing Hessian diagonal, but g_idx stays arange(in) // group_size, so the checkpoint needs none.
    Raises ValueError for mismatched shapes, a group size that does not divide `in`, bits outside 2..8,
    or a Hessian that stays indefinite after damping (raise percdamp).
    """
    w = weight.detach().float().clone()
    out_features, in_features = w.shape
    if hessian.shape != (in_features, in_features):
        raise ValueError(
            f"Hessian has shape {tuple(hessian.shape)}, weight needs ({in_features}, {in_features})"
        )
    gs = _group_size(in_features, group_size)
    per_channel = gs == in_features
    block = block_size if per_channel else max(gs, block_size // gs * gs)
    h = hessian.detach().double().clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    static = static_groups or per_channel
    scales, zeros = _static_params(w, gs, bits, symmetric, scale_dtype, observer, static)
    perm = torch.argsort(torch.diagonal(h), descending=True, stable=True) if act_order else None
    if perm is not None:
        w, h = w[:, perm], h[perm][:, perm]
    hinv = _inverse_hessian_factor(h, percdamp)
    # the group of the column processed at each position
    group_at = (perm if perm is not None and static else torch.arange(in_features)) // gs

    q_int, deq = _column_loop(w, hinv, scales, zeros, group_at, gs, block, bits, symmetric, scale_dtype,
                              observer, static)  # fmt: skip

    g_idx = (torch.arange(in_features) // gs).to(torch.int32)
    if perm is not None:
        inverse = torch.argsort(perm)
        q_int, deq = q_int[:, inverse], deq[:, inverse]
        if not static:  # column perm[k] sits at position k of the processing order: group k // gs
            g_idx = g_idx[inverse]
    return QuantResult(
        qweight=q_int.to(torch.int8),
        scales=scales,
        zeros=zeros.to(torch.int8),
        g_idx=g_idx,
        dequantized=deq,
        bits=bits,
        group_size=group_size,
        symmetric=symmetric,
    )


SUB_BLOCK = 16  # columns whose corrections are applied one by one; the rest of a block gets them as a matmul


def _column_loop(
    w: torch.Tensor,
    hinv: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    group_at: torch.Tensor,
    gs: int,
    block: int,
    bits: int,
    symmetric: bool,
    scale_dtype: torch.dtype,
    observer: str,
    static: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ's column sweep over w [out, in] (float32, columns in processing order) with the upper Cholesky
    factor hinv [in, in] of H^-1: (integer values, dequantized weight), both [out, in] float32.

    scales, zeros [out, groups]: filled here group by group unless static. group_at [in]: the group of the
    column at each position. Works on w transposed, so that a column is a contiguous vector, and applies
    the corrections in three levels (the same arithmetic as the reference's two, in another order): within
    a sub-block of SUB_BLOCK columns one column at a time, to the rest of the block as one product per
    sub-block, to the rest of the matrix as one product per block. A group's columns are up to date when
    its scale is chosen (groups start on sub-block boundaries: the sub-block divides the group size)."""
    wt = w.t().contiguous()  # [in, out]: row k is column k of w
    in_features = wt.shape[0]
    sub = math.gcd(gs, SUB_BLOCK)
    qmin, qmax = integer_range(bits)
    groups = group_at.tolist()
    scales_t, zeros_t = scales.t().contiguous(), zeros.t().contiguous()  # [groups, out]
    q_t, deq_t = torch.zeros_like(wt), torch.zeros_like(wt)
    for i1 in range(0, in_features, block):
        i2 = min(i1 + block, in_features)
        w1, hinv1 = wt[i1:i2], hinv[i1:i2, i1:i2]  # w1 is a view: updates land in wt
        err1 = torch.zeros_like(w1)
        for j1 in range(0, i2 - i1, sub):
            j2 = min(j1 + sub, i2 - i1)
            for i in range(j1, j2):
                col = i1 + i
                g = groups[col]
                if not static and col % gs == 0:
                    scale, zero = grid_params(w1[i : i + gs].t(), bits, symmetric, scale_dtype, observer)
                    scales_t[g], zeros_t[g] = scale, zero
                scale, zero = scales_t[g], zeros_t[g]
                q = torch.clamp(torch.round(w1[i] / scale + zero), qmin, qmax)
                dq = (q - zero) * scale
                err = (w1[i] - dq) / hinv1[i, i]
                w1[i:j2] -= hinv1[i, i:j2, None] * err[None, :]
                q_t[col], deq_t[col], err1[i] = q, dq, err
            if j2 < i2 - i1:
                w1[j2:] -= hinv1[j1:j2, j2:].t() @ err1[j1:j2]
        if i2 < in_features:
            wt[i2:] -= hinv[i1:i2, i2:].t() @ err1
    scales.copy_(scales_t.t())
    zeros.copy_(zeros_t.t())
    return q_t.t().contiguous(), deq_t.t().contiguous()


def _static_params(
    w: torch.Tensor,
    gs: int,
    bits: int,
    symmetric: bool,
    scale_dtype: torch.dtype,
    observer: str,
    static: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """scales, zeros [out, groups] float32: every group's from w [out, in] as it is when static, else
    zeros to be filled group by group during the column loop."""
    out_features, in_features = w.shape
    n_groups = in_features // gs
    if not static:
        return torch.zeros(out_features, n_groups), torch.zeros(out_features, n_groups)
    groups = w.reshape(out_features * n_groups, gs)
    scale, zero = grid_params(groups, bits, symmetric, scale_dtype, observer)
    return scale.reshape(out_features, n_groups), zero.reshape(out_features, n_groups)


def _inverse_hessian_factor(h: torch.Tensor, percdamp: float) -> torch.Tensor:
    """Upper Cholesky factor U of (H + damp I)^-1 (U^T U = the inverse), float32 [in, in], computed in float64
    without forming the inverse: with J the reversal of rows (or columns) and J H J = L L^T, U = J L^-1 J
    (one Cholesky and one triangular solve, instead of a Cholesky, an inverse and a second Cholesky)."""
    damp = percdamp * torch.diagonal(h).mean()
    h = h + damp * torch.eye(h.shape[0], dtype=h.dtype)
    lower, info = torch.linalg.cholesky_ex(h.flip(0, 1))
    if info.item() != 0:
        raise ValueError(f"Hessian is not positive definite after damping {percdamp}; raise percdamp")
    eye = torch.eye(h.shape[0], dtype=h.dtype)
    return torch.linalg.solve_triangular(lower, eye, upper=False).flip(0, 1).float()


def _group_size(in_features: int, group_size: int) -> int:
    """Columns per group; -1 and 0 (shoal.quant.groups.PER_CHANNEL) mean one group spanning the row."""
    if group_size in (-1, 0):
        return in_features
    if group_size <= 0 or in_features % group_size:
        raise ValueError(f"group_size {group_size} does not divide the {in_features} input features")
    return group_size
