"""A fused linear (qkv_proj, gate_up_proj) whose weight stays in its checkpoint parts.

`--load-format mmap` keeps every weight where safetensors maps it in the file (safe_open's tensors are
views of the mapping: their pages count as file-backed, RssFile, and come in as first used). Fusing q/k/v
with torch.cat would copy them into anonymous memory, so this module holds the parts and concatenates
their outputs instead: the same result as the fused matmul, in one matmul per part.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SplitLinear(nn.Module):
    """y = cat([x @ W_i.T + b_i]) over the parts, on the last dimension: what the fused nn.Linear computes."""

    def __init__(self, weights: list[torch.Tensor]):
        super().__init__()
        self.weights = nn.ParameterList(nn.Parameter(w, requires_grad=False) for w in weights)
        self.biases: nn.ParameterList | None = None
        self.in_features = weights[0].shape[1]
        self.out_features = sum(w.shape[0] for w in weights)

    def set_biases(self, biases: list[torch.Tensor]) -> None:
        self.biases = nn.ParameterList(nn.Parameter(b, requires_grad=False) for b in biases)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        biases = list(self.biases) if self.biases is not None else [None] * len(self.weights)
        return torch.cat([F.linear(x, w, b) for w, b in zip(self.weights, biases, strict=True)], dim=-1)
