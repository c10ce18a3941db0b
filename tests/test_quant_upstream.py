"""GPTQ (AutoGPTQ / GPTQModel) and AWQ (AutoAWQ GEMM) checkpoints, packed by the upstream code itself, load
into shoal's QuantizedLinear, dequantize to the upstream's own dequantization, and serve (issue 18, point 6).

The fixtures under tests/fixtures/upstream_quant were packed by gptqmodel 7.7.0 (`TorchLinear.pack`, v1 files
through its `convert_gptq_v2_to_v1_format_module`) and AutoAWQ 0.2.9 (`WQLinear_GEMM.from_linear`); each
`<variant>.reference.safetensors` is their own dequantization (gptqmodel `TorchLinear.dequantize_weight`,
AutoAWQ `packing_utils.dequantize_gemm`), float16. tests/fixtures/make_upstream_quant.py made them and says
how to make them again.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from quant_helpers import serve_completion, shoal_dequantized
from safetensors.torch import load_file, save_file

from shoal.kernels import qgemv
from shoal.model.config import ModelConfigError, load_config
from shoal.model.loader import WeightLoadError, load_model
from shoal.quant.linear import QuantizedLinear

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "upstream_quant"
VARIANTS = (
    "gptq_v1_sym_g32",
    "gptq_v1_asym_g32",
    "gptq_v2_asym_actorder_g32",
    "gptq_v1_int8_channel",
    "awq_gemm_g32",
)
CPU = torch.device("cpu")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def _model_dir(variant: str, tmp_path: Path, stories_dir: Path) -> Path:
    """The fixture with stories260K's tokenizer (vocab 512) beside it, in tmp_path."""
    out = tmp_path / variant
    shutil.copytree(FIXTURES / variant, out)
    for f in TOKENIZER_FILES:
        shutil.copy(stories_dir / f, out / f)
    return out


@pytest.mark.timeout(30)
@pytest.mark.parametrize("variant", VARIANTS)
def test_dequantized_weights_equal_the_upstream_dequantization(variant):
    model, cfg = load_model(FIXTURES / variant, torch.float32, CPU)
    reference = load_file(str(FIXTURES / f"{variant}.reference.safetensors"))
    # float16, as the upstream computes it: (q - z) is a small integer, so both round the same exact product
    ours = shoal_dequantized(model, cfg, torch.float16)
    assert sorted(ours) == sorted(reference) and len(ours) == 14
    for name, w in reference.items():
        assert torch.equal(ours[name], w), name
    layers = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    assert len(layers) == 8  # qkv, o, gate_up and down in each of the 2 layers
    acts = [m.input_perm is not None for m in layers]
    assert any(acts) == ("actorder" in variant)


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    ("variant", "symmetric", "group_size"),
    [("gptq_v1_sym_g32", True, 32), ("gptq_v1_asym_g32", False, 32), ("gptq_v1_int8_channel", True, 0)],
)
def test_gptq_symmetry_and_groups_map_onto_shoal_kernels(variant, symmetric, group_size):
    """GPTQ `sym` zero points (2^(bits-1), stored minus one in v1 files) become a symmetric layer, so int8
    per channel takes torch's _weight_int8pack_mm (qgemv where it runs its AVX2 row and the input size is
    a multiple of 32) and int4 groups of 32 take qgemv."""
    model, _ = load_model(FIXTURES / variant, torch.bfloat16, CPU)
    layers = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    assert {(m.weight_zero_point is None, m.group_size) for m in layers} == {(symmetric, group_size)}
    bits8 = variant.endswith("int8_channel")
    for m in layers:
        assert m.int8_route == (bits8 and not (qgemv.avx2_row() and m.in_features % 32 == 0))
        assert m.use_qgemv == (not m.int8_route and m.in_features % 32 == 0)


def _dense_twin(model_dir: Path, variant: str, out: Path) -> Path:
    """The same model with the upstream's dequantized weights as plain float16 linears."""
    shutil.copytree(model_dir, out)
    raw = json.loads((out / "config.json").read_text())
    del raw["quantization_config"]
    (out / "config.json").write_text(json.dumps(raw))
    tensors = {
        k: v
        for k, v in load_file(str(out / "model.safetensors")).items()
        if k.rsplit(".", 1)[1] not in ("qweight", "qzeros", "scales", "g_idx")
    }
    reference = load_file(str(FIXTURES / f"{variant}.reference.safetensors"))
    tensors.update({f"{name}.weight": w for name, w in reference.items()})
    save_file(tensors, str(out / "model.safetensors"))
    return out


@pytest.mark.timeout(60)
@pytest.mark.parametrize("variant", ["gptq_v2_asym_actorder_g32", "awq_gemm_g32"])
def test_upstream_checkpoint_generates_like_its_dense_twin(variant, stories_dir, tmp_path):
    """Prompt logits and greedy tokens of the quantized checkpoint against the dense model made of the
    upstream's dequantized weights (float32 engine; the quantized path computes in float32 from exact
    dequantized values, the dense twin from their float16 rounding)."""
    from tiny_models import make_engine

    from shoal.engine.sampling_params import SamplingParams

    quantized = _model_dir(variant, tmp_path, stories_dir)
    dense = _dense_twin(quantized, variant, tmp_path / "dense")
    prompt = list(range(3, 40))
    runs = {}
    for label, d in (("quantized", quantized), ("dense", dense)):
        engine = make_engine(d, kv_tokens=512, max_model_len=256)
        logits = engine.prompt_logits(prompt)
        params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
        tokens = list(engine.generate([prompt], params)[0].outputs[0].token_ids)
        runs[label] = logits, tokens
    (lq, tq), (ld, td) = runs["quantized"], runs["dense"]
    assert float((lq - ld).abs().max()) < 1e-2 * float(ld.abs().max())
    assert len(tq) == 8 and tq == td


@pytest.mark.timeout(60)
def test_serve_gptq_act_order_checkpoint_over_openai_api(stories_dir, tmp_path):
    out = serve_completion(_model_dir("gptq_v2_asym_actorder_g32", tmp_path, stories_dir), "Once upon a time")
    assert out["usage"]["completion_tokens"] == 8 and out["choices"][0]["text"]


def _with_tensor_changed(variant: str, key: str, change, tmp_path: Path) -> Path:
    """A copy of the fixture whose tensor key is replaced by change(tensor)."""
    out = tmp_path / variant
    shutil.copytree(FIXTURES / variant, out)
    tensors = load_file(str(out / "model.safetensors"))
    tensors[key] = change(tensors[key]).contiguous()
    save_file(tensors, str(out / "model.safetensors"))
    return out


@pytest.mark.timeout(30)
def test_fused_parts_with_different_g_idx_are_refused(tmp_path):
    key = "model.layers.1.self_attn.k_proj.g_idx"
    out = _with_tensor_changed("gptq_v2_asym_actorder_g32", key, lambda t: t.roll(1), tmp_path)
    with pytest.raises(WeightLoadError, match=r"k_proj\.g_idx differs from .*q_proj\.g_idx"):
        load_model(out, torch.float32, CPU)


@pytest.mark.timeout(30)
def test_tensor_of_the_wrong_shape_names_the_tensor(tmp_path):
    key = "model.layers.0.mlp.down_proj.scales"
    out = _with_tensor_changed("awq_gemm_g32", key, lambda t: t[:, :-8], tmp_path)
    with pytest.raises(WeightLoadError, match=r"down_proj\.scales has .*\(4, 56\), expected \(4, 64\)"):
        load_model(out, torch.float32, CPU)


@pytest.mark.timeout(10)
@pytest.mark.parametrize(
    ("variant", "change", "field"),
    [
        ("gptq_v1_sym_g32", {"bits": 3}, r"quantization_config\.bits=3"),
        (
            "gptq_v1_sym_g32",
            {"checkpoint_format": "marlin"},
            r"quantization_config\.checkpoint_format='marlin'",
        ),
        ("gptq_v1_sym_g32", {"group_size": 0}, r"quantization_config\.group_size=0"),
        ("gptq_v1_sym_g32", {"desc_act": "yes"}, r"quantization_config\.desc_act"),
        ("awq_gemm_g32", {"version": "gemv"}, r"quantization_config\.version='gemv'"),
        ("awq_gemm_g32", {"zero_point": False}, r"quantization_config\.zero_point"),
        ("awq_gemm_g32", {"quant_method": "exl2"}, r"quantization_config\.quant_method='exl2'"),
    ],
)
def test_malformed_upstream_config_names_the_field(variant, change, field, tmp_path):
    raw = json.loads((FIXTURES / variant / "config.json").read_text())
    raw["quantization_config"].update(change)
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ModelConfigError, match=field):
        load_config(tmp_path)
