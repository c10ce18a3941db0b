"""The small-batch GEMM kernels (shoal/kernels/gemm.c: float32 over the plain weight and over its packed
panels; bfloat16 over its panels on AVX512-BF16) compute x @ w.T + bias to within fp32 summation error of a
float64 reference (bfloat16: plus its one rounding) for any row count and any K and N tails, give a row
bitwise the same output whatever batch it is in, and refuse what they do not serve before touching
memory."""

from __future__ import annotations

import contextlib

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
def test_gemm_work_stealing_keeps_results(form) -> None:
    """Batched calls split their blocks / panels statically and let a thread that is done take the rest of
    another's share (gemm.c, work stealing). More threads than cores (descheduled threads: real stealing),
    more threads than panels (empty shares), and rows over several x chunks (shares reopened per chunk)
    must all give the one-thread result bit for bit."""
    x, w, bias = _case(400, 70, 1100, True)  # 1100 columns: x chunks of ~43 rows (f32), 5 panels of 16
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = FORMS[form](x, w, bias)
        for threads in (2, 3, 7):
            torch.set_num_threads(threads)
            for _ in range(3):
                assert torch.equal(FORMS[form](x, w, bias), one), threads
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
    assert gemm.supported(w) and not gemm.supported(w.t()) and not gemm.supported(w.half())
    assert gemm.supported(w.bfloat16()) == gemm.bf16_available()


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


# ---- bfloat16 panels (vdpbf16ps) ----

needs_bf16 = pytest.mark.skipif(
    not gemm.bf16_available(),
    reason="gemm.c was built without AVX512-BF16 (no vdpbf16ps for this CPU/compiler): no bf16 kernel here",
)
BF16_ROWS = [1, 2, 3, 4, 5, 7, 8, 9, 16, 17, 63, 193, 300]  # 1-4: the decode loop
# (N, K): K of 1, odd K (a pair with a zero half), K = 513 (256-column blocks and a 1-column tail), 576;
# N around the 32-row panels: 1, 31, 32, 33, 65.
BF16_SHAPES = [(1, 1), (31, 7), (32, 2), (33, 513), (65, 576), (5, 3)]


def _bf16_case(rows: int, n: int, k: int, with_bias: bool, seed: int = 0):
    x, w, bias = _case(rows, n, k, with_bias, seed)
    return x.bfloat16(), w.bfloat16(), None if bias is None else bias.bfloat16()


def _bf16_gemm(x, w, bias=None):
    return gemm.gemm_panels(x, gemm.pack_panels(w), w.shape[0], bias)


@needs_bf16
@pytest.mark.parametrize("rows", BF16_ROWS)
@pytest.mark.parametrize(("n", "k"), BF16_SHAPES)
@pytest.mark.parametrize("with_bias", [True, False])
def test_gemm_bf16_matches_float64_reference(rows, n, k, with_bias) -> None:
    """Bound: fp32 accumulation of exact bf16 products (_bound: (K + 2) * 2^-23 * sum |x||w|), then one
    rounding to bf16, whose unit roundoff is 2^-8 (8 significant bits): |got - exact| <= acc + 2^-8 *
    (|exact| + acc). A dropped or doubled pair (error about |x||w|) is far outside it."""
    x, w, bias = _bf16_case(rows, n, k, with_bias)
    got = _bf16_gemm(x, w, bias)
    exact = x.double() @ w.double().T + (0 if bias is None else bias.double())
    acc = _bound(x.float(), w.float(), None if bias is None else bias.float())
    assert got.shape == (rows, n) and got.dtype == torch.bfloat16 and got.is_contiguous()
    assert ((got.double() - exact).abs() <= acc + 2**-8 * (exact.abs() + acc)).all()


@needs_bf16
@pytest.mark.parametrize("k", [7, 576, 700])
def test_gemm_bf16_rounds_once_after_the_bias(k) -> None:
    """With small integers every product and sum is exact in fp32 (|sum| < 2^24), so the output must be
    bitwise bf16(sum + bias) rounded once to nearest even (torch's float -> bfloat16), not a sum of rounded
    parts; bias = integer + 0.5 is exact in bf16 and makes ties and non-ties."""
    g = torch.Generator().manual_seed(k)
    x = torch.randint(-8, 9, (40, k), generator=g).bfloat16()
    w = torch.randint(-8, 9, (70, k), generator=g).bfloat16()
    bias = (torch.randint(-60, 60, (70,), generator=g) + 0.5).bfloat16()
    exact = x.double() @ w.double().T + bias.double()
    want = exact.float().bfloat16()  # exact in float32, then one rounding
    got = _bf16_gemm(x, w, bias)
    assert torch.equal(got, want)
    assert (want.double() != exact).any()  # the rounding did something


@needs_bf16
def test_gemm_bf16_rows_are_batch_invariant() -> None:
    """A row's output is bitwise the same whatever M and wherever it sits (the decode loop for 1-4 rows;
    tile of 8, remainder tiles, x in chunks of at most 88 rows at K = 2200, cut in equal parts: 200 rows are
    72 + 72 + 56, 89 rows 48 + 48), against rows computed one at a time."""
    x, w, bias = _bf16_case(200, 45, 2200, True)
    panels = gemm.pack_panels(w)
    alone = torch.cat([gemm.gemm_panels(x[i : i + 1], panels, 45, bias) for i in range(200)])
    for rows in (2, 3, 4, 5, 8, 9, 13, 64, 89, 200):
        for start in (0, 3, 200 - rows):
            part = x[start : start + rows].contiguous()
            got = gemm.gemm_panels(part, panels, 45, bias)
            assert torch.equal(got, alone[start : start + rows]), (rows, start)


@needs_bf16
@pytest.mark.parametrize(("n", "k"), [(33, 7), (100, 1), (65, 513)])
def test_gemm_bf16_decode_rows_match_the_tiles_bitwise(n, k) -> None:
    """1-4 rows (the decode loop, whole K in registers) give bitwise the rows' outputs of a 5+ row call
    (the tiles over 256-column k-blocks): odd K (the zero-padded last pair), a k-block tail, partial panels.
    Sensitive to the order: the first and last products are +-2^24, so the terms between them are summed
    at an fp32 spacing of 2 and another order gives another result (summing the pairs in reverse order
    fails this test: checked)."""
    x, w, bias = _bf16_case(9, n, k, True, seed=3)
    if k > 1:
        x[:, 0] = x[:, -1] = w[:, 0] = 4096.0
        w[:, -1] = -4096.0
    panels = gemm.pack_panels(w)
    tiles = gemm.gemm_panels(x, panels, n, bias)
    with _decode_loop(True):  # whatever an engine loaded in this process chose
        for rows in (1, 2, 3, 4):
            for start in (0, 9 - rows):
                got = gemm.gemm_panels(x[start : start + rows].contiguous(), panels, n, bias)
                assert torch.equal(got, tiles[start : start + rows]), (rows, start)


@contextlib.contextmanager
def _decode_loop(on: bool):
    before = gemm.bf16_decode_loop()
    gemm.set_bf16_decode_loop(on)
    try:
        yield
    finally:
        gemm.set_bf16_decode_loop(before)


@needs_bf16
def test_choosing_the_bf16_route_for_1_to_4_rows_keeps_every_output(monkeypatch):
    """choose_bf16_decode_loop times both routes on the weights given and leaves the faster one on (which
    one is the CPU's affair: docs/benchmarks.md), once per process; 1-4 rows give bitwise the same
    outputs either way."""
    monkeypatch.setattr(gemm, "_chosen", None)  # as in a fresh process (an engine here may have chosen)
    weights = [torch.randn(n, k).bfloat16() for n, k in ((96, 64), (64, 96), (200, 33))]
    linears = [(gemm.pack_panels(w), w.shape[0]) for w in weights]
    with _decode_loop(True):
        choice = gemm.choose_bf16_decode_loop(linears, rounds=2)
        assert set(choice) == {"decode_loop", "loop_ms", "tiles_ms"}
        assert gemm.bf16_decode_loop() is choice["decode_loop"]
        assert choice["decode_loop"] == (choice["loop_ms"] < choice["tiles_ms"])
        gemm.set_bf16_decode_loop(
            not choice["decode_loop"]
        )  # a later model's load neither re-times nor resets
        assert gemm.choose_bf16_decode_loop(linears) is choice
        assert gemm.bf16_decode_loop() is not choice["decode_loop"]
        assert gemm._leading(linears, 1) == linears[:1] and gemm._leading(linears, 1 << 30) == linears
        for rows in (1, 2, 3, 4):
            x = torch.randn(rows, 33).bfloat16()
            panels, n = linears[2]
            outs = []
            for on in (True, False):
                gemm.set_bf16_decode_loop(on)
                outs.append(gemm.gemm_panels(x, panels, n))
            assert torch.equal(outs[0], outs[1]), rows
    monkeypatch.setattr(gemm, "_chosen", None)
    assert gemm.choose_bf16_decode_loop([]) is None


@needs_bf16
def test_gemm_bf16_work_stealing_keeps_results() -> None:
    """As test_gemm_work_stealing_keeps_results, for the bf16 panels (x chunks of ~170 rows at 1100
    columns, 3 panels of 32)."""
    x, w, bias = _bf16_case(400, 70, 1100, True)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _bf16_gemm(x, w, bias)
        for threads in (2, 3, 7):
            torch.set_num_threads(threads)
            for _ in range(3):
                assert torch.equal(_bf16_gemm(x, w, bias), one), threads
    finally:
        torch.set_num_threads(before)


@needs_bf16
def test_gemm_bf16_threads_do_not_change_results() -> None:
    x, w, bias = _bf16_case(20, 101, 96, True)
    before = torch.get_num_threads()
    try:
        for rows in (1, 4, 20):  # the decode loop and the tiles
            torch.set_num_threads(1)
            one = _bf16_gemm(x[:rows], w, bias)
            torch.set_num_threads(max(2, before))
            assert torch.equal(_bf16_gemm(x[:rows], w, bias), one), rows
    finally:
        torch.set_num_threads(before)


@needs_bf16
def test_gemm_bf16_zero_rows_and_special_values() -> None:
    """NaN and inf propagate to their own row only; with an odd K the last column's pair is zero-padded,
    so a NaN at the start of the next row of x is never read into the row before it."""
    x, w, bias = _bf16_case(5, 40, 25, True)
    assert _bf16_gemm(x[:0], w, bias).shape == (0, 40)
    x[1, 3], x[2, 0], x[4, 0] = float("nan"), float("inf"), float("nan")
    w[:, 0] = w[:, 0].abs() + 1  # positive: row 2 is +inf everywhere
    got = _bf16_gemm(x, w, bias)
    assert got[1].isnan().all() and (got[2] == float("inf")).all() and got[4].isnan().all()
    assert got[[0, 3]].isfinite().all()


def test_pack_panels_bf16_layout() -> None:
    """panels[p, i, j, h] = w[32p + j, 2i + h], zeros past N and past an odd K (tensor work: any CPU)."""
    w = torch.randn(40, 7).bfloat16()
    panels = gemm.pack_panels(w)
    assert panels.shape == (2, 4, 32, 2) and panels.dtype == torch.bfloat16 and panels.is_contiguous()
    assert torch.equal(panels[1, 2, 7], w[39, 4:6]) and torch.equal(panels[0, 3, 5, 0], w[5, 6])
    assert not panels[0, 3, :, 1].any() and not panels[1, :, 8:].any()


@needs_bf16
def test_gemm_bf16_rejects_what_it_does_not_serve() -> None:
    """Mismatched dtypes raise TypeError; panels for another shape, devices and strides ValueError; the
    plain-weight kernel is float32 only."""
    w, x, b = torch.randn(40, 16).bfloat16(), torch.randn(5, 16).bfloat16(), torch.randn(40).bfloat16()
    panels = gemm.pack_panels(w)
    for args in [(x.float(), panels, 40), (x, panels, 40, b.float()), (x.half(), panels, 40)]:
        with pytest.raises(TypeError, match="gemm"):
            gemm.gemm_panels(*args)
    with pytest.raises(TypeError, match="gemm"):
        gemm.gemm_panels(x, gemm.pack_panels(w.float()), 40)  # float32 panels, bf16 x
    with pytest.raises(TypeError, match="gemm"):
        gemm.gemm(x, w, b)  # no plain-weight bf16 kernel
    value_errors = [
        (x, panels, 32),  # panels for 1-32 rows
        (x, panels, 65),  # panels for 65-96 rows
        (x, panels, 40.0),  # not an int
        (torch.randn(5, 18).bfloat16(), panels, 40),  # K = 18: 9 pairs, the panels hold 8
        (torch.randn(5, 14).bfloat16(), panels, 40),
        (torch.randn(5, 32).bfloat16()[:, :16], panels, 40),  # non-contiguous x
        (x, panels[:, :4], 40),  # non-contiguous panels
        (x, panels.to("meta"), 40),
        (x.to("meta"), panels, 40),
        (x, panels, 40, b[:39]),
        (x, panels, 40, torch.randn(80).bfloat16()[::2]),
    ]
    for args in value_errors:
        with pytest.raises(ValueError, match="gemm"):
            gemm.gemm_panels(*args)


@pytest.mark.skipif(gemm.bf16_available(), reason="this CPU has the bf16 kernel: nothing to refuse")
def test_gemm_bf16_without_the_kernel_is_unsupported() -> None:
    w = torch.randn(40, 16).bfloat16()
    assert not gemm.supported(w)
    with pytest.raises(RuntimeError, match="bfloat16"):
        gemm.gemm_panels(torch.randn(5, 16).bfloat16(), gemm.pack_panels(w), 40)
