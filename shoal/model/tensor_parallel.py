"""Tensor parallelism (Megatron-LM's layout, Shoeybi et al. 2019): each of N ranks holds 1/N of every layer.

What each rank holds, and the one collective each part needs:
- q/k/v (qkv_proj) and gate/up (gate_up_proj): column-parallel. Each checkpoint part is split on its
  output rows separately, then the rank's slices are fused: rank r holds the q, k and v of its own
  H/N attention heads and Hkv/N KV heads (GQA groups stay whole: q head j reads KV head j // (H/Hkv), and
  both ranges start at r/N of the way), and the matching 1/N of gate and of up. No communication.
- Attention runs on the rank's heads only, so its KV cache holds only the rank's Hkv/N KV heads.
- o_proj and down_proj: row-parallel. Split on their input columns, each rank computes a partial product;
  RowParallelLinear sums them over the ranks (all-reduce) and then adds the bias once.
- embed_tokens: vocab-parallel. Rank r holds rows [r*V', (r+1)*V') (V' = ceil(V/N), the last shard
  zero-padded); ids outside the shard look up zeros, and an all-reduce assembles the embeddings.
- lm_head: vocab-parallel too (the same rows, and with tied embeddings the same tensor); each rank computes
  its V' logits and an all-gather concatenates them (padding dropped).
- Norms and rotary tables: replicated.

Like gpt-fast's tp.py, this is a transformation of the one Transformer rather than a second model: the
model is built with `local_config` (a rank's head and feature counts), the loader reads only the rank's
slice of each checkpoint tensor (`shard`), and `parallelize` wraps the modules that communicate. The module
names the loader fills stay those of the plain model. vLLM (`vllm/model_executor/layers/linear.py`,
`vocab_parallel_embedding.py`) and nano-vllm (`layers/linear.py`) hold the same layout.

Quantized checkpoints are not sharded yet: their packed rows, scales and zero points would have to be cut
along the same lines (groups along the input dimension for row-parallel layers); they raise at start.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from shoal.model.config import ModelConfig
from shoal.model.tp_group import TPGroup

COLUMN_PARALLEL = ("qkv_proj", "gate_up_proj")  # output rows split, each checkpoint part on its own
ROW_PARALLEL = ("o_proj", "down_proj")  # input columns split; the bias is kept whole, added once
VOCAB_PARALLEL = ("embed_tokens", "lm_head")  # vocabulary rows split, padded to equal shards


def check_tensor_parallel(cfg: ModelConfig, size: int) -> None:
    """ValueError, naming both numbers, if this model cannot be split over `size` ranks."""
    if size == 1:
        return
    counts = {
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "intermediate_size": cfg.intermediate_size,
    }
    for name, count in counts.items():
        if count % size:
            raise ValueError(
                f"tensor_parallel_size={size} does not divide the model's {name}={count}: each rank must "
                f"hold a whole share; choose a size that divides {count}"
            )
    if cfg.quantization is not None:
        raise ValueError(
            f"tensor_parallel_size={size}: quantized checkpoints ({type(cfg.quantization).__name__}) are not "
            "supported with tensor parallelism yet; serve the unquantized model, or tensor_parallel_size=1"
        )


def vocab_shard_rows(vocab_size: int, size: int) -> int:
    return -(-vocab_size // size)


def local_config(cfg: ModelConfig, size: int) -> ModelConfig:
    """The shapes one rank builds: its heads, KV heads, MLP features and vocabulary rows."""
    return dataclasses.replace(
        cfg,
        num_heads=cfg.num_heads // size,
        num_kv_heads=cfg.num_kv_heads // size,
        intermediate_size=cfg.intermediate_size // size,
        vocab_size=vocab_shard_rows(cfg.vocab_size, size),
    )


def shard(param: str, part: torch.Tensor, rank: int, size: int) -> torch.Tensor:
    """Rank's slice of one checkpoint tensor `part` that goes into our parameter `param` (e.g.
    "layers.0.self_attn.qkv_proj.weight", whose parts q_proj, k_proj and v_proj are each sliced here)."""
    module = param.rsplit(".", 2)[-2]
    if module in COLUMN_PARALLEL:
        rows = part.shape[0] // size
        return part.narrow(0, rank * rows, rows)
    if module in ROW_PARALLEL and param.endswith(".weight"):
        cols = part.shape[1] // size
        return part.narrow(1, rank * cols, cols).contiguous()
    if module in VOCAB_PARALLEL:
        rows = vocab_shard_rows(part.shape[0], size)
        piece = part[rank * rows : (rank + 1) * rows]
        return F.pad(piece, (0, 0, 0, rows - piece.shape[0])) if piece.shape[0] < rows else piece
    return part


class RowParallelLinear(nn.Module):
    """y = sum over ranks of x_r @ W_r.T, plus the bias once. x: [T, in/N] (this rank's features),
    y: [T, out], the same on every rank. `linear` (bias removed here) may be swapped for a packed one."""

    def __init__(self, linear: nn.Linear, group: TPGroup):
        super().__init__()
        self.bias = linear.bias
        linear.bias = None
        self.linear = linear
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.group.all_reduce_(self.linear(x))
        return y if self.bias is None else y.add_(self.bias)


class VocabParallelEmbedding(nn.Module):
    """Embeddings [T, hidden] of ids [T] (int64, global vocabulary) from this rank's rows [start, start+rows)."""

    def __init__(self, embedding: nn.Embedding, group: TPGroup):
        super().__init__()
        self.weight = embedding.weight
        self.rows = self.weight.shape[0]
        self.start = group.rank * self.rows
        self.group = group

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.start
        outside = (local < 0) | (local >= self.rows)
        x = F.embedding(local.masked_fill(outside, 0), self.weight)
        # Exact: each id's row comes from one rank, the others add zeros.
        return self.group.all_reduce_(x.masked_fill_(outside.unsqueeze(-1), 0))


class ParallelLMHead(nn.Module):
    """Logits [T, vocab_size] from hidden [T, hidden]: this rank's vocabulary rows, gathered from all."""

    def __init__(self, linear: nn.Linear, group: TPGroup, vocab_size: int):
        super().__init__()
        self.linear = linear
        self.group = group
        self.vocab_size = vocab_size

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.cat(self.group.all_gather(self.linear(hidden)), dim=-1)[..., : self.vocab_size]


def parallelize(model: nn.Module, group: TPGroup, vocab_size: int) -> nn.Module:
    """Wrap, in place, the modules of a Transformer built with local_config and loaded with shard() that
    communicate (the column-parallel ones need nothing). Call before packing the linears."""
    model.embed_tokens = VocabParallelEmbedding(model.embed_tokens, group)
    model.lm_head = ParallelLMHead(model.lm_head, group, vocab_size)
    for layer in model.layers:
        layer.self_attn.o_proj = RowParallelLinear(layer.self_attn.o_proj, group)
        layer.mlp.down_proj = RowParallelLinear(layer.mlp.down_proj, group)
    return model
