"""Calibration: run shoal's model over sample text and keep what GPTQ and AWQ need from each linear's input.

What it decides: which tokens calibrate (num_samples windows of seq_len tokens, at offsets drawn from a
seeded generator over the tokenized file, so the same seed gives the same windows) and what is kept of
each linear's inputs, so that memory stays bounded whatever the amount of text:
- GPTQ: the sum of X^T X ([in, in], a HessianAccumulator);
- AWQ: the sum of |x| per input channel ([in]) and a fixed budget of input rows (a few per batch, drawn
  from the same seed), on which the scale and clipping searches measure the output error.

Inputs are caught by forward pre-hooks on the linear modules of the decoder blocks (names as in the model:
`layers.{i}.self_attn.qkv_proj`, `layers.{i}.self_attn.o_proj`, `layers.{i}.mlp.gate_up_proj`,
`layers.{i}.mlp.down_proj`; q/k/v and gate/up are fused at load time, so each fused linear is one entry,
which is also AWQ's grouping by shared input). The forward is the model's own, over a flat batch of
whole prompts described by an AttentionMetadata with one prefill chunk per window and a scratch KV
cache; it stops at the input of the last watched linear, so calibrating early blocks is cheap.

For GPTQ's sequential recipe (each block calibrated on the outputs of the blocks before it, as already
quantized), `BlockwiseCalibration` keeps the residual stream of every window between blocks and runs one
block at a time: memory is that stream (windows x seq_len x hidden x 2 floats) plus one block's
statistics, and every block runs twice (capture, then advance with its quantized weights), not the
whole prefix again per block. A capture stops the block as soon as every watched linear has had its input.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
from torch import nn

from shoal.kernels import fused_ops
from shoal.model.attention import AttentionMetadata, PrefillChunk
from shoal.model.tokenizer import Tokenizer
from shoal.quant.gptq import HessianAccumulator


def calibration_windows(token_ids: list[int], num_samples: int, seq_len: int, seed: int) -> torch.Tensor:
    """[num_samples, seq_len] int64 windows of token_ids at offsets drawn uniformly with `seed`.

    Raises ValueError when the text has fewer than seq_len tokens or the counts are not positive."""
    if num_samples <= 0 or seq_len <= 0:
        raise ValueError(f"num_samples ({num_samples}) and seq_len ({seq_len}) must be positive")
    if len(token_ids) < seq_len:
        raise ValueError(f"calibration text has {len(token_ids)} tokens, fewer than seq_len {seq_len}")
    ids = torch.tensor(token_ids, dtype=torch.int64)
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(token_ids) - seq_len + 1, (num_samples,), generator=generator)
    return torch.stack([ids[s : s + seq_len] for s in starts.tolist()])


def load_calibration_tokens(
    model_dir: str | Path, text_file: str | Path, num_samples: int, seq_len: int, seed: int
) -> torch.Tensor:
    """Tokenize text_file with the model's tokenizer (as `tokenizer(text)` does) and draw the windows."""
    text = Path(text_file).read_text(encoding="utf-8")
    return calibration_windows(Tokenizer(model_dir).encode(text), num_samples, seq_len, seed)


@dataclass
class LinearInputs:
    """What calibration kept of one linear's inputs (in = its input features).

    hessian: X^T X accumulated (None when not requested). abs_sum: [in] float64 sum of |x|; abs_max: [in]
    float32 max |x| (SmoothQuant's statistic); rows: the number of input rows seen. samples: kept input
    rows, float32, concatenated by `sample_rows()`."""

    hessian: HessianAccumulator | None
    abs_sum: torch.Tensor
    abs_max: torch.Tensor
    rows: int = 0
    samples: list[torch.Tensor] = field(default_factory=list)

    def abs_mean(self) -> torch.Tensor:
        """[in] float32 mean |x| per input channel. Raises ValueError when no input was seen."""
        if self.rows == 0:
            raise ValueError("no calibration inputs reached this linear")
        return (self.abs_sum / self.rows).float()

    def sample_rows(self) -> torch.Tensor:
        """[kept rows, in] float32 (empty when no rows were kept)."""
        if not self.samples:
            return torch.zeros(0, self.abs_sum.shape[0])
        return torch.cat(self.samples)


def linear_names(model: nn.Module) -> list[str]:
    """Names of the decoder blocks' linears (nn.Linear or shoal's PackedLinear), in forward order."""
    return [
        name
        for name, module in model.named_modules()
        if name.startswith("layers.") and hasattr(module, "in_features") and hasattr(module, "out_features")
    ]


def capture_linear_inputs(
    model: nn.Module,
    token_ids: torch.Tensor,
    names: list[str] | None = None,
    hessian: bool = True,
    max_sample_rows: int = 0,
    batch_size: int = 4,
    seed: int = 0,
) -> dict[str, LinearInputs]:
    """Run model (shoal's Transformer) over token_ids [samples, seq_len] and keep each linear's inputs.

    names: linears to watch (default: every linear of every decoder block). hessian: accumulate X^T X.
    max_sample_rows: input rows to keep per linear for AWQ's searches (spread over the batches).
    Raises ValueError for no names or a name that is not a decoder-block linear."""
    known = linear_names(model)
    names = known if names is None else names
    if not names:
        raise ValueError("no linears to watch")
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"{unknown[0]!r} is not a decoder-block linear of this model")
    batches = token_ids.split(batch_size)
    stats, handles = _watch(model, names, hessian, max_sample_rows, len(batches), seed)
    handles += _stop_once_seen(model, names)
    try:
        with torch.inference_mode():
            for batch in batches:
                try:
                    forward_windows(model, batch)
                except _StopForward:
                    pass
    finally:
        for handle in handles:
            handle.remove()
    return _trimmed(stats, max_sample_rows)


class BlockwiseCalibration:
    """The decoder blocks run one at a time over the calibration windows, their input kept between calls.

    capture(names, ...) runs the current block (`block`) over every window with hooks on the linears
    `names` of that block and returns their inputs (as capture_linear_inputs); advance() runs the block
    with whatever weights it has by then (e.g. quantized) and makes its output the next block's input.
    token_ids: [samples, seq_len] int64.

    Weights written into a PackedLinear after load are not seen by its packed copies: quantize a model
    loaded without packing (or swap the modules), so that advance() computes with the new weights.
    threads: torch threads for the block forwards and the hooks' Hessian products (large matrix products,
    which threads speed up), whatever the caller runs its own elementwise work on; None: the current count.
    """

    def __init__(
        self, model: nn.Module, token_ids: torch.Tensor, batch_size: int = 4, threads: int | None = None
    ):
        self.model = model
        self.threads = threads
        self.block = 0
        self.batches = list(token_ids.split(batch_size))
        with torch.inference_mode():
            # per batch: (x, residual); residual None before the first block, where x is the embeddings
            self.states: list[tuple[torch.Tensor, torch.Tensor | None]] = [
                (model.embed_tokens(b.reshape(-1)), None) for b in self.batches
            ]

    def capture(
        self, names: list[str], hessian: bool = True, max_sample_rows: int = 0, seed: int = 0
    ) -> dict[str, LinearInputs]:
        """Inputs of the linears `names` (all in the current block) over every window."""
        prefix = f"layers.{self.block}."
        if any(not n.startswith(prefix) for n in names):
            raise ValueError(f"capture({names}) asks for linears outside the current block {self.block}")
        stats, handles = _watch(self.model, names, hessian, max_sample_rows, len(self.batches), seed)
        handles += _stop_once_seen(self.model, names)
        try:
            for i in range(len(self.batches)):
                try:
                    self._run_block(i)
                except _StopForward:
                    pass
        finally:
            for handle in handles:
                handle.remove()
        return _trimmed(stats, max_sample_rows)

    def advance(self) -> None:
        """Run the current block and move on to the next. Raises IndexError after the last block."""
        if self.block >= len(self.model.layers):
            raise IndexError("every block has already run")
        self.states = [self._run_block(i) for i in range(len(self.batches))]
        self.block += 1

    def hidden_states(self) -> torch.Tensor:
        """After the last block: the final normed hidden states [samples * seq_len, hidden], as the model's
        forward returns them."""
        if self.block != len(self.model.layers):
            raise ValueError(f"{len(self.model.layers) - self.block} blocks have not run yet")
        with torch.inference_mode():
            native = fused_ops.supported(self.states[0][0].device, self.states[0][0].dtype)
            return torch.cat(
                [self.model.norm.add_norm(x.clone(), r.clone(), native)[0] for x, r in self.states]
            )

    def _run_block(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        before = torch.get_num_threads()
        torch.set_num_threads(self.threads or before)
        try:
            return self._block_forward(batch)
        finally:
            torch.set_num_threads(before)

    def _block_forward(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        # the native add + RMSNorm works in place: the block gets copies, so the kept state stays intact
        x, residual = self.states[batch]
        samples, seq_len = self.batches[batch].shape
        meta, positions = _prefill_metadata(samples, seq_len)
        model = self.model
        native = fused_ops.supported(x.device, x.dtype)
        rope = (
            model.rope.cos_sin_cache.index_select(0, positions)
            if native
            else model.rope.cos_sin(positions, x.dtype)
        )
        shape = (samples * seq_len, model.config.num_kv_heads, model.config.head_dim)
        cache = (torch.empty(shape, dtype=x.dtype), torch.empty(shape, dtype=x.dtype))
        layer = model.layers[self.block]
        with torch.inference_mode():
            return layer(x.clone(), None if residual is None else residual.clone(), rope, cache, meta, native)


def forward_windows(model: nn.Module, token_ids: torch.Tensor) -> torch.Tensor:
    """The model's final hidden states [samples * seq_len, hidden] for token_ids [samples, seq_len], each
    window a whole prompt from position 0 (one prefill chunk each, a scratch KV cache of just these tokens)."""
    samples, seq_len = token_ids.shape
    cfg = model.config
    dtype = model.embed_tokens.weight.dtype
    meta, positions = _prefill_metadata(samples, seq_len)
    shape = (samples * seq_len, cfg.num_kv_heads, cfg.head_dim)
    caches = [(torch.empty(shape, dtype=dtype), torch.empty(shape, dtype=dtype)) for _ in model.layers]
    return model(token_ids.reshape(-1), positions, caches, meta)


def _prefill_metadata(samples: int, seq_len: int) -> tuple[AttentionMetadata, torch.Tensor]:
    """One prefill chunk per window, each window's keys in its own cache slots; and the positions [T]."""
    slots = torch.arange(samples * seq_len)
    chunks = [
        PrefillChunk(i * seq_len, (i + 1) * seq_len, 0, slots[i * seq_len : (i + 1) * seq_len])
        for i in range(samples)
    ]
    return AttentionMetadata(slot_mapping=slots, prefills=chunks), torch.arange(seq_len).repeat(samples)


class _StopForward(Exception):
    """Raised once every watched linear has had its input: the rest of the forward is not needed."""


def _stop_once_seen(model: nn.Module, names: list[str]) -> list:
    """Pre-hooks that end a forward (of the model, or of one block) as soon as every linear in names has
    had its input (after their recorders, registered first): what follows is not needed to capture them.
    In GPTQ's capture that skips down_proj's product, an eighth of its two forwards of the block; in a
    true-sequential capture of qkv alone, nearly the whole block; in a whole-model capture, every block
    after the last watched linear."""
    seen: set[str] = set()
    watched = len(set(names))

    def hook(module: nn.Module, args, name: str) -> None:
        seen.add(name)
        if len(seen) == watched:
            seen.clear()
            raise _StopForward

    return [model.get_submodule(n).register_forward_pre_hook(partial(hook, name=n)) for n in names]


def _watch(
    model: nn.Module, names: list[str], hessian: bool, max_sample_rows: int, batches: int, seed: int
) -> tuple[dict[str, LinearInputs], list]:
    """Empty statistics and a recording forward pre-hook for each linear in names. Each linear draws its kept
    rows from its own generator seeded with `seed`: the same rows whichever other linears are watched."""
    per_batch = math.ceil(max_sample_rows / batches) if max_sample_rows else 0
    stats, handles = {}, []
    for name in names:
        module = model.get_submodule(name)
        stats[name] = LinearInputs(
            hessian=HessianAccumulator(module.in_features) if hessian else None,
            abs_sum=torch.zeros(module.in_features, dtype=torch.float64),
            abs_max=torch.zeros(module.in_features),
        )
        generator = torch.Generator().manual_seed(seed)
        handles.append(module.register_forward_pre_hook(_recorder(stats[name], per_batch, generator)))
    return stats, handles


def _trimmed(stats: dict[str, LinearInputs], max_sample_rows: int) -> dict[str, LinearInputs]:
    for s in stats.values():
        s.samples = [torch.cat(s.samples)[:max_sample_rows]] if s.samples else []
    return stats


def _recorder(stats: LinearInputs, per_batch: int, generator: torch.Generator):
    def hook(module: nn.Module, args) -> None:
        x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
        if stats.hessian is not None:
            stats.hessian.add(x)
        magnitude = x.abs()
        stats.abs_sum += magnitude.sum(0, dtype=torch.float64)
        torch.maximum(stats.abs_max, magnitude.amax(0), out=stats.abs_max)
        stats.rows += x.shape[0]
        if per_batch:
            keep = torch.randperm(x.shape[0], generator=generator)[:per_batch]
            stats.samples.append(x[keep].clone())

    return hook
