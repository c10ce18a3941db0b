"""Attention over the paged KV cache.

The runner describes one engine step in `AttentionMetadata`: the batch's tokens are laid out flat,
decode tokens first (one per sequence), then each prefill chunk. Every layer writes its new K/V into
the cache slots of `slot_mapping`, then attends: all decodes in one batched call over gathered slots,
each prefill chunk in its own call (a fresh prompt without cached prefix uses the causal kernel directly).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass
class PrefillChunk:
    start: int  # first token of this chunk in the flat batch
    end: int
    context_len: int  # tokens of this sequence already in the cache before the chunk
    slots: torch.Tensor  # [context_len + chunk] cache slots of all keys the chunk attends to


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] where each new token's K/V goes
    num_decodes: int = 0
    decode_slots: torch.Tensor | None = None  # [Bd, Lmax] cache slots per decode sequence (padded)
    decode_context_lens: torch.Tensor | None = None  # [Bd] keys per decode sequence (incl. the new token)
    prefills: list[PrefillChunk] = field(default_factory=list)
    _masks: dict = field(default_factory=dict)

    def decode_mask(self, window: int | None) -> torch.Tensor:
        """[Bd, 1, 1, Lmax] bool, True where a decode query may attend; cached per window size."""
        key = ("decode", window)
        if key not in self._masks:
            lmax = self.decode_slots.shape[1]
            kpos = torch.arange(lmax, device=self.decode_slots.device).unsqueeze(0)
            lens = self.decode_context_lens.unsqueeze(1)
            mask = kpos < lens
            if window is not None:
                mask &= kpos > lens - 1 - window
            self._masks[key] = mask[:, None, None, :]
        return self._masks[key]

    def prefill_mask(self, i: int, window: int | None) -> torch.Tensor | None:
        """[1, 1, q, k] bool for prefill chunk i, or None when plain causal attention applies."""
        chunk = self.prefills[i]
        if chunk.context_len == 0 and window is None:
            return None
        key = ("prefill", i, window)
        if key not in self._masks:
            device = chunk.slots.device
            qpos = torch.arange(chunk.context_len, chunk.context_len + chunk.end - chunk.start, device=device)
            kpos = torch.arange(chunk.slots.shape[0], device=device)
            mask = kpos[None, :] <= qpos[:, None]
            if window is not None:
                mask &= kpos[None, :] > qpos[:, None] - window
            self._masks[key] = mask[None, None]
        return self._masks[key]


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    window: int | None,
) -> torch.Tensor:
    """q: [T, H, D], k/v: [T, Hkv, D]; caches: [num_slots, Hkv, D]. Returns [T, H, D]."""
    k_cache.index_copy_(0, meta.slot_mapping, k)
    v_cache.index_copy_(0, meta.slot_mapping, v)
    out = torch.empty_like(q)
    nd = meta.num_decodes
    if nd:
        keys = k_cache[meta.decode_slots].transpose(1, 2)  # [Bd, Hkv, L, D]
        values = v_cache[meta.decode_slots].transpose(1, 2)
        o = F.scaled_dot_product_attention(
            q[:nd].unsqueeze(2),
            keys,
            values,
            attn_mask=meta.decode_mask(window),
            scale=scale,
            enable_gqa=True,
        )
        out[:nd] = o.squeeze(2)
    for i, chunk in enumerate(meta.prefills):
        qc = q[chunk.start : chunk.end].transpose(0, 1).unsqueeze(0)  # [1, H, q, D]
        mask = meta.prefill_mask(i, window)
        if mask is None:  # whole prompt in this chunk: keys are exactly the new tokens
            kc = k[chunk.start : chunk.end].transpose(0, 1).unsqueeze(0)
            vc = v[chunk.start : chunk.end].transpose(0, 1).unsqueeze(0)
            o = F.scaled_dot_product_attention(qc, kc, vc, is_causal=True, scale=scale, enable_gqa=True)
        else:
            kc = k_cache[chunk.slots].transpose(0, 1).unsqueeze(0)
            vc = v_cache[chunk.slots].transpose(0, 1).unsqueeze(0)
            o = F.scaled_dot_product_attention(qc, kc, vc, attn_mask=mask, scale=scale, enable_gqa=True)
        out[chunk.start : chunk.end] = o.squeeze(0).transpose(0, 1)
    return out
