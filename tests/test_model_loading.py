"""Loading checkpoints: clear errors for what shoal cannot run, and every accepted spelling loading the same.

Each broken directory is a copy of a tiny random checkpoint (tests/tiny_models.py) with one thing wrong;
the error must say which file and which field or tensor.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import LLAMA3_ROPE

from shoal.engine.config import EngineConfig
from shoal.engine.llm_engine import LLMEngine
from shoal.model import device as device_mod
from shoal.model.config import ModelConfigError, load_config, parse_config
from shoal.model.device import resolve_dtype
from shoal.model.loader import WeightLoadError, load_model

CPU = torch.device("cpu")


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_config(model_dir: Path, **changes) -> Path:
    path = model_dir / "config.json"
    raw = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            raw.pop(key, None)
        else:
            raw[key] = value
    path.write_text(json.dumps(raw, indent=2))
    return path


def _load(model_dir: Path):
    return load_model(model_dir, torch.float32, CPU)


def _engine(model_dir: Path, **kw) -> LLMEngine:
    kw = {"dtype": "float32", "kv_cache_memory": 1 << 20, "max_model_len": 128, **kw}
    return LLMEngine(EngineConfig(model=str(model_dir), **kw))


@pytest.fixture
def qwen3_copy(tiny_model_dirs, tmp_path) -> Path:
    return _copy(tiny_model_dirs["qwen3"], tmp_path / "qwen3")


@pytest.fixture
def llama3_copy(tiny_model_dirs, tmp_path) -> Path:
    return _copy(tiny_model_dirs["llama3"], tmp_path / "llama3")


# ---------------------------------------------------------------------------------------------------------
# Errors


def test_unknown_architecture(qwen3_copy):
    path = _edit_config(qwen3_copy, architectures=["GPT2LMHeadModel"], model_type="gpt2")
    with pytest.raises(ModelConfigError, match=r"config\.json.*architectures.*GPT2LMHeadModel"):
        load_config(qwen3_copy)
    with pytest.raises(ModelConfigError, match=re.escape(str(path))):
        _engine(qwen3_copy)


def test_missing_config(qwen3_copy):
    (qwen3_copy / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"config\.json is missing"):
        _engine(qwen3_copy)


def test_missing_model_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such model directory"):
        _engine(tmp_path / "nowhere")


def test_missing_safetensors(qwen3_copy):
    (qwen3_copy / "model.safetensors").unlink()
    with pytest.raises(WeightLoadError, match=re.escape(str(qwen3_copy)) + r".*no \*\.safetensors"):
        _engine(qwen3_copy)


@pytest.mark.parametrize("keep", [0.5, 0.999, 0.0001])
def test_truncated_safetensors(qwen3_copy, keep):
    f = qwen3_copy / "model.safetensors"
    os.truncate(f, int(f.stat().st_size * keep))
    with pytest.raises(WeightLoadError, match=re.escape(f"{f}: not a readable safetensors file")):
        _load(qwen3_copy)


@pytest.mark.parametrize(
    "tensor",
    ["model.layers.1.mlp.down_proj.weight", "model.layers.0.self_attn.q_norm.weight", "model.norm.weight"],
)
def test_missing_tensor(qwen3_copy, tensor):
    f = qwen3_copy / "model.safetensors"
    tensors = load_file(f)
    del tensors[tensor]
    save_file(tensors, f, metadata={"format": "pt"})
    with pytest.raises(WeightLoadError, match=re.escape(tensor) + ".*missing"):
        _load(qwen3_copy)


def test_missing_untied_lm_head(llama3_copy):
    f = llama3_copy / "model.safetensors"
    tensors = load_file(f)
    del tensors["lm_head.weight"]
    save_file(tensors, f, metadata={"format": "pt"})
    with pytest.raises(WeightLoadError, match=r"lm_head\.weight.*missing"):
        _load(llama3_copy)


def test_unexpected_tensor(qwen3_copy):
    """A tensor the architecture has no place for (here: biases a Qwen3 config does not ask for) is an error,
    not silently dropped."""
    f = qwen3_copy / "model.safetensors"
    tensors = load_file(f)
    tensors["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(64)
    save_file(tensors, f, metadata={"format": "pt"})
    with pytest.raises(WeightLoadError, match=r"q_proj\.bias"):
        _load(qwen3_copy)


def test_wrong_tensor_shape(qwen3_copy):
    _edit_config(qwen3_copy, intermediate_size=96)
    with pytest.raises(WeightLoadError, match=r"mlp\.gate_proj\.weight.*shape"):
        _load(qwen3_copy)


@pytest.mark.parametrize(
    "changes",
    [
        {"rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0}},
        {"rope_parameters": None, "rope_theta": 10000.0, "rope_scaling": {"type": "dynamic", "factor": 2.0}},
    ],
    ids=["rope_parameters-yarn", "rope_scaling-dynamic"],
)
def test_unsupported_rope_type(qwen3_copy, changes):
    _edit_config(qwen3_copy, **changes)
    kind = "yarn" if "yarn" in json.dumps(changes) else "dynamic"
    with pytest.raises(ModelConfigError, match=rf"config\.json.*rope.*{kind}.*not supported"):
        _engine(qwen3_copy)


def test_unsupported_hidden_act(qwen3_copy):
    _edit_config(qwen3_copy, hidden_act="gelu_pytorch_tanh")
    with pytest.raises(ModelConfigError, match=r"config\.json.*hidden_act.*gelu_pytorch_tanh"):
        _engine(qwen3_copy)


def test_missing_required_field(qwen3_copy):
    _edit_config(qwen3_copy, num_hidden_layers=None)
    with pytest.raises(ModelConfigError, match=r"config\.json.*num_hidden_layers"):
        load_config(qwen3_copy)


# ---------------------------------------------------------------------------------------------------------
# Config spellings and switches

BASE = {
    "architectures": ["LlamaForCausalLM"],
    "vocab_size": 100,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}


def test_rope_spellings_agree(llama3_copy, tmp_path):
    """transformers 5's `rope_parameters` and the older top-level `rope_theta` + `rope_scaling` give the same
    ModelConfig, and the same rotary tables once loaded."""
    new = load_config(llama3_copy)
    assert new.rope_scaling is not None and new.rope_scaling["rope_type"] == "llama3"
    assert new.rope_theta == LLAMA3_ROPE["rope_theta"]
    legacy_dir = _copy(llama3_copy, tmp_path / "legacy")
    scaling = {k: v for k, v in LLAMA3_ROPE.items() if k != "rope_theta"}
    _edit_config(legacy_dir, rope_parameters=None, rope_theta=LLAMA3_ROPE["rope_theta"], rope_scaling=scaling)
    legacy = load_config(legacy_dir)
    assert legacy.rope_theta == new.rope_theta
    assert {k: v for k, v in legacy.rope_scaling.items() if k != "rope_theta"} == {
        k: v for k, v in new.rope_scaling.items() if k != "rope_theta"
    }
    model_new, _ = _load(llama3_copy)
    model_legacy, _ = _load(legacy_dir)
    assert torch.equal(model_new.rope.cos, model_legacy.rope.cos)
    assert torch.equal(model_new.rope.sin, model_legacy.rope.sin)
    # ...and transformers reads the legacy spelling the same way.
    transformers = pytest.importorskip("transformers")
    hf = transformers.LlamaConfig(**json.loads((legacy_dir / "config.json").read_text()))
    assert (
        hf.rope_parameters["rope_type"] == "llama3" and hf.rope_parameters["factor"] == LLAMA3_ROPE["factor"]
    )


def test_default_rope_spellings():
    a = parse_config({**BASE, "rope_theta": 5e5})
    b = parse_config({**BASE, "rope_parameters": {"rope_type": "default", "rope_theta": 5e5}})
    c = parse_config({**BASE, "rope_theta": 5e5, "rope_scaling": None})
    assert a == b == c and a.rope_theta == 5e5 and a.rope_scaling is None
    assert parse_config(BASE).rope_theta == 10000.0


@pytest.mark.parametrize("key", ["torch_dtype", "dtype"])
@pytest.mark.parametrize("value", ["bfloat16", "torch.bfloat16"])
def test_dtype_spellings(key, value):
    assert parse_config({**BASE, key: value}).dtype == "bfloat16"
    assert parse_config(BASE).dtype == "float32"


def test_qwen2_window_off_unless_use_sliding_window():
    qwen2 = {**BASE, "architectures": ["Qwen2ForCausalLM"], "sliding_window": 4096, "max_window_layers": 1}
    assert parse_config({**qwen2, "use_sliding_window": False}).layer_windows == [None, None, None]
    assert parse_config(qwen2).layer_windows == [None, None, None]
    assert parse_config({**qwen2, "use_sliding_window": True}).layer_windows == [None, 4096, 4096]
    layer_types = ["full_attention", "sliding_attention", "full_attention"]
    with_types = {**qwen2, "use_sliding_window": True, "layer_types": layer_types}
    assert parse_config(with_types).layer_windows == [None, 4096, None]


def test_mistral_window_on_every_layer():
    mistral = {**BASE, "architectures": ["MistralForCausalLM"]}
    assert parse_config({**mistral, "sliding_window": 16}).layer_windows == [16, 16, 16]
    assert parse_config({**mistral, "sliding_window": None}).layer_windows == [None, None, None]


def test_tiny_model_switches(tiny_model_dirs):
    """What each tiny checkpoint is meant to exercise really is switched on in the parsed config."""
    llama3, qwen2, qwen3, mistral = (
        load_config(tiny_model_dirs[n]) for n in ("llama3", "qwen2", "qwen3", "mistral")
    )
    assert (
        llama3.rope_scaling["rope_type"] == "llama3" and llama3.qkv_bias and llama3.o_bias and llama3.mlp_bias
    )
    assert not llama3.tie_word_embeddings
    assert qwen2.qkv_bias and not qwen2.o_bias and qwen2.layer_windows == [None, None]
    assert json.loads((tiny_model_dirs["qwen2"] / "config.json").read_text())["sliding_window"] == 16
    assert qwen3.qk_norm and qwen3.tie_word_embeddings and not qwen3.qkv_bias
    assert mistral.layer_windows == [16, 16, 16] and not mistral.tie_word_embeddings


def test_sharded_checkpoint_loads_the_same(tiny_model_dirs, tmp_path):
    transformers = pytest.importorskip("transformers")
    src = tiny_model_dirs["mistral"]
    sharded = tmp_path / "sharded"
    model = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    model.save_pretrained(sharded, max_shard_size="4MB")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(src / f, sharded / f)
    shards = sorted(sharded.glob("*.safetensors"))
    assert len(shards) >= 3 and (sharded / "model.safetensors.index.json").exists()
    # A stray file next to the shards is not part of the checkpoint: the index decides.
    save_file({"junk": torch.zeros(1)}, sharded / "consolidated.safetensors")

    single, _ = _load(src)
    split, _ = _load(sharded)
    a, b = single.state_dict(), split.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)

    ids = list(range(100, 140))
    torch.testing.assert_close(
        _engine(sharded).prompt_logits(ids), _engine(src).prompt_logits(ids), atol=0, rtol=0
    )


def test_missing_shard(tiny_model_dirs, tmp_path):
    transformers = pytest.importorskip("transformers")
    sharded = tmp_path / "sharded"
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_model_dirs["qwen3"], dtype=torch.float32)
    model.save_pretrained(sharded, max_shard_size="4MB")
    shard = sorted(sharded.glob("*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(WeightLoadError, match=re.escape(f"{shard}: shard listed in the index is missing")):
        _load(sharded)


# ---------------------------------------------------------------------------------------------------------
# dtype choice


@pytest.mark.parametrize("fast_bf16", [True, False])
def test_auto_dtype_on_cpu(monkeypatch, fast_bf16):
    monkeypatch.setattr(device_mod, "cpu_has_fast_bf16", lambda: fast_bf16)
    assert resolve_dtype("auto", "bfloat16", CPU) == (torch.bfloat16 if fast_bf16 else torch.float32)
    assert resolve_dtype("auto", "float32", CPU) == torch.float32
    assert resolve_dtype("float32", "bfloat16", CPU) == torch.float32
    assert resolve_dtype("bfloat16", "float32", CPU) == torch.bfloat16


def test_float16_refused_on_cpu(qwen3_copy):
    with pytest.raises(ValueError, match="float16"):
        resolve_dtype("float16", "float16", CPU)
    with pytest.raises(ValueError, match="float16"):
        _engine(qwen3_copy, dtype="float16", device="cpu")


def test_engine_auto_dtype(qwen3_copy, stories_dir):
    assert _engine(stories_dir, dtype="auto", device="cpu").dtype == torch.float32  # float32 checkpoint
    _edit_config(qwen3_copy, dtype="bfloat16")
    want = torch.bfloat16 if device_mod.cpu_has_fast_bf16() else torch.float32
    engine = _engine(qwen3_copy, dtype="auto", device="cpu")
    assert engine.dtype == want
    assert engine.model.embed_tokens.weight.dtype == want
