"""Every metric shoal exports at GET /metrics: its name, type, labels and meaning, declared once.

The exporter (shoal/server/metrics.py), `shoal stats`, the Grafana dashboard (deploy/grafana/shoal.json),
docs/observability.md and the tests all read the names from here, and the tests check the dashboard and
the docs against this module. It imports nothing but the standard library, so a gateway, a linter or a
test can read it without torch, the engine or prometheus-client.

Names: vLLM's exact names (`vllm:*`) where vLLM has the metric, so that vLLM's dashboards, alerts and
routers (the Gateway API Inference Extension's endpoint picker reads `vllm:num_requests_waiting`,
`vllm:num_requests_running`, `vllm:kv_cache_usage_perc` and `vllm:cache_config_info`) work unchanged;
the definitions follow vLLM's `vllm/v1/metrics/loggers.py` and docs/design/metrics.md. Metrics vLLM
does not have are `shoal:*`. Counters are declared with the `_total` their samples carry.

Labels: every `vllm:*` and `shoal:*` series has `model_name` (the served model name); per-device series
also `gpu`; prometheus-client's `process_*` series (the HTTP server process) have no labels.
"""

from __future__ import annotations

from dataclasses import dataclass

COUNTER, GAUGE, HISTOGRAM = "counter", "gauge", "histogram"
MODEL_NAME = "model_name"
GPU = "gpu"


@dataclass(frozen=True)
class MetricSpec:
    """One exported metric. `name` is what a PromQL query names (counters end in _total)."""

    name: str
    kind: str  # COUNTER, GAUGE or HISTOGRAM
    help: str
    group: str  # the section of docs/observability.md it belongs to
    labels: tuple[str, ...] = (MODEL_NAME,)

    def sample_names(self) -> tuple[str, ...]:
        """The sample names in the text exposition (a histogram's _bucket/_sum/_count, a counter's _total)."""
        if self.kind == HISTOGRAM:
            return tuple(self.name + suffix for suffix in ("_bucket", "_sum", "_count"))
        return (self.name,)


# ---- latency histograms (one observation per choice; times from the engine's clock) -----------------
TIME_TO_FIRST_TOKEN = "vllm:time_to_first_token_seconds"
INTER_TOKEN_LATENCY = "vllm:inter_token_latency_seconds"
TIME_PER_OUTPUT_TOKEN = "vllm:request_time_per_output_token_seconds"
E2E_LATENCY = "vllm:e2e_request_latency_seconds"
QUEUE_TIME = "vllm:request_queue_time_seconds"
PREFILL_TIME = "vllm:request_prefill_time_seconds"
DECODE_TIME = "vllm:request_decode_time_seconds"
# ---- throughput --------------------------------------------------------------------------------------
REQUEST_SUCCESS = "vllm:request_success_total"
PROMPT_TOKENS = "vllm:prompt_tokens_total"
GENERATION_TOKENS = "vllm:generation_tokens_total"
ITERATION_TOKENS = "vllm:iteration_tokens_total"
REQUEST_PROMPT_TOKENS = "vllm:request_prompt_tokens"
REQUEST_GENERATION_TOKENS = "vllm:request_generation_tokens"
BATCH_SIZE = "shoal:batch_size"
STEP_DURATION = "shoal:step_duration_seconds"
STEPS_INTERRUPTED = "shoal:engine_steps_interrupted_total"
NUM_REQUESTS_RUNNING = "vllm:num_requests_running"
NUM_REQUESTS_WAITING = "vllm:num_requests_waiting"
# ---- resources ---------------------------------------------------------------------------------------
KV_CACHE_USAGE = "vllm:kv_cache_usage_perc"
GPU_CACHE_USAGE = "vllm:gpu_cache_usage_perc"
PREFIX_CACHE_QUERIES = "vllm:prefix_cache_queries_total"
PREFIX_CACHE_HITS = "vllm:prefix_cache_hits_total"
NUM_PREEMPTIONS = "vllm:num_preemptions_total"
NUM_REQUESTS_SWAPPED = "vllm:num_requests_swapped"  # vLLM V0's (its V1 has no swap preemption)
CPU_CACHE_USAGE = "vllm:cpu_cache_usage_perc"  # vLLM V0's: the host swap pool
SWAPPED_OUT = "shoal:num_swapped_out_total"
SWAPPED_IN = "shoal:num_swapped_in_total"
CACHE_CONFIG_INFO = "vllm:cache_config_info"
GPU_UTILIZATION = "shoal:gpu_utilization_perc"
GPU_MEMORY_USED = "shoal:gpu_memory_used_bytes"
GPU_MEMORY_ALLOCATED = "shoal:gpu_memory_allocated_bytes"
GPU_MEMORY_RESERVED = "shoal:gpu_memory_reserved_bytes"
CPU_SECONDS = "shoal:cpu_seconds_total"
RESIDENT_MEMORY = "shoal:resident_memory_bytes"
NETWORK_RECEIVE = "shoal:network_receive_bytes_total"
NETWORK_TRANSMIT = "shoal:network_transmit_bytes_total"
# The model manager (shoal serve --models, shoal/fleet/)
MODEL_LOADED = "shoal:model_loaded"
MODEL_LOAD_TIME = "shoal:model_load_seconds"
MODEL_UNLOADS = "shoal:model_unloads_total"
MODEL_FALLBACKS = "shoal:model_fallbacks_total"
MEMORY_BUDGET = "shoal:memory_budget_bytes"
MEMORY_RESERVED = "shoal:memory_reserved_bytes"
# ---- state -------------------------------------------------------------------------------------------
READY = "shoal:ready"
ENGINE_HEALTHY = "shoal:engine_healthy"
ENGINE_LAST_STEP = "shoal:engine_last_step_timestamp_seconds"
# ---- business ----------------------------------------------------------------------------------------
REQUEST_ERRORS = "shoal:request_errors_total"
REQUEST_TIMEOUTS = "shoal:request_timeouts_total"
SLO_REQUESTS = "shoal:slo_requests_total"
SLO_GOOD_REQUESTS = "shoal:slo_good_requests_total"
ENGINE_BUSY = "shoal:engine_busy_seconds_total"
REQUEST_COST = "shoal:request_cost_dollars"
COST_PER_MILLION_TOKENS = "shoal:cost_per_million_tokens_dollars"

_L = "latency"
_T = "throughput"
_R = "resources"
_S = "state"
_B = "business"

METRICS: tuple[MetricSpec, ...] = (
    MetricSpec(
        TIME_TO_FIRST_TOKEN,
        HISTOGRAM,
        "Seconds from the HTTP request's arrival (before templating and tokenization) to the sampling of "
        "a choice's first token.",
        _L,
    ),
    MetricSpec(
        INTER_TOKEN_LATENCY,
        HISTOGRAM,
        "Seconds between two consecutive output tokens of a choice (one observation per token after the "
        "first).",
        _L,
    ),
    MetricSpec(
        TIME_PER_OUTPUT_TOKEN,
        HISTOGRAM,
        "Per choice: decode time / (output tokens - 1); 0 for a one-token choice (vLLM's TPOT).",
        _L,
    ),
    MetricSpec(E2E_LATENCY, HISTOGRAM, "Seconds from the HTTP request's arrival to the end of a choice.", _L),
    MetricSpec(QUEUE_TIME, HISTOGRAM, "Seconds from arrival to the request's first engine step.", _L),
    MetricSpec(PREFILL_TIME, HISTOGRAM, "Seconds from the first engine step to a choice's first token.", _L),
    MetricSpec(DECODE_TIME, HISTOGRAM, "Seconds from a choice's first token to its last token.", _L),
    MetricSpec(
        REQUEST_SUCCESS,
        COUNTER,
        "Choices ended, by finish reason (stop, length, abort).",
        _T,
        (MODEL_NAME, "finished_reason"),
    ),
    MetricSpec(
        PROMPT_TOKENS,
        COUNTER,
        "Prompt tokens admitted to the engine, once per choice (aborted requests included).",
        _T,
    ),
    MetricSpec(
        GENERATION_TOKENS,
        COUNTER,
        "Output tokens returned to clients (an aborted stream's: those of its last output).",
        _T,
    ),
    MetricSpec(REQUEST_PROMPT_TOKENS, HISTOGRAM, "Prompt tokens of each choice, when it ends.", _T),
    MetricSpec(
        REQUEST_GENERATION_TOKENS,
        HISTOGRAM,
        "Output tokens of each choice, when it ends (as counted in vllm:generation_tokens_total).",
        _T,
    ),
    MetricSpec(ITERATION_TOKENS, HISTOGRAM, "Tokens computed per engine step (prefill + decode).", _T),
    MetricSpec(BATCH_SIZE, HISTOGRAM, "Sequences per engine step.", _T),
    MetricSpec(STEP_DURATION, HISTOGRAM, "Seconds per engine step.", _T),
    MetricSpec(
        STEPS_INTERRUPTED,
        COUNTER,
        "Engine steps abandoned between layers for a more urgent request (--scheduling-policy priority).",
        _T,
    ),
    MetricSpec(NUM_REQUESTS_RUNNING, GAUGE, "Sequences in the running batch.", _T),
    MetricSpec(NUM_REQUESTS_WAITING, GAUGE, "Sequences waiting to be scheduled.", _T),
    MetricSpec(KV_CACHE_USAGE, GAUGE, "Share of KV cache blocks in use (0 to 1).", _R),
    MetricSpec(GPU_CACHE_USAGE, GAUGE, "vLLM's older name of vllm:kv_cache_usage_perc (also on CPU).", _R),
    MetricSpec(PREFIX_CACHE_QUERIES, COUNTER, "Prompt tokens looked up in the prefix cache.", _R),
    MetricSpec(PREFIX_CACHE_HITS, COUNTER, "Prompt tokens found in the prefix cache.", _R),
    MetricSpec(NUM_PREEMPTIONS, COUNTER, "Sequences preempted because the KV cache was full.", _R),
    MetricSpec(
        NUM_REQUESTS_SWAPPED,
        GAUGE,
        "Sequences preempted with their KV blocks in the host swap pool now (--preemption-mode swap).",
        _R,
    ),
    MetricSpec(CPU_CACHE_USAGE, GAUGE, "Share of the host swap pool in use, 0..1 (--swap-space).", _R),
    MetricSpec(SWAPPED_OUT, COUNTER, "Preemptions that moved a sequence's KV blocks to the host pool.", _R),
    MetricSpec(
        SWAPPED_IN, COUNTER, "Swapped-out sequences whose KV blocks came back from the host pool.", _R
    ),
    MetricSpec(
        CACHE_CONFIG_INFO,
        GAUGE,
        "Always 1; the KV cache's block size (tokens) and number of blocks, as labels (once loaded).",
        _R,
        (MODEL_NAME, "block_size", "num_gpu_blocks"),
    ),
    MetricSpec(
        GPU_UTILIZATION,
        GAUGE,
        "NVML GPU utilization (0 to 100) over its last sample period. Absent without a GPU.",
        _R,
        (MODEL_NAME, GPU),
    ),
    MetricSpec(
        GPU_MEMORY_USED,
        GAUGE,
        "NVML device memory in use, all processes (bytes). Absent without a GPU.",
        _R,
        (MODEL_NAME, GPU),
    ),
    MetricSpec(
        GPU_MEMORY_ALLOCATED,
        GAUGE,
        "Bytes held by tensors of the engine (torch.cuda.memory_allocated). Absent without a GPU.",
        _R,
        (MODEL_NAME, GPU),
    ),
    MetricSpec(
        GPU_MEMORY_RESERVED,
        GAUGE,
        "Bytes held by PyTorch's caching allocator in the engine (torch.cuda.memory_reserved). Absent "
        "without a GPU.",
        _R,
        (MODEL_NAME, GPU),
    ),
    MetricSpec(
        CPU_SECONDS,
        COUNTER,
        "CPU seconds (user + system) of the HTTP server and of the engine core process.",
        _R,
        (MODEL_NAME, "process"),
    ),
    MetricSpec(
        RESIDENT_MEMORY,
        GAUGE,
        "Resident memory (bytes) of the HTTP server and of the engine core process.",
        _R,
        (MODEL_NAME, "process"),
    ),
    MetricSpec(NETWORK_RECEIVE, COUNTER, "Bytes received on all interfaces of the host/container.", _R),
    MetricSpec(NETWORK_TRANSMIT, COUNTER, "Bytes sent on all interfaces of the host/container.", _R),
    MetricSpec(READY, GAUGE, "1 while /ready answers 200 (loaded, warmed up, not draining), else 0.", _S),
    MetricSpec(ENGINE_HEALTHY, GAUGE, "1 while the engine is alive and not hung, else 0.", _S),
    MetricSpec(MODEL_LOADED, GAUGE, "With --models: 1 while the model is loaded, else 0.", _S),
    MetricSpec(MODEL_LOAD_TIME, HISTOGRAM, "With --models: seconds to load a model (engine start).", _S),
    MetricSpec(
        MODEL_UNLOADS,
        COUNTER,
        "With --models: models unloaded, by reason (keep_alive, lru, admin, shutdown).",
        _S,
        (MODEL_NAME, "reason"),
    ),
    MetricSpec(
        MODEL_FALLBACKS,
        COUNTER,
        "With --models: requests for model_name answered by the fallback model `fallback`.",
        _S,
        (MODEL_NAME, "fallback"),
    ),
    MetricSpec(MEMORY_BUDGET, GAUGE, "With --models: the --memory-budget in bytes.", _S, ()),
    MetricSpec(
        MEMORY_RESERVED, GAUGE, "With --models: bytes of the budget reserved by loaded models.", _S, ()
    ),
    MetricSpec(
        ENGINE_LAST_STEP, GAUGE, "Unix time (seconds) at the end of the last engine step; 0 before one.", _S
    ),
    MetricSpec(
        REQUEST_ERRORS,
        COUNTER,
        "HTTP answers with status >= 400, by status and kind (the OpenAI error code or type).",
        _B,
        (MODEL_NAME, "status", "kind"),
    ),
    MetricSpec(REQUEST_TIMEOUTS, COUNTER, "HTTP requests ended by their timeout.", _B),
    MetricSpec(
        SLO_REQUESTS, COUNTER, "Choices judged against the SLO targets (only with --slo-* flags).", _B
    ),
    MetricSpec(
        SLO_GOOD_REQUESTS,
        COUNTER,
        "Choices that finished and met every configured SLO target: goodput (only with --slo-* flags).",
        _B,
    ),
    MetricSpec(
        ENGINE_BUSY,
        COUNTER,
        "Engine step seconds, summed over requests (each step shared by tokens computed).",
        _B,
    ),
    MetricSpec(
        REQUEST_COST,
        HISTOGRAM,
        "Cost of one engine request in dollars: its busy seconds x --cost-per-hour / 3600 (only with "
        "--cost-per-hour).",
        _B,
    ),
    MetricSpec(
        COST_PER_MILLION_TOKENS,
        GAUGE,
        "Dollars per million tokens (prompt + generated) since start, from busy time (only with "
        "--cost-per-hour).",
        _B,
    ),
)

# prometheus-client's process collector, for the HTTP server process (no labels).
PROCESS_METRICS: tuple[MetricSpec, ...] = tuple(
    MetricSpec(name, kind, help, "process", ())
    for name, kind, help in (
        ("process_cpu_seconds_total", COUNTER, "CPU seconds of the HTTP server process."),
        ("process_resident_memory_bytes", GAUGE, "Resident memory of the HTTP server process."),
        ("process_virtual_memory_bytes", GAUGE, "Virtual memory of the HTTP server process."),
        ("process_start_time_seconds", GAUGE, "Unix time the HTTP server process started."),
        ("process_open_fds", GAUGE, "Open file descriptors of the HTTP server process."),
        ("process_max_fds", GAUGE, "Limit on open file descriptors."),
    )
)

BY_NAME: dict[str, MetricSpec] = {m.name: m for m in METRICS + PROCESS_METRICS}


def spec_of_sample(sample_name: str) -> MetricSpec | None:
    """The declared metric a sample or PromQL selector name belongs to (None when undeclared)."""
    if sample_name in BY_NAME:
        return BY_NAME[sample_name]
    for suffix in ("_bucket", "_sum", "_count", "_created"):
        if sample_name.endswith(suffix):
            base = sample_name[: -len(suffix)]
            spec = BY_NAME.get(base) or BY_NAME.get(base + "_total")
            if spec is not None and (spec.kind == HISTOGRAM or suffix == "_created"):
                return spec
    return None
