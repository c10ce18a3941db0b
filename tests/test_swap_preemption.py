"""Swap preemption (--preemption-mode swap): KV blocks go to the host pool and back, tokens unchanged.

stories260K (a real 260K-parameter Llama) with a KV cache a third of what 12 concurrent requests need, so
the scheduler must preempt: with swap, the same greedy tokens as with recompute and as with a cache large
enough for no preemption at all, and the counters (engine stats and the /metrics collector) show the
swaps. A host pool too small for any victim falls back to recompute. About 5 s.
"""

from __future__ import annotations

import pytest
from tiny_models import make_engine

from shoal import metric_names as mn
from shoal.engine.sampling_params import SamplingParams
from shoal.engine.scheduler import Scheduler
from shoal.engine.swap_space import SwapSpace

NUM_REQUESTS = 12
NEW_TOKENS = 48
MAX_LEN = 256
BLOCK = 16
CONFIG = dict(max_model_len=MAX_LEN, max_num_batched_tokens=64)


@pytest.fixture(scope="module")
def prompts(stories_dir) -> list[list[int]]:
    from shoal.model.tokenizer import Tokenizer

    text = (
        "Once upon a time, there was a little girl named Lily. She loved to play in the park with her dog. "
    )
    base = Tokenizer(stories_dir).encode(text * 4)
    return [base[i * 3 : i * 3 + 20 + (i * 7) % 40] for i in range(NUM_REQUESTS)]


@pytest.fixture(scope="module")
def params() -> SamplingParams:
    return SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def small_kv(prompts) -> int:
    need = sum(-(-(len(p) + NEW_TOKENS) // BLOCK) for p in prompts) * BLOCK
    return max(need // 3 // BLOCK * BLOCK, MAX_LEN)


def _run(stories_dir, prompts, params, kv_tokens, **config):
    engine = make_engine(stories_dir, kv_tokens=kv_tokens, **CONFIG, **config)
    outs = engine.generate(prompts, params)
    engine.refresh_stats()
    return engine, [o.outputs[0].token_ids for o in outs]


@pytest.fixture(scope="module")
def reference(stories_dir, prompts, params):
    """Tokens with a cache that holds everything (no preemption)."""
    engine, tokens = _run(stories_dir, prompts, params, kv_tokens=16384)
    assert engine.stats.num_preemptions == 0
    return tokens


@pytest.mark.timeout(60)
def test_swap_gives_the_tokens_of_recompute_and_of_no_preemption(
    stories_dir, prompts, params, small_kv, reference
):
    recompute, recompute_tokens = _run(stories_dir, prompts, params, small_kv)
    swap, swap_tokens = _run(stories_dir, prompts, params, small_kv, preemption_mode="swap", swap_space=0.01)
    s = swap.stats
    print(
        f"KV {small_kv} tokens; recompute: {recompute.stats.num_preemptions} preemptions; swap: "
        f"{s.num_preemptions} preemptions, {s.num_swapped_out} swap-outs, {s.num_swapped_in} swap-ins"
    )
    assert recompute.stats.num_preemptions > 0 and recompute.stats.num_swapped_out == 0
    assert s.num_swapped_out >= 1 and s.num_swapped_in >= 1
    assert s.num_swapped_in == s.num_swapped_out == s.num_preemptions  # every victim swapped, none lost
    assert s.num_swapped == 0 and s.swap_usage == 0.0  # all back by the end
    assert swap_tokens == recompute_tokens == reference
    assert all(len(t) == NEW_TOKENS for t in swap_tokens)


@pytest.mark.timeout(60)
def test_a_full_host_pool_falls_back_to_recompute(stories_dir, prompts, params, small_kv, reference):
    """A pool of one block cannot hold any victim (each has computed more than 16 tokens): recompute."""
    from shoal.engine.model_runner import ModelRunner
    from shoal.model.config import load_config

    one_block = ModelRunner.kv_bytes_per_block(load_config(stories_dir), BLOCK, __import__("torch").float32)
    engine, tokens = _run(
        stories_dir, prompts, params, small_kv, preemption_mode="swap", swap_space=one_block / 2**30
    )
    assert engine.scheduler.swap.num_blocks == 1
    assert engine.stats.num_preemptions > 0 and engine.stats.num_swapped_out == 0
    assert tokens == reference


@pytest.mark.timeout(30)
def test_swap_counters_are_exported(stories_dir, prompts, params, small_kv):
    """The metrics collector turns the engine's swap counters into vllm:num_requests_swapped and
    shoal:num_swapped_{out,in}_total."""
    pytest.importorskip("prometheus_client")
    from shoal.server.metrics_collectors import EngineStatsCollector

    engine, _ = _run(stories_dir, prompts[:8], params, small_kv, preemption_mode="swap", swap_space=0.01)
    samples = {
        s.name: s.value for family in EngineStatsCollector(engine, "m").collect() for s in family.samples
    }
    assert samples[mn.SWAPPED_OUT] == engine.stats.num_swapped_out >= 1
    assert samples[mn.SWAPPED_IN] == engine.stats.num_swapped_in >= 1
    assert samples[mn.NUM_REQUESTS_SWAPPED] == 0
    assert samples[mn.CPU_CACHE_USAGE] == 0.0


@pytest.mark.timeout(10)
def test_aborting_a_swapped_sequence_frees_its_host_blocks():
    """Scheduler-level: a victim swapped out and then removed gives its host blocks back."""
    from shoal.engine.block_manager import BlockManager
    from shoal.engine.sequence import Sequence, Status

    blocks = BlockManager(num_blocks=5, block_size=4)
    sched = Scheduler(blocks, max_num_seqs=4, max_num_batched_tokens=64, swap_space=SwapSpace(8))
    a, b = (Sequence(r, 0, list(range(8)), SamplingParams(max_tokens=8)) for r in ("a", "b"))
    sched.add(a)
    sched.add(b)
    batch = sched.schedule()  # both prompts: 2 blocks each, one left
    assert len(batch.seqs) == 2
    for seq, n in zip(batch.seqs, batch.num_tokens, strict=True):
        seq.num_computed += n
        seq.token_ids.append(1)
    batch = sched.schedule()  # each needs a third block: a takes the last, b (the newest) is swapped out
    assert b.status is Status.SWAPPED and batch.swap_out and len(batch.swap_out) == 2
    assert sched.swap.num_free == 6
    sched.remove(b)
    assert sched.swap.num_free == 8 and not sched.swapped


@pytest.mark.timeout(10)
def test_a_seat_taken_for_an_urgent_request_is_recomputed_not_swapped():
    """Under `priority`, a running sequence preempted for its seat goes back to waiting (a swapped one
    would block the admission its seat was freed for); the urgent request runs in the same step."""
    from shoal.engine.block_manager import BlockManager
    from shoal.engine.sequence import Sequence, Status

    sched = Scheduler(
        BlockManager(num_blocks=16, block_size=4),
        max_num_seqs=1,
        max_num_batched_tokens=64,
        policy="priority",
        swap_space=SwapSpace(16),
    )
    low = Sequence("low", 0, list(range(8)), SamplingParams(max_tokens=8), priority=10)
    sched.add(low)
    batch = sched.schedule()
    low.num_computed += batch.num_tokens[0]
    low.token_ids.append(1)
    urgent = Sequence("urgent", 0, list(range(8)), SamplingParams(max_tokens=8), priority=0)
    sched.add(urgent)
    batch = sched.schedule()
    assert batch.seqs == [urgent] and batch.preempted == [low]
    assert low.status is Status.WAITING and not batch.swap_out and sched.num_swapped_out == 0


@pytest.mark.timeout(10)
@pytest.mark.parametrize(
    "fields",
    [
        {"preemption_mode": "evict"},
        {"swap_space": -1.0},
        {"preemption_mode": "swap", "tensor_parallel_size": 2},
        {"deterministic": True, "tensor_parallel_size": 2},
        {"deterministic": True, "compile": True},
    ],
)
def test_config_refuses_what_it_cannot_do(fields):
    from shoal.engine.config import EngineConfig

    with pytest.raises(ValueError, match="|".join(k for k in fields if k != "tensor_parallel_size")):
        EngineConfig(model="m", **fields).validate()
