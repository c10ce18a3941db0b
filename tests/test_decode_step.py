"""The one-call native decode step (kernels/decode_step.c, model/fused_decode.py).

Against a float64 reference (the model's own PyTorch formulas in float64: no native kernel serves float64),
and against the per-op path in the same dtype, bit for bit where both run the same kernels (float32 with
the matrix-vector kernel). Tolerances: float32 5e-4 on the logits (both sides sum 30-odd products per
output in a different order and the softmax-free logits of a random model reach ~5); bfloat16 one bf16
rounding per op, 0.15 on logits of that size (measured max ~0.06).

Quantized models (tiny random checkpoints quantized by shoal's own `quantize_model`, loaded as the engine
loads them): the step calls qgemv.c where the per-op path's QuantizedLinear calls it, in the same order on
the same inputs, so logits and KV cache are equal bit for bit, float32 and bfloat16.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from shoal.engine import model_runner
from shoal.engine.model_runner import ModelRunner, StepInput
from shoal.kernels import decode_step, gemm, gemv, qgemv
from shoal.model import fused_decode
from shoal.model.config import ModelConfig
from shoal.model.loader import load_model
from shoal.model.packed_linear import GEMM_MAX_ROWS, PackedLinear, pack_linears
from shoal.model.rope import RotaryEmbedding
from shoal.model.transformer import Transformer
from shoal.quant.groups import PER_CHANNEL
from shoal.quant.linear import QuantizedLinear
from shoal.quant.quantize import quantize_model

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.skipif(not decode_step.supported(torch.device("cpu"), torch.float32), reason="no C compiler"),
]
BLOCK = 4
NUM_BLOCKS = 32


def _config(**overrides) -> ModelConfig:
    base = dict(
        architecture="LlamaForCausalLM",
        vocab_size=97,
        hidden_size=64,
        intermediate_size=96,
        num_layers=3,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        rope_scaling=None,
        max_position_embeddings=128,
        tie_word_embeddings=False,
        qkv_bias=False,
        o_bias=False,
        mlp_bias=False,
        qk_norm=False,
    )
    base.update(overrides)
    cfg = ModelConfig(**base)
    cfg.layer_windows = base.get("layer_windows") or [None] * cfg.num_layers
    return cfg


def _reference_model(cfg: ModelConfig) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(cfg).to(torch.float64)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
    return model


def _cast(model: Transformer, dtype: torch.dtype, panels: bool = False) -> Transformer:
    """As the loader does: weights in dtype, the rotary tables built fresh (float32), linears packed (with
    the copies for mid-size batches, float32's gemm panels, where panels says RAM allows them)."""
    out = copy.deepcopy(model).to(dtype)
    cfg = out.config
    out.rope = RotaryEmbedding(cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta, cfg.rope_scaling)
    return pack_linears(out, available_ram=2**40 if panels else None)


def _runner(model: Transformer, num_blocks: int = NUM_BLOCKS) -> ModelRunner:
    dtype = model.embed_tokens.weight.dtype
    return ModelRunner(model, num_blocks, BLOCK, torch.device("cpu"), dtype)


class Lockstep:
    """Sequences driven through several runners at once: one prefill each, then decode steps of all.
    The prefills take the per-op forward in every runner (prompts_as_rows=False), so that each decode
    step starts from the same K/V; with prompts_as_rows, a native runner runs short prompts as rows."""

    def __init__(self, runners: list[ModelRunner], prompts: list[list[int]], prompts_as_rows: bool = False):
        self.runners, self.tokens = runners, [list(p) for p in prompts]
        self.tables = [list(range(i * 8, i * 8 + 8)) for i in range(len(prompts))]  # 32 slots each
        saved = [r.short_prompt_tokens for r in runners]
        for runner in runners if not prompts_as_rows else []:
            runner.short_prompt_tokens = 0
        self.prefill_logits = [
            self._run(StepInput([seq], [0], [table], [[len(seq) - 1]]))
            for seq, table in zip(self.tokens, self.tables, strict=True)
        ]
        for runner, value in zip(runners, saved, strict=True):
            runner.short_prompt_tokens = value

    def _run(self, inp: StepInput) -> list[torch.Tensor]:
        return [runner.run(inp) for runner in self.runners]

    def decode(self, next_tokens: list[int]) -> list[torch.Tensor]:
        """One decode step of every sequence; the logits [sequences, vocab] of each runner."""
        starts = [len(seq) for seq in self.tokens]
        for seq, token in zip(self.tokens, next_tokens, strict=True):
            seq.append(token)
        return self._run(StepInput([[t] for t in next_tokens], starts, self.tables, [[0]] * len(starts)))


@pytest.mark.parametrize("sequences", [1, 2, 4])
@pytest.mark.parametrize(
    "variant",
    [{}, {"qkv_bias": True, "o_bias": True, "mlp_bias": True}, {"layer_windows": [None, 6, None]}],
    ids=["llama", "biases", "sliding-window"],
)
def test_float32_matches_the_per_op_path_exactly_and_float64_within_tolerance(sequences, variant):
    ref = _reference_model(_config(**variant))
    fused_model, per_op_model = _cast(ref, torch.float32), _cast(ref, torch.float32)
    fused, per_op, reference = _runner(fused_model), _runner(per_op_model), _runner(ref)
    per_op.decode_stack = None
    assert fused.decode_stack is not None and reference.decode_stack is None
    prompts = [[(7 * i + 3 * j) % 97 for j in range(5 + 3 * i)] for i in range(sequences)]
    steps = Lockstep([fused, per_op, reference], prompts)
    for step in range(8):  # crosses block boundaries (4 slots a block) and the 6-key window
        a, b, r = steps.decode([(11 * step + i) % 97 for i in range(sequences)])
        assert torch.equal(a, b), (step, (a - b).abs().max())
        assert (a.double() - r).abs().max() < 5e-4, (step, (a.double() - r).abs().max())
    for layer in range(3):  # the step wrote the same K/V rows the per-op path wrote
        assert torch.equal(fused.kv_caches[layer][0], per_op.kv_caches[layer][0])
        assert torch.equal(fused.kv_caches[layer][1], per_op.kv_caches[layer][1])


@pytest.mark.parametrize("variant", [{}, {"layer_windows": [None, 6, None]}], ids=["llama", "window"])
def test_short_prompts_run_as_rows_of_the_native_step_as_the_per_op_prefill_does(variant):
    """A prompt chunk of 2-32 tokens runs as decode rows with causal context lengths in one native call
    (engine/model_runner.py): its logits and the K/V it writes agree with the per-op prefill to float32
    rounding and with float64, and the decode steps after it too; a longer chunk keeps the per-op path."""
    ref = _reference_model(_config(**variant))
    rows, per_op, reference = (
        _runner(_cast(ref, torch.float32)),
        _runner(_cast(ref, torch.float32)),
        _runner(ref),
    )
    per_op.decode_stack = None
    calls = []
    real_run = rows.decode_stack.run
    rows.decode_stack.run = lambda *a, **k: calls.append(a[0].shape[0]) or real_run(*a, **k)
    prompts = [[(7 * i + 3 * j) % 97 for j in range(n)] for i, n in enumerate((2, 9, 13))]
    steps = Lockstep([rows, per_op, reference], prompts, prompts_as_rows=True)
    assert calls == [2, 9, 13]  # each prompt in one native call, a row per token
    for a, b, r in steps.prefill_logits:
        assert (a - b).abs().max() < 1e-5 and (a.double() - r).abs().max() < 5e-4
    for layer in range(3):
        for kv in range(2):
            assert torch.allclose(rows.kv_caches[layer][kv], per_op.kv_caches[layer][kv], atol=1e-5)
    for step in range(4):
        a, b, r = steps.decode([(11 * step + i) % 97 for i in range(3)])
        assert (a - b).abs().max() < 1e-5 and (a.double() - r).abs().max() < 5e-4
    calls.clear()
    rows.short_prompt_tokens = 8
    Lockstep([rows], [[1, 2, 3, 4, 5, 6, 7, 8, 9]], prompts_as_rows=True)
    assert calls == []  # 9 tokens > 8: the per-op forward
    # A short chunk after a long context keeps the per-op forward too (each row would read it all); a
    # decode row's context does not count.
    table = list(range(8))
    short = StepInput([[5, 6, 7], [9]], [0, 300], [table, table], [[2], [0]])
    late = StepInput([[5, 6, 7]], [model_runner.SHORT_PROMPT_MAX_CONTEXT], [table], [[2]])
    assert rows._short_prompts(short) and not rows._short_prompts(late)


def test_bfloat16_within_tolerance_of_float64():
    ref = _reference_model(_config())
    fused, reference = _runner(_cast(ref, torch.bfloat16)), _runner(ref)
    assert fused.decode_stack is not None
    steps = Lockstep([fused, reference], [[1, 2, 3, 4, 5], [9, 8, 7]])
    for step in range(6):
        a, r = steps.decode([step + 10, step + 20])
        assert (a.double() - r).abs().max() < 0.15, (step, (a.double() - r).abs().max())


def _batch_prompts(sequences: int) -> list[list[int]]:
    """Prompts of 1-13 tokens: with 8 decode steps each sequence stays within its 8 blocks of 4 slots."""
    return [[(7 * i + 3 * j) % 97 for j in range(1 + (5 * i) % 13)] for i in range(sequences)]


_LLAMA, _BIASES_WINDOW = (
    {},
    {"qkv_bias": True, "o_bias": True, "mlp_bias": True, "layer_windows": [None, 6, None]},
)
_BATCHED = [  # (sequences, panels, variant): 5-64 in every combination, and the largest step once
    pytest.param(n, panels, variant, id=f"{n}-{'panels' if panels else 'plain-weight'}-{name}")
    for n in (5, 17, 64)
    for panels in (True, False)
    for name, variant in (("llama", _LLAMA), ("biases-window", _BIASES_WINDOW))
] + [pytest.param(decode_step.MAX_TOKENS, True, _BIASES_WINDOW, id="max-tokens-panels-biases-window")]


@pytest.mark.parametrize("sequences, panels, variant", _BATCHED)
def test_float32_batches_past_gemv_match_the_per_op_path_exactly(sequences, panels, variant):
    """5-MAX_TOKENS tokens: the step's linears run the gemm kernel PackedLinear runs for those rows (over
    its panels, or over the weight where no copy was made), so logits and caches are the per-op path's."""
    ref = _reference_model(_config(**variant))
    fused_model, per_op_model = _cast(ref, torch.float32, panels), _cast(ref, torch.float32, panels)
    assert (fused_model.layers[0].mlp.down_proj.panels is not None) == panels
    blocks = 8 * sequences
    fused, per_op, reference = (
        _runner(fused_model, blocks),
        _runner(per_op_model, blocks),
        _runner(ref, blocks),
    )
    per_op.decode_stack = None
    assert fused.decode_stack.max_tokens == decode_step.MAX_TOKENS
    steps = Lockstep([fused, per_op, reference], _batch_prompts(sequences))
    for step in range(8):
        a, b, r = steps.decode([(11 * step + i) % 97 for i in range(sequences)])
        assert torch.equal(a, b), (step, (a - b).abs().max())
        assert (a.double() - r).abs().max() < 5e-4, (step, (a.double() - r).abs().max())
    assert fused.decode_stack._capacity >= sequences  # the one-call step ran these batches
    for mine, theirs in zip(fused.kv_caches, per_op.kv_caches, strict=True):
        assert torch.equal(mine[0], theirs[0]) and torch.equal(mine[1], theirs[1])


@pytest.mark.skipif(
    not decode_step.gemm_bf16_available(), reason="bf16 gemm kernel not built (gemm.c without AVX512-BF16)"
)
@pytest.mark.parametrize("sequences", [5, 17, 64])
def test_bfloat16_batches_past_gemv_match_the_per_op_path_exactly(sequences):
    """Where shoal_gemm_bf16_panels is built, PackedLinear runs bf16 batches on its panels (up to
    gemm_max_rows: all rows, or 47 where the fp32 route measured faster from 48); the step calls the same
    kernel over the same panels up to there, so logits and caches are the per-op path's bit for bit."""
    ref = _reference_model(_config(**_BIASES_WINDOW))
    fused_model, per_op_model = _cast(ref, torch.bfloat16, True), _cast(ref, torch.bfloat16, True)
    blocks = 8 * sequences
    fused, per_op = _runner(fused_model, blocks), _runner(per_op_model, blocks)
    per_op.decode_stack = None
    most = fused_model.layers[0].mlp.down_proj.gemm_max_rows - 1
    assert fused_model.layers[0].mlp.down_proj.panels.dtype is torch.bfloat16
    assert fused.decode_stack.max_tokens == min(decode_step.MAX_TOKENS, most)
    sequences = min(sequences, most)
    steps = Lockstep([fused, per_op], _batch_prompts(sequences))
    for step in range(6):
        a, b = steps.decode([(11 * step + i) % 97 for i in range(sequences)])
        assert torch.equal(a, b), (step, (a - b).abs().max())
    assert fused.decode_stack._capacity >= sequences
    for mine, theirs in zip(fused.kv_caches, per_op.kv_caches, strict=True):
        assert torch.equal(mine[0], theirs[0]) and torch.equal(mine[1], theirs[1])


@pytest.mark.skipif(
    not decode_step.gemm_bf16_available(), reason="bf16 gemm kernel not built (gemm.c without AVX512-BF16)"
)
@pytest.mark.parametrize("sequences", [1, 2, 4])
def test_bfloat16_decode_rows_run_on_the_panels_as_the_per_op_path_does(sequences, monkeypatch):
    """Where PackedLinear has bf16 panels it runs 1-4 rows on them (gemm.c's decode loop), not on gemv; the
    step's linear() does the same for a Dense with panels, so logits and caches are the per-op path's. The
    plain weights are zeroed after packing, so a linear run on gemv instead would give other logits (gemv's
    and the panels' summation orders alone rarely differ after bf16 rounding at this model's size)."""
    ref = _reference_model(_config(**_BIASES_WINDOW))
    models = [_cast(ref, torch.bfloat16, True) for _ in range(3)]
    for model in models[:2]:
        for m in model.modules():
            if isinstance(m, PackedLinear):
                assert m.decode_on_panels
                m.weight.detach().zero_()  # the panels keep the values
    fused, per_op, intact = (_runner(m) for m in models)
    per_op.decode_stack = intact.decode_stack = None
    steps = Lockstep([fused, per_op, intact], _batch_prompts(sequences))
    calls = []  # the per-op path's kernels, once the prefills are done
    real_gemm, real_gemv = gemm.gemm_panels, gemv.gemv
    monkeypatch.setattr(gemm, "gemm_panels", lambda *a: calls.append("panels") or real_gemm(*a))
    monkeypatch.setattr(gemv, "gemv", lambda *a, **k: calls.append("gemv") or real_gemv(*a, **k))
    for step in range(6):  # crosses block boundaries (4 slots a block) and the 6-key window
        a, b, c = steps.decode([(11 * step + i) % 97 for i in range(sequences)])
        assert torch.equal(a, b) and torch.equal(b, c), (step, (a - b).abs().max(), (b - c).abs().max())
    # a step: the per-op runners' 4 linears in each of 3 layers and their lm_heads, and the fused runner's
    # lm_head (its layers run in C), all on the panels
    assert calls == ["panels"] * (6 * 2 * (4 * 3 + 1) + 6), calls[:8]
    for mine, theirs in zip(fused.kv_caches, per_op.kv_caches, strict=True):
        assert torch.equal(mine[0], theirs[0]) and torch.equal(mine[1], theirs[1])


def test_a_step_takes_no_more_tokens_than_its_narrowest_gemm_route():
    """A linear whose per-op gemm route stops early (bfloat16's stops at 47 rows where the fp32 route
    measured faster from 48) caps the stack's max_tokens: a larger step would not match the per-op path."""
    model = _cast(_reference_model(_config()), torch.float32, panels=True)
    model.layers[1].self_attn.o_proj.gemm_max_rows = 11
    runner = _runner(model, 64)
    assert runner.decode_stack.max_tokens == 10
    runner.decode_stack.run(**_step_inputs(10))
    with pytest.raises(ValueError, match="1-10 tokens"):
        runner.decode_stack.run(**_step_inputs(11))


def test_a_sequences_step_is_the_same_in_any_batch_past_gemv():
    """Batch invariance from 5 tokens on: the first 5 sequences' logits are bitwise the same whether 5, 23
    or MAX_TOKENS sequences share the step (gemm.c sums each output in one order whatever the batch)."""
    model = _cast(_reference_model(_config()), torch.float32, panels=True)
    prompts = _batch_prompts(decode_step.MAX_TOKENS)
    runners = [_runner(copy.deepcopy(model), 8 * n) for n in (5, 23, decode_step.MAX_TOKENS)]
    lockstep = [
        Lockstep([r], prompts[:n]) for r, n in zip(runners, (5, 23, decode_step.MAX_TOKENS), strict=True)
    ]
    for step in range(3):
        logits = [ls.decode([(13 * step + i) % 97 for i in range(len(ls.tokens))])[0][:5] for ls in lockstep]
        assert torch.equal(logits[0], logits[1]) and torch.equal(logits[0], logits[2]), step


def test_a_batched_step_calls_between_layers_and_stops_where_it_raises():
    """A one-call step of 12 tokens (the gemm route) makes the between-layers call after layers 0 and 1 of
    3, and a raise there stops it: only layer 0's caches are written."""
    runner = _runner(_cast(_reference_model(_config()), torch.float32, panels=True))
    inputs, calls = _step_inputs(12), []
    runner.decode_stack.run(**inputs, between_layers=lambda: calls.append("go"))
    assert calls == ["go", "go"]
    for k, v in runner.kv_caches:
        k.zero_()
        v.zero_()

    def stop() -> None:
        raise KeyboardInterrupt("stop")

    with pytest.raises(KeyboardInterrupt):
        runner.decode_stack.run(**inputs, between_layers=stop)
    written = [bool(k[inputs["slots"]].abs().sum() > 0) for k, _ in runner.kv_caches]
    assert written == [True, False, False]


def test_steps_past_gemv_without_a_gemm_route_keep_the_per_op_path():
    """bfloat16 without panels (no room for a copy: the bf16 gemm kernel runs only over panels) and plain
    nn.Linear float32 weights (F.linear past 4 rows): the stack takes 1-4 tokens, the runner sends larger
    steps to the per-op forward, and the stack refuses them itself."""
    ref = _reference_model(_config())
    bf16 = _runner(_cast(ref, torch.bfloat16), 64)
    unpacked = copy.deepcopy(ref).to(torch.float32)
    unpacked.rope = _cast(ref, torch.float32).rope
    plain = _runner(unpacked, 64)
    for runner in (bf16, plain):
        assert runner.decode_stack.max_tokens == decode_step.GEMV_ROWS
        Lockstep([runner], _batch_prompts(6)).decode(list(range(6)))
        assert runner.decode_stack._capacity <= decode_step.GEMV_ROWS
    stack = plain.decode_stack
    with pytest.raises(ValueError, match="1-4 tokens"):
        stack.run(torch.randn(5, 64), torch.zeros(5, dtype=torch.long), torch.zeros(5, dtype=torch.long),
                  torch.zeros(5, 2, dtype=torch.int32), torch.ones(5, dtype=torch.int32))  # fmt: skip


@pytest.fixture
def stack_and_inputs():
    model = _cast(_reference_model(_config()), torch.float32)
    runner = _runner(model)
    stack = runner.decode_stack
    inputs = dict(
        embeddings=torch.randn(2, 64),
        positions=torch.tensor([3, 7]),
        slots=torch.tensor([3, 39]),
        block_tables=torch.tensor([[0, 1], [8, 9]], dtype=torch.int32),
        context_lens=torch.tensor([4, 8], dtype=torch.int32),
    )
    return runner, stack, inputs


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("slots", torch.tensor([3, NUM_BLOCKS * BLOCK]), "token 1: slot 128 outside"),
        ("slots", torch.tensor([-1, 39]), "token 0: slot -1 outside"),
        ("positions", torch.tensor([3, 128]), "token 1: position 128 outside"),
        (
            "block_tables",
            torch.tensor([[0, 1], [8, NUM_BLOCKS]], dtype=torch.int32),
            "sequence 1: a block id",
        ),
        ("context_lens", torch.tensor([4, 9], dtype=torch.int32), "sequence 1: context length 9"),
        ("context_lens", torch.tensor([0, 8], dtype=torch.int32), "sequence 0: context length 0"),
    ],
)
def test_out_of_range_contents_are_refused_before_anything_is_written(
    stack_and_inputs, field, value, message
):
    runner, stack, inputs = stack_and_inputs
    before = [c.clone() for pair in runner.kv_caches for c in pair]
    inputs[field] = value
    with pytest.raises(ValueError, match=message):
        stack.run(**inputs)
    after = [c for pair in runner.kv_caches for c in pair]
    assert all(torch.equal(a, c) for a, c in zip(before, after, strict=True))


def test_between_layers_runs_between_every_two_layers_and_what_it_raises_stops_the_step(stack_and_inputs):
    """Called after layers 0 and 1 of 3; a call that raises stops the step there (the layers after it
    write nothing to their caches) and its exception comes out of run()."""
    runner, stack, inputs = stack_and_inputs
    calls = []
    out = stack.run(**inputs, between_layers=lambda: calls.append("go")).clone()
    assert calls == ["go", "go"]
    assert torch.equal(out, stack.run(**inputs))  # the same K/V written again, the same result

    class Urgent(Exception):
        pass

    def stop_after_first_layer() -> None:
        calls.append("stop")
        raise Urgent("a more urgent request")

    for k, v in runner.kv_caches:
        k.zero_()
        v.zero_()
    with pytest.raises(Urgent, match="more urgent"):
        stack.run(**inputs, between_layers=stop_after_first_layer)
    assert calls.count("stop") == 1
    written = [bool(k[inputs["slots"]].abs().sum() > 0) for k, _ in runner.kv_caches]
    assert written == [True, False, False]


@pytest.mark.parametrize(
    "field, value",
    [
        ("embeddings", torch.randn(2, 64, dtype=torch.float64)),
        ("embeddings", torch.randn(5, 64)),
        ("embeddings", torch.randn(64, 2).t()),
        ("positions", torch.tensor([3, 7], dtype=torch.int32)),
        ("slots", torch.tensor([3])),
        ("block_tables", torch.tensor([[0, 1], [8, 9]])),
        ("context_lens", torch.tensor([4, 8])),
    ],
)
def test_bad_dtypes_shapes_and_strides_are_refused(stack_and_inputs, field, value):
    _, stack, inputs = stack_and_inputs
    inputs[field] = value
    with pytest.raises(ValueError, match="decode_step"):
        stack.run(**inputs)


def _step_inputs(tokens: int) -> dict[str, torch.Tensor]:
    """A valid step of `tokens` sequences, one block each (block t, slot 4t + 3: the 4th key)."""
    return dict(
        embeddings=torch.randn(tokens, 64),
        positions=torch.full((tokens,), 3),
        slots=torch.arange(tokens) * BLOCK + 3,
        block_tables=torch.stack([torch.arange(tokens), torch.zeros(tokens, dtype=torch.long)], 1).to(
            torch.int32
        ),
        context_lens=torch.full((tokens,), 4, dtype=torch.int32),
    )


@pytest.mark.parametrize(
    "field, value, message",
    [
        (
            "slots",
            lambda t: t.index_fill(0, torch.tensor([5]), NUM_BLOCKS * BLOCK),
            "token 5: slot 128 outside",
        ),
        ("positions", lambda t: t.index_fill(0, torch.tensor([6]), -1), "token 6: position -1 outside"),
        ("block_tables", lambda t: t.index_fill(0, torch.tensor([9]), NUM_BLOCKS), "sequence 9: a block id"),
        ("context_lens", lambda t: t.index_fill(0, torch.tensor([7]), 9), "sequence 7: context length 9"),
    ],
)
def test_a_batched_step_with_contents_out_of_range_is_refused_before_anything_is_written(
    field, value, message
):
    runner = _runner(_cast(_reference_model(_config()), torch.float32, panels=True))
    before = [c.clone() for pair in runner.kv_caches for c in pair]
    inputs = _step_inputs(12)
    runner.decode_stack.run(**inputs)  # the valid step runs (and writes its slots)
    assert not all(
        torch.equal(a, c) for a, c in zip(before, (c for p in runner.kv_caches for c in p), strict=True)
    )
    before = [c.clone() for pair in runner.kv_caches for c in pair]
    inputs[field] = value(inputs[field])
    with pytest.raises(ValueError, match=message):
        runner.decode_stack.run(**inputs)
    after = [c for pair in runner.kv_caches for c in pair]
    assert all(torch.equal(a, c) for a, c in zip(before, after, strict=True))


def test_more_tokens_than_max_tokens_are_refused():
    runner = _runner(
        _cast(_reference_model(_config()), torch.float32, panels=True), 8 * decode_step.MAX_TOKENS
    )
    inputs = _step_inputs(decode_step.MAX_TOKENS + 1)
    with pytest.raises(ValueError, match=f"1-{decode_step.MAX_TOKENS} tokens"):
        runner.decode_stack.run(**inputs)
    with pytest.raises(ValueError, match="decode_step"):
        runner.decode_stack.run(**(inputs | {"embeddings": torch.randn(0, 64)}))
    assert decode_step.MAX_TOKENS < GEMM_MAX_ROWS  # past it the per-op path leaves the gemm kernel


def test_a_mismatched_cache_is_refused_at_construction():
    model = _cast(_reference_model(_config()), torch.float32)
    runner = _runner(model)
    caches = list(runner.kv_caches)
    caches[1] = (caches[1][0][:-BLOCK], caches[1][1][:-BLOCK])
    with pytest.raises(ValueError, match="layer 1 k_cache"):
        fused_decode.decode_stack(model, caches, BLOCK)


def test_models_it_does_not_serve_keep_the_per_op_path(monkeypatch):
    qwen3 = _cast(_reference_model(_config(qk_norm=True)), torch.float32)
    assert _runner(qwen3).decode_stack is None  # q/k norms
    llama = _cast(_reference_model(_config()), torch.float32)
    assert (
        ModelRunner(
            llama, NUM_BLOCKS, BLOCK, torch.device("cpu"), torch.float32, deterministic=True
        ).decode_stack
        is None
    )
    monkeypatch.setenv("SHOAL_FUSED_DECODE", "0")
    assert _runner(llama).decode_stack is None


def _checkpoint(out: Path, intermediate: int, bias: bool) -> Path:
    """A tiny random Llama checkpoint (float32 safetensors, Hugging Face names): hidden 64, 2 layers, 4 query
    and 2 key/value heads of 16."""
    hidden, heads, kv_heads, head_dim, vocab = 64, 4, 2, 16, 97
    config = dict(
        architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=hidden, intermediate_size=intermediate,
        num_hidden_layers=2, num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
        vocab_size=vocab, max_position_embeddings=128, rms_norm_eps=1e-5, rope_theta=10000.0, hidden_act="silu",
        tie_word_embeddings=False, attention_bias=bias, mlp_bias=bias, torch_dtype="float32",
    )  # fmt: skip
    gen = torch.Generator().manual_seed(0)
    shapes = {"model.embed_tokens.weight": (vocab, hidden), "lm_head.weight": (vocab, hidden)}
    for i in range(2):
        attn, mlp = f"model.layers.{i}.self_attn", f"model.layers.{i}.mlp"
        shapes |= {
            f"{attn}.q_proj": (heads * head_dim, hidden),
            f"{attn}.k_proj": (kv_heads * head_dim, hidden),
        }
        shapes |= {
            f"{attn}.v_proj": (kv_heads * head_dim, hidden),
            f"{attn}.o_proj": (hidden, heads * head_dim),
        }
        shapes |= {f"{mlp}.gate_proj": (intermediate, hidden), f"{mlp}.up_proj": (intermediate, hidden)}
        shapes |= {f"{mlp}.down_proj": (hidden, intermediate)}
    tensors = {}
    for name, shape in shapes.items():
        if name.endswith(".weight"):
            tensors[name] = 0.2 * torch.randn(shape, generator=gen)
            continue
        tensors[f"{name}.weight"] = 0.2 * torch.randn(shape, generator=gen)
        if bias:
            tensors[f"{name}.bias"] = 0.1 * torch.randn(shape[0], generator=gen)
    for i in range(2):
        for norm in ("input_layernorm", "post_attention_layernorm"):
            tensors[f"model.layers.{i}.{norm}.weight"] = 1 + 0.2 * torch.randn(hidden, generator=gen)
    tensors["model.norm.weight"] = 1 + 0.2 * torch.randn(hidden, generator=gen)
    out.mkdir(parents=True)
    save_file(tensors, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps(config))
    return out


QUANTIZED = {  # name -> (intermediate size, biases, bits, group size, symmetric) for quantize_model
    "int4-g32-asymmetric-biases": (128, True, 4, 32, False),
    "int8-auto": (128, False, 8, "auto", True),  # groups of 64 (input 64) and 128 (input 128)
    "int4-auto-down-kept-dense": (172, False, 4, "auto", True),  # 172: no group size, not whole words: dense
    "int4-per-channel": (128, False, 4, PER_CHANNEL, True),  # qgemv with one group of all the columns
}
NOT_SERVED = {  # layouts qgemv does not take: one such linear keeps the whole model on the per-op path
    "int4-down-per-channel": (168, False, 4, "auto", True),  # 168 = 21 words of int4, not groups of 32
}
# 8-bit per channel: qgemv where it runs its AVX2 row, else torch's int8 route (QuantizedLinear's docstring)
(QUANTIZED if qgemv.avx2_row() else NOT_SERVED)["int8-per-channel"] = (128, False, 8, PER_CHANNEL, True)


def _quantized_runners(tmp_path: Path, variant: str, dtype: torch.dtype) -> tuple[ModelRunner, ModelRunner]:
    """Two runners of one quantized checkpoint: the first with the one-call step where it binds, the
    second on the per-op path."""
    intermediate, bias, bits, group, symmetric = (QUANTIZED | NOT_SERVED)[variant]
    src = _checkpoint(tmp_path / "base", intermediate, bias)
    out = quantize_model(src, tmp_path / "quantized", "rtn", bits, group, symmetric).output
    fused = _runner(load_model(out, dtype, torch.device("cpu"))[0])
    per_op = _runner(load_model(out, dtype, torch.device("cpu"))[0])
    per_op.decode_stack = None
    return fused, per_op


@pytest.mark.parametrize("sequences", [1, 2, 4])
@pytest.mark.parametrize("variant", list(QUANTIZED))
def test_quantized_step_matches_the_per_op_path_exactly(tmp_path, variant, sequences):
    fused, per_op = _quantized_runners(tmp_path, variant, torch.float32)
    assert fused.decode_stack is not None
    assert sum(isinstance(m, QuantizedLinear) for m in fused.model.modules()) >= 4
    prompts = [[(7 * i + 3 * j) % 97 for j in range(5 + 3 * i)] for i in range(sequences)]
    steps = Lockstep([fused, per_op], prompts)
    for step in range(6):
        a, b = steps.decode([(11 * step + i) % 97 for i in range(sequences)])
        assert torch.equal(a, b), (step, (a - b).abs().max())
    for mine, theirs in zip(fused.kv_caches, per_op.kv_caches, strict=True):
        assert torch.equal(mine[0], theirs[0]) and torch.equal(mine[1], theirs[1])


def test_quantized_bfloat16_step_matches_the_per_op_path_exactly(tmp_path):
    fused, per_op = _quantized_runners(tmp_path, "int4-g32-asymmetric-biases", torch.bfloat16)
    assert fused.decode_stack is not None
    steps = Lockstep([fused, per_op], [[1, 2, 3, 4, 5], [9, 8, 7]])
    for step in range(4):
        a, b = steps.decode([step + 10, step + 20])
        assert torch.equal(a, b), (step, (a - b).abs().max())


@pytest.mark.skipif(
    not qgemv.signed_supported(torch.bfloat16, 64) or qgemv.avx2_row(),
    reason="torch's int8 route with qgemv over its signed codes runs on AVX512-BF16 only (this CPU lacks it)",
)
def test_int8_per_channel_bfloat16_step_runs_qgemv_over_torchs_int8_weight(tmp_path):
    """A per-channel int8 layer keeps torch's int8 weight (QuantizedLinear.int8_route), whose 1-4 bf16 rows
    its forward sends to qgemv as signed codes: the one-call step takes the same route (it once left the
    whole model on the per-op path, 0.62x the bf16 model's decode speed) and gives the same bits."""
    fused, per_op = _quantized_runners(tmp_path, "int8-per-channel", torch.bfloat16)
    linears = [m for m in fused.model.modules() if isinstance(m, QuantizedLinear)]
    assert linears and all(m.int8_route and m.int8_qgemv for m in linears)
    assert fused.decode_stack is not None
    steps = Lockstep([fused, per_op], [[1, 2, 3, 4, 5], [9, 8, 7], [4, 4]])
    for step in range(4):
        a, b = steps.decode([step + 10, step + 20, step + 30])
        assert torch.equal(a, b), (step, (a - b).abs().max())


@pytest.mark.parametrize("dtype, zero", [(torch.float32, False), (torch.bfloat16, True)])
def test_signed_int8_codes_outside_qgemvs_route_are_refused(dtype, zero):
    """Signed codes (torch's int8 weight) only where qgemv takes them: bfloat16 x, symmetric (no zero
    points), groups of a multiple of 64 on AVX512-BF16; anything else is refused before a step runs."""
    q = decode_step.Quantized(
        torch.zeros(8, 64 // 4, dtype=torch.int32),
        torch.ones(8, 1, dtype=torch.bfloat16),
        torch.zeros(8, 1, dtype=torch.int8) if zero else None,
        8,
        64,
        signed=True,
    )
    with pytest.raises(ValueError, match="signed True"):
        decode_step._quantized("layer 0 qkv", q, 8, 64, dtype)


def test_a_quantized_model_takes_1_to_4_tokens_and_larger_steps_run_per_op(tmp_path):
    """qgemv stops at 4 rows: the stack of a quantized model takes 1-4 tokens, and a step of 6 runs the
    per-op forward, equal to a runner without the stack."""
    fused, per_op = _quantized_runners(tmp_path, "int4-g32-asymmetric-biases", torch.float32)
    assert fused.decode_stack.max_tokens == decode_step.GEMV_ROWS
    for runner in (fused, per_op):  # room for 6 sequences of 8 blocks
        runner.kv_caches[:] = [(torch.zeros(48 * BLOCK, *k.shape[1:]), torch.zeros(48 * BLOCK, *v.shape[1:]))
                               for k, v in runner.kv_caches]  # fmt: skip
    fused.decode_stack = fused_decode.decode_stack(fused.model, fused.kv_caches, BLOCK)
    a, b = Lockstep([fused, per_op], _batch_prompts(6)).decode(list(range(6)))
    assert torch.equal(a, b)
    assert fused.decode_stack._capacity <= decode_step.GEMV_ROWS  # the 6-token step went per-op


@pytest.mark.parametrize("variant", list(NOT_SERVED))
def test_quantized_layouts_qgemv_does_not_take_keep_the_per_op_path(tmp_path, variant):
    fused, per_op = _quantized_runners(tmp_path, variant, torch.float32)
    assert fused.decode_stack is None
    assert any(isinstance(m, QuantizedLinear) and not m.use_qgemv for m in fused.model.modules())
    a, b = Lockstep([fused, per_op], [[1, 2, 3]]).decode([4])
    assert torch.equal(a, b)


@pytest.mark.parametrize(
    "buffer, bad",
    [
        ("weight_zero_point", lambda t: t.to(torch.int16)),
        ("weight_scale", lambda t: t.t().contiguous().t()),  # column-major
        ("weight_scale", lambda t: t[:, :1]),  # one group short
        ("weight_packed", lambda t: t[:-1]),  # one row short
    ],
)
def test_a_quantized_linear_outside_qgemvs_layout_is_refused_at_construction(tmp_path, buffer, bad):
    fused, _ = _quantized_runners(tmp_path, "int4-g32-asymmetric-biases", torch.float32)
    qkv = fused.model.layers[1].self_attn.qkv_proj
    setattr(qkv, buffer, bad(getattr(qkv, buffer)))
    with pytest.raises(ValueError, match="layer 1 qkv must be qgemv's layout"):
        fused_decode.decode_stack(fused.model, fused.kv_caches, BLOCK)


def test_the_step_benchmark_runs_both_sides(stories_dir):
    """bench/decode_step.py end to end on stories260K (timings meaningless here): a row per sequence count,
    and the one-call step took the 5-token steps."""
    script = Path(__file__).parent.parent / "bench" / "decode_step.py"
    args = ["--model", str(stories_dir), "--sequences", "2,5", "--steps", "3", "--threads", "1"]
    done = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=100)
    assert done.returncode == 0, done.stderr
    rows = [line for line in done.stdout.splitlines() if line.startswith(("| 2", "| 5"))]
    assert len(rows) == 2 and "both per-op" not in done.stdout, done.stdout
