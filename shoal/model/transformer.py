"""One decoder-only transformer for Llama, Mistral, Qwen2 and Qwen3, switched by ModelConfig options.

Tokens arrive flat ([T], all sequences of the step concatenated); attention is the only place that
knows about sequences, through AttentionMetadata. q/k/v and gate/up are fused into one matmul each at
load time (fewer, larger ops: per-op overhead decides CPU decode speed).

Each layer takes the previous sublayer's output and the residual stream apart, as vLLM does, so that the
residual add and the next RMSNorm are one fused op. On CPU in float32/bfloat16 the element-wise work
(residual add + RMSNorm, rotary embedding, SiLU-and-mul) runs in shoal's fused kernels
(`kernels/fused_ops.c`); elsewhere, or with SHOAL_NATIVE_KERNELS=0, the PyTorch formulas below run.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from shoal.kernels import fused_ops
from shoal.model.attention import AttentionMetadata, paged_attention
from shoal.model.config import ModelConfig
from shoal.model.rope import RotaryEmbedding, apply_rotary


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Same order of operations as Hugging Face: normalize in float32, cast back, then scale.
        xf = x.float()
        return self.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)

    def add_norm(
        self, x: torch.Tensor, residual: torch.Tensor | None, native: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(residual + x), residual + x) for x, residual [T, dim]; residual None starts the stream at x.
        The native kernel works in place: residual becomes the sum, x the normalized result."""
        if residual is None:
            return (fused_ops.rms_norm(x, self.weight, self.eps) if native else self(x)), x
        if native:  # vLLM's in-place form: x is this layer's own scratch output, reused for the result
            fused_ops.add_rms_norm_(x, residual, self.weight, self.eps)
            return x, residual
        residual = residual + x
        return self(residual), residual


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, window: int | None):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_size = cfg.num_heads * cfg.head_dim
        self.kv_size = cfg.num_kv_heads * cfg.head_dim
        self.qkv_proj = nn.Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(self.q_size, cfg.hidden_size, bias=cfg.o_bias)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.window = window
        self.scale = cfg.head_dim**-0.5

    def forward(self, x, rope, kv_cache, meta: AttentionMetadata, native: bool):
        """rope: (cos, sin) [T, 1, D] in x's dtype, or with native kernels cos_sin [T, D] float32."""
        qkv = self.qkv_proj(x)
        q, k, v = self._qkv_native(qkv, rope) if native else self._qkv(qkv, rope)
        o = paged_attention(q, k, v, kv_cache[0], kv_cache[1], meta, self.scale, self.window)
        return self.o_proj(o.reshape(-1, self.q_size))

    def _qkv(self, qkv: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]):
        """q [T, H, D], k and v [T, Hkv, D], q and k rotated (and normed first for Qwen3), in PyTorch."""
        if self.q_norm is None:  # rotate q and k heads in one go: they sit side by side in qkv
            qk = qkv[:, : self.q_size + self.kv_size].view(
                -1, self.num_heads + self.num_kv_heads, self.head_dim
            )
            qk = apply_rotary(qk, *rope)
            q, k = qk.split([self.num_heads, self.num_kv_heads], dim=1)
        else:
            q = self.q_norm(qkv[:, : self.q_size].view(-1, self.num_heads, self.head_dim))
            k = self.k_norm(
                qkv[:, self.q_size : self.q_size + self.kv_size].view(-1, self.num_kv_heads, self.head_dim)
            )
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        v = qkv[:, self.q_size + self.kv_size :].view(-1, self.num_kv_heads, self.head_dim)
        return q, k, v

    def _qkv_native(self, qkv: torch.Tensor, cos_sin: torch.Tensor):
        """As _qkv with the fused kernels: q and k rotated in place in qkv and returned as views of it, or
        after the q/k norms (Qwen3) in their own buffers. One split_with_sizes makes the three views (a third
        of the cost of three slices and views, which matters at ~5 us per layer in a decode step)."""
        tokens, d = qkv.shape[0], self.head_dim
        heads = (self.num_heads, self.num_kv_heads, self.num_kv_heads)
        if self.q_norm is None:
            fused_ops.rotary_(qkv, cos_sin, self.num_heads + self.num_kv_heads, d)
            return torch.split_with_sizes(qkv.view(tokens, -1, d), heads, dim=1)
        q, k, v = torch.split_with_sizes(qkv.view(tokens, -1, d), heads, dim=1)
        # contiguous(), not reshape(): with one head (one KV head, or a tensor-parallel rank's share) the
        # reshape of a slice of qkv is a strided view, which the kernel refuses.
        q = fused_ops.rms_norm(q.contiguous().view(-1, d), self.q_norm.weight, self.q_norm.eps).view(
            tokens, -1
        )
        k = fused_ops.rms_norm(k.contiguous().view(-1, d), self.k_norm.weight, self.k_norm.eps).view(
            tokens, -1
        )
        fused_ops.rotary_(q, cos_sin, self.num_heads, d)
        fused_ops.rotary_(k, cos_sin, self.num_kv_heads, d)
        return q.view(tokens, -1, d), k.view(tokens, -1, d), v


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.intermediate = cfg.intermediate_size
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, x: torch.Tensor, native: bool) -> torch.Tensor:
        if native:
            return self.down_proj(fused_ops.silu_and_mul(self.gate_up_proj(x)))
        gate, up = self.gate_up_proj(x).split(self.intermediate, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, window: int | None):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, window)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, residual, rope, kv_cache, meta, native: bool):
        """x: the previous sublayer's output, not yet added to residual (None at the first layer, where x
        is the embeddings). Returns this layer's MLP output and the residual stream before it."""
        h, residual = self.input_layernorm.add_norm(x, residual, native)
        h = self.self_attn(h, rope, kv_cache, meta, native)
        h, residual = self.post_attention_layernorm.add_norm(h, residual, native)
        return self.mlp(h, native), residual


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig, max_positions: int | None = None):
        super().__init__()
        self.config = cfg
        # On the meta device (the loader) an explicit weight skips nn.Embedding's random init: that init runs
        # through torch._refs there, whose import of torch._dynamo costs every engine start ~3 s.
        on_meta = torch.get_default_device().type == "meta"
        weight = torch.empty(cfg.vocab_size, cfg.hidden_size) if on_meta else None
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size, _weight=weight)
        self.layers = nn.ModuleList(DecoderLayer(cfg, w) for w in cfg.layer_windows)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.rope = RotaryEmbedding(
            cfg.head_dim, max_positions or cfg.max_position_embeddings, cfg.rope_theta, cfg.rope_scaling
        )

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        meta: AttentionMetadata,
        between_layers: Callable[[], None] | None = None,
    ) -> torch.Tensor:
        """Final hidden states [T, hidden] for the flat batch; logits() turns the ones needed into logits.
        between_layers, if given, is called after every layer but the last; it may raise to abandon the
        forward (engine/interrupt.py)."""
        x = self.embed_tokens(input_ids)
        # Compiled, inductor fuses the PyTorch formulas itself: calling the kernels from its graph goes
        # through the dispatcher's Python custom-op path (13-30 us a call), which measured 1.5 ms slower a
        # step (SmolLM2 bf16 decode, 14.5 vs 13.0 ms, 1 thread).
        # is_compiling first: dynamo never traces into the loader's file checks (and importing torch._dynamo for a
        # decorator that would let it costs every process 3.5 s at start)
        native = not torch.compiler.is_compiling() and fused_ops.supported(x.device, x.dtype)
        rope = (
            self.rope.cos_sin_cache.index_select(0, positions)
            if native
            else self.rope.cos_sin(positions, x.dtype)
        )
        residual = None
        for i, (layer, kv_cache) in enumerate(zip(self.layers, kv_caches, strict=True)):
            if i and between_layers is not None:
                between_layers()
            x, residual = layer(x, residual, rope, kv_cache, meta, native)
        return self.norm.add_norm(x, residual, native)[0]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()
