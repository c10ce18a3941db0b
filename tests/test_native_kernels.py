"""The native kernels (paged decode attention, float32 gemv) compute what the PyTorch paths compute, and
shoal falls back to PyTorch where they cannot be built."""

from __future__ import annotations

import contextlib
import resource

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


def _softmax_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """One sequence in float64 with an explicit torch.softmax: q [H, D], k/v [L, Hkv, D] -> [H, D]."""
    groups = q.shape[0] // k.shape[1]
    k, v = (t.double().repeat_interleave(groups, 1) for t in (k, v))
    probs = torch.softmax(scale * torch.einsum("hd,lhd->hl", q.double(), k), dim=-1)
    return torch.einsum("hl,lhd->hd", probs, v)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_special_values_follow_softmax(dtype) -> None:
    """-inf scores weigh exactly 0, a sequence whose scores are all -inf (a fully masked row) gets NaN as
    torch.softmax does, and a NaN stays inside its own head: what -ffast-math would not promise."""
    block_size, n, scale = 16, 20, 0.125
    q, kc, vc, tables, lens = _paged_case(7, [n] * 3, 4, 2, 64, block_size, dtype)
    q[:, :, 0] = q[:, :, 0].abs() + 1  # positive in dim 0: a key with -inf there scores -inf
    pos = torch.arange(n)
    slots = tables.long()[:, pos // block_size] * block_size + pos % block_size  # [3, n]
    kc[slots[0, ::2], :, 0] = float("-inf")  # sequence 0: every other key masked
    kc[slots[1], :, 0] = float("-inf")  # sequence 1: every key masked
    q[2, 1, 5] = float("nan")  # sequence 2: a NaN in query head 1 (kv head 0, shared with head 0)
    got = native.paged_decode_attention(q, kc, vc, tables, lens, block_size, None, scale).double()
    want = torch.stack([_softmax_attention(q[b], kc[slots[b]], vc[slots[b]], scale) for b in range(3)])
    assert want[0].isfinite().all() and want[1].isnan().all() and want[2, 1].isnan().all()
    assert want[2, [0, 2, 3]].isfinite().all()
    assert torch.equal(got.isnan(), want.isnan())
    # Sequence 0 is attention over its unmasked keys alone (the masked ones weigh exactly 0).
    odd = slots[0, 1::2]
    alone = _softmax_attention(q[0], kc[odd], vc[odd], scale)
    finite = want.isfinite()
    rel = 2**-8 if dtype == torch.bfloat16 else 0
    assert ((got - want).abs()[finite] <= (want.abs() * rel + 2e-6)[finite]).all()
    assert ((got[0] - alone).abs() <= alone.abs() * rel + 2e-6).all()


@needs_kernel
def test_kernel_rejects_out_of_contract_inputs() -> None:
    """Wrong dtypes raise TypeError, everything else ValueError, before the kernel reads a byte."""
    q, kc, vc, tables, lens = _paged_case(0, [5, 40], 4, 2, 64, 16, torch.float32)
    num_blocks = kc.shape[0] // 16

    def call(q=q, kc=kc, vc=vc, tables=tables, lens=lens, block_size=16, window=None):
        return native.paged_decode_attention(q, kc, vc, tables, lens, block_size, window, 0.125)

    bad_ids = [tables.clone() for _ in range(3)]
    bad_ids[0][1, 2] = num_blocks  # one past the cache, in a block sequence 1 reads
    bad_ids[1][1, 0] = -1
    bad_ids[2][0, 0] = 2**31 - 1
    for t in bad_ids:
        with pytest.raises(ValueError, match="block id"):
            call(tables=t)
    for n in (0, -3, tables.shape[1] * 16 + 1):  # lengths the table cannot hold
        with pytest.raises(ValueError, match="context length"):
            call(lens=torch.tensor([5, n], dtype=torch.int32))
    type_errors = [
        {"tables": tables.long()},
        {"lens": lens.long()},
        {"q": q.bfloat16()},
        {"kc": kc.double(), "vc": vc.double(), "q": q.double()},
    ]
    for kwargs in type_errors:
        with pytest.raises(TypeError):
            call(**kwargs)
    value_errors = [
        {"kc": kc.transpose(1, 2).contiguous().transpose(1, 2)},  # non-contiguous cache
        {"tables": tables.t().contiguous().t()},  # non-contiguous table
        {"vc": vc[:-16]},  # caches of different sizes
        {"q": q[:, :, :32].contiguous()},  # head dim mismatch
        {"q": q[:, :3].contiguous()},  # 3 query heads over 2 kv heads
        {"q": q[0]},  # not [B, H, D]
        {"tables": tables[:1]},  # one table for two sequences
        {"lens": lens[:1]},
        {"tables": tables[:, :0]},
        {"block_size": 0},
        {"block_size": 7},  # does not divide the cache's slots
        {"window": -1},
    ]
    for kwargs in value_errors:
        with pytest.raises(ValueError, match="paged_decode_attention"):
            call(**kwargs)
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="CPU"):
            call(q=q.cuda())


@needs_kernel
def test_kernel_reports_failed_allocation() -> None:
    """A context whose score buffer cannot be allocated raises MemoryError (malloc checked): 2^24 keys x
    64 heads of fp32 scores is 4 GiB, refused under an address-space limit 256 MiB above current use (4 GiB,
    not 1: in a long pytest process another thread may unmap memory between the limit's reading of VmSize
    and the call, which once left room for a 1 GiB buffer)."""
    q = torch.randn(1, 64, 8)
    kc = torch.randn(16, 1, 8)
    tables = torch.zeros(1, 2**20, dtype=torch.int32)  # every position reads the one block (valid ids)
    lens = torch.tensor([2**24], dtype=torch.int32)
    with _address_space_limit(256 << 20), pytest.raises(MemoryError, match="paged_decode_attention"):
        native.paged_decode_attention(q, kc, kc, tables, lens, 16, None, 1.0)


@contextlib.contextmanager
def _address_space_limit(headroom: int):
    """RLIMIT_AS at current virtual size + headroom, so that a larger malloc fails (restored after)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    vm = int(next(line for line in open("/proc/self/status") if line.startswith("VmSize")).split()[1]) * 1024
    limit = vm + headroom
    if hard != resource.RLIM_INFINITY and hard < limit:
        pytest.skip("address-space hard limit too low to test")
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


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


def test_build_key_covers_the_shared_headers(monkeypatch, tmp_path) -> None:
    """A kernel may include any header beside it (bf16.h): editing one must rebuild every kernel."""
    for f in kernels.SOURCE_DIR.glob("*.h"):
        (tmp_path / f.name).write_bytes(f.read_bytes())
    monkeypatch.setattr(kernels, "SOURCE_DIR", tmp_path)
    source = b"int f(void) { return 0; }"
    before = kernels._build_key(source, "cc")
    assert kernels._build_key(source, "cc") == before
    (tmp_path / "bf16.h").write_text("/* edited */", encoding="utf-8")
    assert kernels._build_key(source, "cc") != before


needs_gemv = pytest.mark.skipif(
    not gemv.supported(torch.zeros(1, 1)), reason="no C compiler: native kernels off"
)
GEMV_SHAPES = [(320, 192), (7, 37), (33, 65), (5, 1)]  # (N, K); odd ones: tails past every vector width


def _gemv_case(rows: int, n: int, k: int, with_bias: bool, dtype: torch.dtype):
    g = torch.Generator().manual_seed(rows * n + k)
    x, w = torch.randn(rows, k, generator=g).to(dtype), torch.randn(n, k, generator=g).to(dtype)
    bias = torch.randn(n, generator=g).to(dtype) if with_bias else None
    return x, w, bias


def _gemv_bound(x: torch.Tensor, w: torch.Tensor, bias, exact: torch.Tensor, out_ulp: float) -> torch.Tensor:
    """fp32 summation of k products (rounding grows like sqrt(k) * sum |x||w| * 2^-24; bound 2x that) plus
    the output's own rounding, out_ulp relative (half a bf16 ulp: 2^-8)."""
    k = x.shape[1]
    magnitude = x.double().abs() @ w.double().abs().T + (0 if bias is None else bias.double().abs())
    return magnitude * k**0.5 * 2**-23 * (1 + out_ulp) + exact.abs() * out_ulp + 1e-30


@needs_gemv
@pytest.mark.parametrize("rows", [1, 2, 3, 4])
@pytest.mark.parametrize(("n", "k"), GEMV_SHAPES)
@pytest.mark.parametrize("with_bias", [True, False])
def test_gemv_matches_reference(rows, n, k, with_bias) -> None:
    x, w, bias = _gemv_case(rows, n, k, with_bias, torch.float32)
    got = gemv.gemv(x, w, bias)
    want = x.double() @ w.double().T + (0 if bias is None else bias.double())
    assert got.shape == (rows, n) and got.dtype == torch.float32
    assert ((got.double() - want).abs() <= _gemv_bound(x, w, bias, want, 0.0)).all()


BF16_PATHS = [
    pytest.param(
        False,
        marks=pytest.mark.skipif(
            not gemv.avx512_bf16(),
            reason="no AVX512-BF16 here (CPU or compiler): shoal_gemv_bf16 is the portable path, tested below",
        ),
        id="avx512bf16",
    ),
    pytest.param(True, id="portable"),
]


@needs_gemv
@pytest.mark.parametrize("portable", BF16_PATHS)
@pytest.mark.parametrize("rows", [1, 2, 3, 4])
@pytest.mark.parametrize(("n", "k"), GEMV_SHAPES)
@pytest.mark.parametrize("with_bias", [True, False])
def test_gemv_bf16_matches_reference(portable, rows, n, k, with_bias) -> None:
    """bf16 in and out, fp32 accumulation, one rounding: within half a bf16 ulp of the exact float64
    result (plus fp32 summation), and nearly always bit-equal to torch's bf16 linear."""
    x, w, bias = _gemv_case(rows, n, k, with_bias, torch.bfloat16)
    got = gemv.gemv(x, w, bias, portable=portable)
    want = x.double() @ w.double().T + (0 if bias is None else bias.double())
    assert got.shape == (rows, n) and got.dtype == torch.bfloat16
    assert ((got.double() - want).abs() <= _gemv_bound(x, w, bias, want, 2**-8)).all()
    theirs = F.linear(x, w, bias)  # differs only where summation order flips a rounding: one ulp at most
    assert ((got.double() - theirs.double()).abs() <= theirs.double().abs() * 2**-7 + 1e-30).all()


@needs_gemv
@pytest.mark.parametrize("portable", BF16_PATHS)
def test_gemv_bf16_propagates_nan_and_inf(portable) -> None:
    x, w, _ = _gemv_case(2, 9, 40, False, torch.bfloat16)
    x[0, 3] = float("nan")
    x[1, 0] = float("inf")
    w[:, 0] = w[:, 0].abs() + 1  # positive: row 1 is +inf everywhere
    got = gemv.gemv(x, w, portable=portable)
    assert got[0].isnan().all()
    assert (got[1] == float("inf")).all()


@needs_gemv
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gemv_rejects_what_it_does_not_serve(dtype) -> None:
    """Wrong dtypes raise TypeError, wrong shapes, strides and sizes ValueError, before any memory is read."""
    w, x, b = torch.randn(8, 16).to(dtype), torch.randn(2, 16).to(dtype), torch.randn(8).to(dtype)
    alt = torch.bfloat16 if dtype == torch.float32 else torch.float32  # served, but not mixed
    wrong = [(x.double(), w.double()), (x.to(alt), w), (x, w.to(alt)), (x, w, b.to(alt))]
    for args in wrong:
        with pytest.raises(TypeError, match="gemv"):
            gemv.gemv(*args)
    value_errors = [
        (torch.randn(gemv.MAX_ROWS + 1, 16).to(dtype), w),  # too many rows
        (x[:0], w),  # no rows
        (x[:, :15], w),  # K mismatch
        (x[None], w),  # 3-d x
        (x, torch.randn(16, 8).to(dtype).t()),  # non-contiguous weight
        (x, w[None]),  # 3-d weight
        (x[:, :0], w[:, :0]),  # K = 0
        (x, w, b[:7]),  # bias shape
        (x, w, b[None]),
    ]
    for args in value_errors:
        with pytest.raises(ValueError, match="gemv"):
            gemv.gemv(*args)
    assert gemv.supported(w) and not gemv.supported(w.t()) and not gemv.supported(w.double())


@needs_gemv
def test_gemv_bf16_portable_reports_failed_allocation() -> None:
    """The portable path converts x to fp32 in one allocation, checked: 2^30 columns need 4 GiB, refused
    under an address-space limit 256 MiB above current use (MemoryError, not a crash). The inputs are
    never written, so they take address space but no memory. (With 2^28 columns, 1 GiB, the full suite
    once saw the allocation succeed: by then malloc's heap, already counted in the process's size, had
    that much free.)"""
    x, w = torch.empty(1, 2**30, dtype=torch.bfloat16), torch.empty(1, 2**30, dtype=torch.bfloat16)
    with _address_space_limit(256 << 20), pytest.raises(MemoryError, match="gemv"):
        gemv.gemv(x, w, portable=True)
