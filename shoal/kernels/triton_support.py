"""When shoal's Triton kernels serve a tensor, and how they compute: the one place that imports triton lazily.

The kernels (triton_paged_decode.py, triton_prefill.py, triton_w4a16.py) import triton at module level,
since `@triton.jit` functions must be defined in a .py file. The model and engine reach them only through
`kernel_module`, which imports a kernel module on first use and only for a CUDA tensor: without triton,
or without a GPU, nothing here imports triton and every path stays the CPU/PyTorch one.

Switches:
- SHOAL_TRITON_KERNELS=0: never use the Triton kernels (the PyTorch paths run on CUDA).
- TRITON_INTERPRET=1 (triton's own, read when a kernel module is imported): the kernels run on CPU tensors
  in triton's interpreter. Tests use it, in a subprocess (tests/triton_interpret_worker.py), to check every
  kernel against a PyTorch reference without a GPU. SHOAL_TRITON_ON_CPU=1 then also routes the model's CPU
  tensors to the kernels, so that a whole model runs on them (the dispatch hooks' test).

Dot products: on a GPU, bfloat16/float16 operands go to `tl.dot` as they are (tensor cores, fp32
accumulation; products of 16-bit values are exact in fp32), and attention probabilities are rounded to the
input dtype before P @ V, as FlashAttention does. float32 inputs use fp32 dots with input_precision="ieee"
(not TF32). Triton's interpreter computes bfloat16 arithmetic wrongly (../shared/dependency-notes.md), so
under it bfloat16 takes the fp32 route; float16, which it computes right, keeps the 16-bit route, so that
the route the GPU takes for bfloat16 is the one the interpreter tests check (in float16).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from functools import lru_cache
from types import ModuleType

import torch

KERNEL_MODULES = ("triton_paged_decode", "triton_prefill", "triton_w4a16")


def interpreting() -> bool:
    """Whether triton runs kernels in its interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@lru_cache
def _importable() -> bool:
    return (
        os.environ.get("SHOAL_TRITON_KERNELS", "1") != "0" and importlib.util.find_spec("triton") is not None
    )


@lru_cache
def _on_cpu() -> bool:
    return interpreting() and os.environ.get("SHOAL_TRITON_ON_CPU") == "1" and _importable()


def serves(device: torch.device) -> bool:
    """Whether the Triton kernels serve tensors on this device: CUDA with triton installed, or the CPU under
    the interpreter when SHOAL_TRITON_ON_CPU=1 asks for it (tests). Called per layer and step: the
    environment is read once per process."""
    if device.type == "cuda":
        return _importable()
    return _on_cpu()


def serves_dtype(device: torch.device, dtype: torch.dtype) -> bool:
    """serves(device), for tensors of a dtype the attention kernels take (float32, bfloat16, float16)."""
    return dtype in (torch.float32, torch.bfloat16, torch.float16) and serves(device)


@lru_cache
def kernel_module(name: str) -> ModuleType:
    """shoal.kernels.<name>, imported once (this imports triton). name: one of KERNEL_MODULES."""
    if name not in KERNEL_MODULES:
        raise ValueError(f"unknown Triton kernel module {name!r}; known: {KERNEL_MODULES}")
    return importlib.import_module(f"shoal.kernels.{name}")


def dot_in_fp32(dtype: torch.dtype) -> bool:
    """Whether tl.dot gets fp32 operands for inputs of this dtype (see the module docstring)."""
    return dtype == torch.float32 or (dtype == torch.bfloat16 and interpreting())


W4A16_BLOCK_KS = (64, 32, 16)  # triton_w4a16's K steps: the first that divides the group size


def w4a16_block_k(bits: int, group_size: int, in_features: int) -> int | None:
    """The K step triton_w4a16 takes for a layer (group_size 0: one group per row), or None where it does not
    serve the layer: it needs 4 or 8 bits and a group of a multiple of 16 columns that divides in_features.
    Here, not in triton_w4a16, so that layers decide without importing triton."""
    group = group_size or in_features
    if bits not in (4, 8) or group <= 0 or in_features % group:
        return None
    return next((b for b in W4A16_BLOCK_KS if group % b == 0), None)


def next_power_of_2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()
