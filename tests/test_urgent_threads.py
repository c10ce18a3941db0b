"""Urgent steps on more CPU threads (EngineConfig.urgent_threads, `--urgent-threads`): under the priority
policy, the step that computes a premium prompt toward its first token runs its forward on
urgent_threads, every other step on the engine's threads; asserted on each step's record (StepStats.threads
and who it ran), in process on stories260K, never on time."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from shoal.cli import app as shoal_cli
from shoal.engine.config import EngineConfig
from shoal.engine.interrupt import StepInterrupted
from shoal.engine.llm_engine import LLMEngine
from shoal.engine.sampling_params import SamplingParams
from shoal.engine.stats import StepStats
from shoal.kernels import torch_threads

pytestmark = pytest.mark.timeout(60)

STANDARD = ([1, 403, 407, 261, 378], [1, 207, 28, 90])
PREMIUM = [1, 300, 301, 302, 303, 304]


@pytest.fixture
def one_thread():
    """The engine's own threads are 1 for the test (restored after), so that 2 is visibly more."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _engine(stories_dir, **kw) -> LLMEngine:
    config = dict(model=str(stories_dir), dtype="float32", device="cpu", kv_cache_memory=16 << 20)
    return LLMEngine(EngineConfig(**config, max_num_seqs=8, record_schedule=True, **kw))


def _run(engine: LLMEngine, premium_priority: int = 0) -> tuple[list[StepStats], list[int]]:
    """Two standard requests (priority 10) start; after their first two steps a premium one arrives;
    every step until all end. Returns the steps' records and the premium request's tokens."""
    steps: list[StepStats] = []
    engine.step_listeners.append(steps.append)
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    for i, prompt in enumerate(STANDARD):
        engine.add_request(f"standard-{i}", prompt, params, priority=10)
    engine.step(), engine.step()
    engine.add_request("premium", PREMIUM, params, priority=premium_priority)
    tokens: list[int] = []
    while engine.has_unfinished():
        for out in engine.step():
            if out.request_id == "premium" and out.finished:
                tokens = out.outputs[0].token_ids
    engine.step_listeners.remove(steps.append)
    return steps, tokens


def _admitting(steps: list[StepStats], request_id: str) -> StepStats:
    return next(s for s in steps if any(row[0] == request_id for row in s.admitted))


def test_the_premium_prompt_step_runs_on_urgent_threads_and_every_other_step_on_the_engines(
    stories_dir, one_thread
):
    steps, tokens = _run(_engine(stories_dir, scheduling_policy="priority", urgent_threads=2))
    urgent = _admitting(steps, "premium")
    assert urgent.threads == 2
    assert urgent.batch_size == 1  # the standard decodes sat it out: a step of premium rows only
    others = [s for s in steps if s is not urgent]
    assert len(others) >= 6 and {s.threads for s in others} == {1}
    assert torch.get_num_threads() == 1
    # The same greedy tokens as on an engine that never changes its threads.
    _, plain_tokens = _run(_engine(stories_dir, scheduling_policy="priority"))
    assert tokens == plain_tokens and len(tokens) == 6


def test_a_prompt_less_urgent_than_urgent_priority_keeps_the_engines_threads(stories_dir, one_thread):
    engine = _engine(stories_dir, scheduling_policy="priority", urgent_threads=2, urgent_priority=-1)
    steps, _ = _run(engine, premium_priority=0)
    assert _admitting(steps, "premium").batch_size == 1  # still a step of its own (priority), but
    assert {s.threads for s in steps} == {1}  # not urgent enough for more threads


def test_threads_are_restored_when_the_step_is_interrupted(one_thread):
    with pytest.raises(StepInterrupted), torch_threads(2):
        assert torch.get_num_threads() == 2
        raise StepInterrupted("a more urgent arrival")
    assert torch.get_num_threads() == 1
    with torch_threads(None):
        assert torch.get_num_threads() == 1


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"urgent_threads": 0}, "urgent_threads must be positive"),
        ({"urgent_threads": 2}, "scheduling_policy fcfs"),
        ({"urgent_threads": 2, "scheduling_policy": "priority", "device": "cuda"}, "device cuda"),
        (
            {"urgent_threads": 2, "scheduling_policy": "priority", "tensor_parallel_size": 2},
            "tensor_parallel",
        ),
        ({"urgent_threads": 2, "scheduling_policy": "priority", "deterministic": True}, "deterministic"),
    ],
)
def test_urgent_threads_refuses_what_it_cannot_serve(settings, message):
    with pytest.raises(ValueError, match=message):
        EngineConfig(model="m", **settings).validate()


def test_serve_flag_without_the_priority_policy_fails_before_loading(stories_dir):
    out = CliRunner().invoke(shoal_cli, ["serve", "--model", str(stories_dir), "--urgent-threads", "2"])
    assert out.exit_code == 2
    assert "urgent_threads cannot be combined with scheduling_policy fcfs" in out.output
