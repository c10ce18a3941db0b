"""Turn one step's logits into one token per sequence, with vLLM's sampling semantics.

Everything is batched on the logits' device. The rows are read once, in Python, into per-step parameter
tensors (a few numbers per row, or the flat indices of the tokens a row penalizes or biases), never into
anything vocabulary-sized; every later step is one tensor op for the whole batch. The one loop left runs
over seeded rows only, to draw one number from each row's own generator: PyTorch draws from one generator
per call.

Order of operations, on a float32 copy of the logits (the raw logits are kept for logprobs):
logit_bias -> min_tokens masking -> repetition penalty -> presence/frequency penalties -> greedy argmax,
or temperature -> top_k -> softmax -> top_p and min_p -> inverse-CDF sampling.

Sampling inverts each row's cumulative distribution at one uniform number, in two levels (blocks of
tokens, then tokens inside the chosen block). That is exact categorical sampling like the exponential race
it replaced, but it needs one random number per row instead of one per vocabulary entry, so a seeded row's
token depends only on its logits and its generator, never on the rest of the batch.
"""

from __future__ import annotations

import array
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import chain

import torch

from shoal.engine.outputs import TokenLogprobs
from shoal.engine.sampling_params import SamplingParams
from shoal.kernels import argmax as argmax_kernel

# Tokens per block of the two-level inverse CDF: the first level reads V / 256 block sums, the second 256 tokens.
_CDF_BLOCK = 256


@dataclass
class SamplingRow:
    """What the sampler needs to know about one sequence in the batch."""

    params: SamplingParams
    token_ids: list[int]  # prompt + generated so far
    num_prompt_tokens: int
    generator: torch.Generator | None  # set for requests with a seed; its state advances with each draw

    @property
    def num_generated(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens


@dataclass
class SamplerOutput:
    token_ids: list[int]  # one sampled token per row
    logprobs: list[TokenLogprobs | None]  # per row: None unless params.logprobs is not None


class Sampler:
    """Batched sampler; stateless apart from the vocabulary size and the model's eos ids."""

    def __init__(self, vocab_size: int, eos_token_ids: set[int]):
        self.vocab_size = vocab_size
        self.eos_token_ids = set(eos_token_ids)

    def __call__(self, logits: torch.Tensor, rows: list[SamplingRow]) -> SamplerOutput:
        if logits.dim() != 2 or logits.shape[0] != len(rows):
            raise ValueError(f"expected logits of shape [{len(rows)}, V], got {tuple(logits.shape)}")
        # The lm_head may be padded past the tokenizer's vocabulary; those columns must never be chosen.
        logits = logits[:, : self.vocab_size]
        if all(row.params.greedy and not self._modifies_logits(row) for row in rows):
            # Nothing changes the argmax: skip every per-row tensor.
            token_ids = _argmax(logits)
        else:
            work = logits.to(torch.float32, copy=True).contiguous()
            self._process_logits(work, rows)
            token_ids = _choose_tokens(work, rows)
        return SamplerOutput(token_ids=token_ids.tolist(), logprobs=_row_logprobs(logits, token_ids, rows))

    def _stop_ids_to_mask(self, row: SamplingRow) -> set[int]:
        """Ids that must not be sampled yet because the request asked for at least min_tokens tokens."""
        if row.num_generated >= row.params.min_tokens:
            return set()
        return self.eos_token_ids | set(row.params.stop_token_ids)

    def _modifies_logits(self, row: SamplingRow) -> bool:
        """Whether any pre-sampling step (bias, min_tokens, penalties) does something for this row."""
        return bool(row.params.logit_bias) or bool(self._stop_ids_to_mask(row)) or _has_penalties(row.params)

    def _process_logits(self, logits: torch.Tensor, rows: list[SamplingRow]) -> None:
        """Apply, in place, the steps that change the distribution before temperature and truncation."""
        _apply_logit_bias(logits, rows)
        _mask_tokens(logits, [self._stop_ids_to_mask(row) for row in rows])
        _apply_penalties(logits, rows)


def token_logprobs(logits: torch.Tensor, target_ids: torch.Tensor, k: int) -> list[TokenLogprobs]:
    """Raw log_softmax of logits ([N, V]); per row a dict with the top-k token ids plus target id (always included).

    Used for prompt logprobs (target = the next prompt token) as well as for sampled tokens.
    """
    return _gather_logprobs(logits, target_ids, [k] * logits.shape[0])


def _argmax(logits: torch.Tensor) -> torch.Tensor:
    """Row-wise argmax (first index on ties).

    On the CPU, argmax over bfloat16 is not vectorized: widening to float32 first is about 5x faster for a
    [64, 49152] batch, and exact.
    """
    if logits.device.type == "cpu" and logits.dtype != torch.float32:
        logits = logits.float()
    if argmax_kernel.supported(logits):  # torch's CPU argmax does not vectorize (kernels/argmax.c)
        return argmax_kernel.argmax(logits)
    return logits.argmax(dim=-1)


# ---------------------------------------------------------------------------------------------------------
# Pre-sampling logits processing (in place on the float32 copy)


def _has_penalties(params: SamplingParams) -> bool:
    return (
        params.repetition_penalty != 1.0 or params.presence_penalty != 0.0 or params.frequency_penalty != 0.0
    )


def _flat_index(
    token_lists: Sequence[Sequence[int]], row_ids: list[int], vocab_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices into a flattened [B, V] tensor for every (row_ids[n], token in token_lists[n]), and each one's n.

    Built on the host by C loops (array, repeat_interleave), not a Python loop per token. Duplicates are
    kept; ids outside the vocabulary are dropped.
    """
    lengths = torch.tensor([len(tokens) for tokens in token_lists], dtype=torch.long)
    if int(lengths.sum()) == 0:
        empty = torch.empty(0, dtype=torch.long)
        return empty, empty
    tokens = torch.frombuffer(array.array("q", chain.from_iterable(token_lists)), dtype=torch.long)
    owner = torch.repeat_interleave(torch.arange(len(token_lists)), lengths)
    flat = torch.tensor(row_ids, dtype=torch.long)[owner] * vocab_size + tokens
    valid = (tokens >= 0) & (tokens < vocab_size)
    return flat[valid], owner[valid]


def _per_entry(values: list[float], owner: torch.Tensor, device: torch.device) -> torch.Tensor:
    """values[owner[j]] for every entry j, as float32 on the device."""
    return torch.tensor(values, dtype=torch.float32)[owner].to(device)


def _apply_logit_bias(logits: torch.Tensor, rows: list[SamplingRow]) -> None:
    picked = [i for i, row in enumerate(rows) if row.params.logit_bias]
    if not picked:
        return
    vocab_size = logits.shape[1]
    biases = [rows[i].params.logit_bias or {} for i in picked]
    index, _ = _flat_index([list(b) for b in biases], picked, vocab_size)
    # A bias holds at most a few hundred entries: a Python loop over them is fine.
    values = [v for b in biases for t, v in b.items() if 0 <= t < vocab_size]
    logits.view(-1).index_add_(0, index.to(logits.device), torch.tensor(values).to(logits))


def _mask_tokens(logits: torch.Tensor, masked: list[set[int]]) -> None:
    """Set the listed tokens of each row to -inf so they can never be chosen."""
    picked = [i for i, tokens in enumerate(masked) if tokens]
    if not picked:
        return
    index, _ = _flat_index([sorted(masked[i]) for i in picked], picked, logits.shape[1])
    logits.view(-1).index_fill_(0, index.to(logits.device), float("-inf"))


def _apply_penalties(logits: torch.Tensor, rows: list[SamplingRow]) -> None:
    """Repetition penalty over prompt+output, then frequency/presence penalties over the output only.

    Only the tokens a row has seen are touched, through flat indices (one entry per occurrence): no [B, V]
    count tensor. A token seen n times has n entries; the penalties that act once per distinct token are
    written with index_put, where every duplicate writes the same value, and frequency accumulates per entry.
    """
    flat, device = logits.view(-1), logits.device
    repeat = [i for i, row in enumerate(rows) if row.params.repetition_penalty != 1.0]
    if repeat:
        index, owner = _flat_index([rows[i].token_ids for i in repeat], repeat, logits.shape[1])
        penalty = _per_entry([rows[i].params.repetition_penalty for i in repeat], owner, device)
        index = index.to(device)
        seen = flat[index]
        flat[index] = torch.where(seen > 0, seen / penalty, seen * penalty)

    additive = [
        i
        for i, row in enumerate(rows)
        if row.params.presence_penalty != 0.0 or row.params.frequency_penalty != 0.0
    ]
    if additive:
        outputs = [rows[i].token_ids[rows[i].num_prompt_tokens :] for i in additive]
        index, owner = _flat_index(outputs, additive, logits.shape[1])
        presence = _per_entry([rows[i].params.presence_penalty for i in additive], owner, device)
        frequency = _per_entry([rows[i].params.frequency_penalty for i in additive], owner, device)
        index = index.to(device)
        flat[index] = flat[index] - presence
        flat.index_add_(0, index, -frequency)


# ---------------------------------------------------------------------------------------------------------
# Choosing the token


def _choose_tokens(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """Greedy rows take the argmax of the processed logits; the rest are sampled after truncation.

    Each kind only reads its own rows, so a greedy row costs no sampling work and the reverse.
    """
    greedy = [i for i, row in enumerate(rows) if row.params.greedy]
    sampled = [i for i, row in enumerate(rows) if not row.params.greedy]
    token_ids = torch.empty(len(rows), dtype=torch.long, device=logits.device)
    if greedy:
        _put(token_ids, greedy, _argmax(_take(logits, greedy)))
    if sampled:
        _put(token_ids, sampled, _sample(_take(logits, sampled), [rows[i] for i in sampled]))
    return token_ids


def _take(t: torch.Tensor, picked: list[int]) -> torch.Tensor:
    """The rows of t at the ascending indices picked: t itself, not a copy, when that is every row."""
    if len(picked) == t.shape[0]:
        return t
    return t.index_select(0, torch.tensor(picked, device=t.device))


def _put(out: torch.Tensor, picked: list[int], values: torch.Tensor) -> None:
    """out[picked] = values."""
    out[torch.tensor(picked, device=out.device)] = values


def _truncates(params: SamplingParams, vocab_size: int) -> bool:
    return params.top_p < 1.0 or params.min_p > 0.0 or 0 < params.top_k < vocab_size


def _sample(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """One token per (non-greedy) row: temperature and top_k on the logits (in place), then one draw.

    Rows that truncate draw among their few candidate tokens; the others from the whole vocabulary.
    """
    params = [row.params for row in rows]
    vocab_size = logits.shape[1]
    settings = torch.tensor([(p.temperature, p.top_p, p.min_p) for p in params], dtype=torch.float32)
    temperature, top_p, min_p = settings.to(logits.device).unbind(1)

    logits.div_(temperature.unsqueeze(1))
    if any(0 < p.top_k < vocab_size for p in params):
        _apply_top_k(logits, [p.top_k for p in params])
    probs = logits.softmax(dim=-1)
    u = _uniforms(rows, probs.device)

    truncated = [i for i, p in enumerate(params) if _truncates(p, vocab_size)]
    whole = [i for i, p in enumerate(params) if not _truncates(p, vocab_size)]
    token_ids = torch.empty(len(rows), dtype=torch.long, device=probs.device)
    if whole:
        _put(token_ids, whole, _inverse_cdf(_take(probs, whole), _take(u, whole)))
    if truncated:
        picked = [_take(t, truncated) for t in (probs, top_p, min_p, u)]
        _put(token_ids, truncated, _sample_truncated(*picked))
    return token_ids


def _apply_top_k(logits: torch.Tensor, top_k: list[int]) -> None:
    """Keep each row's k largest logits (ties at the k-th value are kept too); k <= 0 or k >= V means all.

    Only the rows that ask for it pay for the topk and the masking.
    """
    picked = [i for i, k in enumerate(top_k) if 0 < k < logits.shape[1]]
    rows = _take(logits, picked)
    k = torch.tensor([top_k[i] for i in picked], device=logits.device)
    top_values = rows.topk(max(top_k[i] for i in picked), dim=-1).values  # as wide as the largest k asked
    threshold = top_values.gather(1, (k - 1).unsqueeze(1))
    rows.masked_fill_(rows < threshold, float("-inf"))
    if rows is not logits:
        logits.index_copy_(0, torch.tensor(picked, device=logits.device), rows)


def _sample_truncated(
    probs: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor, u: torch.Tensor
) -> torch.Tensor:
    """Draw for rows that truncate (top_k, top_p or min_p), among their candidates only."""
    ranked, columns, kept = _truncate(probs, top_p, min_p)
    position, _ = _invert(ranked.masked_fill(~kept, 0.0).double(), u)
    return columns.gather(1, position.unsqueeze(1)).squeeze(1)


def _truncate(
    probs: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row, the candidates sorted descending ([B, K] probabilities and ids) and which of them are kept.

    Every token top_p or min_p could keep is a candidate: at or above (1 - p) / 2V for top_p (those below
    hold less than (1 - p) / 2 together, so vLLM's rule drops them all; halved as a margin for rounding), at
    or above min_p times the top probability for min_p, and above 0 (top_k has zeroed the rest).
    """
    vocab_size = probs.shape[1]
    min_p_floor = (min_p * probs.amax(dim=-1)).unsqueeze(1)
    top_p_bound = torch.where(top_p < 1.0, (1.0 - top_p) / (2 * vocab_size), torch.finfo(probs.dtype).tiny)
    ranked, columns = _ranked(probs, torch.maximum(top_p_bound, min_p_floor.squeeze(1)))
    in_nucleus = torch.arange(ranked.shape[1], device=probs.device) < _nucleus_size(ranked, top_p).unsqueeze(
        1
    )
    # vLLM applies min_p after renormalizing what top_p kept: the ratio to the top probability is the same.
    return ranked, columns, in_nucleus & (ranked >= min_p_floor)


def _nucleus_size(ranked: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Per row, how many of the probabilities (sorted descending) top_p keeps.

    vLLM's rule: sort ascending and drop the tokens whose cumulative mass is <= 1 - p; in descending order,
    keep each token whose predecessors hold less than p, so the most likely token always survives. ranked
    must hold every token of the nucleus. Among tokens tied at the boundary, the order of ranked decides
    (vLLM's sort leaves it arbitrary). Where top_p is 1 every entry counts, whatever the rounding.
    """
    cumulative = ranked.cumsum(dim=-1, dtype=torch.float64)
    before = torch.nn.functional.pad(cumulative[:, :-1], (1, 0))  # mass ahead of each token, exactly monotone
    size = (before < top_p.unsqueeze(1)).sum(dim=-1)
    return torch.where(top_p < 1.0, size, ranked.shape[1])


def _ranked(probs: torch.Tensor, bound: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, probabilities sorted descending and their token ids, covering at least those >= bound.

    Ties are in token id order on both paths, so both keep the same tokens.

    On the CPU only the tokens at or above the bound are sorted (usually a few hundred of tens of thousands;
    a full sort of the vocabulary costs more than all the rest of the step). Elsewhere a full sort is cheap,
    and compacting would need a host sync for the width.
    """
    if probs.device.type == "cpu":
        return _ranked_candidates(probs, bound)
    return _ranked_by_sort(probs, bound)


def _ranked_by_sort(probs: torch.Tensor, bound: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole vocabulary sorted descending (bound unused: every token is there)."""
    return probs.sort(dim=-1, descending=True, stable=True)


def _ranked_candidates(probs: torch.Tensor, bound: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's probabilities >= bound, sorted descending, with their token ids, in zero-padded [B, K]."""
    num_rows = probs.shape[0]
    row, column = (probs >= bound.unsqueeze(1)).nonzero(as_tuple=True)
    values = probs[row, column]
    # One sort for all rows: by row, then by probability descending (positive float32s order like their
    # bits), then by token id (nonzero lists them in that order; the sort is stable).
    key = row * 2**31 + (2**31 - 1 - values.view(torch.int32).long())
    order = key.argsort(stable=True)
    row, column, values = row[order], column[order], values[order]
    counts = torch.bincount(row, minlength=num_rows)
    position = torch.arange(row.shape[0], device=probs.device) - (counts.cumsum(0) - counts)[row]
    width = max(1, int(counts.max()))
    ranked = probs.new_zeros(num_rows, width)
    ranked[row, position] = values
    columns = torch.zeros(num_rows, width, dtype=torch.long, device=probs.device)
    columns[row, position] = column
    return ranked, columns


def _uniforms(rows: list[SamplingRow], device: torch.device) -> torch.Tensor:
    """One float64 U[0, 1) per row: from the row's own generator where it has one, else from the global one.

    The unseeded rows share one call. Each seeded row takes one scalar draw from its generator (PyTorch
    draws from one generator per call): a loop over seeded rows of O(1) work each, with no host sync.
    """
    u = torch.rand(len(rows), dtype=torch.float64, device=device)
    seeded = [i for i, row in enumerate(rows) if row.generator is not None]
    if seeded:
        draws = []
        for i in seeded:
            g = rows[i].generator
            draws.append(torch.rand(1, dtype=torch.float64, generator=g, device=g.device).to(device))
        u[torch.tensor(seeded, device=device)] = torch.cat(draws)
    return u


def _inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Per row, the token where u falls in the row's cumulative distribution.

    Two levels: block sums of _CDF_BLOCK tokens pick a block, then the tokens of that block alone pick the
    token, each with a float64 cumulative sum. That reads the [B, V] probabilities once (for the sums) and
    keeps every token's chance to float32 relative precision, where one float32 cumulative sum over V would
    round away tokens rarer than about 1e-7 (its absolute precision near 1).
    """
    num_rows, vocab_size = probs.shape
    block = min(_CDF_BLOCK, vocab_size)
    num_full = vocab_size // block
    # Block sums in float32 (a float64 sum would first copy all of probs to float64).
    sums = probs[:, : num_full * block].view(num_rows, num_full, block).sum(dim=-1)
    if vocab_size % block:
        sums = torch.cat([sums, probs[:, num_full * block :].sum(dim=-1, keepdim=True)], dim=1)
    chosen_block, u_inside = _invert(sums.double(), u)
    columns = chosen_block.unsqueeze(1) * block + torch.arange(block, device=probs.device)
    window = probs.gather(1, columns.clamp(max=vocab_size - 1)).double()
    position, _ = _invert(window.masked_fill_(columns >= vocab_size, 0.0), u_inside)
    return chosen_block * block + position


def _invert(weights: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the first index whose cumulative weight exceeds u (in [0, 1)) times the row's total.

    Also returns where u fell inside that index's share, again uniform in [0, 1) when u is: the next level
    of a two-level draw uses it. An index with weight 0 is never returned (the cumulative sum does not rise
    there) unless the whole row is 0.
    """
    cumulative = weights.cumsum(dim=-1)
    total = cumulative[:, -1:]
    # Kept below the total, so rounding can never land past the last index with weight.
    target = torch.minimum(u.unsqueeze(1) * total, torch.nextafter(total, torch.zeros_like(total)))
    index = torch.searchsorted(cumulative, target, right=True).clamp_(max=weights.shape[1] - 1)
    end = cumulative.gather(1, index)
    start = torch.where(index > 0, cumulative.gather(1, (index - 1).clamp(min=0)), 0.0)
    inside = torch.where(end > start, (target - start) / (end - start), 0.0)
    return index.squeeze(1), inside.clamp_(max=1.0 - 2**-53).squeeze(1)


# ---------------------------------------------------------------------------------------------------------
# Logprobs


def _row_logprobs(
    logits: torch.Tensor, token_ids: torch.Tensor, rows: list[SamplingRow]
) -> list[TokenLogprobs | None]:
    """Raw logprobs (before any processing, as vLLM reports them) for the rows that asked for them."""
    picked = [i for i, row in enumerate(rows) if row.params.logprobs is not None]
    result: list[TokenLogprobs | None] = [None] * len(rows)
    if not picked:
        return result
    index = torch.tensor(picked, device=logits.device)
    gathered = _gather_logprobs(
        logits.index_select(0, index),
        token_ids.index_select(0, index),
        [rows[i].params.logprobs or 0 for i in picked],
    )
    for i, entry in zip(picked, gathered, strict=True):
        result[i] = entry
    return result


def _gather_logprobs(logits: torch.Tensor, target_ids: torch.Tensor, ks: list[int]) -> list[TokenLogprobs]:
    """Per row: the ks[row] most likely tokens (descending), then the target if it was not among them.

    One log_softmax and one topk for the batch; only the small results cross to the host.
    """
    if logits.shape[0] == 0:
        return []
    logprobs = torch.log_softmax(logits.to(torch.float32), dim=-1)
    target_ids = target_ids.to(device=logits.device, dtype=torch.long)
    target_lp = logprobs.gather(1, target_ids.unsqueeze(1)).squeeze(1).tolist()
    max_k = min(max(ks), logprobs.shape[1])
    top_values: list[list[float]] = []
    top_ids: list[list[int]] = []
    if max_k > 0:
        top = logprobs.topk(max_k, dim=-1)
        top_values, top_ids = top.values.tolist(), top.indices.tolist()
    result: list[TokenLogprobs] = []
    for row, (target, k) in enumerate(zip(target_ids.tolist(), ks, strict=True)):
        entry: TokenLogprobs = {}
        if k > 0:
            entry = dict(zip(top_ids[row][:k], top_values[row][:k], strict=True))
        entry.setdefault(target, target_lp[row])
        result.append(entry)
    return result
