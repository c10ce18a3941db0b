"""Read the tensors of GPTQ (AutoGPTQ / GPTQModel) and AWQ (AutoAWQ GEMM) checkpoints into shoal's
QuantizedWeight, so that QuantizedLinear and its kernels serve them like shoal's own checkpoints.

GPTQ, per linear `<m>` (GPTQModel 7.7 gptqmodel/nn_modules/qlinear/__init__.py `pack_block` and
`dequantize_weight`; AutoGPTQ's qlinear layout before it):
- `<m>.qweight`: int32 [in * bits / 32, out], packed along the INPUT dim: word r of column o holds inputs
  r * 32/bits + j at bits j * bits, unsigned codes q in [0, 2^bits);
- `<m>.qzeros`: int32 [groups, out * bits / 32], unsigned zero points z packed along the output dim;
  v1 files (`checkpoint_format: gptq`, AutoGPTQ's) store z - 1, written by subtracting 0x11111111 (4-bit)
  from each whole word, so a zero point of 0 borrows from the next one: read back by adding the same
  constant to the whole word, as GPTQModel's `convert_gptq_v1_to_v2_format_module` does (exact, mod 2^32);
- `<m>.scales`: float16 [groups, out]; `<m>.g_idx`: int32 [in], the group of each input column.
  w = scales[g_idx[i], o] * (q[i, o] - z[g_idx[i], o]).
  Without act-order g_idx is i // group_size. With act-order (desc_act) it is any assignment of group_size
  columns a group: shoal sorts the columns by group (a stable argsort), stores the weight in that order,
  and QuantizedLinear permutes its input the same way (vLLM's exllama path does the same).
AWQ GEMM, per linear (AutoAWQ 0.2.9 awq/modules/linear/gemm.py `WQLinear_GEMM.from_linear`,
awq/utils/packing_utils.py `dequantize_gemm`):
- `<m>.qweight`: int32 [in, out / 8], packed along the OUTPUT dim, 8 codes a word in the interleaved order
  [0, 2, 4, 6, 1, 3, 5, 7] (nibble i holds output column 8c + order[i]); `<m>.qzeros`: int32
  [groups, out / 8], the same way; `<m>.scales`: float16 [groups, out]. w = (q - z) * s.
shoal keeps codes as q - 2^(bits-1) (int8, compressed-tensors' convention) and zero points likewise, so
(q - z) is unchanged; scales are kept in float32, which holds every float16 exactly (and the qgemv kernel
takes float32 scales). All-equal zero points of 2^(bits-1) (GPTQ `sym`) become a symmetric layer.
Errors are ValueErrors naming the tensor.
"""

from __future__ import annotations

import torch

from shoal.quant.format import unpack_int32
from shoal.quant.groups import PER_CHANNEL
from shoal.quant.linear import fuse
from shoal.quant.rtn import QuantizedWeight
from shoal.quant.upstream_config import AWQ, UpstreamQuantization

UPSTREAM_SUFFIXES = ("qweight", "qzeros", "scales", "g_idx")
AWQ_REVERSE_ORDER = (0, 4, 1, 5, 2, 6, 3, 7)  # awq/utils/packing_utils.py: undoes [0, 2, 4, 6, 1, 3, 5, 7]


def _need(tensors: dict[str, torch.Tensor], name: str, key: str, shape: tuple[int, ...], dtype=None):
    """tensors[key], checked for shape (and dtype); ValueError naming <name>.<key> otherwise."""
    if key not in tensors:
        raise ValueError(f"tensor {name}.{key} is missing from the checkpoint")
    t = tensors[key]
    if tuple(t.shape) != shape or (dtype is not None and t.dtype != dtype):
        want = f"{dtype} {shape}" if dtype is not None else str(shape)
        raise ValueError(f"tensor {name}.{key} has {t.dtype} {tuple(t.shape)}, expected {want}")
    return t


def _groups(spec: UpstreamQuantization, cols: int, name: str) -> int:
    if spec.group_size == PER_CHANNEL:
        return 1
    if cols % spec.group_size:
        raise ValueError(f"{name}: group_size {spec.group_size} does not divide in_features {cols}")
    return cols // spec.group_size


def _add_per_value(words: torch.Tensor, bits: int) -> torch.Tensor:
    """Each word + (1 + 2^bits + 2^(2 bits) + ...) mod 2^32: GPTQ v1 zero points back to v2 (see above)."""
    one_each = sum(1 << (bits * j) for j in range(32 // bits))
    w = (words.to(torch.int64) + one_each) & 0xFFFFFFFF
    return torch.where(w >= 2**31, w - 2**32, w).to(torch.int32)


def _weight(codes, scales, zeros, spec: UpstreamQuantization) -> QuantizedWeight:
    """QuantizedWeight from codes int8 [out, in], float16 scales [groups, out], zeros int8 [out, groups]
    (codes and zeros offset by 2^(bits-1))."""
    return QuantizedWeight(codes, scales.t().float().contiguous(), zeros, spec.bits, spec.group_size)


def _symmetric_if_centred(qw: QuantizedWeight) -> QuantizedWeight:
    """Drop the zero points when all are the middle of the range (GPTQ `sym`): the same weight, and the
    layer takes the symmetric kernels (int8 per channel: torch's _weight_int8pack_mm)."""
    if qw.zero_point is None or bool(qw.zero_point.any()):
        return qw
    return QuantizedWeight(qw.qweight, qw.scale, None, qw.bits, qw.group_size)


def decode_gptq(tensors: dict[str, torch.Tensor], spec: UpstreamQuantization, name: str):
    """One GPTQ linear's tensors (keys: UPSTREAM_SUFFIXES) -> (QuantizedWeight [out, in] with its columns
    in g_idx order, g_idx int64 [in] or None when absent). Columns are not permuted here (see contiguous_groups)."""
    bits = spec.bits
    if "qweight" not in tensors or tensors["qweight"].dim() != 2:
        raise ValueError(f"tensor {name}.qweight is missing or not 2-D")
    rows, out = tensors["qweight"].shape
    cols = rows * 32 // bits
    groups = _groups(spec, cols, name)
    qweight = _need(tensors, name, "qweight", (rows, out), torch.int32)
    qzeros = _need(tensors, name, "qzeros", (groups, out * bits // 32), torch.int32)
    scales = _need(tensors, name, "scales", (groups, out))
    g_idx = tensors.get("g_idx")
    if g_idx is not None:
        g_idx = _need(tensors, name, "g_idx", (cols,)).long()
        if int(g_idx.min()) < 0 or int(g_idx.max()) >= groups:
            raise ValueError(f"tensor {name}.g_idx has groups outside [0, {groups})")
    if spec.zeros_minus_one:
        qzeros = _add_per_value(qzeros, bits)
    codes = unpack_int32(qweight.t(), bits, cols)
    zeros = unpack_int32(qzeros, bits, out).t().contiguous()
    return _weight(codes, scales, zeros, spec), g_idx


def _awq_unpack(packed: torch.Tensor, cols: int) -> torch.Tensor:
    """int32 [rows, cols / 8] in AWQ's interleaved order -> int8 [rows, cols] (codes - 8), natural order."""
    values = unpack_int32(packed, 4, cols)
    return values.view(-1, cols // 8, 8)[:, :, list(AWQ_REVERSE_ORDER)].reshape(-1, cols)


def decode_awq(tensors: dict[str, torch.Tensor], spec: UpstreamQuantization, name: str) -> QuantizedWeight:
    """One AWQ GEMM linear's tensors (qweight, qzeros, scales) -> QuantizedWeight [out, in]."""
    if "qweight" not in tensors or tensors["qweight"].dim() != 2:
        raise ValueError(f"tensor {name}.qweight is missing or not 2-D")
    cols, words = tensors["qweight"].shape
    out = words * 8
    groups = _groups(spec, cols, name)
    qweight = _need(tensors, name, "qweight", (cols, words), torch.int32)
    qzeros = _need(tensors, name, "qzeros", (groups, words), torch.int32)
    scales = _need(tensors, name, "scales", (groups, out))
    codes = _awq_unpack(qweight, out).t().contiguous()
    zeros = _awq_unpack(qzeros, out).t().contiguous()
    return _weight(codes, scales, zeros, spec)


def contiguous_groups(
    qw: QuantizedWeight, g_idx: torch.Tensor | None, name: str
) -> tuple[QuantizedWeight, torch.Tensor | None]:
    """Reorder the columns so that each group is a contiguous run, as QuantizedLinear stores it.
    Returns (the weight, the input permutation int64 [in] or None when g_idx is already in order);
    ValueError naming <name>.g_idx when a group does not have group_size columns."""
    cols = qw.qweight.shape[1]
    size = cols if qw.group_size == PER_CHANNEL else qw.group_size
    in_order = torch.arange(cols) // size
    if g_idx is None or torch.equal(g_idx, in_order):
        return qw, None
    perm = torch.argsort(g_idx, stable=True)
    if not torch.equal(g_idx[perm], in_order):
        raise ValueError(f"tensor {name}.g_idx: every group must have {size} columns")
    permuted = QuantizedWeight(
        qw.qweight[:, perm].contiguous(), qw.scale, qw.zero_point, qw.bits, qw.group_size
    )
    return permuted, perm


def read_upstream_linear(
    parts: list[dict[str, torch.Tensor]], spec: UpstreamQuantization, names: list[str], path: str
) -> tuple[QuantizedWeight, torch.Tensor | None]:
    """The (fused) weight of one shoal linear from its checkpoint parts (q/k/v, gate/up or one), and its input
    permutation (act-order) or None. Fusing concatenates along the output dim; the parts read the same input,
    so their g_idx must agree: a ValueError names the parts otherwise."""
    if spec.method == AWQ:
        fused = fuse([decode_awq(t, spec, n) for t, n in zip(parts, names, strict=True)], path)
        return _symmetric_if_centred(fused), None
    decoded = [decode_gptq(t, spec, n) for t, n in zip(parts, names, strict=True)]
    g_idx = decoded[0][1]
    for (_, other), other_name in zip(decoded[1:], names[1:], strict=True):
        if (g_idx is None) != (other is None) or (g_idx is not None and not torch.equal(g_idx, other)):
            raise ValueError(
                f"tensor {other_name}.g_idx differs from {names[0]}.g_idx: parts fused into {path!r} must "
                f"share their act-order groups"
            )
    fused = _symmetric_if_centred(fuse([qw for qw, _ in decoded], path))
    return contiguous_groups(fused, g_idx, path)
