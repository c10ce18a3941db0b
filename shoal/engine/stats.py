"""Plain numbers the engine keeps about itself; the server turns them into Prometheus metrics."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class StepStats:
    """One engine step, as handed to step listeners."""

    batch_size: int  # sequences in the step
    num_prefill_tokens: int
    num_decode_tokens: int
    num_running: int
    num_waiting: int
    kv_cache_usage: float
    step_seconds: float
    num_preempted: int = 0
    # Abandoned between layers for a more urgent arrival (engine/interrupt.py): nothing of it was computed,
    # the counts above are what it would have run, step_seconds the time it ran before it was dropped.
    interrupted: bool = False
    threads: int = 1  # CPU threads its forward ran on (EngineConfig.urgent_threads for an urgent step)
    # With EngineConfig.record_schedule: [request_id, arrival_time, priority] of each sequence taken from
    # the waiting queue in this step, in the order taken, and the request ids preempted in it. Empty
    # otherwise (it costs lists every step).
    admitted: list = field(default_factory=list)
    preempted: list = field(default_factory=list)
    added: list = field(default_factory=list)  # request ids added to the engine since the previous step
    abandoned: list = field(default_factory=list)  # an interrupted step's rows' request ids


@dataclass
class EngineStats:
    num_running: int = 0
    num_waiting: int = 0
    kv_cache_usage: float = 0.0
    prefix_cache_queries: int = 0  # prompt tokens looked up in the prefix cache
    prefix_cache_hits: int = 0  # of which found
    num_preemptions: int = 0  # swapped out or sent back to be recomputed
    num_swapped: int = 0  # sequences swapped out now (vLLM V0's num_requests_swapped)
    num_swapped_out: int = 0  # swap-outs so far (--preemption-mode swap)
    num_swapped_in: int = 0  # swap-ins so far
    swap_usage: float = 0.0  # share of the host swap pool in use, 0..1
    last_batch_size: int = 0
    num_steps: int = 0  # completed steps
    num_steps_interrupted: int = 0  # steps abandoned for a more urgent arrival (engine/interrupt.py)
    last_step_unix: float = 0.0  # time.time() at the end of the last step (0: none yet)
    block_size: int = 0  # tokens per KV cache block
    num_kv_blocks: int = 0  # KV cache blocks in all (vLLM's num_gpu_blocks)
    # The engine's CUDA device and PyTorch's caching allocator there (bytes); None/0 without CUDA. Only the
    # engine's process can read them (the HTTP process has no torch), hence here.
    cuda_device: int | None = None
    cuda_memory_allocated: int = 0
    cuda_memory_reserved: int = 0
