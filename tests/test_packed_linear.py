"""The CPU linear swap (the gemv kernel for decode, oneDNN pre-packed weights for small batches, a big-batch
route for prompt chunks) computes the same matmul as torch's linear, in float32 and (where the CPU has it)
bfloat16."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from shoal.kernels import gemm, gemv
from shoal.model.packed_linear import (
    BIG_BATCH_ROWS,
    GEMM_MAX_ROWS,
    PackedLinear,
    pack_linears,
    packing_available,
)

CPU = torch.device("cpu")
pytestmark = pytest.mark.timeout(60)
needs_bf16 = pytest.mark.skipif(
    not packing_available(CPU, torch.bfloat16),
    reason="oneDNN bf16 linears need AVX512 (BW/VL/DQ) or AVX-NE-CONVERT",
)
needs_fp32 = pytest.mark.skipif(
    not packing_available(CPU, torch.float32), reason="torch built without oneDNN"
)
ROUTES = [  # (dtype, oneDNN copy, big-batch route, keep the plain weight) as pack_linears makes them
    pytest.param(torch.float32, True, "plain", True, marks=needs_fp32),
    pytest.param(torch.float32, False, "plain", True, marks=needs_fp32),  # no room for the oneDNN copy
    pytest.param(torch.bfloat16, True, None, True, marks=needs_bf16),  # gemv for 1-4 rows
    pytest.param(torch.bfloat16, True, "fp32", True, marks=needs_bf16),
    pytest.param(torch.bfloat16, False, None, True, marks=needs_bf16),  # no room for the oneDNN copy
    pytest.param(torch.bfloat16, True, None, False, marks=needs_bf16),  # no kernel: packed weight only
    pytest.param(torch.bfloat16, True, "fp32", False, marks=needs_bf16),
]


@pytest.mark.parametrize(("dtype", "packed", "big_route", "keep_weight"), ROUTES)
@pytest.mark.parametrize("rows", [1, 3, 7, BIG_BATCH_ROWS, 300])  # gemv, gemv, packed, big, big
def test_packed_linear_matches_torch(dtype, packed, big_route, keep_weight, rows: int) -> None:
    torch.manual_seed(rows)
    linear = nn.Linear(192, 320, bias=True).to(dtype)
    x = torch.randn(rows, 192, dtype=dtype)
    got = PackedLinear(linear, packed, big_route, keep_weight)(x)
    assert got.dtype == dtype and got.shape == (rows, 320)
    # Reference: the exact matmul of the same values; a bf16 GEMM rounds its result once to bf16.
    exact = F.linear(x.double(), linear.weight.double(), linear.bias.double())
    rounding = exact.abs() * (2**-8 if dtype == torch.bfloat16 else 1e-6) + 1e-5  # plus summation order
    assert ((got.double() - exact).abs() <= rounding).all()
    theirs = F.linear(x, linear.weight, linear.bias).double()
    assert (got.double() - theirs).abs().max() <= theirs.abs().max() * (
        2**-7 if dtype == torch.bfloat16 else 1e-6
    )


@pytest.mark.parametrize(
    "dtype", [pytest.param(torch.float32, marks=needs_fp32), pytest.param(torch.bfloat16, marks=needs_bf16)]
)
def test_pack_linears_swaps_every_linear_and_keeps_shapes(dtype) -> None:
    model = nn.Sequential(nn.Linear(16, 32), nn.SiLU(), nn.Linear(32, 8)).to(dtype)
    x = torch.randn(3, 5, 16, dtype=dtype)
    before = model(x)
    pack_linears(model, available_ram=None)
    assert all(type(m) is not nn.Linear for m in model.modules())
    after = model(x)
    assert after.shape == before.shape
    assert (after.float() - before.float()).abs().max() < (0.05 if dtype == torch.bfloat16 else 1e-5)


@needs_fp32
def test_float32_keeps_the_plain_weight_and_packs_only_when_ram_allows() -> None:
    linear = nn.Linear(64, 64)

    def swapped(ram: int | None) -> PackedLinear:
        return pack_linears(nn.Sequential(copy.deepcopy(linear)), available_ram=ram)[0]

    roomy, tight = swapped(1 << 34), swapped(64 * 64 * 4)  # tight: the copy would not be small next to RAM
    # The copy: the gemm kernel's panels where it is built, else oneDNN's packed weight.
    assert (roomy.panels if roomy.use_gemm else roomy.packed) is not None
    assert roomy.packed is None or roomy.panels is None
    assert tight.packed is None and tight.panels is None
    assert roomy.weight is not None and tight.weight is not None and roomy.big_route == "plain"
    for rows in (1, 7, BIG_BATCH_ROWS + 1, GEMM_MAX_ROWS):
        x = torch.randn(rows, 64)
        want = F.linear(x.double(), linear.weight.double(), linear.bias.double())
        for route in (roomy, tight):
            assert (route(x).double() - want).abs().max() < 1e-5


@pytest.mark.parametrize(
    "dtype", [pytest.param(torch.float32, marks=needs_fp32), pytest.param(torch.bfloat16, marks=needs_bf16)]
)
def test_decode_rows_run_on_gemv(dtype, monkeypatch) -> None:
    """Where the kernel builds, pack_linears keeps the plain weight and 1-4 rows go to gemv, more elsewhere
    (bfloat16: where no panels are made; with panels, test_bfloat16_decode_rows_run_on_the_panels)."""
    if not gemv.supported(torch.zeros(1, 1, dtype=dtype)):
        pytest.skip("no C compiler: native kernels off")
    ram = 1 << 34 if dtype == torch.float32 or not gemm.bf16_available() else None  # None: no copy, no panels
    model = pack_linears(nn.Sequential(nn.Linear(64, 48).to(dtype)), available_ram=ram)
    layer = model[0]
    assert not layer.decode_on_panels
    assert layer.use_gemv and layer.weight is not None
    assert (layer.panels if layer.use_gemm else layer.packed) is not None or ram is None
    calls = []
    monkeypatch.setattr(gemv, "gemv", lambda *args: calls.append(args[0].shape[0]) or gemv._run(*args))
    for rows in (1, 4, 5):
        layer(torch.randn(rows, 64, dtype=dtype))
    assert calls == [1, 4]


def test_float32_batches_run_on_gemm(monkeypatch) -> None:
    """Where the kernel builds, float32 batches of 5+ rows go to the gemm kernel's panels where the copy fits
    in RAM (prompt chunks included); without the copy, 5 to GEMM_MAX_ROWS - 1 rows go to the kernel over
    the plain weight and bigger batches to F.linear."""
    if not gemm.supported(torch.zeros(1, 1)):
        pytest.skip("no C compiler: native kernels off")
    roomy, tight = (pack_linears(nn.Sequential(nn.Linear(64, 48)), available_ram=r)[0] for r in (1 << 34, 1))
    assert roomy.use_gemm and not PackedLinear(nn.Linear(4, 4).bfloat16(), False, None, True).use_gemm
    calls = []
    for name in ("gemm", "gemm_panels"):
        real = getattr(gemm, name)
        monkeypatch.setattr(
            gemm, name, lambda *a, real=real, name=name: calls.append((name, len(a[0]))) or real(*a)
        )
    for layer in (roomy, tight):
        for rows in (4, 5, GEMM_MAX_ROWS - 1, GEMM_MAX_ROWS, 600):
            layer(torch.randn(rows, 64))
    last = GEMM_MAX_ROWS - 1
    panels = [("gemm_panels", rows) for rows in (5, last, GEMM_MAX_ROWS, 600)]
    assert calls == [*panels, ("gemm", 5), ("gemm", last)]


@pytest.mark.skipif(not gemm.bf16_available(), reason="gemm.c built without AVX512-BF16: no bf16 kernel here")
def test_bfloat16_batches_run_on_the_bf16_panels(monkeypatch) -> None:
    """Where the bf16 kernel is built and a copy fits, bfloat16 batches of 5+ rows go to its panels (which
    replace oneDNN's copy), and so do 1-4 rows; with the fp32 big-batch route, from BIG_BATCH_ROWS on that
    route instead; with no room for a copy, not at all."""
    linear = nn.Linear(64, 48).bfloat16()
    roomy = PackedLinear(linear, True, None, True)
    with_fp32 = PackedLinear(linear, True, "fp32", True)
    tight = PackedLinear(linear, False, None, True)
    assert roomy.panels is not None and roomy.packed is None and roomy.use_gemm
    assert with_fp32.panels is not None and with_fp32.packed_fp32 is not None
    assert tight.panels is None and not tight.use_gemm
    calls = []
    real = gemm.gemm_panels
    monkeypatch.setattr(gemm, "gemm_panels", lambda *a: calls.append(len(a[0])) or real(*a))
    for layer, want in ((roomy, [4, 5, 47, 48, 600]), (with_fp32, [4, 5, 47]), (tight, [])):
        calls.clear()
        for rows in (4, 5, BIG_BATCH_ROWS - 1, BIG_BATCH_ROWS, 600):
            x = torch.randn(rows, 64, dtype=torch.bfloat16)
            exact = F.linear(x.double(), linear.weight.double(), linear.bias.double())
            got = layer(x)
            assert (
                got.dtype == torch.bfloat16
                and ((got.double() - exact).abs() <= exact.abs() * 2**-8 + 1e-5).all()
            )
        assert calls == want


@pytest.mark.skipif(not gemm.bf16_available(), reason="gemm.c built without AVX512-BF16: no bf16 kernel here")
@pytest.mark.parametrize("bias", [True, False])
def test_bfloat16_decode_rows_run_on_the_panels(bias, monkeypatch) -> None:
    """Where the bf16 panels are made, 1-4 rows run on them too (gemm.c streams them faster than gemv the
    plain weight; module docstring), bitwise the rows of a larger batch; without panels, on gemv. An odd K
    and N (the zero-padded last pair, a partial panel)."""
    linear = nn.Linear(67, 45, bias=bias).bfloat16()
    roomy, tight = PackedLinear(linear, True, None, True), PackedLinear(linear, False, None, True)
    assert roomy.decode_on_panels and not tight.decode_on_panels and tight.use_gemv
    calls = []
    real_gemm, real_gemv = gemm.gemm_panels, gemv.gemv
    monkeypatch.setattr(gemm, "gemm_panels", lambda *a: calls.append(("panels", len(a[0]))) or real_gemm(*a))
    monkeypatch.setattr(gemv, "gemv", lambda *a: calls.append(("gemv", len(a[0]))) or real_gemv(*a))
    x = torch.randn(7, 67, dtype=torch.bfloat16)
    batch = roomy(x)
    exact = F.linear(
        x.double(), linear.weight.double(), None if linear.bias is None else linear.bias.double()
    )
    for rows in (1, 2, 3, 4):
        got = roomy(x[:rows].view(1, rows, 67))  # any leading shape
        assert got.shape == (1, rows, 45) and torch.equal(got[0], batch[:rows])
        assert ((tight(x[:rows]).double() - exact[:rows]).abs() <= exact[:rows].abs() * 2**-7 + 1e-4).all()
    want = [("panels", 7)] + [r for n in (1, 2, 3, 4) for r in (("panels", n), ("gemv", n))]
    assert calls == want


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    "dtype", [pytest.param("float32", marks=needs_fp32), pytest.param("bfloat16", marks=needs_bf16)]
)
def test_smollm2_chat_answer(smollm2_dir, dtype) -> None:
    """The default model with packed linears gives the reference chat answer (float32 is what --dtype auto
    picks on CPUs without fast bf16)."""
    from shoal.engine.config import EngineConfig
    from shoal.engine.llm_engine import LLMEngine
    from shoal.engine.sampling_params import SamplingParams

    engine = LLMEngine(EngineConfig(model=str(smollm2_dir), dtype=dtype, kv_cache_memory=128 << 20))
    assert any(isinstance(m, PackedLinear) for m in engine.model.modules())
    tok = engine.tokenizer
    question = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
    ids = tok.encode(tok.apply_chat_template(question), add_special_tokens=False)
    out = engine.generate([ids], SamplingParams(temperature=0, max_tokens=20))[0].outputs[0]
    assert out.text == "The capital of France is Paris."
    assert out.finish_reason == "stop"
