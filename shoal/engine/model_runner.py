"""Turns a scheduled batch into tensors, runs the model over the paged KV cache, returns logits.

Holds the model and the KV cache (one flat [num_slots, kv_heads, head_dim] tensor per layer for K and V,
slot = block_id * block_size + offset), and the host pool that swap preemption copies blocks to and from
(the same layout per layer, in host memory: pinned on CUDA so the copies can use DMA).

Deterministic mode (docs/determinism.md): every query token, prompt chunk or decode, attends through the
decode path as a row of its own (its block table and its own context length), so a token's attention is
computed the same way whatever else is in the step and however its prompt was chunked or cached.

Short prompts take the same route where the one-call native decode step runs (kernels/decode_step.c):
a step whose chunks are all at most SHORT_PROMPT_TOKENS long, whose contexts are at most
SHORT_PROMPT_MAX_CONTEXT tokens (each row reads its whole context), and at most the step's max_tokens in all
runs its prompt tokens as decode rows with causal context lengths, in one native call, instead of the
per-op forward, whose Python and dispatch cost made a 13-token prompt step twice a decode step's time
(measured in docs/benchmarks.md, "short prompts in the one-call step"). The kernel writes every row's
K/V before any row attends, so row j of a chunk starting at position s, attending to s + j + 1 keys, is
exactly causal attention.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from shoal.kernels import paged_attention as native
from shoal.kernels import triton_support
from shoal.model.attention import AttentionMetadata, DecodeGroup, PrefillChunk
from shoal.model.fused_decode import decode_stack
from shoal.model.transformer import Transformer

MAX_DECODE_GROUP = 32
SHORT_PROMPT_TOKENS = 32  # longer chunks keep the per-op prefill: no faster as rows from 64 (measured)
# Each row reads its whole context, so a short chunk after a long cached prefix (or the tail of a long
# chunked prompt) keeps the per-op prefill, which reads each key once per chunk.
SHORT_PROMPT_MAX_CONTEXT = 256
DECODE_GROUP_SLACK = 1.2  # a group's longest context may be this many times its shortest (plus one block)


@dataclass
class StepInput:
    token_ids: list[list[int]]  # per sequence: the tokens computed this step
    start_positions: list[int]  # per sequence: position of its first token this step
    block_tables: list[list[int]]
    logit_rows: list[list[int]]  # per sequence: indices (within its chunk) whose logits are wanted


class ModelRunner:
    def __init__(
        self,
        model: Transformer,
        num_blocks: int,
        block_size: int,
        device: torch.device,
        dtype,
        compile_decode: bool = False,
        num_host_blocks: int = 0,
        deterministic: bool = False,
    ):
        self.model = model
        self.compiled = _compile(model) if compile_decode else None
        self.device = device
        self.block_size = block_size
        # Paged decode attention in place (CPU kernel, or Triton's on CUDA) where it runs, else gather + SDPA.
        self.native_decode = native.supported(device, dtype) or triton_support.serves_dtype(device, dtype)
        cfg = model.config
        shape = (num_blocks * block_size, cfg.num_kv_heads, cfg.head_dim)
        self.kv_caches = [
            (torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
            for _ in range(cfg.num_layers)
        ]
        self.deterministic = deterministic
        # A decode step of 1-4 tokens (up to decode_step.MAX_TOKENS where every linear has a gemm route) as
        # one native call where the model and machine allow (not under torch.compile or deterministic mode,
        # which keep their own forward, nor where the Triton kernels serve this device: on the CPU that is
        # the interpreter, which tests run the model through).
        self.decode_stack = None
        self.short_prompt_tokens = SHORT_PROMPT_TOKENS  # 0: every prompt chunk takes the per-op forward
        triton = triton_support.serves_dtype(device, dtype)
        if self.native_decode and not triton and not compile_decode and not deterministic:
            self.decode_stack = decode_stack(model, self.kv_caches, block_size)
        host_shape = (num_host_blocks * block_size, cfg.num_kv_heads, cfg.head_dim)
        pin = device.type == "cuda"
        # torch.empty: the pool's pages are only touched when a block is swapped into them.
        self.host_caches = [
            tuple(torch.empty(host_shape, dtype=dtype, pin_memory=pin) for _ in range(2))
            for _ in range(cfg.num_layers if num_host_blocks else 0)
        ]

    @staticmethod
    def kv_bytes_per_block(model_config, block_size: int, dtype: torch.dtype) -> int:
        elem = torch.empty((), dtype=dtype).element_size()
        return (
            2
            * model_config.num_layers
            * block_size
            * model_config.num_kv_heads
            * model_config.head_dim
            * elem
        )

    def swap_blocks(self, swap_out: list[tuple[int, int]], swap_in: list[tuple[int, int]]) -> None:
        """Copy (device block, host block) pairs out to the host pool and (host block, device block) pairs
        back, in every layer, for K and V. Called before the step's forward (see engine/scheduler.py)."""
        if not swap_out and not swap_in:
            return
        for (k, v), (hk, hv) in zip(self.kv_caches, self.host_caches, strict=True):
            for dev, host in ((k, hk), (v, hv)):
                if swap_out:
                    _copy_blocks(dev, host, swap_out, self.block_size)
                if swap_in:
                    _copy_blocks(host, dev, swap_in, self.block_size)

    def _slots(self, block_tables: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Cache slots of positions, for one block table [blocks] or a padded batch of them [b, blocks]."""
        return block_tables[..., positions // self.block_size] * self.block_size + positions % self.block_size

    def _row_slots(self, table: list[int], start: int, end: int) -> list[int]:
        """Cache slots of positions start..end-1 of one sequence, in Python: for the few positions of decode
        rows, a handful of small tensor ops per sequence cost more (3% of a 64-row step, py-spy)."""
        size = self.block_size
        return [table[p // size] * size + p % size for p in range(start, end)]

    def _metadata(self, inp: StepInput) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        dev = self.device
        flat_ids, flat_pos, slots = [], [], []
        decode_tables, decode_lens, prefills = [], [], []
        offset = 0
        prompt_rows = self.deterministic or self._short_prompts(inp)
        for ids, start, table in zip(inp.token_ids, inp.start_positions, inp.block_tables, strict=True):
            n = len(ids)
            flat_ids.extend(ids)
            flat_pos.extend(range(start, start + n))
            if n == 1 or prompt_rows:  # decode rows: one per token (see the module docstring)
                slots.extend(self._row_slots(table, start, start + n))
                decode_tables.extend([table] * n)
                decode_lens.extend(range(start + 1, start + n + 1))
            else:
                all_slots = self._slots(torch.tensor(table, dtype=torch.long), torch.arange(start + n))
                slots.extend(all_slots[start:].tolist())  # context + chunk; the chunk's own slots
                prefills.append(PrefillChunk(offset, offset + n, start, all_slots.to(dev)))
            offset += n
        slot_mapping = torch.tensor(slots, dtype=torch.long, device=dev)
        meta = AttentionMetadata(slot_mapping=slot_mapping, prefills=prefills)
        for start, end in self._decode_groups(decode_lens):
            meta.decodes.append(
                self._decode_group(start, end, decode_tables[start:end], decode_lens[start:end])
            )
        ids_t = torch.tensor(flat_ids, dtype=torch.long, device=dev)
        pos_t = torch.tensor(flat_pos, dtype=torch.long, device=dev)
        return ids_t, pos_t, meta

    def _short_prompts(self, inp: StepInput) -> bool:
        """Whether this step has prompt chunks and runs them as decode rows of the one-call native step
        (module docstring): every chunk at most short_prompt_tokens and its context at most
        SHORT_PROMPT_MAX_CONTEXT, all tokens within its max_tokens."""
        if self.decode_stack is None:
            return False
        lens = [len(ids) for ids in inp.token_ids]
        chunks = [start + n for start, n in zip(inp.start_positions, lens, strict=True) if n > 1]
        longest_context = max(chunks, default=0)  # of the prompt chunks: decodes are rows either way
        return (
            1 < max(lens) <= self.short_prompt_tokens
            and longest_context <= SHORT_PROMPT_MAX_CONTEXT
            and sum(lens) <= self.decode_stack.max_tokens
        )

    def _decode_groups(self, lens: list[int]) -> list[tuple[int, int]]:
        """Split decodes (sorted by context length by the engine) into runs of similar length; the native
        kernel pays nothing for mixed lengths, so there they form one group. Deterministic without the
        kernel: one group per token, so each SDPA call has the same shape whatever the batch."""
        if self.deterministic and not self.native_decode:
            return [(i, i + 1) for i in range(len(lens))]
        if self.native_decode:
            return [(0, len(lens))] if lens else []
        groups, start = [], 0
        for i in range(1, len(lens) + 1):
            if (
                i == len(lens)
                or i - start >= MAX_DECODE_GROUP
                or lens[i] > lens[start] * DECODE_GROUP_SLACK + self.block_size
            ):
                groups.append((start, i))
                start = i
        return groups

    def _decode_group(self, start: int, end: int, tables: list[list[int]], lens: list[int]) -> DecodeGroup:
        # At least 2 columns: torch.compile specializes a size-1 dimension, so a one-block context at
        # warm-up would otherwise force a recompile at the second block (the padding is never read).
        width = max(2, *(len(t) for t in tables))
        padded = [t + [0] * (width - len(t)) for t in tables]
        same = min(lens) == max(lens)
        if self.native_decode:
            tables_t = torch.tensor(padded, dtype=torch.int32, device=self.device)
            if self.compiled is not None:  # the width grows with the context: one graph for all widths
                torch._dynamo.maybe_mark_dynamic(tables_t, 1)
            lens_t = torch.tensor(lens, dtype=torch.int32, device=self.device)
            return DecodeGroup(
                start, end, lens_t, block_tables=tables_t, block_size=self.block_size, same_length=same
            )
        slots = self._slots(torch.tensor(padded, dtype=torch.long), torch.arange(max(lens)))
        lens_t = torch.tensor(lens, dtype=torch.long, device=self.device)
        return DecodeGroup(start, end, lens_t, slots=slots.to(self.device), same_length=same)

    @torch.inference_mode()
    def run(self, inp: StepInput, between_layers: Callable[[], None] | None = None) -> torch.Tensor:
        """Float32 logits [sum of len(logit_rows[i]), vocab] of the rows asked for, sequence after sequence in
        the order of inp (split by len(logit_rows[i]) for each sequence's rows). between_layers:
        called between the decoder layers of the per-op forward and of the one-call native decode step,
        and once more before the lm_head (a fifth of a SmolLM2-135M step's weight bytes), so that an urgent
        arrival waits for neither; it may raise StepInterrupted (engine/interrupt.py). The compiled forward
        calls it only before the lm_head."""
        ids, pos, meta = self._metadata(inp)
        # Only a single decoding sequence is compiled (the latency case, where per-op overhead decides the
        # step time): one graph with a dynamic context length. Batched steps are dominated by the matmuls,
        # run eagerly through the packed linears, and would otherwise recompile for each new mix of shapes
        # (measured: the 64-request throughput benchmark halved by recompilations).
        pure_decode = (
            self.compiled is not None
            and len(meta.decodes) == 1
            and not meta.prefills
            and meta.decodes[0].end - meta.decodes[0].start == 1
        )
        if self._fused_decode(meta, ids):
            group = meta.decodes[0]
            embeddings = self.model.embed_tokens(ids)
            hidden = self.decode_stack.run(
                embeddings, pos, meta.slot_mapping, group.block_tables, group.context_lens, between_layers
            )
        else:
            if pure_decode:
                hidden = self.compiled(ids, pos, self.kv_caches, meta)
            else:
                hidden = self.model(ids, pos, self.kv_caches, meta, between_layers)
        if between_layers is not None:
            between_layers()
        rows, offset = [], 0
        for ids_i, wanted in zip(inp.token_ids, inp.logit_rows, strict=True):
            rows.extend(offset + r for r in wanted)
            offset += len(ids_i)
        if not rows:
            return torch.empty(0, self.model.config.vocab_size, device=self.device)
        return self.model.logits(hidden[torch.tensor(rows, device=self.device)])

    def _fused_decode(self, meta: AttentionMetadata, ids: torch.Tensor) -> bool:
        """Whether this step runs as the one-call native decode step: a pure decode step of at most the
        stack's max_tokens (kernels/decode_step.py)."""
        return (
            self.decode_stack is not None
            and not meta.prefills
            and len(meta.decodes) == 1
            and ids.shape[0] <= self.decode_stack.max_tokens
        )

    def close(self) -> None:
        """Release what outlives the runner (tensor-parallel workers, engine/tp_worker.py); nothing here."""


def _copy_blocks(src: torch.Tensor, dst: torch.Tensor, pairs: list[tuple[int, int]], block_size: int) -> None:
    """dst's block b = src's block a for each (a, b); caches [slots, Hkv, D] viewed as [blocks, rest]."""
    src_ids = torch.tensor([a for a, _ in pairs], dtype=torch.long, device=src.device)
    dst_ids = torch.tensor([b for _, b in pairs], dtype=torch.long, device=dst.device)
    rows = src.view(src.shape[0] // block_size, -1).index_select(0, src_ids)
    dst.view(dst.shape[0] // block_size, -1).index_copy_(0, dst_ids, rows.to(dst.device))


def _compile(model: Transformer):
    """torch.compile of the whole forward: on CPU this fuses the ~25 small eager ops per layer into a few
    C++ kernels (measured on SmolLM2 bf16 decode: 25.5 -> 19.7 ms per step); freezing lets inductor
    pre-pack the weights for oneDNN itself."""
    import torch._inductor.config as inductor_config

    inductor_config.freezing = True
    return torch.compile(model, dynamic=True)
