"""compressed-tensors' `pack-quantized` tensors: pack, unpack, and the tensors of one quantized linear.

The layout is the one compressed-tensors 0.20 writes and reads (compressors/pack_quantized/base.py and
helpers.py `pack_to_int32` / `unpack_from_int32`), so its `decompress` is the oracle in the tests:
- `<module>.weight_packed`: int32 [out, in * bits / 32]. Each integer q of [-2^(b-1), 2^(b-1) - 1] is
  stored as q + 2^(b-1) (unsigned); element i of a row sits at bit i * bits of the row's bit stream, words
  little-end first: for int4, word j holds columns 8j..8j+7, column 8j in its lowest nibble.
- `<module>.weight_scale`: [out, groups], the model's dtype.
- `<module>.weight_zero_point` (asymmetric only): the int8 zero points [out, groups] packed the same way
  along the output dimension: int32 [ceil(out * bits / 32), groups].
- `<module>.weight_shape`: int64 [2], the dense weight's (out, in).
shoal packs only rows that fill whole words (groups.py keeps the others 16-bit), so unpacking needs no tail.
"""

from __future__ import annotations

import sys

import torch

from shoal.quant.groups import values_per_word
from shoal.quant.rtn import QuantizedWeight

TENSOR_SUFFIXES = ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape")


def pack_int32(q: torch.Tensor, bits: int, dim: int = 1) -> torch.Tensor:
    """Pack int8 q [rows, cols] along dim (1: columns, 0: rows) into int32, zero-padding the last word."""
    per_word = values_per_word(bits)
    if dim == 0:
        return pack_int32(q.t(), bits, 1).t().contiguous()
    rows, cols = q.shape
    u = (q.to(torch.int16) + (1 << (bits - 1))).to(torch.uint8)
    pad = -cols % per_word
    if pad:
        u = torch.nn.functional.pad(u, (0, pad))
    if bits == 4:  # two columns a byte, the first in the low nibble
        pairs = u.view(rows, -1, 2)
        u = pairs[..., 0] | (pairs[..., 1] << 4)
    return _bytes_to_words(u.contiguous(), rows)


def _bytes_to_words(u: torch.Tensor, rows: int) -> torch.Tensor:
    """uint8 [rows, 4k] -> int32 [rows, k], the first byte lowest (the file's little-endian words)."""
    if sys.byteorder == "little":
        return (
            u.reshape(-1).view(torch.int32).view(rows, -1)
        )  # flat first: a 1-row view's stride is arbitrary
    shifts = torch.arange(4, dtype=torch.int64) * 8
    words = (u.view(rows, -1, 4).to(torch.int64) << shifts).sum(-1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def _words_to_bytes(packed: torch.Tensor) -> torch.Tensor:
    rows = packed.shape[0]
    if sys.byteorder == "little":
        return packed.reshape(-1).view(torch.uint8).view(rows, -1)
    shifts = torch.arange(4, dtype=torch.int64) * 8
    return ((packed.to(torch.int64).unsqueeze(-1) >> shifts) & 0xFF).to(torch.uint8).view(rows, -1)


def unpack_int32(packed: torch.Tensor, bits: int, size: int, dim: int = 1) -> torch.Tensor:
    """The inverse of pack_int32: int32 words -> int8 [rows, size] (dim 1) or [size, cols] (dim 0)."""
    values_per_word(bits)
    if dim == 0:
        return unpack_int32(packed.t(), bits, size, 1).t().contiguous()
    rows = packed.shape[0]
    u = _words_to_bytes(packed)
    if bits == 4:
        u = torch.stack((u & 0xF, u >> 4), dim=-1).view(rows, -1)
    return (u[:, :size].to(torch.int16) - (1 << (bits - 1))).to(torch.int8)


def compress(qw: QuantizedWeight) -> dict[str, torch.Tensor]:
    """The checkpoint tensors of one quantized linear, keyed by suffix (weight_packed, ...)."""
    out, cols = qw.qweight.shape
    tensors = {
        "weight_packed": pack_int32(qw.qweight, qw.bits),
        "weight_scale": qw.scale.contiguous(),
        "weight_shape": torch.tensor([out, cols], dtype=torch.int64),
    }
    if qw.zero_point is not None:
        tensors["weight_zero_point"] = pack_int32(qw.zero_point, qw.bits, dim=0)
    return tensors


def decompress(
    tensors: dict[str, torch.Tensor], bits: int, group_size: int, symmetric: bool, name: str
) -> QuantizedWeight:
    """Read one linear's tensors back (keys as in compress); ValueError naming the tensor when a shape
    disagrees with the scheme of the config."""
    for key in ("weight_packed", "weight_scale", "weight_shape"):
        if key not in tensors:
            raise ValueError(f"tensor {name}.{key} is missing from the checkpoint")
    packed, scale = tensors["weight_packed"], tensors["weight_scale"]
    out, cols = (int(v) for v in tensors["weight_shape"].tolist())
    if packed.dtype != torch.int32 or tuple(packed.shape) != (out, cols * bits // 32) or cols % (32 // bits):
        raise ValueError(
            f"tensor {name}.weight_packed has {packed.dtype} {tuple(packed.shape)}, expected int32 "
            f"{(out, cols * bits // 32)} for a {out}x{cols} weight of {bits} bits"
        )
    groups = 1 if group_size == 0 else cols // group_size
    if tuple(scale.shape) != (out, groups) or (group_size and cols % group_size):
        raise ValueError(
            f"tensor {name}.weight_scale has shape {tuple(scale.shape)}, expected {(out, groups)} "
            f"(group size {group_size or 'per channel'}, in_features {cols})"
        )
    zero_point = None
    if not symmetric:
        if "weight_zero_point" not in tensors:
            raise ValueError(f"tensor {name}.weight_zero_point is missing (the config says asymmetric)")
        zero_point = unpack_int32(tensors["weight_zero_point"], bits, out, dim=0)
    return QuantizedWeight(unpack_int32(packed, bits, cols), scale, zero_point, bits, group_size)
