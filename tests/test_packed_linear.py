"""The CPU bf16 linear swap (oneDNN pre-packed weights, fp32 route for big batches) computes the same
matmul as torch's bf16 linear."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from shoal.model.packed_linear import FP32_MIN_ROWS, PackedLinear, pack_linears, packing_available

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.skipif(
        not packing_available(torch.device("cpu"), torch.bfloat16),
        reason="oneDNN bf16 linears need AVX512 (BW/VL/DQ) or AVX-NE-CONVERT",
    ),
]


@pytest.mark.parametrize("with_fp32", [False, True])
@pytest.mark.parametrize("rows", [1, 7, FP32_MIN_ROWS, 300])
def test_packed_linear_matches_torch(rows: int, with_fp32: bool) -> None:
    torch.manual_seed(rows)
    linear = nn.Linear(192, 320, bias=True).to(torch.bfloat16)
    x = torch.randn(rows, 192, dtype=torch.bfloat16)
    packed = PackedLinear(linear, with_fp32)
    got = packed(x)
    # Reference: exact fp32 matmul of the bf16 values, rounded once to bf16 (what a bf16 GEMM approximates).
    exact = F.linear(x.float(), linear.weight.float(), linear.bias.float())
    assert got.dtype == torch.bfloat16 and got.shape == (rows, 320)
    rounding = exact.abs() * 2**-8 + 1e-3  # one bf16 rounding of the result, plus summation-order slack
    assert ((got.float() - exact).abs() <= rounding).all()
    torch_bf16 = F.linear(x, linear.weight, linear.bias).float()
    assert (got.float() - torch_bf16).abs().max() <= (torch_bf16.abs().max() * 2**-7)


def test_pack_linears_swaps_every_linear_and_keeps_shapes() -> None:
    model = nn.Sequential(nn.Linear(16, 32), nn.SiLU(), nn.Linear(32, 8)).to(torch.bfloat16)
    x = torch.randn(3, 5, 16, dtype=torch.bfloat16)
    before = model(x)
    pack_linears(model, available_ram=None)
    assert all(type(m) is not nn.Linear for m in model.modules())
    after = model(x)
    assert after.shape == before.shape
    assert (after.float() - before.float()).abs().max() < 0.05


@pytest.mark.timeout(120)
def test_smollm2_bfloat16_chat_answer(smollm2_dir) -> None:
    """The default model in its served dtype (bf16, packed linears) gives the reference chat answer."""
    from shoal.engine.config import EngineConfig
    from shoal.engine.llm_engine import LLMEngine
    from shoal.engine.sampling_params import SamplingParams

    engine = LLMEngine(EngineConfig(model=str(smollm2_dir), dtype="bfloat16", kv_cache_memory=64 << 20))
    assert engine.dtype == torch.bfloat16
    tok = engine.tokenizer
    question = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
    ids = tok.encode(tok.apply_chat_template(question), add_special_tokens=False)
    out = engine.generate([ids], SamplingParams(temperature=0, max_tokens=20))[0].outputs[0]
    assert out.text == "The capital of France is Paris."
    assert out.finish_reason == "stop"
