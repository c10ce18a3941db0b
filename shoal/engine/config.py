"""Engine configuration: one object, per-device defaults, validated once at start-up."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class EngineConfig:
    """The engine's knobs, with vLLM's names. None means "pick the per-device default" (see resolve())."""

    model: str
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    device: str = "auto"  # auto | cpu | cuda
    max_num_seqs: int = 256
    max_num_batched_tokens: int | None = None  # CPU 512, CUDA 8192
    max_model_len: int | None = None  # CPU min(model limit, 2048), CUDA the model limit
    block_size: int = 16
    gpu_memory_utilization: float = 0.90  # CUDA: share of total GPU memory shoal may use
    kv_cache_memory: int | None = None  # CPU: bytes for the KV cache (default: a share of free RAM)
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    chat_template: str | None = None  # path of a jinja file overriding the model's template
    seed: int = 0
    compile: bool = False  # torch.compile the decode forward (minutes of compiling at start, faster steps)
    scheduling_policy: str = "fcfs"  # fcfs | priority (vLLM's --scheduling-policy)
    record_schedule: bool = False  # StepStats.scheduled: who ran in each step (tests, GET /debug/schedule)
    load_format: str = "auto"  # auto | mmap (weights stay mapped in the safetensors file, checkpoint dtype)
    tensor_parallel_size: int = 1  # ranks each holding 1/N of every layer (docs/parallelism.md)
    preemption_mode: str = "recompute"  # recompute | swap (vLLM's --preemption-mode; engine/scheduler.py)
    swap_space: float = 4.0  # GiB of host memory for swapped-out KV blocks (vLLM's --swap-space), swap only
    deterministic: bool = False  # batch-invariant numerics (vLLM's VLLM_BATCH_INVARIANT; docs/determinism.md)
    # CPU threads of an urgent prompt step: under `priority`, a step computing a prompt of priority <=
    # urgent_priority toward its first token (it runs only rows as urgent: engine/scheduler.py). None: the
    # engine's threads. The idle cores a server keeps for its HTTP side go to premium first tokens.
    urgent_threads: int | None = None
    urgent_priority: int = 0

    def validate(self) -> None:
        checks = {
            "max_num_seqs": self.max_num_seqs,
            "max_num_batched_tokens": self.max_num_batched_tokens,
            "max_model_len": self.max_model_len,
            "block_size": self.block_size,
            "kv_cache_memory": self.kv_cache_memory,
            "tensor_parallel_size": self.tensor_parallel_size,
            "urgent_threads": self.urgent_threads,
        }
        for name, value in checks.items():
            if value is not None and value < 1:
                raise ValueError(f"{name} must be positive, got {value}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be auto, float32, bfloat16 or float16, got {self.dtype!r}")
        if self.scheduling_policy not in ("fcfs", "priority"):
            raise ValueError(f"scheduling_policy must be fcfs or priority, got {self.scheduling_policy!r}")
        if self.load_format not in ("auto", "mmap"):
            raise ValueError(f"load_format must be auto or mmap, got {self.load_format!r}")
        if self.preemption_mode not in ("recompute", "swap"):
            raise ValueError(f"preemption_mode must be recompute or swap, got {self.preemption_mode!r}")
        if self.swap_space < 0:
            raise ValueError(f"swap_space must be at least 0 GiB, got {self.swap_space}")
        if self.tensor_parallel_size > 1 and (self.preemption_mode == "swap" or self.deterministic):
            # The workers hold their own KV shards and model slices: neither feature reaches them yet.
            raise ValueError("preemption_mode swap and deterministic need tensor_parallel_size 1")
        if self.deterministic and self.compile:
            raise ValueError(
                "deterministic and compile cannot be combined: the compiled graph has its own kernels"
            )
        if self.urgent_threads is not None:
            self._validate_urgent_threads()
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be auto, cpu or cuda, got {self.device!r}")
        if self.tensor_parallel_size > 1:
            self._validate_tensor_parallel()

    def _validate_urgent_threads(self) -> None:
        """urgent_threads is refused where no step is urgent (fcfs), where the forward does not run on this
        process's CPU threads (CUDA, tensor parallelism), and where a step's numbers must not depend on the
        size of its OpenMP team (deterministic)."""
        fcfs = self.scheduling_policy != "priority"
        conflicts = {
            "scheduling_policy fcfs (urgent steps exist only under priority)": fcfs,
            "device cuda (CPU threads only)": self.device == "cuda",
            "tensor_parallel_size > 1 (each rank has its own threads)": self.tensor_parallel_size > 1,
            "deterministic (a step's team size must not change its numbers)": self.deterministic,
        }
        for name, on in conflicts.items():
            if on:
                raise ValueError(f"urgent_threads cannot be combined with {name}")

    def _validate_tensor_parallel(self) -> None:
        """What does not combine with tensor parallelism yet (the model's own limits are checked at load)."""
        unsupported = {"compile": self.compile, "load_format mmap": self.load_format == "mmap"}
        for name, on in unsupported.items():
            if on:
                raise ValueError(f"{name} is not supported with tensor_parallel_size > 1")
