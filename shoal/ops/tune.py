"""`shoal tune`: the tuning process of the seed (Q6), automated with in-process engine benchmarks.

1. Start from the defaults: one run with the engine's default flags and the KV budget (on CPU
   `--kv-cache-memory`, else what the defaults give; on CUDA `--gpu-memory-utilization`), which every later
   run keeps, so that only the batch changes.
2. Raise `max_num_seqs` (1, 2, 4, ... then a bisection) until the KV cache is exhausted at the load. It is
   detected, not crashed into: a full cache makes the scheduler preempt sequences (the count behind
   `vllm:num_preemptions_total`), and a budget too small for one sequence is an error the engine raises
   before it starts; both are recorded as a row. The choice is the largest `max_num_seqs` with zero
   preemptions, confirmed by a rerun on a fresh engine.
3. Choose `max_num_batched_tokens` (the token budget of one step: prefill chunks plus decodes) for the
   target TTFT and TPOT: of the sizes whose P95s meet both targets without preemptions, the one with the
   highest output tokens/s; if none meets them, the one closest (the smallest worst ratio to a target).
   The TTFT judged here is the prefill part, from a request's first step to its first token: the budget
   sets it (bigger chunks, fewer steps), while the time spent waiting for a free sequence slot belongs to
   the load, which replicas fix (docs/operations/autoscaling.md). The table shows both.
4. Choose the memory share for stability: on CPU, `kv_cache_memory` = the peak KV blocks the chosen flags
   used, plus `headroom` (20%: longer requests, prefix-cache blocks), at most the budget, confirmed by a
   run without preemptions (else the budget). On CUDA the share stays the given `gpu_memory_utilization`.

The load: `num_prompts` requests of `input_len` random prompt tokens and `output_len` output tokens (EOS
ignored, greedy), all arriving at once, so the batch is what the flags allow. Timings are wall-clock
P95s of one run each (the machine's other load shows in them); the preemption counts are exact and
repeatable, since the scheduler is deterministic for a fixed load.
"""

from __future__ import annotations

import math
import random
import shlex
import time
from collections.abc import Callable
from dataclasses import dataclass, field

HEADROOM = 0.2


@dataclass(frozen=True)
class Load:
    """The benchmark load: requests of fixed lengths (tokens), all at once."""

    num_prompts: int = 64
    input_len: int = 128
    output_len: int = 128
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("num_prompts", "input_len", "output_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")


@dataclass(frozen=True)
class Targets:
    """Latency targets of step 3 (milliseconds, P95)."""

    ttft_ms: float = 2000.0
    tpot_ms: float = 100.0


@dataclass
class Trial:
    """One benchmark run: the flags and what happened. error: why the engine could not run (KV budget
    too small for one sequence), None when it ran."""

    step: str
    flags: dict  # the EngineConfig fields this trial set (the rest: the engine's defaults)
    max_num_seqs: int | None = None  # as the engine resolved them (None: it did not start)
    max_num_batched_tokens: int | None = None
    preemptions: int = 0
    kv_blocks: int = 0
    peak_kv_blocks: int = 0
    kv_bytes: int = 0
    output_tokens_per_s: float = 0.0
    ttft_p95_ms: float = math.nan  # from arrival (vLLM's TTFT: queueing included)
    prefill_p95_ms: float = math.nan  # from first scheduled to first token: what the token budget changes
    tpot_p95_ms: float = math.nan
    error: str | None = None

    @property
    def clean(self) -> bool:
        return self.error is None and self.preemptions == 0


@dataclass
class TuneResult:
    trials: list[Trial]
    recommended: dict  # EngineConfig field -> value
    notes: list[str] = field(default_factory=list)

    def command(self, model: str) -> str:
        """The recommended flags as a `shoal serve` command line (vLLM's flag names)."""
        args = ["shoal", "serve", "--model", model]
        for name, value in self.recommended.items():
            args += ["--" + name.replace("_", "-"), str(value)]
        return shlex.join(args)


Runner = Callable[..., Trial]  # (step, **EngineConfig overrides) -> Trial


def engine_runner(model: str, load: Load, base: dict) -> Runner:
    """A Runner that builds a fresh LLMEngine per trial (base: EngineConfig fields shared by all trials)."""

    def run(step: str, **flags) -> Trial:
        from shoal.bench import workload

        config = {**base, **flags}
        try:
            engine = workload.build_engine(model, **config)
        except (ValueError, MemoryError) as e:  # the KV budget cannot hold one sequence
            return Trial(step, flags, error=str(e))
        return measure(engine, load, step, flags)

    return run


def measure(engine, load: Load, step: str, flags: dict) -> Trial:
    """Run the load to completion on `engine` and record preemptions, KV use and latency P95s."""
    import torch

    from shoal.engine.sampling_params import SamplingParams

    rng = random.Random(load.seed)
    vocab = engine.model_config.vocab_size
    low = min(100, vocab // 4)  # past the special tokens at the start of the vocabulary
    prompts = [[rng.randrange(low, vocab) for _ in range(load.input_len)] for _ in range(load.num_prompts)]
    params = SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=load.output_len)
    peak = [0.0]
    engine.step_listeners.append(lambda s: peak.__setitem__(0, max(peak[0], s.kv_cache_usage)))
    info = engine.describe()
    trial = Trial(
        step,
        flags,
        max_num_seqs=info["max_num_seqs"],
        max_num_batched_tokens=info["max_num_batched_tokens"],
        kv_blocks=info["kv_cache_blocks"],
        kv_bytes=info["kv_cache_bytes"],
    )
    before = engine.scheduler.num_preemptions
    t0 = time.perf_counter()
    try:
        with torch.inference_mode():
            outs = engine.generate(prompts, params)
    except MemoryError as e:  # nothing left to preempt: the cache cannot hold one sequence
        trial.error = str(e)
        return trial
    wall = time.perf_counter() - t0
    trial.preemptions = engine.scheduler.num_preemptions - before
    trial.peak_kv_blocks = round(peak[0] * trial.kv_blocks)
    trial.output_tokens_per_s = load.num_prompts * load.output_len / wall
    ttfts = [o.metrics["first_token_time"] - o.metrics["arrival_time"] for o in outs]
    tpots = [
        (o.metrics["finished_time"] - o.metrics["first_token_time"]) / (load.output_len - 1)
        for o in outs
        if load.output_len > 1
    ]
    prefills = [o.metrics["first_token_time"] - o.metrics["first_scheduled_time"] for o in outs]
    trial.ttft_p95_ms = p95(ttfts) * 1000
    trial.prefill_p95_ms = p95(prefills) * 1000
    trial.tpot_p95_ms = p95(tpots) * 1000 if tpots else math.nan
    return trial


def p95(values: list[float]) -> float:
    """The nearest-rank 95th percentile (the smallest value with 95% of the values at or below it)."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(0.95 * len(ordered)) - 1)]


def tune(run: Runner, load: Load, targets: Targets, on_cuda: bool = False, log=None) -> TuneResult:
    """The four steps; `run` benchmarks one set of flags. Raises RuntimeError when even one sequence at a
    time preempts or does not fit (the budget is too small for the load's lengths)."""
    log = log or (lambda msg: None)
    trials: list[Trial] = []

    def trial(step: str, **flags) -> Trial:
        t = run(step, **flags)
        trials.append(t)
        log(_describe(t))
        return t

    defaults = trial("defaults")
    budget = {} if on_cuda else {"kv_cache_memory": defaults.kv_bytes} if defaults.kv_bytes else {}
    seqs = _max_num_seqs(trial, load, budget)
    confirm = trial("confirm", max_num_seqs=seqs, **budget)
    if not confirm.clean:
        raise RuntimeError(
            f"max_num_seqs={seqs} preempted on the rerun ({confirm.preemptions}): not repeatable"
        )
    notes = []
    if seqs >= load.num_prompts:
        notes.append(
            f"the KV cache held all {load.num_prompts} requests at once: raise --num-prompts to find its limit"
        )
    batched = _batched_tokens(trial, load, targets, seqs, budget, notes)
    recommended = {"max_num_seqs": seqs, "max_num_batched_tokens": batched.flags["max_num_batched_tokens"]}
    if on_cuda:
        notes.append("CUDA: the memory share is kept at the given --gpu-memory-utilization")
    else:
        recommended["kv_cache_memory"] = _kv_memory(trial, batched, recommended, budget)
    return TuneResult(trials, recommended, notes)


def _max_num_seqs(trial, load: Load, budget: dict) -> int:
    """Step 2: double until preemptions (or an error), then bisect; the largest clean count."""
    good, bad, n = 0, None, 1
    while n <= load.num_prompts:
        if trial("raise", max_num_seqs=n, **budget).clean:
            good, n = n, n * 2
        else:
            bad = n
            break
    if good == 0:
        raise RuntimeError("one sequence at a time already preempts or does not fit: raise the KV budget")
    if bad is None:  # never exhausted below the load's size
        if good < load.num_prompts and trial("raise", max_num_seqs=load.num_prompts, **budget).clean:
            return load.num_prompts
        bad = min(good * 2, load.num_prompts)
    while bad - good > 1:
        mid = (good + bad) // 2
        if trial("bisect", max_num_seqs=mid, **budget).clean:
            good = mid
        else:
            bad = mid
    return good


def _batched_tokens(trial, load: Load, targets: Targets, seqs: int, budget: dict, notes: list[str]) -> Trial:
    """Step 3: token budgets from 64 up to what the whole load's prompts need at once (at most 8192)."""
    top = min(8192, 1 << math.ceil(math.log2(max(load.num_prompts * load.input_len, 64))))
    sizes = [1 << k for k in range(6, top.bit_length())]
    runs = [trial("batched", max_num_seqs=seqs, max_num_batched_tokens=b, **budget) for b in sizes]
    clean = [t for t in runs if t.clean]
    if not clean:
        raise RuntimeError("every max_num_batched_tokens preempted at the chosen max_num_seqs")

    def worst(t: Trial) -> float:
        return max(t.prefill_p95_ms / targets.ttft_ms, t.tpot_p95_ms / targets.tpot_ms)

    meeting = [t for t in clean if worst(t) <= 1.0]
    if meeting:
        return max(meeting, key=lambda t: t.output_tokens_per_s)
    best = min(clean, key=worst)
    notes.append(
        f"no max_num_batched_tokens met prefill P95 <= {targets.ttft_ms:g} ms and TPOT P95 <= "
        f"{targets.tpot_ms:g} ms; the closest is recommended (fewer --max-num-seqs or more replicas)"
    )
    return best


def _kv_memory(trial, chosen: Trial, recommended: dict, budget: dict) -> int:
    """Step 4 (CPU): the peak KV blocks used plus headroom, at most the budget, checked by a run."""
    if not chosen.kv_blocks:
        return budget.get("kv_cache_memory", 0)
    per_block = chosen.kv_bytes // chosen.kv_blocks
    blocks = min(chosen.kv_blocks, math.ceil(chosen.peak_kv_blocks * (1 + HEADROOM)))
    if blocks >= chosen.kv_blocks:
        return chosen.kv_bytes
    check = trial("memory", **recommended, kv_cache_memory=blocks * per_block)
    return blocks * per_block if check.clean else chosen.kv_bytes


def _describe(t: Trial) -> str:
    flags = " ".join(f"{k}={v}" for k, v in t.flags.items() if k != "kv_cache_memory") or "defaults"
    if t.error:
        return f"  {t.step} {flags}: does not run ({t.error})"
    return f"  {t.step} {flags}: {t.preemptions} preemptions, KV peak {t.peak_kv_blocks}/{t.kv_blocks} blocks"


# Steps: defaults (1), raise and bisect max_num_seqs, confirm (2), batched: max_num_batched_tokens (3), memory (4).
TABLE_HEADER = ["step", "max_num_seqs", "max_num_batched_tokens", "KV blocks", "peak", "preempted", "tok/s",
                "TTFT P95 ms", "prefill P95 ms", "TPOT P95 ms"]  # fmt: skip


def table_rows(result: TuneResult) -> list[list[str]]:
    rows = []
    for t in result.trials:
        f = t.flags
        common = [
            t.step,
            str(t.max_num_seqs or f.get("max_num_seqs", "default")),
            str(t.max_num_batched_tokens or f.get("max_num_batched_tokens", "default")),
        ]
        if t.error:
            rows.append([*common, "-", "-", "does not fit", "-", "-", "-", "-"])
            continue
        rows.append(
            [
                *common,
                str(t.kv_blocks),
                str(t.peak_kv_blocks),
                str(t.preemptions),
                f"{t.output_tokens_per_s:.0f}",
                f"{t.ttft_p95_ms:.0f}",
                f"{t.prefill_p95_ms:.0f}",
                f"{t.tpot_p95_ms:.1f}",
            ]
        )
    return rows
