"""The fused CPU kernels (kernels/fused_ops.c: RMSNorm with residual add, rotary embedding, SiLU-and-mul)
against float64 references with stated tolerances, their input checks, their custom ops under
torch.compile, and the model with them against the model without them."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tiny_models import make_engine

from shoal.kernels import fused_ops
from shoal.model.rope import RotaryEmbedding, apply_rotary

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.skipif(
        not fused_ops.supported(torch.device("cpu"), torch.float32),
        reason="no C compiler: native kernels off",
    ),
]
DTYPES = [torch.float32, torch.bfloat16]
# One rounding of a float32 result to bfloat16 is within half a bf16 ulp: 2^-8 relative (8 significant
# bits). Float32 results differ from float64 by summation order and a few ulp of the float32 operations.
REL = {torch.float32: 2**-20, torch.bfloat16: 2**-8 + 2**-20}


def _randn(*shape: int, dtype: torch.dtype, seed: int, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)


def _assert_close(got: torch.Tensor, want: torch.Tensor, rel: float, abs_: float, what: str) -> None:
    err = (got.double() - want).abs()
    bound = want.abs() * rel + abs_
    print(f"{what}: max |err| {err.max():.2e}, worst err/bound {(err / bound).max():.2f}")
    assert (err <= bound).all(), what


def _rms_norm64(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x = x.double()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight.double()


# Rows x dim: single-row decode, odd sizes, and one case past the kernel's threading threshold.
SHAPES = [(1, 576), (3, 33), (7, 1001), (70, 577)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("rows", "dim"), SHAPES)
@pytest.mark.parametrize("threads", [1, 2])
def test_rms_norm_matches_float64(dtype, rows, dim, threads, monkeypatch) -> None:
    monkeypatch.setattr(fused_ops, "_threads", lambda: threads)
    x = _randn(rows, dim, dtype=dtype, seed=dim, scale=3.0)
    w = _randn(dim, dtype=dtype, seed=dim + 1)
    got = fused_ops.rms_norm(x, w, 1e-5)
    assert got.dtype == dtype and got.shape == x.shape
    _assert_close(got, _rms_norm64(x, w, 1e-5), REL[dtype], 1e-30, f"rms_norm {dtype} {rows}x{dim}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("rows", "dim"), SHAPES)
@pytest.mark.parametrize("threads", [1, 2])
def test_add_rms_norm_matches_float64(dtype, rows, dim, threads, monkeypatch) -> None:
    """residual becomes residual + x exactly as torch adds in the dtype (one rounding); x becomes the norm
    of that stored sum (what the next layer adds to), with one more rounding."""
    monkeypatch.setattr(fused_ops, "_threads", lambda: threads)
    x = _randn(rows, dim, dtype=dtype, seed=dim, scale=3.0)
    residual = _randn(rows, dim, dtype=dtype, seed=dim + 2, scale=10.0)
    w = _randn(dim, dtype=dtype, seed=dim + 1)
    want_sum = residual + x
    out, res = x.clone(), residual.clone()
    fused_ops.add_rms_norm_(out, res, w, 1e-6)
    assert torch.equal(res, want_sum)
    _assert_close(
        out, _rms_norm64(want_sum, w, 1e-6), REL[dtype], 1e-30, f"add_rms_norm {dtype} {rows}x{dim}"
    )


def _rotary64(x: torch.Tensor, cos_sin: torch.Tensor, heads: int, head_dim: int) -> torch.Tensor:
    out = x.double().clone()
    half = head_dim // 2
    c, s = cos_sin[:, None, :half].double(), cos_sin[:, None, half:].double()
    h = out[:, : heads * head_dim].view(out.shape[0], heads, head_dim)
    x1, x2 = h[..., :half].clone(), h[..., half:].clone()
    h[..., :half] = x1 * c - x2 * s
    h[..., half:] = x2 * c + x1 * s
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("tokens", "heads", "head_dim", "width"),
    [
        (1, 12, 64, 960),
        (5, 3, 6, 25),
        (9, 8, 128, 1024 + 3),
        (300, 12, 64, 960),
    ],  # SmolLM2; odd; last: threads
)
def test_rotary_matches_float64(dtype, tokens, heads, head_dim, width, monkeypatch) -> None:
    """The first `heads` heads of each row rotate; the rest of the row (v) is left bit for bit."""
    monkeypatch.setattr(fused_ops, "_threads", lambda: 2)
    x = _randn(tokens, width, dtype=dtype, seed=width, scale=2.0)
    angles = _randn(tokens, head_dim // 2, dtype=torch.float32, seed=1, scale=100.0)
    cos_sin = torch.cat([angles.cos(), angles.sin()], dim=-1)
    want = _rotary64(x, cos_sin, heads, head_dim)
    got = x.clone()
    fused_ops.rotary_(got, cos_sin, heads, head_dim)
    assert torch.equal(got[:, heads * head_dim :], x[:, heads * head_dim :])
    # The fp32 products carry an error relative to the inputs, not the (possibly cancelling) result.
    scale = x.double().abs().amax(-1, keepdim=True)
    _assert_close(got, want, REL[dtype], 4 * 2**-24 * scale, f"rotary {dtype} {tokens}x{heads}x{head_dim}")


def test_rotary_follows_the_models_convention() -> None:
    """RotaryEmbedding's cos_sin_cache (cos | sin of each frequency) through the kernel gives what the
    PyTorch rotate-half formula gives with the model's full cos/sin tables (float32)."""
    rope = RotaryEmbedding(64, 4096, 10000.0, None)
    positions = torch.tensor([0, 1, 17, 1000, 4095])
    x = _randn(5, 15 * 64, dtype=torch.float32, seed=3)
    want = apply_rotary(x.view(5, 15, 64)[:, :12], rope.cos[positions, None], rope.sin[positions, None])
    got = x.clone()
    fused_ops.rotary_(got, rope.cos_sin_cache.index_select(0, positions), 12, 64)
    torch.testing.assert_close(got.view(5, 15, 64)[:, :12], want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("rows", "inter"), [(1, 1536), (3, 17), (40, 1001)])  # last: threads
def test_silu_and_mul_matches_float64(dtype, rows, inter, monkeypatch) -> None:
    monkeypatch.setattr(fused_ops, "_threads", lambda: 2)
    gate_up = _randn(rows, 2 * inter, dtype=dtype, seed=inter, scale=4.0)
    got = fused_ops.silu_and_mul(gate_up)
    assert got.dtype == dtype and got.shape == (rows, inter)
    g, u = gate_up.double().split(inter, dim=-1)
    # exp is Cephes' polynomial (2 ulp), then a division and a product: 6 fp32 ulp.
    rel = REL[dtype] + 6 * 2**-24
    _assert_close(got, F.silu(g) * u, rel, 1e-30, f"silu_and_mul {dtype} {rows}x{inter}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_and_mul_same_value_same_result_in_body_and_tail(dtype) -> None:
    """The kernel runs 8 lanes at a time and the row's tail through a padded buffer: a value gives the
    same bits wherever it sits in the row."""
    values = _randn(1, 8, dtype=dtype, seed=5, scale=4.0)[0]
    inter = 8 + 8 + 5  # two full vectors and a tail of 5
    gates = torch.cat([values, values, values[:5]])
    ups = torch.cat([values.flip(0), values.flip(0), values.flip(0)[:5]])
    got = fused_ops.silu_and_mul(torch.cat([gates, ups])[None])[0]
    assert got.shape == (inter,)
    assert torch.equal(got[:8], got[8:16]) and torch.equal(got[16:], got[:5])


def test_silu_exp_over_its_whole_range() -> None:
    """Gates from -87 to 87 (where e^-g stays a normal float): relative error of silu(g) within 6 ulp;
    beyond, values are tiny or exact (silu(g) = g), and NaN stays NaN."""
    g = torch.cat([torch.linspace(-87, 87, 20001), torch.tensor([-1e4, -200.0, 200.0, 1e4])])
    gate_up = torch.cat([g, torch.ones_like(g)])[None]
    got = fused_ops.silu_and_mul(gate_up)[0].double()
    want = F.silu(g.double())
    inside = g.abs() <= 87
    _assert_close(got[inside], want[inside], 6 * 2**-24, 1e-30, "silu over [-87, 87]")
    assert (got[~inside] - want[~inside]).abs().max() < 1e-30 + 2**-23 * want[~inside].abs().max()
    nan = fused_ops.silu_and_mul(torch.tensor([[float("nan"), 1.0, 2.0, float("nan")]]))
    assert nan.isnan().all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_nan_and_inf_propagate(dtype) -> None:
    """No -ffast-math: a NaN in a row makes that row NaN and leaves the others; inf overflows to NaN
    through inf/inf, as the PyTorch formula does."""
    x = _randn(3, 40, dtype=dtype, seed=0)
    x[1, 7] = float("nan")
    out = fused_ops.rms_norm(x, torch.ones(40, dtype=dtype), 1e-5)
    assert out[1].isnan().all() and out[[0, 2]].isfinite().all()
    res = torch.zeros(3, 40, dtype=dtype)
    fused_ops.add_rms_norm_(x, res, torch.ones(40, dtype=dtype), 1e-5)
    assert x[1].isnan().all() and x[[0, 2]].isfinite().all() and res[1, 7].isnan()


def test_bad_inputs_raise() -> None:
    x, w = torch.randn(4, 8), torch.randn(8)
    qkv, cos_sin = torch.randn(4, 48), torch.randn(4, 16)
    gate_up = torch.randn(4, 10)
    bad_norms = [
        (x.half(), w.half()),  # unsupported dtype
        (x.double(), w.double()),
        (x.int(), w.int()),
        (x, w.bfloat16()),  # mixed dtypes
        (x.t(), torch.randn(4)),  # strided
        (x[:, ::2], w[:4]),
        (x, w[:7]),  # weight of another size
        (x, torch.randn(1, 8)),
        (x.view(2, 2, 8), w),  # not [rows, dim]
        (x.to("meta"), w),  # not on the CPU
    ]
    for xi, wi in bad_norms:
        with pytest.raises(ValueError, match="rms_norm"):
            fused_ops.rms_norm(xi, wi, 1e-5)
        with pytest.raises(ValueError, match="rms_norm"):
            fused_ops.add_rms_norm_(xi, xi.clone(), wi, 1e-5)
    for residual in (torch.randn(4, 9), torch.randn(3, 8), x.bfloat16(), torch.randn(8, 4).t(), x.to("meta")):
        with pytest.raises(ValueError, match="add_rms_norm_"):
            fused_ops.add_rms_norm_(x, residual, w, 1e-5)
    bad_rotary = [
        (qkv.half(), cos_sin, 3, 16),
        (qkv[:, ::2], cos_sin, 1, 16),  # strided
        (qkv, cos_sin.bfloat16(), 3, 16),  # cos_sin not float32
        (qkv, cos_sin[:3], 3, 16),  # a row short
        (qkv, cos_sin[:, :8], 3, 16),  # head_dim mismatch
        (qkv, cos_sin, 4, 16),  # more heads than the row holds
        (qkv, torch.randn(4, 15), 3, 15),  # odd head_dim
        (qkv, cos_sin, -1, 16),
        (qkv.view(4, 3, 16), cos_sin, 3, 16),
        (qkv.to("meta"), cos_sin, 3, 16),
    ]
    for args in bad_rotary:
        with pytest.raises(ValueError, match="rotary"):
            fused_ops.rotary_(*args)
    for bad in (gate_up.half(), gate_up[:, :9], gate_up.t(), gate_up[:, ::2], gate_up[0], gate_up.to("meta")):
        with pytest.raises(ValueError, match="silu_and_mul"):
            fused_ops.silu_and_mul(bad)


def test_custom_ops_under_torch_compile() -> None:
    """The custom ops' fake implementations and declared mutations hold up under tracing (AOT autograd with
    functionalization, the part of torch.compile that checks them)."""

    def layer(x, residual, w, qkv, cos_sin, gate_up):
        fused_ops.add_rms_norm_(x, residual, w, 1e-5)
        fused_ops.rotary_(qkv, cos_sin, 3, 16)
        return fused_ops.rms_norm(x, w, 1e-5), fused_ops.silu_and_mul(gate_up)

    args = (torch.randn(4, 8), torch.randn(4, 8), torch.randn(8), torch.randn(4, 64), torch.randn(4, 16))
    args = (*args, torch.randn(4, 10))
    eager_args = [a.clone() for a in args]
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    got, want = compiled(*args), layer(*eager_args)
    for a, b in zip([*got, *args], [*want, *eager_args], strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("arch", ["llama3", "qwen3"])  # rotary inside fused qkv; q/k norms first
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_model_same_with_and_without_kernels(arch, dtype, tiny_model_dirs, test_prompts, monkeypatch) -> None:
    """Teacher-forced logits through the real engine (paged cache, chunked prefill) with the kernels and
    with the PyTorch formulas: float32 agrees to summation order; bfloat16 to the rounding the kernels skip
    (they round once where PyTorch rounds after every op)."""
    ids = test_prompts["long"][:120]
    logits = {}
    for native in (True, False):
        if not native:
            monkeypatch.setattr(fused_ops, "supported", lambda device, dtype: False)
        engine = make_engine(
            tiny_model_dirs[arch], kv_tokens=512, dtype=dtype, max_model_len=256, max_num_batched_tokens=48
        )
        logits[native] = engine.prompt_logits(ids)
    diff = (logits[True] - logits[False]).abs()
    print(f"{arch} {dtype}: max |logit diff| {diff.max():.2e}, mean {diff.mean():.2e}")
    if dtype == "float32":
        assert diff.max() < 1e-4
    else:
        assert diff.mean() < 0.05 * logits[False].abs().mean()


# ---- Chunked-prefill attention over the paged cache (kernels/paged_prefill_attention.c) -----------------


def _prefill_case(seed, context_len, tokens, heads, kv_heads, dim, dtype, block_size=16):
    """Caches with the sequence's blocks scattered at random; q a view into fused qkv rows, as in the model."""
    g = torch.Generator().manual_seed(seed)
    n = context_len + tokens
    num_blocks = -(-n // block_size) + 5
    table = torch.randperm(num_blocks, generator=g)[: -(-n // block_size)]
    pos = torch.arange(n)
    slots = table[pos // block_size] * block_size + pos % block_size
    shape = (num_blocks * block_size, kv_heads, dim)
    k_cache = torch.randn(shape, generator=g).to(dtype)
    v_cache = torch.randn(shape, generator=g).to(dtype)
    qkv = torch.randn(tokens, heads + 2 * kv_heads, dim, generator=g).to(dtype)
    return qkv[:, :heads], k_cache, v_cache, slots


def _prefill_reference(q, k_cache, v_cache, slots, context_len, window, scale):
    """Per query token, float64 softmax attention over the keys it may see, read by slot."""
    groups = q.shape[1] // k_cache.shape[1]
    out = []
    for t in range(q.shape[0]):
        p = context_len + t
        lo = max(0, p - window + 1) if window else 0
        k = k_cache[slots[lo : p + 1]].double().repeat_interleave(groups, 1)  # [n, H, D]
        v = v_cache[slots[lo : p + 1]].double().repeat_interleave(groups, 1)
        probs = torch.softmax(scale * torch.einsum("hd,nhd->hn", q[t].double(), k), dim=-1)
        out.append(torch.einsum("hn,nhd->hd", probs, v))
    return torch.stack(out)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("heads", "kv_heads", "dim"), [(9, 3, 64), (8, 8, 128), (4, 1, 32), (6, 2, 16)]
)  # SmolLM2's GQA; MHA at 128; MQA; the smallest head the kernel takes
@pytest.mark.parametrize(
    ("context_len", "tokens", "window"),
    [(0, 1, None), (0, 70, None), (15, 1, None), (16, 33, None), (333, 5, None), (100, 37, 20), (0, 40, 7)],
)
def test_prefill_attention_matches_float64(dtype, heads, kv_heads, dim, context_len, tokens, window) -> None:
    """Fresh prompts, cached contexts across block boundaries, single tokens, and sliding windows. float32:
    summation order and the exp polynomial (2 ulp) only; bfloat16: plus one rounding of the output."""
    from shoal.kernels import prefill_attention

    q, kc, vc, slots = _prefill_case(
        dim + context_len + tokens, context_len, tokens, heads, kv_heads, dim, dtype
    )
    scale = dim**-0.5
    got = prefill_attention.paged_prefill_attention(q, kc, vc, slots, context_len, window, scale)
    assert got.dtype == dtype and got.shape == q.shape
    want = _prefill_reference(q, kc, vc, slots, context_len, window, scale)
    rel = 2**-8 if dtype == torch.bfloat16 else 0.0
    _assert_close(
        got, want, rel, 2e-6, f"prefill {dtype} H={heads}/{kv_heads} D={dim} ctx={context_len} T={tokens}"
    )


@pytest.mark.parametrize("dtype", DTYPES)
def test_prefill_attention_special_values(dtype) -> None:
    """As torch.softmax: a NaN in a query makes its (token, head) row NaN and no other; keys scored -inf
    weigh exactly 0; a query whose keys all score -inf gets NaN."""
    from shoal.kernels import prefill_attention

    q, kc, vc, slots = _prefill_case(1, 40, 6, 4, 2, 32, dtype)
    q = q.clone()
    q[2, 1, 3] = float("nan")
    got = prefill_attention.paged_prefill_attention(q, kc, vc, slots, 40, None, 0.2)
    assert got[2, 1].isnan().all()
    got[2, 1] = 0
    assert got.isfinite().all()

    q[2, 1, 3] = 0.0
    q[:, :, 0] = q[:, :, 0].abs() + 1  # positive in dim 0: a key with -inf there scores -inf
    kc[slots[:30], :, 0] = float("-inf")
    got = prefill_attention.paged_prefill_attention(q, kc, vc, slots, 40, None, 0.2)
    # Attention over keys 30.. alone: the query at position 40 + t is at 10 + t among them.
    want = _prefill_reference(q, kc, vc, slots[30:], 10, None, 0.2)
    rel = 2**-8 if dtype == torch.bfloat16 else 0.0
    _assert_close(got, want, rel, 2e-6, f"prefill {dtype} with -inf keys")

    kc[slots, :, 0] = float("-inf")
    assert prefill_attention.paged_prefill_attention(q, kc, vc, slots, 40, None, 0.2).isnan().all()


def test_prefill_attention_bad_inputs_raise() -> None:
    from shoal.kernels import prefill_attention

    q, kc, vc, slots = _prefill_case(0, 20, 4, 4, 2, 32, torch.float32)

    def call(q=q, kc=kc, vc=vc, slots=slots, context_len=20, window=None):
        return prefill_attention.paged_prefill_attention(q, kc, vc, slots, context_len, window, 0.2)

    for bad in (kc.shape[0], -1, 2**40):
        s = slots.clone()
        s[7] = bad
        with pytest.raises(ValueError, match="slot"):
            call(slots=s)
    value_errors = [
        {"q": q.double(), "kc": kc.double(), "vc": vc.double()},  # unsupported dtype
        {"q": q.bfloat16()},  # mixed dtypes
        {"slots": slots.int()},
        {"slots": slots[:-1]},  # not context_len + T slots
        {"context_len": 19},
        {"context_len": -1},
        {"window": -1},
        {"kc": kc[:, :, :16].contiguous(), "vc": vc[:, :, :16].contiguous()},  # head dims differ
        {"q": q[:, :3]},  # 3 query heads over 2 kv heads
        {"q": q[0]},  # not [T, H, D]
        {"q": q[:, :, ::2]},  # strided inside a head
        {"q": q.transpose(0, 1).contiguous().transpose(0, 1)},  # heads not adjacent
        {"kc": kc.transpose(1, 2).contiguous().transpose(1, 2)},  # non-contiguous cache
        {"vc": vc[:-16]},
        {"slots": slots.to("meta")},
    ]
    for kwargs in value_errors:
        with pytest.raises(ValueError, match="paged_prefill_attention"):
            call(**kwargs)
    q24, kc24, vc24, slots24 = _prefill_case(0, 3, 2, 2, 1, 24, torch.float32)
    with pytest.raises(ValueError, match="paged_prefill_attention"):  # D not a multiple of 16
        prefill_attention.paged_prefill_attention(q24, kc24, vc24, slots24, 3, None, 0.2)
    assert not prefill_attention.supported(torch.device("cpu"), torch.float32, 24)


@pytest.mark.parametrize("arch", ["mistral", "qwen2"])  # sliding window; plain GQA with biases
def test_engine_prefill_same_with_and_without_kernel(
    arch, tiny_model_dirs, test_prompts, monkeypatch
) -> None:
    """Chunked prefill through the engine (chunks of 24 tokens over cached context): the in-place kernel and
    the gather + SDPA path give the same float32 logits up to summation order."""
    from shoal.kernels import prefill_attention

    ids = test_prompts["long"][:150]
    logits = {}
    for native in (True, False):
        if not native:
            monkeypatch.setattr(prefill_attention, "supported", lambda device, dtype, head_dim: False)
        engine = make_engine(
            tiny_model_dirs[arch], kv_tokens=512, max_model_len=256, max_num_batched_tokens=24
        )
        logits[native] = engine.prompt_logits(ids)
    diff = (logits[True] - logits[False]).abs().max()
    print(f"{arch}: max |logit diff| kernel vs gather {diff:.2e}")
    assert diff < 1e-4


def test_prefill_attention_threads_agree() -> None:
    """Rows are independent: split over two OpenMP threads, the result is the same bit for bit."""
    from shoal.kernels import prefill_attention

    q, kc, vc, slots = _prefill_case(5, 300, 70, 9, 3, 64, torch.bfloat16)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = prefill_attention.paged_prefill_attention(q, kc, vc, slots, 300, None, 0.125)
        torch.set_num_threads(2)
        two = prefill_attention.paged_prefill_attention(q, kc, vc, slots, 300, None, 0.125)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)


def _chunks_case(dtype):
    """Four sequences' chunks in one flat q (fresh prompts and cached contexts), their caches shared, with
    two rows between them that no chunk covers (a step's decode rows)."""
    heads, kv_heads, dim, block = 9, 3, 64, 16
    specs = [(0, 32), (48, 17), (300, 5), (0, 1)]  # (context_len, tokens)
    g = torch.Generator().manual_seed(11)
    num_blocks = sum(-(-(c + t) // block) for c, t in specs) + 4
    free = torch.randperm(num_blocks, generator=g).tolist()
    shape = (num_blocks * block, kv_heads, dim)
    k_cache, v_cache = (torch.randn(shape, generator=g).to(dtype) for _ in range(2))
    total = 2 + sum(t for _, t in specs)
    q = torch.randn(total, heads + 2 * kv_heads, dim, generator=g).to(dtype)[:, :heads]
    chunks, start = [], 2
    for context_len, tokens in specs:
        n = context_len + tokens
        table = torch.tensor([free.pop() for _ in range(-(-n // block))])
        pos = torch.arange(n)
        chunks.append((start, tokens, context_len, table[pos // block] * block + pos % block))
        start += tokens
    return q, k_cache, v_cache, chunks


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("window", [None, 7])
def test_prefill_attention_chunks_equal_one_call_per_chunk(dtype, window) -> None:
    """All chunks of a step in one call: each chunk's rows bit for bit what its own call gives, the rows
    no chunk covers untouched."""
    from shoal.kernels import prefill_attention

    q, kc, vc, chunks = _chunks_case(dtype)
    out = torch.full(q.shape, 7.0, dtype=dtype)
    prefill_attention.paged_prefill_attention_chunks(q, kc, vc, chunks, window, 0.125, out)
    assert (out[:2] == 7.0).all()
    for start, tokens, context_len, slots in chunks:
        one = prefill_attention.paged_prefill_attention(
            q[start : start + tokens], kc, vc, slots, context_len, window, 0.125
        )
        assert torch.equal(out[start : start + tokens], one)


def test_prefill_attention_chunks_bad_inputs_raise() -> None:
    from shoal.kernels import prefill_attention

    q, kc, vc, chunks = _chunks_case(torch.float32)
    out = torch.empty(q.shape)

    def call(chunks=chunks, out=out, q=q):
        prefill_attention.paged_prefill_attention_chunks(q, kc, vc, chunks, None, 0.2, out)

    start, tokens, context_len, slots = chunks[1]
    bad_slot = slots.clone()
    bad_slot[3] = kc.shape[0]
    bad_chunks = [
        (start, tokens, context_len, bad_slot),  # a slot outside the cache
        (q.shape[0] - 2, tokens, context_len, slots),  # rows past q's end
        (-1, tokens, context_len, slots),
        (start, 0, context_len, slots[:context_len]),  # no tokens
        (start, tokens, context_len + 1, slots),  # slots not context_len + T
        (start, tokens, context_len, slots.int()),
    ]
    for bad in bad_chunks:
        with pytest.raises(ValueError, match="paged_prefill_attention"):
            call(chunks=[chunks[0], bad])
    for bad_out in (out.bfloat16(), out[:-1], out.transpose(0, 1).contiguous().transpose(0, 1)):
        with pytest.raises(ValueError, match="paged_prefill_attention_chunks"):
            call(out=bad_out)
    with pytest.raises(ValueError, match="paged_prefill_attention"):
        call(q=q.double())
    call(chunks=[])  # nothing to do


@pytest.mark.parametrize("arch", ["mistral", "qwen2"])  # sliding window; plain GQA with biases
def test_engine_steps_of_several_prompts_same_as_one_call_per_chunk(
    arch, tiny_model_dirs, test_prompts, monkeypatch
) -> None:
    """Several prompts in one step (one of them chunked over cached context) take the one-call path in
    model/attention.py: the same greedy tokens and logprobs, bit for bit, as one kernel call per chunk."""
    from shoal.engine.sampling_params import SamplingParams
    from shoal.model import attention

    long = test_prompts["long"]
    prompts = [long[:40], long[40:47], long[100:190], long[7:8]]
    params = SamplingParams(max_tokens=4, temperature=0, logprobs=2, ignore_eos=True)
    results, calls = {}, []
    real = attention.native_prefill.paged_prefill_attention_chunks
    monkeypatch.setattr(
        attention.native_prefill,
        "paged_prefill_attention_chunks",
        lambda *a: calls.append(len(a[3])) or real(*a),
    )
    for one_call in (True, False):
        if not one_call:
            monkeypatch.setattr(attention, "_prefills_in_one_call", lambda q, meta: False)
        engine = make_engine(
            tiny_model_dirs[arch], kv_tokens=1024, max_model_len=256, max_num_batched_tokens=64
        )
        outs = engine.generate(prompts, params)
        results[one_call] = [(o.outputs[0].token_ids, o.outputs[0].logprobs) for o in outs]
    assert calls and max(calls) > 1  # steps with several chunks went to the one-call kernel
    assert results[True] == results[False]
