"""The `shoal` command line. `shoal serve` starts the OpenAI-compatible server."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from shoal.engine.health import DEFAULT_HANG_TIMEOUT_S, DEFAULT_MAX_CONSECUTIVE_STEP_FAILURES, HealthPolicy
from shoal.policy.config import PolicyConfig, check_runtime, load_policy
from shoal.server.settings import DEFAULT_MAX_REQUEST_BYTES

DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"

app = typer.Typer(
    name="shoal",
    help="shoal: an LLM inference server (paged KV cache, continuous batching, OpenAI API).",
    no_args_is_help=True,
    add_completion=False,
)


@app.callback()
def main() -> None:
    """shoal: an LLM inference server (paged KV cache, continuous batching, OpenAI API)."""


@app.command()
def serve(
    model: Annotated[
        str,
        typer.Option(
            envvar="SHOAL_MODEL",
            help="Local Hugging Face model directory, hub id, or shared storage copied to a local cache: s3://, gs://, file://, a network mount (env SHOAL_MODEL).",
        ),
    ] = DEFAULT_MODEL,
    host: Annotated[
        str, typer.Option(help="Address to listen on (0.0.0.0 for all interfaces).")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port to listen on.")] = 8000,
    dtype: Annotated[
        str,
        typer.Option(
            help="auto, float32, bfloat16 or float16 (auto: the checkpoint dtype where the hardware runs it fast, else float32)."
        ),
    ] = "auto",
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    load_format: Annotated[
        str,
        typer.Option(
            help="auto, or mmap (CPU): weights stay memory-mapped in the safetensors file, paged in as used, "
            "in the checkpoint's dtype (no fused, cast or packed copies; slower where that dtype is)."
        ),
    ] = "auto",
    max_num_seqs: Annotated[int, typer.Option(help="Most sequences in one engine step (the batch).")] = 256,
    max_num_batched_tokens: Annotated[
        int | None, typer.Option(help="Most tokens in one engine step (default: 512 on CPU, 8192 on CUDA).")
    ] = None,
    max_model_len: Annotated[
        int | None,
        typer.Option(
            help="Context window: prompt + output tokens (default: the model's; at most 2048 on CPU)."
        ),
    ] = None,
    gpu_memory_utilization: Annotated[
        float, typer.Option(help="CUDA: share of the GPU's memory shoal may use (weights + KV cache).")
    ] = 0.90,
    kv_cache_memory: Annotated[
        int | None, typer.Option(help="CPU: bytes for the KV cache (default: a share of free RAM).")
    ] = None,
    block_size: Annotated[int, typer.Option(help="Tokens per KV cache block.")] = 16,
    tensor_parallel_size: Annotated[
        int,
        typer.Option(
            "--tensor-parallel-size",
            "-tp",
            help="Split every layer over N ranks (N-1 worker processes; gloo on CPU, NCCL on CUDA, one GPU a "
            "rank). N must divide the attention and KV head counts (docs/parallelism.md). vLLM's flag.",
        ),
    ] = 1,
    no_prefix_caching: Annotated[
        bool, typer.Option("--no-prefix-caching", help="Do not reuse the KV cache of shared prompt prefixes.")
    ] = False,
    served_model_name: Annotated[
        str | None, typer.Option(help="Model name clients send and /v1/models lists (default: --model).")
    ] = None,
    api_key: Annotated[
        str | None,
        typer.Option(
            envvar="SHOAL_API_KEY", help="Require 'Authorization: Bearer KEY' on /v1/* (env SHOAL_API_KEY)."
        ),
    ] = None,
    chat_template: Annotated[
        Path | None,
        typer.Option(
            exists=True,
            dir_okay=False,
            readable=True,
            help="Jinja file overriding the model's chat template.",
        ),
    ] = None,
    max_request_bytes: Annotated[
        int, typer.Option(help="Largest request body accepted; larger ones get 413.")
    ] = DEFAULT_MAX_REQUEST_BYTES,
    log_level: Annotated[str, typer.Option(help="debug, info, warning or error.")] = "info",
    log_format: Annotated[
        str,
        typer.Option(
            help="text or json: json writes one JSON object per line (shoal, uvicorn, engine core, and the "
            "access log's fields as keys)."
        ),
    ] = "text",
    log_prompts: Annotated[
        bool,
        typer.Option(
            "--log-prompts", help="Put each request's prompt text in its access log line (off by default)."
        ),
    ] = False,
    otlp_traces_endpoint: Annotated[
        str | None,
        typer.Option(
            envvar="OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
            help="Send OpenTelemetry traces (HTTP, queue, prefill, decode spans per request) over OTLP/HTTP "
            "to this URL, e.g. http://collector:4318/v1/traces; other OTEL_* variables apply. Off by default.",
        ),
    ] = None,
    compile: Annotated[
        bool,
        typer.Option(
            "--compile",
            help="torch.compile the decode forward: faster decode steps, compiled before the server is ready "
            "(about 1.5 min for SmolLM2 on 2 CPU cores; inductor caches it on disk for later starts).",
        ),
    ] = False,
    threads: Annotated[
        int | None,
        typer.Option(
            help="CPU threads of the engine (torch/OpenMP). Default: OMP_NUM_THREADS if set, else the "
            "container's cgroup CPU quota when one is set (torch ignores it), else torch's default.",
        ),
    ] = None,
    engine_mode: Annotated[
        str,
        typer.Option(
            help="process: the engine core runs in its own process and the HTTP side never waits for the "
            "GIL (the default); thread: both in one process (see docs/performance.md).",
        ),
    ] = "process",
    enable_fault_injection: Annotated[
        bool,
        typer.Option(
            "--enable-fault-injection",
            help="Allow POST /debug/faults to make engine steps fail, hang or die and loads slow (tests "
            "and drills only; the start-up plan can be given as JSON in SHOAL_FAULTS).",
        ),
    ] = False,
    scheduling_policy: Annotated[
        str,
        typer.Option(
            help="fcfs: first come, first served (a request's non-zero priority is a 400); priority: the "
            "waiting queue is ordered by (priority, arrival), lower first, and KV pressure preempts the "
            "least urgent request, newest first. vLLM's flag.",
        ),
    ] = "fcfs",
    urgent_threads: Annotated[
        int | None,
        typer.Option(
            help="With --scheduling-policy priority: CPU threads of an urgent step, one that computes the "
            "prompt of a request with priority <= --urgent-priority toward its first token (such a step runs "
            "only rows as urgent). Every other step keeps --threads. Gives premium first tokens the cores "
            "that --threads leaves to the HTTP side (docs/security.md). Default: --threads.",
        ),
    ] = None,
    urgent_priority: Annotated[
        int, typer.Option(help="The least urgent priority whose prompt steps get --urgent-threads.")
    ] = 0,
    preemption_mode: Annotated[
        str,
        typer.Option(
            help="What happens to a sequence preempted when the KV cache is full: recompute (its blocks are "
            "dropped and recomputed later) or swap (they move to a host pool of --swap-space GiB and back; "
            "recompute when the pool is full). vLLM's flag.",
        ),
    ] = "recompute",
    swap_space: Annotated[
        float, typer.Option(help="GiB of host memory for swapped-out KV blocks (--preemption-mode swap).")
    ] = 4.0,
    deterministic: Annotated[
        bool,
        typer.Option(
            "--deterministic",
            help="Batch-invariant numerics: a seeded request gives the same tokens whatever else is in the "
            "batch, however its prompt is chunked and whether its prefix is cached (vLLM's "
            "VLLM_BATCH_INVARIANT; slower, docs/determinism.md).",
        ),
    ] = False,
    record_schedule: Annotated[
        bool,
        typer.Option(
            "--record-schedule",
            help="Record which requests each engine step runs and preempts, at GET /debug/schedule "
            "(tests and tuning).",
        ),
    ] = False,
    policy: Annotated[
        Path | None,
        typer.Option(
            exists=True,
            dir_okay=False,
            readable=True,
            help="YAML policy file: API keys and JWT, rate limits, priority classes, caches, shedding, "
            "limits (docs/security.md). Validated at start; a bad field stops the server with its path.",
        ),
    ] = None,
    max_tokens_cap: Annotated[
        int | None,
        typer.Option(help="Most tokens one choice may ask for (max_tokens); more is a 400 naming this flag."),
    ] = None,
    max_n: Annotated[
        int | None,
        typer.Option(help="Most choices (n) one request may ask for; more is a 400 (at most 128)."),
    ] = None,
    max_waiting_requests: Annotated[
        int | None,
        typer.Option(
            help="Load shedding: past this many requests waiting for the engine, new ones get 503 with "
            "Retry-After, the lowest priority first (docs/security.md). Default: unbounded.",
        ),
    ] = None,
    drain_timeout: Annotated[
        float,
        typer.Option(
            "--drain-timeout",
            "--shutdown-timeout",
            help="On SIGTERM: seconds running requests get to finish (new ones get 503); the rest then end "
            "with their partial output and finish_reason 'abort'. --shutdown-timeout is vLLM's name.",
        ),
    ] = 30.0,
    request_timeout: Annotated[
        float | None,
        typer.Option(
            help="Seconds a request may take from arrival; then it ends with its partial output and "
            "finish_reason 'abort'. A request may set its own with the X-Request-Timeout header.",
        ),
    ] = None,
    engine_hang_timeout: Annotated[
        float,
        typer.Option(
            help="Liveness: /health fails when no engine step has finished for this many seconds while "
            "requests are pending (a hung kernel or device). 0 disables it.",
        ),
    ] = DEFAULT_HANG_TIMEOUT_S,
    ssl_certfile: Annotated[
        Path | None,
        typer.Option(exists=True, dir_okay=False, help="Serve HTTPS with this certificate (PEM)."),
    ] = None,
    ssl_keyfile: Annotated[
        Path | None, typer.Option(exists=True, dir_okay=False, help="The certificate's private key (PEM).")
    ] = None,
    ssl_ca_certs: Annotated[
        Path | None,
        typer.Option(
            exists=True, dir_okay=False, help="CA certificates that client certificates must chain to."
        ),
    ] = None,
    ssl_cert_reqs: Annotated[
        int,
        typer.Option(help="Client certificates (mTLS): 0 none, 1 optional, 2 required (vLLM's flag)."),
    ] = 0,
    max_consecutive_step_failures: Annotated[
        int,
        typer.Option(
            help="A failed engine step fails only its requests; after this many failures in a row the "
            "engine counts as broken: every request gets an error and /health fails.",
        ),
    ] = DEFAULT_MAX_CONSECUTIVE_STEP_FAILURES,
    disable_log_stats: Annotated[
        bool,
        typer.Option(
            "--disable-log-stats",
            help="vLLM's flag: observe no per-request or per-step metrics (/metrics keeps the gauges).",
        ),
    ] = False,
    slo_ttft_ms: Annotated[
        float | None,
        typer.Option(help="SLO target for time to first token (ms): goodput counts choices within it."),
    ] = None,
    slo_tpot_ms: Annotated[
        float | None,
        typer.Option(help="SLO target for time per output token (ms): goodput counts choices within it."),
    ] = None,
    cost_per_hour: Annotated[
        float | None,
        typer.Option(help="Instance price in dollars per hour: exports cost per request and per token."),
    ] = None,
    models: Annotated[
        Path | None,
        typer.Option(
            exists=True,
            dir_okay=False,
            readable=True,
            help="YAML registry of several models to serve (docs/fleet.md): routed by the request's model, "
            "loaded at start or on first use, unloaded after keep_alive or to fit --memory-budget. "
            "Replaces --model and --served-model-name; the other flags apply to every model.",
        ),
    ] = None,
    no_ui: Annotated[
        bool, typer.Option("--no-ui", help="Turn off the operator console at /ui (docs/console.md).")
    ] = False,
    gateway_url: Annotated[
        str | None,
        typer.Option(
            help="The gateway whose deployments the console shows (its /admin/* endpoints; the admin "
            "token, if any, in env SHOAL_GATEWAY_ADMIN_TOKEN).",
        ),
    ] = None,
    memory_budget: Annotated[
        str | None,
        typer.Option(
            help="With --models: bytes for all models' weights and KV caches (e.g. 8GiB; default "
            "half the RAM)."
        ),
    ] = None,
) -> None:
    """Serve MODEL over an OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions, /metrics...)."""
    from shoal.cpu_quota import choose_threads
    from shoal.engine.config import EngineConfig
    from shoal.logging_config import LOG_FORMATS
    from shoal.server.launch import TLSOptions
    from shoal.server.launch import serve as run_server
    from shoal.server.settings import ServerSettings

    config = EngineConfig(
        model=model,
        dtype=dtype,
        device=device,
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max_num_batched_tokens,
        max_model_len=max_model_len,
        block_size=block_size,
        gpu_memory_utilization=gpu_memory_utilization,
        kv_cache_memory=kv_cache_memory,
        enable_prefix_caching=not no_prefix_caching,
        chat_template=str(chat_template) if chat_template else None,
        compile=compile,
        scheduling_policy=scheduling_policy,
        urgent_threads=urgent_threads,
        urgent_priority=urgent_priority,
        record_schedule=record_schedule,
        load_format=load_format,
        tensor_parallel_size=tensor_parallel_size,
        preemption_mode=preemption_mode,
        swap_space=swap_space,
        deterministic=deterministic,
    )
    try:
        config.validate()
        if log_format not in LOG_FORMATS:
            raise ValueError(f"--log-format must be text or json, got {log_format!r}")
        if engine_mode not in ("process", "thread"):
            raise ValueError(f"--engine-mode must be process or thread, got {engine_mode!r}")
        settings = ServerSettings(
            served_model_name=served_model_name or model,
            api_key=api_key or os.environ.get("SHOAL_API_KEY") or None,
            max_request_bytes=max_request_bytes,
            enable_fault_injection=enable_fault_injection,
            drain_timeout_s=drain_timeout,
            record_schedule=record_schedule,
            policy=load_policy(policy) if policy else None,
            request_timeout_s=request_timeout,
            max_tokens_cap=max_tokens_cap,
            max_n=max_n,
            max_waiting_requests=max_waiting_requests,
            disable_log_stats=disable_log_stats,
            slo_ttft_ms=slo_ttft_ms,
            slo_tpot_ms=slo_tpot_ms,
            cost_per_hour=cost_per_hour,
            otlp_traces_endpoint=otlp_traces_endpoint or None,
            log_prompts=log_prompts,
            ui=not no_ui,
            gateway_url=gateway_url,
        )
        health = HealthPolicy(engine_hang_timeout or None, max_consecutive_step_failures)
        thread_choice = choose_threads(threads)
        _check_policy_fits(settings.policy, scheduling_policy)
        tls = TLSOptions(
            *(str(p) if p else None for p in (ssl_certfile, ssl_keyfile, ssl_ca_certs)), ssl_cert_reqs
        )
    except ValueError as e:
        raise typer.BadParameter(str(e)) from e
    if models is not None:
        raise typer.Exit(_serve_fleet(models, memory_budget, config, settings, host, port, log_level,
                                      engine_mode, health, tls, log_format))  # fmt: skip
    try:
        code = run_server(
            config,
            settings,
            host=host,
            port=port,
            log_level=log_level,
            engine_mode=engine_mode,
            health=health,
            tls=tls,
            log_format=log_format,
            threads=thread_choice,
        )
    except (
        ValueError,
        OSError,
        RuntimeError,
    ) as e:  # a bad model path, a config the model cannot take: no traceback
        typer.echo(f"shoal serve: error: {e}", err=True)
        raise typer.Exit(1) from None
    raise typer.Exit(code)


def _serve_fleet(models: Path, memory_budget: str | None, *args) -> int:
    """`shoal serve --models`: a bad registry or budget fails naming the entry, before the port opens."""
    from shoal.fleet.budget import default_budget
    from shoal.fleet.launch import serve_fleet
    from shoal.fleet.registry import load_registry, parse_bytes

    try:
        registry = load_registry(models)
        budget = parse_bytes(memory_budget) if memory_budget else default_budget()
    except ValueError as e:
        typer.echo(f"shoal serve: error: {e}", err=True)
        return 2
    return serve_fleet(registry, args[0], args[1], budget, *args[2:])


def _check_policy_fits(policy: PolicyConfig | None, scheduling_policy: str) -> None:
    """Before the engine starts: priority classes only mean something to the priority scheduler (fcfs
    refuses priorities), and the policy's keys and files must be there."""
    if policy is None:
        return
    if policy.classes and scheduling_policy != "priority":
        raise ValueError("the policy's priority classes need --scheduling-policy priority")
    check_runtime(policy)


@app.command()
def generate(
    prompt: Annotated[str, typer.Argument(help="The prompt text.")],
    model: Annotated[
        str, typer.Option(envvar="SHOAL_MODEL", help="Local Hugging Face model directory or hub id.")
    ] = DEFAULT_MODEL,
    max_tokens: Annotated[int, typer.Option(help="Most tokens to generate.")] = 64,
    temperature: Annotated[float, typer.Option(help="0 for greedy decoding.")] = 0.0,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling mass.")] = 1.0,
    seed: Annotated[int | None, typer.Option(help="Seed for reproducible sampling.")] = None,
    chat: Annotated[
        bool, typer.Option(help="Wrap the prompt as a user message in the chat template.")
    ] = False,
    dtype: Annotated[str, typer.Option(help="auto, float32, bfloat16 or float16.")] = "auto",
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    max_model_len: Annotated[int | None, typer.Option(help="Context window (default: per device).")] = None,
) -> None:
    """Generate text for one prompt and print it (no server)."""
    from shoal.engine.config import EngineConfig
    from shoal.engine.llm_engine import LLMEngine
    from shoal.engine.sampling_params import SamplingParams

    try:
        engine = LLMEngine(EngineConfig(model=model, dtype=dtype, device=device, max_model_len=max_model_len))
        tok = engine.tokenizer
        if chat:
            ids = tok.encode(
                tok.apply_chat_template([{"role": "user", "content": prompt}]), add_special_tokens=False
            )
        else:
            ids = tok.encode(prompt)
        params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed)
        out = engine.generate([ids], params)[0].outputs[0]
    except (ValueError, OSError) as e:
        typer.echo(f"shoal generate: error: {e}", err=True)
        raise typer.Exit(1) from None
    typer.echo(out.text)


@app.command()
def stats(
    url: Annotated[
        str, typer.Option(help="Base URL of a running shoal (or vLLM) server.")
    ] = "http://127.0.0.1:8000",
    interval: Annotated[
        float, typer.Option(min=0.1, help="Seconds between the two scrapes that rates are measured over.")
    ] = 5.0,
) -> None:
    """P50/P95/P99 of TTFT, TPOT and E2E, requests/s and tokens/s of a live server, from its /metrics."""
    from rich.console import Console

    from shoal.live_stats import run, table

    try:
        summary = run(url, interval)
    except (OSError, ValueError) as e:
        typer.echo(f"shoal stats: error: cannot read {url}/metrics: {e}", err=True)
        raise typer.Exit(1) from None
    Console().print(table(summary, url))


def _register_bench() -> None:
    from shoal.bench.cli import bench_app

    app.add_typer(
        bench_app,
        name="bench",
        help="Benchmarks against a peer in the same run (latency, throughput, serve-compare).",
    )


def _register_quant() -> None:
    from shoal.quant.cli import quant_app  # imports only typer; the toolkit loads when a command runs

    app.add_typer(quant_app, name="quant", help="Quantize models (rtn, gptq, awq now; w8a8, fp8 to come).")


def _register_policy_tools() -> None:
    from shoal.policy.cli import audit_app, keys_app  # imports only typer and pydantic

    app.add_typer(keys_app, name="keys", help="Manage API keys in a key file (stored hashed).")
    app.add_typer(audit_app, name="audit", help="Check the HMAC chain of an audit log.")


def _register_gateway() -> None:
    from shoal.gateway.cli import gateway_app  # imports only typer; no torch, no engine

    app.add_typer(
        gateway_app, name="gateway", help="The gateway: blue-green, canary, shadow, load-aware routing."
    )


def _register_ops() -> None:
    from shoal.ops.cli import autoscale_app, cost, tune  # imports only typer; the engine loads when tune runs

    app.add_typer(
        autoscale_app, name="autoscale", help="Replay a load trace against the autoscaling policy (KEDA/HPA)."
    )
    app.command(name="tune")(tune)
    app.command(name="cost")(cost)


_register_bench()
_register_quant()
_register_policy_tools()
_register_gateway()
_register_ops()

if __name__ == "__main__":
    app()
