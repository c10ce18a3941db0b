"""Tensor parallelism on CPU (gloo, 2 processes) gives the tokens of one process.

1. Greedy parity: an engine with tensor_parallel_size=2 (this process as rank 0, one worker process)
   generates, for several prompts arriving staggered (so steps mix prompt chunks and decodes), the greedy
   tokens of a tensor_parallel_size=1 engine, on stories260K (8 heads, 4 KV heads) and on the tiny random
   Llama (4 heads, 2 KV heads, biases on every linear: the row-parallel bias must be added once). The
   near-tie rule of test_model_parity applies with the TP=1 engine as the reference: every TP=2 token is
   TP=1's argmax teacher-forced on TP=2's own prefix, or within twice the measured max |logit diff|
   between the two engines (tiny_models.check_greedy / tie_margin).
2. A model whose head counts N does not divide is a ValueError naming both numbers, raised before any
   worker process starts; so are quantized checkpoints, --compile and --load-format mmap.
3. Workers stop cleanly with engine.close() (exit code 0) and die with rank 0 when it is killed; a dead
   worker fails the step with an error naming it (no hang).
4. `shoal serve --tensor-parallel-size 2` starts and answers a request.
5. The parallel layers on their own (two ranks on two threads of this process, a real gloo group): a
   vocabulary that 2 does not divide (the last shard padded), and a row-parallel bias added once.
6. A rank's share may be one head: Qwen3's q/k norms then run on it correctly.

Cost: about 18 s of CPU for all but the server test (one worker process per TP=2 engine, two engines), and
a stories260K server with one worker for that one; wall time grows with the machine's load, since each
collective waits for both processes to get a core.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch
from tiny_models import check_greedy, make_engine, tie_margin

from shoal.engine.config import EngineConfig
from shoal.engine.llm_engine import LLMEngine
from shoal.engine.sampling_params import SamplingParams
from shoal.kernels import fused_ops
from shoal.model.config import load_config
from shoal.model.tensor_parallel import (
    ParallelLMHead,
    RowParallelLinear,
    VocabParallelEmbedding,
    check_tensor_parallel,
    shard,
)
from shoal.model.tokenizer import Tokenizer
from shoal.model.tp_group import TPGroup, join_store, serve_store
from shoal.model.transformer import Attention, RotaryEmbedding

try:
    from server_fixture import launch_own_server, wait_ready
except ImportError:
    from tests.server_fixture import launch_own_server, wait_ready

NEW_TOKENS = 24
STAGGER = [0, 1, 3, 6]
STORIES_TEXTS = (
    "Once upon a time, there was a little girl named Lily. She loved to play outside in the park.",
    "Tom had a big red ball.",
    "One day, a cat and a dog went to the forest to find a tree with apples. The dog was happy and",
    "The sun was hot.",
)
ENGINE_ARGS = dict(kv_tokens=2048, max_model_len=512, max_num_batched_tokens=24)


class EngineReference:
    """tiny_models.Reference's interface over a shoal engine: teacher-forced logits of the TP=1 engine."""

    def __init__(self, engine: LLMEngine):
        self.engine, self.checked = engine, {}

    def logits(self, token_ids: list[int]):
        return self.engine.prompt_logits(token_ids)


def _prompts(name: str, stories_dir: Path, test_prompts: dict[str, list[int]]) -> list[list[int]]:
    if name == "stories":
        tok = Tokenizer(stories_dir)
        return [tok.encode(t) for t in STORIES_TEXTS]
    return [test_prompts[label] for label in ("short", "french", "code", "chat")]


def _greedy(engine: LLMEngine, prompts: list[list[int]]) -> list[list[int]]:
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    return [o.outputs[0].token_ids for o in engine.generate(prompts, params, arrival_steps=STAGGER)]


class Engines:
    """name -> (TP=1 engine, TP=2 engine), built on first use, once per module; TP=2 ones closed at the end."""

    def __init__(self, dirs: dict[str, Path]):
        self.dirs, self.built = dirs, {}

    def __getitem__(self, name: str) -> tuple[LLMEngine, LLMEngine]:
        if name not in self.built:
            one = make_engine(self.dirs[name], **ENGINE_ARGS)
            self.built[name] = one, make_engine(self.dirs[name], tensor_parallel_size=2, **ENGINE_ARGS)
        return self.built[name]


@pytest.fixture(scope="module")
def engines(stories_dir, tiny_model_dirs):
    pairs = Engines({"stories": stories_dir, "llama3": tiny_model_dirs["llama3"]})
    yield pairs
    for _, two in pairs.built.values():
        two.close()


@pytest.mark.timeout(90)
@pytest.mark.parametrize("name", ["stories", "llama3"])
def test_tp2_greedy_tokens_match_tp1(name, engines, stories_dir, test_prompts):
    prompts = _prompts(name, stories_dir, test_prompts)
    one, two = engines[name]
    # The worker holds half of every layer: half the heads, half the KV heads in its cache.
    assert two.runner.kv_caches[0][0].shape[1] == one.runner.kv_caches[0][0].shape[1] // 2
    diff = max(float((two.prompt_logits(p) - one.prompt_logits(p)).abs().max()) for p in prompts)
    margin = tie_margin(diff)
    outputs = _greedy(two, prompts)
    ref = EngineReference(one)
    ties = [
        t for p, out in zip(prompts, outputs, strict=True) for t in check_greedy(ref, p, out, margin, name)
    ]
    print(f"{name}: max |logit diff| TP=2 vs TP=1 {diff:.2e}, near-ties {len(ties)}")
    if not ties:
        assert outputs == _greedy(one, prompts)


@pytest.mark.timeout(60)
def test_workers_stop_cleanly_on_close(engines):
    _, two = engines["llama3"]
    two.close()
    assert [p.returncode for p in two.workers.procs] == [0], "workers must leave their loop and exit 0"
    two.close()  # idempotent


@pytest.mark.timeout(60)
def test_a_dead_worker_fails_the_step_with_a_clear_error(engines):
    _, two = engines["stories"]
    (worker,) = two.workers.procs
    worker.kill()
    worker.wait()
    params = SamplingParams(temperature=0.0, max_tokens=4)
    for _ in range(2):  # and again: no hang, the same clear error
        with pytest.raises(RuntimeError, match=r"worker of rank 1 \(pid \d+\) is gone"):
            two.generate([[1, 5, 6]], params)
        two.abort_all(RuntimeError("test"))


@pytest.mark.timeout(30)
def test_indivisible_head_counts_are_a_clear_error_before_any_worker(stories_dir, monkeypatch):
    spawned = []
    monkeypatch.setattr("shoal.engine.tp_worker._spawn", lambda *a: spawned.append(a))
    with pytest.raises(ValueError, match=r"tensor_parallel_size=3 .*num_attention_heads=8"):
        LLMEngine(EngineConfig(model=str(stories_dir), tensor_parallel_size=3, kv_cache_memory=1 << 20))
    with pytest.raises(ValueError, match=r"tensor_parallel_size=8 .*num_key_value_heads=4"):
        LLMEngine(EngineConfig(model=str(stories_dir), tensor_parallel_size=8, kv_cache_memory=1 << 20))
    assert spawned == []


def test_unsupported_combinations_are_clear_errors(stories_dir):
    cfg = load_config(stories_dir)
    with pytest.raises(ValueError, match="quantized checkpoints .* not supported with tensor parallelism"):
        check_tensor_parallel(dataclasses.replace(cfg, quantization=object()), 2)
    for flags in ({"compile": True}, {"load_format": "mmap"}):
        with pytest.raises(ValueError, match="not supported with tensor_parallel_size > 1"):
            EngineConfig(model="m", tensor_parallel_size=2, **flags).validate()
    with pytest.raises(ValueError, match="tensor_parallel_size must be positive"):
        EngineConfig(model="m", tensor_parallel_size=0).validate()


def _on_two_ranks(fn) -> dict:
    """fn(group) on ranks 0 and 1 of one gloo group, one thread each; {rank: result}."""
    store = serve_store(2)
    results, errors = {}, []

    def run(rank: int) -> None:
        try:
            rank_store = store if rank == 0 else join_store(store.port, 2)
            group = TPGroup(rank_store, rank, 2, torch.device("cpu"))
            with torch.no_grad():
                results[rank] = fn(group)
        except Exception as e:  # noqa: BLE001 - re-raised in the test's thread
            errors.append(e)

    threads = [threading.Thread(target=run, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    if errors:
        raise errors[0]
    return results


@pytest.mark.timeout(60)
def test_parallel_layers_match_whole_ones_with_padded_vocab_and_bias():
    vocab, hidden, features = 7, 5, 6  # 7 rows over 2 ranks: shards of 4, the last one padded
    embedding, head_x = torch.randn(vocab, hidden), torch.randn(3, hidden)
    ids = torch.tensor([0, 3, 4, 6, 2])
    down, bias, x = torch.randn(hidden, features), torch.randn(hidden), torch.randn(3, features)

    def layers(group: TPGroup):
        rank = group.rank
        rows = shard("embed_tokens.weight", embedding, rank, 2)
        embed = torch.nn.Embedding(*rows.shape, _weight=rows)
        lm_head = torch.nn.Linear(hidden, rows.shape[0], bias=False)
        lm_head.weight = embed.weight  # tied, as the loader leaves them
        linear = torch.nn.Linear(features // 2, hidden)
        linear.weight.copy_(shard("layers.0.mlp.down_proj.weight", down, rank, 2))
        linear.bias.copy_(shard("layers.0.mlp.down_proj.bias", bias, rank, 2))
        mine = x[:, rank * features // 2 : (rank + 1) * features // 2]
        return (
            VocabParallelEmbedding(embed, group)(ids),
            ParallelLMHead(lm_head, group, vocab)(head_x),
            RowParallelLinear(linear, group)(mine),
        )

    for rank, (emb, logits, y) in _on_two_ranks(layers).items():
        torch.testing.assert_close(emb, embedding[ids], msg=f"rank {rank} embeddings")
        torch.testing.assert_close(logits, head_x @ embedding.T, msg=f"rank {rank} logits")
        torch.testing.assert_close(y, x @ down.T + bias, msg=f"rank {rank} row-parallel output")


@pytest.mark.timeout(30)
def test_qk_norm_with_one_head_per_rank_matches_pytorch(stories_dir):
    """A rank's share may be a single (KV) head: Qwen3's q/k norms on the fused kernels must then see the
    head's rows as a contiguous tensor (a strided view of qkv was refused), and agree with the PyTorch path."""
    if not fused_ops.supported(torch.device("cpu"), torch.float32):
        pytest.skip("fused kernels unavailable here")
    cfg = dataclasses.replace(load_config(stories_dir), num_heads=1, num_kv_heads=1, qk_norm=True)
    attn = Attention(cfg, None)
    torch.nn.init.normal_(attn.q_norm.weight)
    torch.nn.init.normal_(attn.k_norm.weight)
    rope = RotaryEmbedding(cfg.head_dim, 64, cfg.rope_theta, None)
    positions = torch.arange(3, 8)
    qkv = torch.randn(5, 3 * cfg.head_dim)
    native = attn._qkv_native(qkv.clone(), rope.cos_sin_cache.index_select(0, positions))
    plain = attn._qkv(qkv, rope.cos_sin(positions, torch.float32))
    for ours, theirs in zip(native, plain, strict=True):
        torch.testing.assert_close(ours, theirs)


def _children(pid: int) -> list[int]:
    kids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rpartition(")")[2].split()[1]) == pid:
                kids.append(int(entry.name))
    return kids


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.timeout(200)  # a loaded 2-core box: three processes importing torch, all slow to start
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds the worker process through /proc")
def test_serve_with_tensor_parallel_answers_and_workers_die_with_the_engine():
    server = launch_own_server("tp2", ["--tensor-parallel-size", "2"])
    wait_ready(server)
    r = httpx.post(
        f"{server.url}/v1/completions",
        json={"model": server.model, "prompt": "Once upon a time", "max_tokens": 8, "temperature": 0},
        timeout=90,
    )
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"]
    (core,) = [p for p in _children(server.proc.pid) if "spawn_main" in _cmdline(p)]
    (worker,) = [p for p in _children(core) if "shoal.engine.tp_worker" in _cmdline(p)]
    os.kill(core, signal.SIGKILL)  # rank 0 dies without a word: its worker must not outlive it
    deadline = time.monotonic() + 10
    while _alive(worker) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(worker), "the worker outlived its engine"
    server.proc.terminate()
    server.proc.wait(timeout=30)
