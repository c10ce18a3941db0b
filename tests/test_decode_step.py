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
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from shoal.engine.model_runner import ModelRunner, StepInput
from shoal.kernels import decode_step, qgemv
from shoal.model import fused_decode
from shoal.model.config import ModelConfig
from shoal.model.loader import load_model
from shoal.model.packed_linear import pack_linears
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


def _cast(model: Transformer, dtype: torch.dtype) -> Transformer:
    """As the loader does: weights in dtype, the rotary tables built fresh (float32), linears packed."""
    out = copy.deepcopy(model).to(dtype)
    cfg = out.config
    out.rope = RotaryEmbedding(cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta, cfg.rope_scaling)
    return pack_linears(out)


def _runner(model: Transformer) -> ModelRunner:
    dtype = model.embed_tokens.weight.dtype
    return ModelRunner(model, NUM_BLOCKS, BLOCK, torch.device("cpu"), dtype)


class Lockstep:
    """Sequences driven through several runners at once: one prefill each, then decode steps of all."""

    def __init__(self, runners: list[ModelRunner], prompts: list[list[int]]):
        self.runners, self.tokens = runners, [list(p) for p in prompts]
        self.tables = [list(range(i * 8, i * 8 + 8)) for i in range(len(prompts))]  # 32 slots each
        for seq, table in zip(self.tokens, self.tables, strict=True):
            self._run(StepInput([seq], [0], [table], [[len(seq) - 1]]))

    def _run(self, inp: StepInput) -> list[torch.Tensor]:
        return [torch.cat(runner.run(inp)) for runner in self.runners]

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


def test_bfloat16_within_tolerance_of_float64():
    ref = _reference_model(_config())
    fused, reference = _runner(_cast(ref, torch.bfloat16)), _runner(ref)
    assert fused.decode_stack is not None
    steps = Lockstep([fused, reference], [[1, 2, 3, 4, 5], [9, 8, 7]])
    for step in range(6):
        a, r = steps.decode([step + 10, step + 20])
        assert (a.double() - r).abs().max() < 0.15, (step, (a.double() - r).abs().max())


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
