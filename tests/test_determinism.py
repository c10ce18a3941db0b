"""Deterministic mode (--deterministic): a seeded request gives the same tokens whatever surrounds it.

- The batch-invariant linear: a row's output is bitwise the same for any number of rows around it, on
  every route PackedLinear takes (gemv kernel, oneDNN packed, the fp32 GEMM); unwrapped, the routes
  give a row different bits (so the wrapper is what makes the difference).
- End to end on SmolLM2-135M, in bfloat16 where the CPU computes it natively (AVX512-BF16: oneDNN's bf16
  linears), else in float32 (an AVX2-only CPU emulates bf16 matmuls: 44 s instead of ~15 s here): a seeded request at temperature 1 gives identical token ids (and
  bitwise identical logprobs) alone, in a batch of 8 mixed requests, with its prefix cold and warm in the
  prefix cache, and with chunked prefill splitting its prompt. The same cases without the mode give the
  request different logprobs in at least one case: the variation the mode removes is there, except
  where every linear runs on gemm.c's bf16 panels for every row count (AVX512-BF16, a copy fits in RAM,
  no fp32 route): one summation order whatever the batch, so the cases agree without the mode too.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from tiny_models import make_engine
from torch import nn

from shoal.engine.sampling_params import SamplingParams
from shoal.model.batch_invariant import BatchInvariantLinear, make_batch_invariant
from shoal.model.packed_linear import PackedLinear, onednn_bf16_supported, packing_available

NEW_TOKENS = 16
END_TO_END_DTYPE = "bfloat16" if onednn_bf16_supported() else "float32"
PROMPT = (
    "The old lighthouse keeper climbed the stairs every evening to light the lamp. One night, a storm "
    "came in from the sea and"
)
OTHERS = [
    "Write a poem about",
    "What is the capital of France? The capital",
    "def fibonacci(n):\n    ",
    "In 1905, Albert Einstein published four papers that",
    "Once upon a time there was a small robot who",
    "The recipe calls for two cups of flour and",
    "Q: Why is the sky blue?\nA:",
]


def _linear(dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    lin = nn.Linear(576, 1536, bias=False).to(dtype)
    if packing_available(torch.device("cpu"), dtype):
        return PackedLinear(
            lin, packed=True, big_route="fp32" if dtype == torch.bfloat16 else "plain", keep_weight=True
        )
    return lin


@pytest.mark.timeout(30)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_batch_invariant_linear_rows_do_not_depend_on_the_batch(dtype):
    inner = _linear(dtype)
    wrapped = BatchInvariantLinear(inner)
    x = torch.randn(100, 576, dtype=dtype)
    alone = wrapped(x[:1])
    for rows in (2, 5, 16, 17, 47, 48, 100):
        torch.testing.assert_close(wrapped(x[:rows])[:1], alone, rtol=0, atol=0)
        shifted = torch.cat([torch.randn(rows - 1, 576, dtype=dtype), x[:1]])  # same row, last place
        torch.testing.assert_close(wrapped(shifted)[-1:], alone, rtol=0, atol=0)
    torch.testing.assert_close(wrapped(x.view(4, 25, 576)).view(100, -1), wrapped(x), rtol=0, atol=0)
    if dtype == torch.bfloat16 and isinstance(inner, PackedLinear):
        # Unwrapped, the routes reduce in different orders: 4 rows (gemv, or where built the gemm kernel's
        # bf16 panels), 40 rows (oneDNN, or those panels: then 4's order) and 100 rows (the fp32 GEMM). The
        # bf16 rounding hides most differences: the first 4 rows are compared across the three, and all 40
        # between 40 and 100 rows.
        firsts = [inner(x[:rows])[:4] for rows in (4, 40, 100)] + [inner(x[:40]), inner(x)[:40]]
        assert any(not torch.equal(firsts[0], f) for f in firsts[1:3]) or not torch.equal(*firsts[3:])


@pytest.mark.timeout(10)
def test_make_batch_invariant_wraps_every_projection_once():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv_proj, self.o_proj, self.other = nn.Linear(4, 12), nn.Linear(4, 4), nn.Linear(4, 4)

    model = nn.Sequential(Block(), Block())
    make_batch_invariant(make_batch_invariant(model))
    for block in model:
        assert isinstance(block.qkv_proj, BatchInvariantLinear) and isinstance(
            block.qkv_proj.inner, nn.Linear
        )
        assert isinstance(block.o_proj, BatchInvariantLinear) and type(block.other) is nn.Linear


# ---------------------------------------------------------------------------------------------------------
# End to end

_ids = itertools.count()


def _run(engine, requests) -> list:
    """requests: (prompt ids, params, cache_salt, arrival step); returns each request's choices."""
    ids = [f"det-{next(_ids)}" for _ in requests]
    pending = sorted(range(len(requests)), key=lambda i: requests[i][3])
    done, steps = {}, 0
    while pending or engine.has_unfinished():
        while pending and requests[pending[0]][3] <= steps:
            i = pending.pop(0)
            prompt, params, salt, _ = requests[i]
            engine.add_request(ids[i], prompt, params, cache_salt=salt)
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.outputs
        steps += 1
    return [done[i] for i in ids]


def _cases(engine) -> dict[str, list[tuple[list[int], list[float]]]]:
    """The target request's (token ids, logprobs) per choice in each case (two choices: the issue's report
    was of a second choice changing between a cold and a warm prefix); a fresh cache salt makes a cold
    cache."""
    tok = engine.tokenizer
    prompt = tok.encode(PROMPT)
    target = SamplingParams(temperature=1.0, seed=7, n=2, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=0)

    def result(choices):
        return [
            (c.token_ids, [lp[t] for t, lp in zip(c.token_ids, c.logprobs, strict=True)]) for c in choices
        ]

    cases = {"alone": result(_run(engine, [(prompt, target, "alone", 0)])[0])}
    mixed = [
        (
            tok.encode(text),
            SamplingParams(temperature=0.8, seed=i if i % 2 else None, max_tokens=4 + 2 * i),
            "b",
            0,
        )
        for i, text in enumerate(OTHERS)
    ]
    mixed.insert(3, (prompt, target, "b", 2))  # arrives while the others decode: prefill next to decodes
    cases["batch of 8"] = result(_run(engine, mixed)[3])
    # Warm: a request with the same first block of prompt runs first (a different ending, so the target's
    # last block and sampling are its own).
    _run(engine, [(prompt[:-3] + tok.encode(" then"), SamplingParams(max_tokens=1), "warm", 0)])
    hits = engine.block_manager.prefix_hits
    cases["prefix warm"] = result(_run(engine, [(prompt, target, "warm", 0)])[0])
    assert engine.block_manager.prefix_hits - hits >= engine.config.block_size
    # Chunked: a step budget of 8 tokens cuts the 25-token prompt into 4 chunks (the scheduler's
    # budget read each step; the same engine, so the same weights and kernels).
    engine.scheduler.max_num_batched_tokens = 8
    try:
        cases["chunked prefill"] = result(_run(engine, [(prompt, target, "chunked", 0)])[0])
    finally:
        engine.scheduler.max_num_batched_tokens = engine.config.max_num_batched_tokens
    return cases


@pytest.fixture(scope="module")
def engines(smollm2_dir):
    made = {}

    def get(deterministic: bool):
        if deterministic not in made:
            made[deterministic] = make_engine(
                smollm2_dir,
                kv_tokens=8192,
                dtype=END_TO_END_DTYPE,
                max_model_len=256,
                deterministic=deterministic,
            )
        return made[deterministic]

    return get


@pytest.mark.timeout(240)
def test_deterministic_mode_gives_the_same_tokens_in_every_case(engines):
    cases = _cases(engines(True))
    alone = cases.pop("alone")
    assert len(alone) == 2 and all(len(tokens) == NEW_TOKENS for tokens, _ in alone)
    assert alone[0][0] != alone[1][0]  # the choices draw from their own seeds (seed, seed + 1)
    for name, got in cases.items():
        for choice, (tokens, logprobs) in enumerate(got):
            assert tokens == alone[choice][0], (name, choice)
            assert logprobs == alone[choice][1], (name, choice)  # bitwise: the numerics, not only the draws


@pytest.mark.timeout(240)
def test_without_the_mode_the_cases_differ(engines):
    cases = _cases(engines(False))
    alone = cases.pop("alone")
    differ = [name for name, got in cases.items() if got[1] != alone[1]]
    print(
        f"without --deterministic, logprobs differ from alone in: {differ}; tokens differ in: "
        f"{[name for name, got in cases.items() if got[0] != alone[0]]}"
    )
    linears = [m for m in engines(False).runner.model.modules() if isinstance(m, PackedLinear)]
    if linears and all(m.decode_on_panels and m.big_route is None for m in linears):
        # bfloat16 where every linear runs on gemm.c's panels at every row count (one summation order
        # whatever M, no fp32 route for big batches): already batch-invariant without the mode.
        assert not differ
    else:
        assert differ


@pytest.mark.timeout(120)
def test_determinism_bench_reports_both_sides(stories_dir, tmp_path):
    """`shoal bench determinism` on stories260K: one round, both engines, ratios and the markdown table."""
    from shoal.bench import determinism

    result = determinism.run_determinism(
        str(stories_dir),
        dtype="float32",
        num_prompts=3,
        input_len=(8, 24),
        output_len=(4, 8),
        rounds=1,
        dataset=tmp_path / "absent.txt",
        log=lambda _: None,
    )
    for side in determinism.SIDES:
        assert result["median"][side]["output_tokens_per_s"] > 0
        assert result["median"][side]["cpu_ms_per_output_token"] > 0
    assert result["ratio"]["output_tokens_per_s"] == pytest.approx(
        result["median"]["deterministic"]["output_tokens_per_s"]
        / result["median"]["default"]["output_tokens_per_s"]
    )
    table = determinism.markdown(result)
    assert "| default |" in table and "| deterministic |" in table
