"""qgemv (shoal/kernels/qgemv.c): int4/int8 pack-quantized matrix-vector products against a float64
reference over the dequantized weight, and QuantizedLinear's routes against its dequantize + F.linear path.

Tolerance, relative to max_n sum_k |x_k w_hat_nk| + |bias_n| (the scale of the rounding errors): float32
1e-6 (fp32 accumulation in another order; the zero-point term is subtracted once per group); bfloat16 4e-3
(one rounding of the result to bf16, 2^-8 relative, plus fp32 accumulation).
"""

from __future__ import annotations

import pytest
import torch

from shoal import kernels
from shoal.kernels import qgemv
from shoal.quant.format import pack_int32
from shoal.quant.groups import PER_CHANNEL
from shoal.quant.linear import QuantizedLinear
from shoal.quant.rtn import quantize_rtn

pytestmark = pytest.mark.skipif(
    kernels.load("qgemv") is None, reason="native kernels unavailable (no C compiler)"
)
TOLERANCE = {torch.float32: 1e-6, torch.bfloat16: 4e-3}


def _layer(out: int, cols: int, bits: int, group: int, symmetric: bool, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(out, cols, generator=g) * 0.02).to(dtype)
    return quantize_rtn(w, None, bits, group, symmetric=symmetric)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("portable", [False, True])
@pytest.mark.parametrize("cols,group", [(576, 64), (1184, 32)])  # 9 groups; 37 (the zero-point sums' tail)
def test_qgemv_matches_float64_reference(bits, symmetric, dtype, rows, portable, cols, group):
    qw = _layer(200, cols, bits, group, symmetric, dtype)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(rows, cols, generator=g).to(dtype)
    bias = torch.randn(200, generator=g).to(dtype)
    y = qgemv.qgemv(x, pack_int32(qw.qweight, bits), qw.scale, qw.zero_point, bias, bits, group, portable)
    w = qw.dequantize(torch.float32).double()
    ref = x.double() @ w.T + bias.double()
    scale = (x.double().abs() @ w.abs().T + bias.double().abs()).max()
    assert y.dtype == dtype and y.shape == (rows, 200)
    assert float((y.double() - ref).abs().max() / scale) < TOLERANCE[dtype]


@pytest.mark.timeout(30)
def test_qgemv_refuses_bad_inputs():
    qw = _layer(8, 64, 4, 32, True, torch.float32)
    packed = pack_int32(qw.qweight, 4)
    x = torch.randn(1, 64)
    with pytest.raises(TypeError):
        qgemv.qgemv(x.double(), packed, qw.scale, None, None, 4, 32)
    with pytest.raises(ValueError, match="x shape"):
        qgemv.qgemv(torch.randn(5, 64), packed, qw.scale, None, None, 4, 32)
    with pytest.raises(ValueError, match="packed weight"):
        qgemv.qgemv(x, packed[:, :4], qw.scale, None, None, 4, 32)
    with pytest.raises(ValueError, match="scale"):
        qgemv.qgemv(x, packed, qw.scale[:4], None, None, 4, 32)
    with pytest.raises(ValueError, match="multiple of 32"):
        qgemv.qgemv(x, packed, qw.scale, None, None, 4, 16)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("bits,group", [(4, 64), (8, 128), (8, PER_CHANNEL), (4, PER_CHANNEL)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantized_linear_routes_agree_with_the_reference(bits, group, dtype):
    qw = _layer(96, 256, bits, group, group != PER_CHANNEL, dtype)
    bias = torch.randn(96).to(dtype)
    layer = QuantizedLinear(qw, bias)
    w = layer.dequantized_weight(dtype)
    for rows in (1, 4, 9):
        x = torch.randn(rows, 256).to(dtype)
        ref = (x.double() @ w.double().T + bias.double()).to(dtype)
        y = layer(x)
        assert y.dtype == dtype
        torch.testing.assert_close(
            y.float(), ref.float(), rtol=TOLERANCE[dtype] * 4, atol=TOLERANCE[dtype] * 4
        )


@pytest.mark.timeout(60)
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("rows", [1, 2, 4])
@pytest.mark.parametrize(
    "out,cols,group",
    [
        (37, 1536, 64),  # 24 groups: two 16-group steps of a row; 37 rows = 2 tiles + 5
        (16, 1536, 128),  # groups of a multiple of 128: one scale a block
        (50, 576, 576),  # per channel (9 x 64 columns): a 64-column tail block
        (21, 1152, 192),  # 192 = 3 x 64: blocks straddling group edges
        (3, 128, 64),  # fewer rows than a tile
    ],
)
def test_qgemv_bf16_blocks_match_float64_reference(bits, symmetric, rows, out, cols, group):
    """The bfloat16 path for groups of a multiple of 64 (qgemv.c's row4_plain / row8_plain over tiles of 16
    output rows) across its group layouts, row counts and tile tails; same reference and tolerance as above
    (bfloat16: 4e-3 of the row's sum of |x w_hat| + |bias|)."""
    qw = _layer(out, cols, bits, group, symmetric, torch.bfloat16, seed=out)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(rows, cols, generator=g).to(torch.bfloat16)
    bias = torch.randn(out, generator=g).to(torch.bfloat16)
    for b in (bias, None):
        y = qgemv.qgemv(x, pack_int32(qw.qweight, bits), qw.scale, qw.zero_point, b, bits, group)
        w = qw.dequantize(torch.float32).double()
        ref = x.double() @ w.T + (0 if b is None else b.double())
        scale = (x.double().abs() @ w.abs().T + (0 if b is None else b.double().abs())).max()
        assert y.dtype == torch.bfloat16 and y.shape == (rows, out)
        assert float((y.double() - ref).abs().max() / scale) < TOLERANCE[torch.bfloat16]


@pytest.mark.timeout(30)
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("cols,group", [(576, 64), (1536, 64), (1536, 128)])
def test_qgemv_int8_row_same_bits_paired_alone_or_batched(symmetric, cols, group):
    """One bf16 row of x over int8 runs output rows two at a time (qgemv.c's row8_pair), an odd last row of a
    tile alone, and 2-4 rows of x through row8_plain: each output must be bitwise the same whichever way it
    ran (the same sums in the same order), so a weight row's result does not depend on its neighbours or on
    the batch (deterministic mode's batch invariance)."""
    qw = _layer(35, cols, 8, group, symmetric, torch.bfloat16, seed=cols + group)
    packed = pack_int32(qw.qweight, 8)
    zero = qw.zero_point
    x = torch.randn(2, cols, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    alone = qgemv.qgemv(x[:1], packed, qw.scale, zero, None, 8, group)
    # the same weight rows one position later: each pair of the first call is split across two pairs here
    shifted = qgemv.qgemv(
        x[:1],
        torch.cat([packed[:1], packed]),
        torch.cat([qw.scale[:1], qw.scale]),
        None if zero is None else torch.cat([zero[:1], zero]),
        None,
        8,
        group,
    )
    batched = qgemv.qgemv(x, packed, qw.scale, zero, None, 8, group)
    assert torch.equal(shifted[:, 1:], alone)
    assert torch.equal(batched[:1], alone)


@pytest.mark.timeout(30)
@pytest.mark.skipif(
    not qgemv.bf16_native(), reason="signed int8 codes run on AVX512-BF16 only (this CPU lacks it)"
)
@pytest.mark.parametrize("rows", [1, 4])
@pytest.mark.parametrize("cols,group", [(576, 576), (1536, 128)])
def test_qgemv_signed_int8_codes_equal_the_packed_ones(rows, cols, group):
    """torch's signed int8 weight viewed as int32 (`signed=True`, the int8 lm_head's and per-channel W8A16's
    1-4 row route) gives the packed path's result bit for bit (the kernel turns q into u = q + 128 with one
    XOR, the rest is the same arithmetic); QuantizedLinear takes that route for 1-4 bf16 rows of a
    per-channel int8 layer."""
    qw = _layer(70, cols, 8, group, True, torch.bfloat16, seed=cols)
    x = torch.randn(rows, cols).to(torch.bfloat16)
    packed = qgemv.qgemv(x, pack_int32(qw.qweight, 8), qw.scale, None, None, 8, group)
    signed = qgemv.qgemv(
        x, qw.qweight.contiguous().view(torch.int32), qw.scale, None, None, 8, group, signed=True
    )
    assert torch.equal(signed, packed)
    if group == cols:  # per channel: torch's int8 weight, and qgemv over it for 1-4 rows
        layer = QuantizedLinear(_layer(70, cols, 8, PER_CHANNEL, True, torch.bfloat16, seed=cols))
        assert layer.int8_route and layer.int8_qgemv
        ref = x.double() @ layer.dequantized_weight(torch.bfloat16).double().T
        scale = (x.double().abs() @ layer.dequantized_weight(torch.float32).double().abs().T).max()
        assert float((layer(x).double() - ref).abs().max() / scale) < TOLERANCE[torch.bfloat16]


@pytest.mark.timeout(30)
def test_qgemv_refuses_signed_codes_where_its_kernel_cannot_take_them():
    """Signed codes where row8_plain does not run (float32 x, 4 bits, the portable path, groups of an odd
    multiple of 32) are refused before the kernel is called, on every CPU."""
    qw = _layer(8, 128, 8, 64, True, torch.bfloat16)
    codes, x = qw.qweight.contiguous().view(torch.int32), torch.randn(1, 128).to(torch.bfloat16)
    q4 = _layer(8, 128, 4, 64, True, torch.bfloat16)
    g32 = _layer(8, 128, 8, 32, True, torch.bfloat16)
    calls = [
        lambda: qgemv.qgemv(x.float(), codes, qw.scale.float(), None, None, 8, 64, signed=True),
        lambda: qgemv.qgemv(x, pack_int32(q4.qweight, 4), q4.scale, None, None, 4, 64, signed=True),
        lambda: qgemv.qgemv(x, codes, qw.scale, None, None, 8, 64, portable=True, signed=True),
        lambda: qgemv.qgemv(
            x, g32.qweight.contiguous().view(torch.int32), g32.scale, None, None, 8, 32, signed=True
        ),
    ]
    for call in calls:
        with pytest.raises(ValueError, match="signed codes"):
            call()
