"""shoal's Triton kernels compile, ahead of time and without a GPU, to Hopper machine code (sm_90, the H200
that sessions are lent), in the configurations a bfloat16 model takes there.

Why, beside the interpreter tests (tests/test_triton_kernels.py): the interpreter runs a kernel as NumPy
code, so it accepts what the compiler refuses (a loop-carried value changing type, a tl.dot shape below
16, an unsupported cast); `triton.compile` with a CUDA target runs the whole pipeline (TTIR, TTGIR, LLVM,
PTX, and ptxas to a cubin) with triton's bundled CUDA tools, no driver needed. The shapes are those of the
benchmark models: Llama-3.2-1B (GQA 32/8, head dim 64) and Qwen3-0.6B (GQA 16/8, head dim 128).
Compiled kernels are cached by triton (~/.triton/cache, keyed by source and options): cold, about 15 s
here (five kernels); warm, under a second.
"""

from __future__ import annotations

import importlib.util
import os

import pytest

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed"),
    pytest.mark.skipif(
        os.environ.get("TRITON_INTERPRET") == "1", reason="compiles only outside the interpreter"
    ),
]
POINTERS = {  # argument -> pointee type, where it is not the activations' dtype
    "tables_ptr": "i32",
    "lens_ptr": "i32",
    "slots_ptr": "i64",
    "w_ptr": "i32",
    "z_ptr": "i8",
    "part_ptr": "fp32",  # split-K partial outputs
    "ml_ptr": "fp32",
}


def _signature(fn, dtype: str) -> dict[str, str]:
    """triton's signature for fn: pointers to `dtype` (or POINTERS'), fp32 `scale`, i32 for other scalars."""
    sig = {}
    for param in fn.params:
        name = param.name
        if param.is_constexpr:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = "*" + POINTERS.get(name, dtype)
        else:
            sig[name] = "fp32" if name == "scale" else "i32"
    return sig


def _cases():
    from shoal.kernels import triton_paged_decode, triton_prefill, triton_w4a16

    decode = dict(BLOCK_SIZE=16, BLOCK_G=16, BLOCK_N=triton_paged_decode.BLOCK_N, DOT_F32=False, SPLITS=1)
    prefill = dict(BLOCK_M=triton_prefill.BLOCK_M, BLOCK_N=triton_prefill.BLOCK_N, DOT_F32=False)
    w4a16 = dict(
        BITS=4, HAS_ZERO=True, HAS_BIAS=False, BLOCK_N=64, BLOCK_K=64, DOT_F32=False, ROUND_BF16=True
    )
    return {
        "decode_llama1b": (
            triton_paged_decode._paged_decode_kernel,
            dict(decode, HKV=8, GROUP=4, D=64, BLOCK_D=64),
        ),
        "decode_split8_qwen3": (
            triton_paged_decode._paged_decode_kernel,
            dict(decode, HKV=8, GROUP=2, D=128, BLOCK_D=128, SPLITS=8),
        ),
        "combine_split8_qwen3": (
            triton_paged_decode._combine_kernel,
            dict(H=16, D=128, SPLITS=8, BLOCK_S=8, BLOCK_D=128),
        ),
        "prefill_qwen3": (triton_prefill._prefill_kernel, dict(prefill, H=16, HKV=8, D=128, BLOCK_D=128)),
        "w4a16_g128": (triton_w4a16._quantized_matmul_kernel, dict(w4a16, GROUP=128, BLOCK_M=16)),
    }


CASES = ["decode_llama1b", "decode_split8_qwen3", "combine_split8_qwen3", "prefill_qwen3", "w4a16_g128"]


@pytest.mark.parametrize("name", CASES)
def test_kernel_compiles_to_hopper_cubin(name):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn, constexprs = _cases()[name]
    source = ASTSource(fn=fn, signature=_signature(fn, "bf16"), constexprs=constexprs)
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32))
    assert len(compiled.asm["cubin"]) > 0
    ptx = compiled.asm["ptx"]
    assert ".target sm_90" in ptx
    if not name.startswith("combine"):  # the split-K combination has no dot
        # bfloat16 dots reach the tensor cores (mma/wgmma), not scalar FMAs
        assert "mma" in ptx, f"{name}: no tensor-core instruction in the PTX"
