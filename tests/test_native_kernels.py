"""The native kernels (paged decode attention, float32 gemv) compute what the PyTorch paths compute, and
shoal falls back to PyTorch where they cannot be built."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tiny_models import make_engine

from shoal import kernels
from shoal.engine.sampling_params import SamplingParams
from shoal.kernels import gemv
from shoal.kernels import paged_attention as native

pytestmark = pytest.mark.timeout(120)
CPU = torch.device("cpu")
needs_kernel = pytest.mark.skipif(
    not native.supported(CPU, torch.float32), reason="no C compiler: native kernels off"
)


def _paged_case(seed: int, lens: list[int], heads: int, kv_heads: int, dim: int, block_size: int, dtype):
    """Random caches with each sequence's blocks scattered at random over the cache."""
    g = torch.Generator().manual_seed(seed)
    width = max(-(-n // block_size) for n in lens)
    num_blocks = len(lens) * width + 3
    tables = torch.randperm(num_blocks, generator=g)[: len(lens) * width].view(len(lens), width)
    shape = (num_blocks * block_size, kv_heads, dim)
    k_cache = torch.randn(shape, generator=g).to(dtype)
    v_cache = torch.randn(shape, generator=g).to(dtype)
    q = torch.randn(len(lens), heads, dim, generator=g).to(dtype)
    return q, k_cache, v_cache, tables.to(torch.int32), torch.tensor(lens, dtype=torch.int32)


def _reference(q, k_cache, v_cache, tables, lens, block_size, window, scale):
    """Per sequence: gather its keys by position, float64 SDPA."""
    out = []
    for b, n in enumerate(lens.tolist()):
        pos = torch.arange(n)
        slots = tables[b].long()[pos // block_size] * block_size + pos % block_size
        if window:
            slots = slots[-window:]
        k = k_cache[slots].double().transpose(0, 1)
        v = v_cache[slots].double().transpose(0, 1)
        o = F.scaled_dot_product_attention(q[b].double()[:, None], k, v, scale=scale, enable_gqa=True)
        out.append(o[:, 0])
    return torch.stack(out)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    ("heads", "kv_heads", "dim"),
    [(9, 3, 64), (8, 8, 128), (4, 1, 40)],  # SmolLM2's GQA, MHA at 128, a generic (unspecialized) dim
)
@pytest.mark.parametrize("window", [None, 20])
def test_kernel_matches_reference(dtype, heads, kv_heads, dim, window) -> None:
    lens = [1, 2, 15, 16, 17, 33, 100, 257]
    block_size = 16
    q, kc, vc, tables, lens_t = _paged_case(dim + heads, lens, heads, kv_heads, dim, block_size, dtype)
    scale = dim**-0.5
    got = native.paged_decode_attention(q, kc, vc, tables, lens_t, block_size, window, scale)
    want = _reference(q, kc, vc, tables, lens_t, block_size, window, scale)
    assert got.dtype == dtype and got.shape == q.shape
    # float32: summation order only; bfloat16: one rounding of the output, half a bf16 ulp (2^-8 relative).
    err = (got.double() - want).abs()
    bound = want.abs() * (2**-8 if dtype == torch.bfloat16 else 0) + 2e-6
    print(f"{dtype} H={heads} Hkv={kv_heads} D={dim} window={window}: max |err| {err.max():.2e}")
    assert (err <= bound).all()


@needs_kernel
def test_kernel_ignores_padding_of_block_tables() -> None:
    """Entries past a sequence's last block (padding, here garbage ids) are never read."""
    q, kc, vc, tables, lens = _paged_case(0, [5, 40], 4, 2, 64, 16, torch.float32)
    padded = torch.cat([tables, torch.full((2, 4), 10**6, dtype=torch.int32)], dim=1)
    got = native.paged_decode_attention(q, kc, vc, padded, lens, 16, None, 0.125)
    assert torch.equal(got, native.paged_decode_attention(q, kc, vc, tables, lens, 16, None, 0.125))


@needs_kernel
def test_kernel_rejects_mismatched_inputs() -> None:
    q, kc, vc, tables, lens = _paged_case(0, [5], 4, 2, 64, 16, torch.float32)
    with pytest.raises(ValueError, match="int32"):
        native.paged_decode_attention(q, kc, vc, tables.long(), lens, 16, None, 0.125)
    with pytest.raises(ValueError, match="dtype"):
        native.paged_decode_attention(q.bfloat16(), kc, vc, tables, lens, 16, None, 0.125)


@needs_kernel
def test_engine_decode_same_with_and_without_kernel(tiny_model_dirs) -> None:
    """A batch of decodes of mixed lengths through the runner: the kernel and the gather path agree."""
    engine = make_engine(tiny_model_dirs["mistral"], kv_tokens=2048, dtype="float32", max_model_len=512)
    runner = engine.runner
    assert runner.native_decode
    g = torch.Generator().manual_seed(0)
    lens = [3, 40, 17, 90]  # mistral's window (16) is shorter than most
    prompts = [torch.randint(0, 1000, (n,), generator=g).tolist() for n in lens]
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    with_kernel = [o.outputs[0].token_ids for o in engine.generate(prompts, [params] * len(prompts))]
    runner.native_decode = False
    try:
        gathered = [o.outputs[0].token_ids for o in engine.generate(prompts, [params] * len(prompts))]
    finally:
        runner.native_decode = True
    assert with_kernel == gathered


def test_disabled_or_no_compiler_falls_back(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("SHOAL_CACHE_DIR", str(tmp_path))
    kernels.load.cache_clear()
    try:
        monkeypatch.setenv("SHOAL_NATIVE_KERNELS", "0")
        assert kernels.load("paged_decode_attention") is None
        kernels.load.cache_clear()
        monkeypatch.setenv("SHOAL_NATIVE_KERNELS", "1")
        monkeypatch.setenv("CC", "no-such-compiler")
        assert kernels.load("paged_decode_attention") is None
        assert not list(tmp_path.rglob("*.so"))
    finally:
        kernels.load.cache_clear()


@needs_kernel
def test_build_is_cached_per_source(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("SHOAL_CACHE_DIR", str(tmp_path))
    kernels.load.cache_clear()
    try:
        assert kernels.load("paged_decode_attention") is not None
        built = list(tmp_path.rglob("*.so"))
        assert len(built) == 1 and built[0].name.startswith("paged_decode_attention-")
        mtime = built[0].stat().st_mtime_ns
        kernels.load.cache_clear()
        assert kernels.load("paged_decode_attention") is not None
        assert built[0].stat().st_mtime_ns == mtime  # loaded, not rebuilt
    finally:
        kernels.load.cache_clear()


@pytest.mark.skipif(not gemv.supported(torch.zeros(1, 1)), reason="no C compiler: native kernels off")
@pytest.mark.parametrize("rows", [1, 2, 4])
@pytest.mark.parametrize(("n", "k"), [(320, 192), (7, 37)])  # 37: the tail past the 16-wide loop
@pytest.mark.parametrize("with_bias", [True, False])
def test_gemv_matches_reference(rows, n, k, with_bias) -> None:
    g = torch.Generator().manual_seed(rows * n + k)
    x, w = torch.randn(rows, k, generator=g), torch.randn(n, k, generator=g)
    bias = torch.randn(n, generator=g) if with_bias else None
    got = gemv.gemv(x, w, bias)
    want = x.double() @ w.double().T + (0 if bias is None else bias.double())
    assert got.shape == (rows, n) and got.dtype == torch.float32
    # fp32 summation of k products: rounding grows like sqrt(k) * |x||w| * 2^-24
    bound = (x.double().abs() @ w.double().abs().T) * k**0.5 * 2**-23 + 1e-6
    assert ((got.double() - want).abs() <= bound).all()


@pytest.mark.skipif(not gemv.supported(torch.zeros(1, 1)), reason="no C compiler: native kernels off")
def test_gemv_rejects_what_it_does_not_serve() -> None:
    w = torch.randn(8, 16)
    with pytest.raises(ValueError, match="gemv"):
        gemv.gemv(torch.randn(gemv.MAX_ROWS + 1, 16), w)
    with pytest.raises(ValueError, match="gemv"):
        gemv.gemv(torch.randn(1, 16).bfloat16(), w.bfloat16())
    assert not gemv.supported(w.bfloat16()) and not gemv.supported(w.t())
