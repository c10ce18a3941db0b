"""Engine behaviour end to end on small models: prefix caching, preemption, sampling controls, logprobs.

- Prefix caching: a request sharing a ~200-token system prompt with an earlier one reuses its blocks and
  returns exactly the tokens of an engine without the cache (and the transformers reference's argmax).
- Preemption: 16 concurrent requests in a KV cache a third of the size they need all finish, with tokens
  equal to a run with a large cache.
- Sampling: seeded runs repeat, n>1 gives n choices, ignore_eos/min_tokens/max_tokens give exact lengths.
- Logprobs: prompt logprobs (what lm-eval's loglikelihood reads) equal transformers' log_softmax.

Tiny random checkpoints (tests/tiny_models.py) and stories260K keep all of this to a few seconds.
"""

from __future__ import annotations

import time
from dataclasses import replace

import pytest
import torch
from tiny_models import LONG_TEXT, Reference, check_greedy, make_engine, measure_logit_error, tie_margin

from shoal.engine.sampling_params import SamplingParams

GREEDY = dict(temperature=0.0, ignore_eos=True)
BLOCK = 16


# ---------------------------------------------------------------------------------------------------------
# Prefix caching


SYSTEM_PROMPT = LONG_TEXT[:1000]
QUESTIONS = [
    "Who designed the lens that changed lighthouses?",
    "Why are keepers no longer needed today?",
    "Name one use of an old lighthouse tower.",
]


@pytest.fixture(scope="module")
def chat_prompts(tiny_model_dirs) -> list[list[int]]:
    from shoal.model.tokenizer import Tokenizer

    tok = Tokenizer(tiny_model_dirs["llama3"])
    return [
        tok.encode(
            tok.apply_chat_template(
                [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": q}]
            ),
            add_special_tokens=False,
        )
        for q in QUESTIONS
    ]


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


@pytest.mark.timeout(60)
@pytest.mark.parametrize("arch", ["llama3", "mistral"])
def test_prefix_caching_reuses_blocks_and_keeps_tokens(arch, tiny_model_dirs, chat_prompts):
    d = tiny_model_dirs[arch]
    shared = _common_prefix(chat_prompts[0], chat_prompts[1])
    assert shared >= 200, f"the shared system prompt is only {shared} tokens"
    shared_blocks = shared // BLOCK
    params = SamplingParams(max_tokens=32, **GREEDY)

    cached = make_engine(d, kv_tokens=4096, max_model_len=512, max_num_batched_tokens=48)
    plain = make_engine(
        d, kv_tokens=4096, max_model_len=512, max_num_batched_tokens=48, enable_prefix_caching=False
    )
    bm = cached.block_manager

    first = cached.generate([chat_prompts[0]], params)[0]
    assert first.num_cached_tokens == 0
    hits_before = bm.prefix_hits
    second = cached.generate([chat_prompts[1]], params)[0]
    gained = bm.prefix_hits - hits_before
    print(f"{arch}: shared prefix {shared} tokens, prefix hits +{gained}, cached {second.num_cached_tokens}")
    assert gained >= shared_blocks * BLOCK
    assert shared_blocks * BLOCK <= second.num_cached_tokens < len(chat_prompts[1])
    # A repeat of a fully cached prompt: every full block but the one holding the last token is a hit.
    repeat = cached.generate([chat_prompts[0]], params)[0]
    assert repeat.num_cached_tokens == (len(chat_prompts[0]) - 1) // BLOCK * BLOCK
    # The third question and the first again, together in one batch, both served from the cache.
    both = cached.generate([chat_prompts[2], chat_prompts[0]], params)
    assert all(o.num_cached_tokens >= shared_blocks * BLOCK for o in both)

    want = plain.generate([chat_prompts[0], chat_prompts[1], chat_prompts[2]], params)
    assert plain.block_manager.prefix_hits == 0 and all(o.num_cached_tokens == 0 for o in want)
    want_tokens = [o.outputs[0].token_ids for o in want]
    assert first.outputs[0].token_ids == want_tokens[0]
    assert second.outputs[0].token_ids == want_tokens[1]
    assert repeat.outputs[0].token_ids == want_tokens[0]
    assert [o.outputs[0].token_ids for o in both] == [want_tokens[2], want_tokens[0]]

    ref = Reference.load(d)
    margin = tie_margin(measure_logit_error(d, ref, chat_prompts[:2]))
    for prompt, out in zip(chat_prompts, want_tokens, strict=True):
        check_greedy(ref, prompt, out, margin, f"{arch}/prefix")


@pytest.mark.timeout(30)
def test_prompt_logits_with_cached_prefix(tiny_model_dirs, chat_prompts):
    """BUG (shoal/engine/block_manager.py match_prefix): prompt_logits() on a prompt whose blocks are in the
    prefix cache returns only the rows after the cached blocks: scoring two prompts with a common prefix (as the
    parity checks do) silently gets a truncated tensor."""
    engine = make_engine(
        tiny_model_dirs["qwen3"], kv_tokens=4096, max_model_len=512, max_num_batched_tokens=64
    )
    first = engine.prompt_logits(chat_prompts[0])
    assert first.shape[0] == len(chat_prompts[0])
    second = engine.prompt_logits(chat_prompts[1])  # shares ~200 tokens with the first
    assert second.shape[0] == len(chat_prompts[1]), (
        f"prompt_logits returned {second.shape[0]} rows for a {len(chat_prompts[1])}-token prompt"
    )
    again = engine.prompt_logits(chat_prompts[0])
    torch.testing.assert_close(again, first, atol=1e-4, rtol=0)


# ---------------------------------------------------------------------------------------------------------
# Preemption

NUM_SEQS = 16
PREEMPT_NEW_TOKENS = 64
PREEMPT_MAX_LEN = 256


@pytest.fixture(scope="module")
def preemption_prompts(tiny_model_dirs) -> list[list[int]]:
    """16 prompts of 30-90 tokens with distinct starts (no accidental prefix sharing between them)."""
    from shoal.model.tokenizer import Tokenizer

    base = Tokenizer(tiny_model_dirs["llama3"]).encode(LONG_TEXT)
    return [base[i * 13 : i * 13 + 30 + (i * 7) % 60] for i in range(NUM_SEQS)]


class PreemptionRun:
    """The same 16 greedy requests on a large and on a too-small KV cache (one run per architecture)."""

    def __init__(self, model_dir, prompts):
        self.prompts = prompts
        # Every 4th request also asks for prompt logprobs: those never take prefix hits and keep per-prompt
        # state that a preemption must not corrupt.
        self.params = [
            SamplingParams(max_tokens=PREEMPT_NEW_TOKENS, prompt_logprobs=1 if i % 4 == 0 else None, **GREEDY)
            for i in range(NUM_SEQS)
        ]
        need = sum(-(-(len(p) + PREEMPT_NEW_TOKENS) // BLOCK) for p in prompts) * BLOCK
        self.small_kv = max(need // 3 // BLOCK * BLOCK, PREEMPT_MAX_LEN)
        cfg = dict(max_model_len=PREEMPT_MAX_LEN, max_num_batched_tokens=64)
        self.large = make_engine(model_dir, kv_tokens=4 * need, **cfg)
        self.small = make_engine(model_dir, kv_tokens=self.small_kv, **cfg)
        self.need = need
        self.large_out = self.large.generate(prompts, self.params)
        self.small_out = self.small.generate(prompts, self.params)


@pytest.fixture(scope="module")
def preemption_runs(tiny_model_dirs, preemption_prompts):
    runs: dict[str, PreemptionRun] = {}

    def get(arch: str) -> PreemptionRun:
        if arch not in runs:
            runs[arch] = PreemptionRun(tiny_model_dirs[arch], preemption_prompts)
        return runs[arch]

    return get


@pytest.mark.timeout(60)
@pytest.mark.parametrize("arch", ["llama3", "mistral"])
def test_preemption_keeps_tokens(arch, preemption_runs, tiny_model_dirs):
    run = preemption_runs(arch)
    preemptions = run.small.scheduler.num_preemptions
    print(
        f"{arch}: KV {run.small_kv} tokens for {run.need} needed, {preemptions} preemptions, "
        f"large cache {run.large.scheduler.num_preemptions}"
    )
    assert run.small_kv * 2.5 <= run.need and run.small_kv >= PREEMPT_MAX_LEN
    assert preemptions > 0
    assert run.large.scheduler.num_preemptions == 0
    for big, small in zip(run.large_out, run.small_out, strict=True):
        assert small.finished and small.outputs[0].finish_reason == "length"
        assert len(small.outputs[0].token_ids) == PREEMPT_NEW_TOKENS
        assert small.outputs[0].token_ids == big.outputs[0].token_ids
    d = tiny_model_dirs[arch]
    ref = Reference.load(d)
    margin = tie_margin(measure_logit_error(d, ref, run.prompts[:4]))
    for i, (prompt, out) in enumerate(zip(run.prompts, run.small_out, strict=True)):
        check_greedy(ref, prompt, out.outputs[0].token_ids, margin, f"{arch}/preempted/{i}")


@pytest.mark.timeout(60)
def test_prompt_logprobs_survive_preemption(preemption_runs):
    """BUG (shoal/engine/llm_engine.py _collect_prompt_logits): a preempted sequence recomputes its prompt and
    appends its prompt logprobs a second time, so prompt_logprobs grows past one entry per prompt token."""
    run = preemption_runs("llama3")
    assert run.small.scheduler.num_preemptions > 0
    for prompt, params, big, small in zip(run.prompts, run.params, run.large_out, run.small_out, strict=True):
        if params.prompt_logprobs is None:
            continue
        assert len(big.prompt_logprobs) == len(prompt)
        assert len(small.prompt_logprobs) == len(prompt), (
            f"{len(small.prompt_logprobs)} prompt logprobs for a {len(prompt)}-token prompt"
        )
        for a, b in zip(big.prompt_logprobs[1:], small.prompt_logprobs[1:], strict=True):
            assert a.keys() == b.keys()
            assert max(abs(a[k] - b[k]) for k in a) < 1e-4


@pytest.mark.timeout(60)
def test_num_cached_tokens_counts_prompt_tokens_only(preemption_runs):
    """BUG (shoal/engine/block_manager.py match_prefix): after a preemption the re-admitted sequence is matched
    against the cache with its generated tokens, and num_cached_tokens reports more tokens than the prompt has."""
    run = preemption_runs("llama3")
    assert run.small.scheduler.num_preemptions > 0
    bad = [
        (len(p), o.num_cached_tokens)
        for p, o in zip(run.prompts, run.small_out, strict=True)
        if not 0 <= o.num_cached_tokens <= len(p)
    ]
    assert not bad, f"(prompt length, num_cached_tokens) out of range: {bad}"


@pytest.mark.timeout(60)
def test_waiting_request_does_not_hold_cached_blocks(tiny_model_dirs):
    """BUG (shoal/engine/scheduler.py, Scheduler.schedule, admission of waiting sequences): a waiting request
    whose prompt hits the prefix cache takes those blocks in match_prefix, then fails admission (no room for its
    uncached tail) and keeps holding them while it waits. A running request that then needs a block preempts
    itself, cannot be re-admitted into what is left, and the engine raises MemoryError ("KV cache too small for
    one sequence") although each request fits the cache on its own.

    Scenario, 16 blocks of 16 (= max_model_len 256): request C (100 tokens) finishes, leaving its 6 full blocks
    cached at the back of the free list; B (20 + 236 tokens) decodes through the 10 other blocks; A, sharing
    C's first 96 tokens, arrives when B holds 10 blocks, takes C's 6 cached blocks and waits for a 17th."""
    d = tiny_model_dirs["llama3"]
    from shoal.model.tokenizer import Tokenizer

    base = Tokenizer(d).encode(LONG_TEXT)
    c, b, a = base[:100], base[150:170], base[:96] + base[200:210]
    params = [SamplingParams(max_tokens=236, **GREEDY), SamplingParams(max_tokens=8, **GREEDY)]

    small = make_engine(d, kv_tokens=256, max_model_len=256, max_num_batched_tokens=64)
    assert small.block_manager.num_blocks == 16
    small.generate([c], SamplingParams(max_tokens=1))
    got = small.generate([b, a], params, arrival_steps=[0, 135])

    large = make_engine(d, kv_tokens=4096, max_model_len=256, max_num_batched_tokens=64)
    large.generate([c], SamplingParams(max_tokens=1))
    want = large.generate([b, a], params, arrival_steps=[0, 135])
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in want]


# ---------------------------------------------------------------------------------------------------------
# Sampling controls and logprobs (stories260K: a real 260K-parameter Llama, vocab 512)


@pytest.fixture(scope="module")
def stories(stories_dir):
    return make_engine(stories_dir, kv_tokens=8192, max_model_len=512, max_num_batched_tokens=64)


@pytest.fixture(scope="module")
def stories_ref(stories_dir):
    pytest.importorskip("transformers")
    return Reference.load(stories_dir)


@pytest.fixture(scope="module")
def story_prompt(stories) -> list[int]:
    return stories.tokenizer.encode("Once upon a time, there was a little girl named Lily. She loved to play")


def _tokens(outs) -> list[list[int]]:
    return [c.token_ids for o in outs for c in o.outputs]


@pytest.mark.timeout(30)
def test_seeded_sampling_is_reproducible(stories, story_prompt):
    params = SamplingParams(temperature=0.9, top_p=0.95, top_k=50, seed=1234, max_tokens=40)
    alone = stories.generate([story_prompt], params)[0].outputs[0].token_ids
    # The same seed inside a batch of other (seeded and unseeded) requests, arriving a few steps late.
    others = [
        SamplingParams(temperature=1.0, max_tokens=40),
        SamplingParams(temperature=0.7, seed=99, max_tokens=40),
    ]
    batched = stories.generate(
        [story_prompt, story_prompt[:5], story_prompt],
        [others[0], others[1], params],
        arrival_steps=[0, 0, 3],
    )
    assert batched[2].outputs[0].token_ids == alone
    other_seed = stories.generate([story_prompt], replace(params, seed=1235))
    assert other_seed[0].outputs[0].token_ids != alone


@pytest.mark.timeout(30)
def test_n_choices(stories, story_prompt):
    out = stories.generate([story_prompt], SamplingParams(n=4, temperature=1.0, seed=7, max_tokens=24))[0]
    assert [c.index for c in out.outputs] == [0, 1, 2, 3]
    assert all(len(c.token_ids) == 24 and c.finish_reason == "length" for c in out.outputs)
    assert len({tuple(c.token_ids) for c in out.outputs}) >= 3, "the n samples should differ"
    again = stories.generate([story_prompt], SamplingParams(n=4, temperature=1.0, seed=7, max_tokens=24))[0]
    assert _tokens([again]) == _tokens([out])
    greedy = stories.generate([story_prompt], SamplingParams(n=3, temperature=0.0, max_tokens=16))[0]
    assert len(greedy.outputs) == 3 and len({tuple(c.token_ids) for c in greedy.outputs}) == 1


@pytest.mark.timeout(30)
def test_exact_lengths_around_eos(stories, story_prompt):
    """EOS pushed to the top with logit_bias: it ends the output at once, unless ignore_eos (then max_tokens is
    exact) or min_tokens (then EOS is held back exactly that long)."""
    eos = min(stories.eos_token_ids)
    bias = {eos: 50.0}
    stop_now = stories.generate(
        [story_prompt], SamplingParams(temperature=0.0, logit_bias=bias, max_tokens=30)
    )
    assert stop_now[0].outputs[0].token_ids == [eos] and stop_now[0].outputs[0].finish_reason == "stop"

    ignored = stories.generate(
        [story_prompt], SamplingParams(temperature=0.0, logit_bias=bias, max_tokens=23, ignore_eos=True)
    )[0].outputs[0]
    assert len(ignored.token_ids) == 23 and ignored.finish_reason == "length"

    held = stories.generate(
        [story_prompt], SamplingParams(temperature=0.0, logit_bias=bias, min_tokens=12, max_tokens=30)
    )[0].outputs[0]
    assert len(held.token_ids) == 13 and held.finish_reason == "stop"
    assert eos not in held.token_ids[:12] and held.token_ids[12] == eos

    # No bias: greedy continues to exactly max_tokens when EOS is ignored.
    exact = stories.generate([story_prompt], SamplingParams(max_tokens=57, **GREEDY))[0].outputs[0]
    assert len(exact.token_ids) == 57 and exact.finish_reason == "length"


STORY_ENDING = (
    "Tim learned to share his toys. From that day on, Tim and his friends played together every day. "
    "They were all very happy."
)


@pytest.mark.timeout(60)
def test_min_tokens_runs_past_a_natural_stop(stories):
    """stories260K (a llama2.c TinyStories model) never emits EOS: it ends a story by starting the next one with
    BOS. With BOS as a stop token and a prompt that finishes a story, find a seeded sample that stops, then ask
    for 20 tokens more than it had: min_tokens must keep it going past the stop, with the same tokens up to
    there (the same seeded draws; only the stop token is masked)."""
    bos = stories.tokenizer.bos_token_id
    prompt = stories.tokenizer.encode(STORY_ENDING)
    seeds = list(range(32))
    outs = stories.generate(
        [prompt] * len(seeds),
        [SamplingParams(temperature=1.0, seed=s, max_tokens=200, stop_token_ids=[bos]) for s in seeds],
    )
    stopped = [
        (s, o.outputs[0]) for s, o in zip(seeds, outs, strict=True) if o.outputs[0].finish_reason == "stop"
    ]
    assert stopped, "no seeded story reached its end within 200 tokens"
    seed, short = min(stopped, key=lambda x: len(x[1].token_ids))
    assert short.token_ids[-1] == bos and short.stop_reason == bos
    k = len(short.token_ids)
    params = SamplingParams(
        temperature=1.0, seed=seed, max_tokens=k + 20, stop_token_ids=[bos], min_tokens=k + 20
    )
    longer = stories.generate([prompt], params)[0].outputs[0]
    print(f"seed {seed}: stops after {k} tokens; with min_tokens={k + 20}: {len(longer.token_ids)} tokens")
    assert len(longer.token_ids) == k + 20 and longer.finish_reason == "length"
    assert bos not in longer.token_ids
    assert longer.token_ids[: k - 1] == short.token_ids[:-1]
    assert longer.token_ids[k - 1] != bos


@pytest.mark.timeout(60)
def test_prompt_logprobs_match_transformers(stories, stories_ref):
    text = " ".join(["Tom and Sue went to the park to play on the swings."] * 3) + " They were very happy."
    prompt = stories.tokenizer.encode(text)
    assert len(prompt) > 64  # more than one prefill chunk
    # Cache the prompt first: prompt logprobs must still cover every position.
    stories.generate([prompt], SamplingParams(max_tokens=1))
    out = stories.generate([prompt], SamplingParams(max_tokens=1, prompt_logprobs=5))[0]
    lps = out.prompt_logprobs
    assert len(lps) == len(prompt) and lps[0] is None
    ref = torch.log_softmax(stories_ref.logits(prompt), dim=-1)
    worst = 0.0
    for pos in range(1, len(prompt)):
        entry, want = lps[pos], ref[pos - 1]
        assert prompt[pos] in entry
        top = want.topk(5)
        # The five most likely tokens, in order (unless the reference has a near-tie among them).
        ours_top = list(entry)[:5]
        if ours_top != top.indices.tolist():
            assert torch.allclose(want[ours_top], top.values, atol=1e-4), (
                pos,
                ours_top,
                top.indices.tolist(),
            )
        worst = max(worst, max(abs(v - float(want[t])) for t, v in entry.items()))
    print(f"stories260K prompt logprobs: max |diff| {worst:.2e} over {len(prompt) - 1} positions")
    assert worst < 1e-4
    # The loglikelihood lm-eval computes from them.
    ours_ll = sum(lps[pos][prompt[pos]] for pos in range(1, len(prompt)))
    want_ll = float(ref[torch.arange(len(prompt) - 1), torch.tensor(prompt[1:])].sum())
    assert abs(ours_ll - want_ll) < 1e-3


@pytest.mark.timeout(60)
def test_sampled_logprobs_match_transformers(tiny_model_dirs, test_prompts):
    """Per-token logprobs of a greedy generation on a tiny Qwen2 (chunked prefill of a ~300-token prompt)."""
    d = tiny_model_dirs["qwen2"]
    engine = make_engine(d, kv_tokens=2048, max_model_len=512, max_num_batched_tokens=40)
    prompt = test_prompts["long"]
    out = engine.generate([prompt], SamplingParams(max_tokens=16, logprobs=3, prompt_logprobs=2, **GREEDY))[0]
    ref = Reference.load(d)
    tokens = out.outputs[0].token_ids
    want = torch.log_softmax(ref.logits(prompt + tokens[:-1]), dim=-1)
    lp = out.outputs[0].logprobs
    assert len(lp) == len(tokens)
    for i, (token, entry) in enumerate(zip(tokens, lp, strict=True)):
        row = want[len(prompt) - 1 + i]
        assert token in entry and len(entry) == 3
        assert all(abs(v - float(row[t])) < 1e-4 for t, v in entry.items()), i
    plp = out.prompt_logprobs
    assert len(plp) == len(prompt)
    diff = max(abs(v - float(want[pos - 1, t])) for pos in range(1, len(prompt)) for t, v in plp[pos].items())
    assert diff < 1e-4


@pytest.mark.timeout(30)
def test_request_timestamps_are_ordered_and_per_token(stories, story_prompt):
    """RequestOutput.metrics carries the engine's own times (metrics and traces are built from them):
    arrival <= first scheduled <= first token <= finished, one sampling time per output token, in order,
    and a share of step time for every choice."""
    arrival = time.monotonic() - 0.25  # the HTTP request arrived a while before the engine saw it
    stories.add_request("timed", story_prompt, SamplingParams(n=2, max_tokens=6, ignore_eos=True), arrival)
    outs = []
    while stories.has_unfinished():
        outs.extend(stories.step())
    last = outs[-1]
    m = last.metrics
    assert last.finished and m["arrival_time"] == arrival
    assert arrival < m["first_scheduled_time"] <= m["first_token_time"] <= m["finished_time"]
    for choice in last.outputs:
        assert len(choice.token_times) == len(choice.token_ids) == 6
        assert choice.token_times == sorted(choice.token_times)
        assert m["first_token_time"] <= choice.token_times[0] and choice.token_times[-1] <= m["finished_time"]
    assert 0 < m["busy_seconds"] <= m["finished_time"] - m["first_scheduled_time"]
    first_output = outs[0]
    assert first_output.metrics["finished_time"] is None


@pytest.mark.timeout(30)
def test_cache_salt_isolates_prefix_cache_blocks(stories, story_prompt):
    """Requests share prefix-cache blocks only with requests of the same cache_salt (vLLM's field)."""
    prompt = list(range(100, 140))  # two full blocks of 16 and a rest, used by no other test
    params = SamplingParams(max_tokens=2, temperature=0)

    def cached(salt: str | None) -> int:
        rid = f"salt-{salt}-{time.monotonic_ns()}"
        stories.add_request(rid, prompt, params, cache_salt=salt)
        while stories.has_unfinished():
            for out in stories.step():
                if out.request_id == rid and out.finished:
                    return out.num_cached_tokens
        raise AssertionError("the request did not finish")

    assert cached("tenant-a") == 0
    assert cached("tenant-a") == 32  # the same tenant reuses its own blocks
    assert cached("tenant-b") == 0  # another tenant: same tokens, no shared blocks
    assert cached(None) == 0 and cached(None) == 32


def test_prefix_block_hashes_are_sha256_chained_from_the_salt():
    from shoal.engine.block_manager import chain_hash, root_hash

    block = tuple(range(16))
    h = chain_hash(root_hash(None), block)
    assert len(h) == 32 and h == chain_hash(b"", block)
    assert h != chain_hash(root_hash("a"), block) != chain_hash(root_hash("b"), block)
    assert chain_hash(h, block) != h


@pytest.mark.timeout(30)
def test_fcfs_refuses_a_priority_it_would_ignore(stories, story_prompt):
    with pytest.raises(ValueError, match="--scheduling-policy priority"):
        stories.add_request("prio", story_prompt, SamplingParams(max_tokens=2), priority=-1)
