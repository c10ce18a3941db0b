"""Sampler behaviour on small real tensors: determinism, truncation, penalties and logprobs."""

from __future__ import annotations

import math
import random

import pytest
import torch

from shoal.engine import sampler as sampler_module
from shoal.engine.sampler import Sampler, SamplingRow, _ranked_candidates, token_logprobs
from shoal.engine.sampling_params import SamplingParams

V = 8
EOS = 7


def make_row(
    prompt: list[int] | None = None,
    generated: list[int] | None = None,
    seed: int | None = None,
    **params,
) -> SamplingRow:
    prompt = [1, 2, 3] if prompt is None else prompt
    generated = generated or []
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    return SamplingRow(
        params=SamplingParams(seed=seed, **params),
        token_ids=prompt + generated,
        num_prompt_tokens=len(prompt),
        generator=generator,
    )


def random_logits(batch: int, vocab: int = V, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, vocab, generator=torch.Generator().manual_seed(seed)) * 3


def frequencies(tokens: list[int], vocab: int = V) -> torch.Tensor:
    return torch.bincount(torch.tensor(tokens), minlength=vocab).float() / len(tokens)


@pytest.fixture(autouse=True)
def _seed_global_rng() -> None:
    """Unseeded rows draw from torch's global generator; fixing it keeps the statistical tests deterministic."""
    torch.manual_seed(0)


@pytest.fixture
def sampler() -> Sampler:
    return Sampler(vocab_size=V, eos_token_ids={EOS})


def test_greedy_equals_argmax(sampler: Sampler) -> None:
    logits = random_logits(5)
    rows = [make_row(temperature=0.0) for _ in range(5)]
    assert sampler(logits, rows).token_ids == logits.argmax(-1).tolist()
    # Half precision input takes the same path and gives the same answer.
    assert sampler(logits.to(torch.bfloat16), rows).token_ids == logits.to(torch.bfloat16).argmax(-1).tolist()


def test_padded_vocab_columns_are_never_chosen() -> None:
    logits = torch.zeros(2, V + 4)
    logits[:, V:] = 100.0  # lm_head padding beyond the tokenizer's vocabulary
    logits[:, 2] = 1.0
    out = Sampler(V, {EOS})(logits, [make_row(temperature=0.0), make_row(temperature=1.0, top_k=1)])
    assert out.token_ids == [2, 2]


def test_top_k_one_equals_greedy(sampler: Sampler) -> None:
    logits = random_logits(6, seed=1)
    out = sampler(logits, [make_row(temperature=1.0, top_k=1) for _ in range(6)])
    assert out.token_ids == logits.argmax(-1).tolist()


def test_seeded_sampling_is_reproducible(sampler: Sampler) -> None:
    logits = torch.zeros(1, V)  # uniform: every draw is decided by the random stream alone

    def run(seed: int) -> list[int]:
        row = make_row(seed=seed)  # one fresh generator, advanced across the calls
        return [sampler(logits, [row]).token_ids[0] for _ in range(30)]

    assert run(1234) == run(1234)
    assert run(1234) != run(4321)


def test_seeded_row_is_independent_of_batch(sampler: Sampler) -> None:
    logits = random_logits(1, seed=2) / 3  # flat enough that different draws give different tokens
    others = random_logits(3, seed=5)

    def run(position: int | None, steps: int = 20) -> list[int]:
        """The seeded row's tokens, alone (position None) or at `position` among unrelated rows."""
        seeded = make_row(seed=7)
        tokens = []
        for _ in range(steps):
            if position is None:
                rows, batch_logits, position_in_batch = [seeded], logits, 0
            else:
                rows = [make_row(), make_row(temperature=0.0), make_row(seed=99, top_p=0.9)]
                rows.insert(position, seeded)
                batch_logits = torch.cat([others[:position], logits, others[position:]])
                position_in_batch = position
            tokens.append(sampler(batch_logits, rows).token_ids[position_in_batch])
        return tokens

    alone = run(None)
    assert len(set(alone)) > 1
    assert run(0) == alone
    assert run(3) == alone


def test_top_k_restricts_to_k_most_likely(sampler: Sampler) -> None:
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.9, -1.0, 0.5, 0.2, 0.1]])
    tokens = sampler(logits.expand(2000, V), [make_row(top_k=2) for _ in range(2000)]).token_ids
    assert set(tokens) == {1, 3}


def test_top_p_tiny_picks_the_max(sampler: Sampler) -> None:
    logits = random_logits(50, seed=3) / 3
    out = sampler(logits, [make_row(top_p=1e-6) for _ in range(50)])
    assert out.token_ids == logits.argmax(-1).tolist()


def test_top_p_keeps_the_nucleus(sampler: Sampler) -> None:
    probs = torch.tensor([[0.5, 0.3, 0.1, 0.05, 0.05, 0.0, 0.0, 0.0]])
    logits = probs.clamp(min=1e-9).log()
    tokens = sampler(logits.expand(3000, V), [make_row(top_p=0.75) for _ in range(3000)]).token_ids
    assert set(tokens) == {0, 1}
    assert frequencies(tokens)[0].item() == pytest.approx(0.5 / 0.8, abs=0.04)


def test_min_p_drops_unlikely_tokens(sampler: Sampler) -> None:
    probs = torch.tensor([[0.4, 0.3, 0.15, 0.1, 0.03, 0.01, 0.005, 0.005]])
    logits = probs.log()
    tokens = sampler(logits.expand(3000, V), [make_row(min_p=0.3) for _ in range(3000)]).token_ids
    assert set(tokens) == {0, 1, 2}  # 0.15 >= 0.3 * 0.4 = 0.12 > 0.1


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_temperature_matches_softmax(sampler: Sampler, temperature: float) -> None:
    logits = torch.tensor([[1.0, 0.5, 0.0, -0.5, -1.0, 0.2, 0.8, -2.0]])
    n = 20000
    tokens = sampler(logits.expand(n, V), [make_row(temperature=temperature) for _ in range(n)]).token_ids
    expected = torch.softmax(logits[0] / temperature, dim=-1)
    assert torch.allclose(frequencies(tokens), expected, atol=0.015)


def test_mixed_batch_greedy_and_sampled(sampler: Sampler) -> None:
    logits = random_logits(4, seed=4)
    rows = [make_row(temperature=0.0), make_row(top_k=1), make_row(temperature=0.0), make_row(seed=3)]
    out = sampler(logits, rows)
    argmax = logits.argmax(-1).tolist()
    assert out.token_ids[:3] == argmax[:3]
    assert 0 <= out.token_ids[3] < V


def test_logit_bias_forces_and_forbids(sampler: Sampler) -> None:
    logits = random_logits(3, seed=5)
    out = sampler(logits, [make_row(logit_bias={4: 100.0}) for _ in range(3)])
    assert out.token_ids == [4, 4, 4]
    top = logits.argmax(-1)
    banned = [make_row(temperature=0.0, logit_bias={int(t): -100.0}) for t in top]
    expected = logits.scatter(1, top.unsqueeze(1), -1e9).argmax(-1)
    assert sampler(logits, banned).token_ids == expected.tolist()


def test_min_tokens_masks_eos_and_stop_ids(sampler: Sampler) -> None:
    logits = torch.zeros(1, V)
    logits[0, EOS] = 10.0
    logits[0, 5] = 9.0  # a request stop token
    logits[0, 2] = 8.0

    def pick(generated: list[int], temperature: float = 0.0) -> int:
        row = make_row(generated=generated, min_tokens=2, stop_token_ids=[5], temperature=temperature)
        return sampler(logits, [row]).token_ids[0]

    assert pick([]) == 2
    assert pick([4]) == 2
    assert pick([4, 4]) == EOS  # min_tokens reached: nothing masked any more
    sampled = [pick([4], temperature=1.0) for _ in range(200)]
    assert EOS not in sampled and 5 not in sampled


def processed_logits(sampler: Sampler, logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    work = logits.clone()
    sampler._process_logits(work, rows)
    return work


def test_penalties_match_hand_computed_reference(sampler: Sampler) -> None:
    logits = torch.tensor(
        [
            [2.0, -1.0, 0.5, -2.0, 1.0, 0.0, 3.0, -0.5],
            [2.0, -1.0, 0.5, -2.0, 1.0, 0.0, 3.0, -0.5],
            [2.0, -1.0, 0.5, -2.0, 1.0, 0.0, 3.0, -0.5],
            [2.0, -1.0, 0.5, -2.0, 1.0, 0.0, 3.0, -0.5],
        ]
    )
    prompt, generated = [0, 1], [2, 3, 3, 4, 0]
    rows = [
        make_row(prompt, generated, repetition_penalty=2.0),
        make_row(prompt, generated, presence_penalty=0.5),
        make_row(prompt, generated, frequency_penalty=0.25),
        make_row(prompt, generated),  # neutral row in the same batch: untouched
    ]
    # Repetition (prompt + output: 0,1,2,3,4): positive logits halved, negative doubled.
    rep = [1.0, -2.0, 0.25, -4.0, 0.5, 0.0, 3.0, -0.5]
    # Presence (output only: 0,2,3,4): minus 0.5 once per distinct token.
    pres = [1.5, -1.0, 0.0, -2.5, 0.5, 0.0, 3.0, -0.5]
    # Frequency (output counts: 0x1, 2x1, 3x2, 4x1): minus 0.25 per occurrence.
    freq = [1.75, -1.0, 0.25, -2.5, 0.75, 0.0, 3.0, -0.5]
    expected = torch.tensor([rep, pres, freq, logits[3].tolist()])
    assert torch.allclose(processed_logits(sampler, logits, rows), expected)


def test_penalties_combine_in_order(sampler: Sampler) -> None:
    logits = torch.tensor([[2.0, -1.0, 0.5, -2.0, 1.0, 0.0, 3.0, -0.5]])
    row = make_row(
        [0, 1],
        [2, 3, 3],
        repetition_penalty=2.0,
        presence_penalty=0.5,
        frequency_penalty=0.25,
        logit_bias={6: -4.0},
    )
    # bias first (6: 3 -> -1), then repetition over 0,1,2,3, then presence+frequency over 2,3,3.
    expected = torch.tensor([[1.0, -2.0, 0.25 - 0.75, -4.0 - 1.0, 1.0, 0.0, -1.0, -0.5]])
    assert torch.allclose(processed_logits(sampler, logits, [row]), expected)


def test_penalties_change_the_greedy_choice(sampler: Sampler) -> None:
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0, 2.0, 1.5, 0.0, 0.0]])
    assert sampler(logits, [make_row(generated=[4], temperature=0.0)]).token_ids == [4]
    assert sampler(logits, [make_row(generated=[4], temperature=0.0, repetition_penalty=1.5)]).token_ids == [
        5
    ]
    assert sampler(logits, [make_row(generated=[4], temperature=0.0, presence_penalty=1.0)]).token_ids == [5]
    assert sampler(logits, [make_row(generated=[4], temperature=0.0, frequency_penalty=0.4)]).token_ids == [4]
    assert sampler(
        logits, [make_row(generated=[4, 4], temperature=0.0, frequency_penalty=0.4)]
    ).token_ids == [5]


def test_logprobs_are_raw_and_include_the_chosen_token(sampler: Sampler) -> None:
    logits = random_logits(4, seed=8)
    rows = [
        make_row(logprobs=2, temperature=0.5, repetition_penalty=1.3, seed=1),
        make_row(logprobs=0, logit_bias={3: 50.0}),
        make_row(),  # did not ask: None
        make_row(logprobs=5, temperature=0.0, min_tokens=1, generated=[]),
    ]
    out = sampler(logits.to(torch.bfloat16), rows)
    raw = torch.log_softmax(logits.to(torch.bfloat16).float(), dim=-1)
    assert out.logprobs[2] is None
    assert out.token_ids[1] == 3 and set(out.logprobs[1]) == {3}
    for i, k in [(0, 2), (1, 0), (3, 5)]:
        entry = out.logprobs[i]
        assert out.token_ids[i] in entry
        top = raw[i].topk(k).indices.tolist() if k else []
        assert set(top) <= set(entry) and len(entry) in (k, k + 1)
        for token, lp in entry.items():
            assert lp == pytest.approx(raw[i, token].item(), abs=1e-5)


def test_token_logprobs_top_k() -> None:
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0, -1.0], [5.0, 0.0, 0.0, 0.0, 1.0]])
    raw = torch.log_softmax(logits, dim=-1)
    result = token_logprobs(logits, torch.tensor([4, 0]), k=2)
    assert list(result[0]) == [1, 3, 4]  # top-2 in order, then the target that was outside them
    assert list(result[1]) == [0, 4]  # target already among the top-2: no extra entry
    for row, entry in enumerate(result):
        for token, lp in entry.items():
            assert lp == pytest.approx(raw[row, token].item())
    only_target = token_logprobs(logits, torch.tensor([2, 2]), k=0)
    assert [list(e) for e in only_target] == [[2], [2]]
    full = token_logprobs(logits, torch.tensor([0, 0]), k=5)[0]  # k = V: the whole distribution
    assert math.isclose(sum(math.exp(v) for v in full.values()), 1.0, rel_tol=1e-5)


# ---------------------------------------------------------------------------------------------------------
# Batching: a vocabulary of several inverse-CDF blocks (256 tokens each, plus a partial tail block)

BIG_V = 600
TRUNCATIONS = [
    pytest.param({}, id="whole-vocabulary"),
    pytest.param({"top_p": 0.9}, id="top_p"),
    pytest.param({"top_k": 40}, id="top_k"),
    pytest.param({"min_p": 0.05}, id="min_p"),
    pytest.param({"temperature": 0.8, "top_p": 0.95, "top_k": 100, "min_p": 0.01}, id="all"),
]


def companion_rows(rng: random.Random) -> list[SamplingRow]:
    """A random mix of unrelated requests: greedy, penalized, biased, seeded, unseeded, with logprobs."""
    kinds = [
        lambda: make_row(temperature=0.0, repetition_penalty=1.3),
        lambda: make_row(top_p=0.8, presence_penalty=0.5, generated=[5, 5, 9]),
        lambda: make_row(seed=rng.randrange(1000), logprobs=3),
        lambda: make_row(logit_bias={7: 5.0}, min_tokens=2),
        lambda: make_row(top_k=5, frequency_penalty=0.3, generated=[1, 2]),
        lambda: make_row(),
    ]
    return [rng.choice(kinds)() for _ in range(rng.randrange(1, 6))]


@pytest.mark.parametrize("settings", TRUNCATIONS)
def test_seeded_row_ignores_batch_companions(settings: dict) -> None:
    """A seeded request draws the same tokens alone and at any position among any other requests."""
    sampler = Sampler(BIG_V, {EOS})
    logits = (random_logits(1, BIG_V, seed=11) / 2).to(torch.bfloat16)

    def run(rng: random.Random | None, steps: int = 25) -> list[int]:
        seeded = make_row(seed=1234, **settings)
        tokens = []
        for _ in range(steps):
            rows, batch = [seeded], logits
            if rng is not None:
                rows = companion_rows(rng)
                position = rng.randrange(len(rows) + 1)
                rows.insert(position, seeded)
                others = random_logits(len(rows) - 1, BIG_V, seed=rng.randrange(1000))
                others = others.to(torch.bfloat16)
                batch = torch.cat([others[:position], logits, others[position:]])
            tokens.append(sampler(batch, rows).token_ids[rows.index(seeded)])
        return tokens

    alone = run(None)
    assert len(set(alone)) > 3
    assert run(random.Random(1)) == alone
    assert run(random.Random(2)) == alone


def test_deterministic_rows_are_unchanged_by_a_mixed_batch() -> None:
    """Greedy rows (with penalties, bias, min_tokens, logprobs) give the same token alone and in a mixed batch."""
    sampler = Sampler(BIG_V, {EOS})
    deterministic = [
        make_row(temperature=0.0, repetition_penalty=1.5, generated=[3, 4]),
        make_row(top_k=1, logit_bias={9: 2.0}),
        make_row(temperature=0.0, min_tokens=3, logprobs=2),
        make_row(top_p=1e-9, frequency_penalty=1.0, generated=[8, 8, 8]),  # a tiny nucleus keeps one token
    ]
    logits = random_logits(len(deterministic), BIG_V, seed=12)
    logits[:, EOS] = 20.0  # masked by min_tokens where asked
    alone = [sampler(logits[i : i + 1], [row]).token_ids[0] for i, row in enumerate(deterministic)]
    rng = random.Random(3)
    for _ in range(5):
        rows = companion_rows(rng)
        batch_rows, batch_logits = list(rows), [random_logits(len(rows), BIG_V, seed=rng.randrange(1000))]
        for i, row in enumerate(deterministic):
            batch_rows.append(row)
            batch_logits.append(logits[i : i + 1])
        out = sampler(torch.cat(batch_logits), batch_rows).token_ids
        assert out[len(rows) :] == alone


def test_sampling_matches_softmax_across_cdf_blocks() -> None:
    """Peaks on both sides of each block edge and in the tail block come out at their softmax frequencies."""
    peaks = [0, 255, 256, 300, 511, 512, 599]
    logits = torch.zeros(1, BIG_V)
    logits[0, peaks] = torch.tensor([3.0, 4.0, 3.5, 2.0, 4.0, 3.0, 4.5])
    expected = torch.softmax(logits[0], dim=-1)
    sampler, n = Sampler(BIG_V, set()), 40000
    tokens = torch.tensor(sampler(logits.expand(n, BIG_V), [make_row() for _ in range(n)]).token_ids)
    counts = torch.bincount(tokens, minlength=BIG_V).float() / n
    for token in peaks:
        assert counts[token].item() == pytest.approx(expected[token].item(), abs=0.01)
    background = torch.ones(BIG_V, dtype=torch.bool)
    background[peaks] = False
    for block in (slice(0, 256), slice(256, 512), slice(512, BIG_V)):
        got, want = counts[block][background[block]].sum(), expected[block][background[block]].sum()
        assert got.item() == pytest.approx(want.item(), abs=0.01)


def test_masked_tokens_at_block_edges_are_never_drawn() -> None:
    """Zero-probability tokens at the first/last slot of a block or of the vocabulary are never chosen."""
    edges = {0, 255, 256, 511, 512, BIG_V - 1}
    sampler = Sampler(BIG_V, edges)
    logits = torch.zeros(1, BIG_V)
    logits[0, sorted(edges)] = 30.0  # almost all the mass, before masking
    n = 4000
    rows = [make_row(min_tokens=1, **([{}, {"top_p": 0.99}, {"top_k": 600}][i % 3])) for i in range(n)]
    tokens = set(sampler(logits.expand(n, BIG_V), rows).token_ids)
    assert not tokens & edges
    assert len(tokens) > 100


def reference_kept(probs: torch.Tensor, top_p: float, min_p: float) -> torch.Tensor:
    """vLLM's top_p then min_p on one row, with a stable sort (ties: lower token ids first), as a bool mask."""
    values, order = probs.sort(descending=True, stable=True)
    before = torch.cat([torch.zeros(1, dtype=torch.float64), values.double().cumsum(0)[:-1]])
    kept = torch.zeros_like(probs, dtype=torch.bool)
    kept[order[before < top_p] if top_p < 1.0 else order] = True
    renormalized = torch.where(kept, probs, 0.0)
    return kept & (renormalized >= min_p * renormalized.max())


@pytest.mark.parametrize("ranking", ["_ranked_candidates", "_ranked_by_sort"])
def test_truncation_matches_the_sort_based_reference(monkeypatch: pytest.MonkeyPatch, ranking: str) -> None:
    """top_p and min_p keep exactly vLLM's tokens, ties included (bfloat16 logits make many), whether the
    candidates are compacted (the CPU's way) or the whole vocabulary is sorted (other devices')."""
    monkeypatch.setattr(sampler_module, "_ranked", getattr(sampler_module, ranking))
    rng = random.Random(4)
    logits = (
        (torch.randn(60, 3000, generator=torch.Generator().manual_seed(4)) * 3).to(torch.bfloat16).float()
    )
    probs = (logits / torch.tensor([rng.choice([0.5, 1.0, 2.0]) for _ in range(60)]).unsqueeze(1)).softmax(-1)
    top_p = torch.tensor([rng.choice([1.0, 0.9, 0.5, 0.99, 1e-6, 0.3]) for _ in range(60)])
    min_p = torch.tensor([rng.choice([0.0, 0.0, 0.05, 0.2]) for _ in range(60)])
    ranked, columns, kept = sampler_module._truncate(probs, top_p, min_p)
    for row in range(60):
        ours = torch.zeros(3000, dtype=torch.bool)
        ours[columns[row][kept[row]]] = True
        assert torch.equal(ours, reference_kept(probs[row], top_p[row].item(), min_p[row].item())), row


def test_candidate_ranking_matches_a_full_sort() -> None:
    """The CPU's compacted ranking is the head of a full stable sort: everything at or above the bound."""
    logits = (torch.randn(8, 2000, generator=torch.Generator().manual_seed(5)) * 2).to(torch.bfloat16).float()
    probs = logits.softmax(-1)
    bound = torch.tensor([1e-4, 1e-3, 0.0, 1.0, 5e-4, 2e-4, 1e-5, 1e-2])
    ranked, columns = _ranked_candidates(probs, bound)
    values, order = probs.sort(dim=-1, descending=True, stable=True)
    for row in range(8):
        n = int((probs[row] >= bound[row]).sum())
        assert torch.equal(ranked[row, :n], values[row, :n]) and torch.equal(columns[row, :n], order[row, :n])
        assert not ranked[row, n:].any()


def test_top_p_counts_tied_tokens_like_vllm(sampler: Sampler) -> None:
    """Uniform logits: top_p keeps the smallest set reaching p (4 of 8 for 0.5, 3 for 0.3), lowest ids."""
    logits = torch.zeros(1, V)
    for top_p, size in [(0.5, 4), (0.3, 3)]:
        tokens = sampler(logits.expand(2000, V), [make_row(top_p=top_p) for _ in range(2000)]).token_ids
        assert set(tokens) == set(range(size))
