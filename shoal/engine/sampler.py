"""Turn one step's logits into one token per sequence, with vLLM's sampling semantics.

Everything is batched on the logits' device: per-row parameters become [B] tensors and token histories
become [B, V] count tensors, so a step costs a handful of kernels whatever the batch mix. The only Python
loops are over rows (to build those tensors, and to draw from per-request seeded generators).

Order of operations, on a float32 copy of the logits (the raw logits are kept for logprobs):
logit_bias -> min_tokens masking -> repetition penalty -> presence/frequency penalties -> greedy argmax,
or temperature -> top_k -> top_p -> min_p -> exponential-race sampling.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from shoal.engine.outputs import TokenLogprobs
from shoal.engine.sampling_params import SamplingParams


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
            # Nothing changes the argmax: skip the float32 copy and every per-row tensor.
            token_ids = logits.argmax(dim=-1)
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


# ---------------------------------------------------------------------------------------------------------
# Pre-sampling logits processing (in place on the float32 copy)


def _has_penalties(params: SamplingParams) -> bool:
    return (
        params.repetition_penalty != 1.0 or params.presence_penalty != 0.0 or params.frequency_penalty != 0.0
    )


def _flat_indices(token_sets: list, vocab_size: int, device: torch.device) -> torch.Tensor:
    """Indices into a flattened [B, V] tensor for every (row, token) pair; duplicates are kept.

    Building one index tensor lets a single scatter/index op serve the whole batch.
    """
    flat = [i * vocab_size + t for i, tokens in enumerate(token_sets) for t in tokens if 0 <= t < vocab_size]
    return torch.tensor(flat, dtype=torch.long, device=device)


def _apply_logit_bias(logits: torch.Tensor, rows: list[SamplingRow]) -> None:
    biases = [row.params.logit_bias or {} for row in rows]
    if not any(biases):
        return
    vocab_size = logits.shape[1]
    index = _flat_indices([list(b) for b in biases], vocab_size, logits.device)
    values = [v for b in biases for t, v in b.items() if 0 <= t < vocab_size]
    logits.view(-1).index_add_(0, index, torch.tensor(values, dtype=logits.dtype, device=logits.device))


def _mask_tokens(logits: torch.Tensor, masked: list[set[int]]) -> None:
    """Set the listed tokens of each row to -inf so they can never be chosen."""
    if not any(masked):
        return
    index = _flat_indices([sorted(m) for m in masked], logits.shape[1], logits.device)
    logits.view(-1).index_fill_(0, index, float("-inf"))


def _token_counts(sequences: list[list[int]], vocab_size: int, device: torch.device) -> torch.Tensor:
    """[len(sequences), V] occurrence counts, built with one scatter_add rather than a loop per token."""
    counts = torch.zeros(len(sequences) * vocab_size, dtype=torch.float32, device=device)
    index = _flat_indices(sequences, vocab_size, device)
    counts.scatter_add_(0, index, torch.ones(index.shape, dtype=torch.float32, device=device))
    return counts.view(len(sequences), vocab_size)


def _apply_penalties(logits: torch.Tensor, rows: list[SamplingRow]) -> None:
    """Repetition penalty over prompt+output, then frequency/presence penalties over the output only.

    Only the rows that ask for a penalty pay for the [n, V] count tensors.
    """
    picked = [i for i, row in enumerate(rows) if _has_penalties(row.params)]
    if not picked:
        return
    device, vocab_size = logits.device, logits.shape[1]
    params = [rows[i].params for i in picked]
    sub = logits[picked]

    if any(p.repetition_penalty != 1.0 for p in params):
        seen = _token_counts([rows[i].token_ids for i in picked], vocab_size, device) > 0
        penalty = torch.tensor([p.repetition_penalty for p in params], device=device).unsqueeze(1)
        penalized = torch.where(sub > 0, sub / penalty, sub * penalty)
        sub = torch.where(seen, penalized, sub)

    if any(p.frequency_penalty != 0.0 or p.presence_penalty != 0.0 for p in params):
        generated = [rows[i].token_ids[rows[i].num_prompt_tokens :] for i in picked]
        counts = _token_counts(generated, vocab_size, device)
        frequency = torch.tensor([p.frequency_penalty for p in params], device=device).unsqueeze(1)
        presence = torch.tensor([p.presence_penalty for p in params], device=device).unsqueeze(1)
        sub = sub - frequency * counts - presence * (counts > 0).float()

    logits[picked] = sub


# ---------------------------------------------------------------------------------------------------------
# Choosing the token


def _choose_tokens(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """Greedy rows take the argmax of the processed logits; the rest are sampled after truncation."""
    greedy = [row.params.greedy for row in rows]
    if all(greedy):
        return logits.argmax(dim=-1)
    greedy_mask = torch.tensor(greedy, device=logits.device)
    greedy_tokens = logits.argmax(dim=-1) if any(greedy) else None

    # Greedy rows ride along with neutral settings: their result is replaced by the argmax below.
    active = [row.params for row, g in zip(rows, greedy, strict=True) if not g]
    neutral = SamplingParams()
    params = [neutral if g else row.params for row, g in zip(rows, greedy, strict=True)]

    temperature = torch.tensor([p.temperature for p in params], device=logits.device).unsqueeze(1)
    logits.div_(temperature)
    if any(0 < p.top_k < logits.shape[1] for p in active):
        _apply_top_k(logits, [p.top_k for p in params])
    if any(p.top_p < 1.0 for p in active):
        _apply_top_p(logits, [p.top_p for p in params])
    if any(p.min_p > 0.0 for p in active):
        _apply_min_p(logits, [p.min_p for p in params])

    sampled = _exponential_race(logits.softmax(dim=-1), rows, greedy)
    if greedy_tokens is None:
        return sampled
    return torch.where(greedy_mask, greedy_tokens, sampled)


def _apply_top_k(logits: torch.Tensor, top_k: list[int]) -> None:
    """Keep each row's k largest logits (ties at the k-th value are kept too); k <= 0 means all."""
    vocab_size = logits.shape[1]
    enabled = [0 < k < vocab_size for k in top_k]
    max_k = max(k for k, on in zip(top_k, enabled, strict=True) if on)
    top_values = logits.topk(max_k, dim=-1).values  # only as wide as the largest k actually asked for
    k_index = torch.tensor(
        [k - 1 if on else 0 for k, on in zip(top_k, enabled, strict=True)], device=logits.device
    )
    threshold = top_values.gather(1, k_index.unsqueeze(1))
    disabled = torch.tensor([not on for on in enabled], device=logits.device).unsqueeze(1)
    threshold = threshold.masked_fill(disabled, float("-inf"))
    logits.masked_fill_(logits < threshold, float("-inf"))


def _apply_top_p(logits: torch.Tensor, top_p: list[float]) -> None:
    """Nucleus filtering as vLLM does it: drop the least likely tokens whose total mass is <= 1 - p.

    The most likely token always survives, so a tiny p degenerates to greedy.
    """
    probs_sorted, order = logits.softmax(dim=-1).sort(dim=-1, descending=False)
    cumulative = probs_sorted.cumsum(dim=-1)
    p = torch.tensor(top_p, device=logits.device).unsqueeze(1)
    drop_sorted = cumulative <= 1 - p
    drop_sorted[:, -1] = False
    drop = torch.empty_like(drop_sorted).scatter_(1, order, drop_sorted)
    logits.masked_fill_(drop, float("-inf"))


def _apply_min_p(logits: torch.Tensor, min_p: list[float]) -> None:
    """Drop tokens whose probability is below min_p times the most likely token's probability."""
    probs = logits.softmax(dim=-1)
    scale = torch.tensor(min_p, device=logits.device).unsqueeze(1)
    threshold = probs.amax(dim=-1, keepdim=True) * scale
    logits.masked_fill_(probs < threshold, float("-inf"))


def _exponential_race(probs: torch.Tensor, rows: list[SamplingRow], skip: list[bool]) -> torch.Tensor:
    """Sample one token per row as argmax(probs / q), q ~ Exp(1): exact categorical sampling, no CDF search.

    Seeded rows draw their q from their own generator, a full vocabulary's worth per step whatever the
    batch, so their tokens do not depend on which other requests share the step. Unseeded rows share one
    batched draw from the global generator. Rows in `skip` (greedy) draw nothing.
    """
    q = torch.empty_like(probs).exponential_()
    for i, row in enumerate(rows):
        if row.generator is None or skip[i]:
            continue
        g = row.generator
        draw = torch.empty(probs.shape[1], dtype=probs.dtype, device=g.device).exponential_(generator=g)
        q[i] = draw.to(probs.device)
    # An exact 0 would turn a masked token's 0/0 into NaN, which argmax would pick.
    q.clamp_(min=torch.finfo(q.dtype).tiny)
    return probs.div_(q).argmax(dim=-1)


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
