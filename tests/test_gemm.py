"""The float32 small-batch GEMM kernels (shoal/kernels/gemm.c: over the plain weight, and over its packed
panels) compute x @ w.T + bias to within fp32 summation error of a float64 reference for any row count and
any K and N tails, give a row bitwise the same output whatever batch it is in, and refuse what they do not
serve before touching memory."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from shoal.kernels import gemm

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.skipif(not gemm.supported(torch.zeros(1, 1)), reason="no C compiler: native kernels off"),
]
ROWS = [1, 3, 4, 5, 7, 8, 13, 32, 64, 65, 130]
# (N, K). K: below one 8-float vector, tails of 1 and 7, SmolLM2's 576 and 700 (256-column blocks of the
# panels with and without a tail); N: every tail of the 3-row blocks, 16-row panels full, 1, 2, 3, 10, 15.
SHAPES = [(1, 5), (2, 9), (3, 7), (64, 8), (10, 15), (31, 17), (96, 576), (577, 63), (19, 700)]
FORMS = {
    "plain": gemm.gemm,
    "panels": lambda x, w, bias=None: gemm.gemm_panels(x, gemm.pack_panels(w), w.shape[0], bias),
}


def _case(rows: int, n: int, k: int, with_bias: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed * 7919 + rows * 131 + n * 17 + k)
    x, w = torch.randn(rows, k, generator=g), torch.randn(n, k, generator=g)
    return x, w, torch.randn(n, generator=g) if with_bias else None


def _bound(x: torch.Tensor, w: torch.Tensor, bias) -> torch.Tensor:
    """fp32 inner products in any summation order: |error| <= gamma_n * sum_k |x||w| with gamma_n about
    n * 2^-24 (Higham, "Accuracy and Stability of Numerical Algorithms", 2nd ed., section 3.1), n = K + 2
    for the bias addition and the output's rounding, times 2 for margin."""
    k = x.shape[1]
    magnitude = x.double().abs() @ w.double().abs().T + (0 if bias is None else bias.double().abs())
    return magnitude * (k + 2) * 2**-23 + 1e-30


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize(("n", "k"), SHAPES)
@pytest.mark.parametrize("with_bias", [True, False])
def test_gemm_matches_float64_reference(form, rows, n, k, with_bias) -> None:
    x, w, bias = _case(rows, n, k, with_bias)
    got = FORMS[form](x, w, bias)
    want = x.double() @ w.double().T + (0 if bias is None else bias.double())
    assert got.shape == (rows, n) and got.dtype == torch.float32 and got.is_contiguous()
    assert ((got.double() - want).abs() <= _bound(x, w, bias)).all()


@pytest.mark.parametrize("form", FORMS)
def test_gemm_close_to_torch_on_a_smollm2_shape(form) -> None:
    """Typical error, not the worst case: on SmolLM2's down_proj shape (K = 1536) the kernels and torch's
    linear agree to about 1e-6 relative to the output's scale."""
    x, w, bias = _case(48, 576, 1536, True)
    got, theirs = FORMS[form](x, w, bias), F.linear(x, w, bias)
    assert (got - theirs).abs().max() <= 1e-5 * theirs.abs().max()


@pytest.mark.parametrize("form", FORMS)
def test_gemm_rows_are_batch_invariant(form) -> None:
    """A row's output does not depend on how many rows share the call nor where it sits in them (tile
    position, remainder tiles, chunking of x beyond X_CHUNK_BYTES): bitwise, against rows computed one at
    a time. K = 1100 makes x's chunks 44 (plain) and 42 (panels) rows, so 130 rows span 3-4 chunks."""
    x, w, bias = _case(130, 37, 1100, True)
    alone = torch.cat([FORMS[form](x[i : i + 1], w, bias) for i in range(130)])
    for rows in (2, 4, 5, 7, 13, 64, 130):
        for start in (0, 1, 130 - rows):
            part = x[start : start + rows].contiguous()
            assert torch.equal(FORMS[form](part, w, bias), alone[start : start + rows]), (rows, start)


@pytest.mark.parametrize("form", FORMS)
def test_gemm_threads_do_not_change_results(form) -> None:
    x, w, bias = _case(20, 101, 96, True)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = FORMS[form](x, w, bias)
        torch.set_num_threads(max(2, before))
        assert torch.equal(FORMS[form](x, w, bias), one)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("form", FORMS)
def test_gemm_zero_rows_and_special_values(form) -> None:
    x, w, bias = _case(5, 6, 24, True)
    assert FORMS[form](x[:0], w, bias).shape == (0, 6)
    x[1, 3], x[2, 0] = float("nan"), float("inf")
    w[:, 0] = w[:, 0].abs() + 1  # positive: row 2 is +inf everywhere
    got = FORMS[form](x, w, bias)
    assert got[1].isnan().all() and (got[2] == float("inf")).all() and got[[0, 3, 4]].isfinite().all()


@pytest.mark.parametrize("form", FORMS)
def test_gemm_rejects_what_it_does_not_serve(form) -> None:
    """Wrong dtypes raise TypeError; wrong devices, shapes, strides and sizes ValueError."""
    w, x, b = torch.randn(8, 16), torch.randn(5, 16), torch.randn(8)
    for args in [(x.double(), w), (x, w.bfloat16()), (x.half(), w.half()), (x, w, b.double())]:
        with pytest.raises(TypeError, match="gemm"):
            FORMS[form](*args)
    value_errors = [
        (x.to("meta"), w),  # not on the CPU
        (x, w, b.to("meta")),
        (x[:, :15], w),  # K mismatch (and a strided view)
        (torch.randn(5, 15), w),  # K mismatch
        (x[None], w),  # 3-d x
        (torch.randn(5, 32)[:, :16], w),  # rows strided by 32: non-contiguous x
        (torch.randn(16, 5).t(), w),  # column-major x
        (x, torch.randn(16, 8).t()),  # non-contiguous weight
        (x, w[None]),  # 3-d weight
        (x[:, :0], w[:, :0]),  # K = 0
        (x, w, b[:7]),  # bias shape
        (x, w, b[None]),
        (x, w, torch.randn(16)[::2]),  # strided bias
    ]
    for args in value_errors:
        with pytest.raises(ValueError, match="gemm"):
            FORMS[form](*args)
    assert gemm.supported(w) and not gemm.supported(w.t()) and not gemm.supported(w.bfloat16())


def test_gemm_panels_must_match_their_weight() -> None:
    w, x = torch.randn(20, 16), torch.randn(5, 16)
    panels = gemm.pack_panels(w)
    assert panels.shape == (2, 16, 16) and torch.equal(panels[1, :, 3], w[19]) and not panels[1, :, 4:].any()
    with pytest.raises(TypeError, match="gemm"):
        gemm.gemm_panels(x, panels.double(), 20)
    for args in [
        (x, panels, 33),  # panels for 17-32 rows
        (x, panels, 16),  # panels for 1-16 rows
        (x, panels, 20.0),  # not an int
        (x, panels[:, :8], 20),  # non-contiguous
        (x, panels.reshape(2, 32, 8), 20),  # not 16 wide
        (x, panels.to("meta"), 20),
        (torch.randn(5, 15), panels, 20),  # K mismatch
        (x, panels, 20, torch.randn(19)),  # bias length
    ]:
        with pytest.raises(ValueError, match="gemm"):
            gemm.gemm_panels(*args)
