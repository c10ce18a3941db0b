"""`shoal autoscale simulate`, `shoal tune` and `shoal cost`: thin commands over shoal/ops/autoscale_sim.py,
shoal/ops/tune.py and shoal/ops/cost.py. Imports only typer: the models, the engine and matplotlib load when
a command runs."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

autoscale_app = typer.Typer(
    help="The autoscaling policy of deploy/k8s (KEDA or HPA) as code: replay a load trace against it.",
    no_args_is_help=True,
    add_completion=False,
)


def _console():
    from rich.console import Console

    # Wide enough for the tables when piped (rich's default is then 80 columns, which wraps every header).
    return Console(width=max(Console().width, 130))


def _rich_table(title: str, header: list[str], rows: list[list[str]], caption: str | None = None):
    from rich.table import Table

    table = Table(title=title, caption=caption)
    for i, name in enumerate(header):
        table.add_column(name, justify="left" if i == 0 or name in ("step", "scale") else "right")
    for row in rows:
        table.add_row(*row)
    return table


@autoscale_app.command()
def simulate(
    trace: Annotated[
        Path,
        typer.Option(
            exists=True,
            dir_okay=False,
            help="CSV with a 'time_s,rps' header: the request rate holds from each row to the next; the last "
            "row marks the end (example: docs/operations/spike-trace.csv).",
        ),
    ],
    policy: Annotated[
        Path | None,
        typer.Option(
            help="The manifests to read the policy from: a kustomize overlay directory (rendered with kubectl, "
            "e.g. deploy/k8s/overlays/keda or .../hpa) or a YAML file with a ScaledObject or an autoscaling/v2 "
            "HPA. Default: the keda overlay's values, built in (tests check they agree).",
        ),
    ] = None,
    bench: Annotated[
        Path | None,
        typer.Option(
            exists=True,
            dir_okay=False,
            help="A 'shoal bench serve' JSON result: one replica's capacity from its request_throughput "
            "(requests/s; the highest of its runs) and its TTFT from median_ttft_ms (the lowest-rate run). "
            "The flags below override it.",
        ),
    ] = None,
    capacity_rps: Annotated[
        float | None,
        typer.Option(help="Requests/s one replica completes at saturation (required without --bench)."),
    ] = None,
    ttft_s: Annotated[
        float | None,
        typer.Option(help="One replica's TTFT at low load, seconds (default 0 without --bench)."),
    ] = None,
    pod_startup_s: Annotated[
        float,
        typer.Option(
            help="Seconds from a scale-up decision to a Ready pod: scheduling, image pull, model load, "
            "readiness probe (measure yours: docs/operations/cold-start.md).",
        ),
    ] = 60.0,
    start_replicas: Annotated[
        int | None, typer.Option(min=1, help="Pods at t=0, all Ready (default: minReplicas).")
    ] = None,
    sync_period_s: Annotated[
        int,
        typer.Option(
            min=1, help="The HPA controller's sync period (--horizontal-pod-autoscaler-sync-period)."
        ),
    ] = 15,
    queue_threshold: Annotated[
        float | None,
        typer.Option(
            help="Try another queue-depth threshold (waiting requests per pod) than the manifest's."
        ),
    ] = None,
    ttft_sla_s: Annotated[
        float | None, typer.Option(help="Try another TTFT P95 threshold (seconds) than the manifest's.")
    ] = None,
    min_replicas: Annotated[int | None, typer.Option(min=0, help="Try another minReplicas.")] = None,
    max_replicas: Annotated[int | None, typer.Option(min=1, help="Try another maxReplicas.")] = None,
    plot: Annotated[
        Path | None, typer.Option(help="Write a PNG of replicas, queue depth and TTFT P95 over time here.")
    ] = None,
    every: Annotated[
        int, typer.Option(min=1, help="Table rows every this many seconds (plus every scale event).")
    ] = 60,
) -> None:
    """Replay a request-rate trace against the autoscaling policy: replicas, queue, TTFT P95 over time.

    The policy is the keda (or hpa) overlay's, the replicas a queueing model of their capacity: print
    replicas, queue depth and TTFT P95 over time, and plot them, to choose thresholds before a cluster."""
    from dataclasses import replace

    from shoal.ops import autoscale, autoscale_sim

    try:
        fields = autoscale_sim.capacity_from_bench(bench) if bench else {}
        fields.update(
            {k: v for k, v in (("capacity_rps", capacity_rps), ("ttft_s", ttft_s)) if v is not None}
        )
        if "capacity_rps" not in fields:
            raise ValueError("give --capacity-rps or --bench (a 'shoal bench serve' JSON result)")
        model = autoscale_sim.ReplicaModel(pod_startup_s=pod_startup_s, **fields)
        pol = autoscale.load_policy(policy) if policy else autoscale.AutoscalePolicy()
        pol = replace(
            pol.with_targets(queue_threshold, ttft_sla_s),
            sync_period_s=sync_period_s,
            min_replicas=pol.min_replicas if min_replicas is None else min_replicas,
            max_replicas=pol.max_replicas if max_replicas is None else max_replicas,
        )
        sim = autoscale_sim.simulate(autoscale_sim.load_trace(trace), model, pol, start_replicas)
    except (ValueError, OSError) as e:
        typer.echo(f"shoal autoscale simulate: error: {e}", err=True)
        raise typer.Exit(2) from None
    triggers = ", ".join(f"{t.name} {t.target_type} {t.target:g}" for t in pol.triggers)
    caption = f"triggers: {triggers}; replicas {pol.min_replicas}-{pol.max_replicas}"
    if pol.ignored:
        caption += f"; not modeled: {', '.join(pol.ignored)}"
    console = _console()
    console.print(_rich_table(f"shoal autoscale simulate: {trace}", autoscale_sim.TABLE_HEADER,
                              autoscale_sim.table_rows(sim, every), caption))  # fmt: skip
    for key, value in sim.summary().items():
        console.print(f"{key}: {value if not isinstance(value, float) else f'{value:.1f}'}")
    if plot:
        autoscale_sim.plot(sim, plot)
        console.print(f"plot: {plot}")


def tune(
    model: Annotated[
        str | None,
        typer.Option(
            help="Local model directory or hub id (default: $SHOAL_MODEL, else models/SmolLM2-135M-Instruct)."
        ),
    ] = None,
    num_prompts: Annotated[int, typer.Option(min=1, help="Requests of the load, all arriving at once.")] = 64,
    input_len: Annotated[int, typer.Option(min=1, help="Prompt tokens per request (random ids).")] = 128,
    output_len: Annotated[int, typer.Option(min=1, help="Output tokens per request (EOS ignored).")] = 128,
    target_ttft_ms: Annotated[
        float,
        typer.Option(
            help="Step 3's target: P95 of the prefill part of TTFT (first step to first token; the wait for a "
            "sequence slot is the load's, for replicas to fix), ms."
        ),
    ] = 2000.0,
    target_tpot_ms: Annotated[
        float, typer.Option(help="Step 3's target: TPOT P95 (time per output token), ms.")
    ] = 100.0,
    kv_cache_memory: Annotated[
        int | None,
        typer.Option(
            help="CPU: the KV budget in bytes the search works within (default: what the defaults give)."
        ),
    ] = None,
    gpu_memory_utilization: Annotated[
        float, typer.Option(help="CUDA: the share of GPU memory (kept).")
    ] = 0.90,
    max_model_len: Annotated[int | None, typer.Option(help="Context window (default: the engine's).")] = None,
    dtype: Annotated[str, typer.Option(help="auto, float32, bfloat16 or float16.")] = "auto",
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    threads: Annotated[int | None, typer.Option(help="torch intra-op threads (default: torch's).")] = None,
    output_json: Annotated[
        Path | None, typer.Option(help="Write every run and the recommended flags to this JSON file.")
    ] = None,
) -> None:
    """Recommend serving flags for a load: max_num_seqs, max_num_batched_tokens, the KV memory.

    The seed's tuning process, as in-process engine runs: from the defaults, raise max_num_seqs
    until the KV cache runs out (preemptions, detected, not crashed), confirm with a rerun, choose
    max_num_batched_tokens for the TTFT/TPOT targets and the KV memory with headroom; print the runs and
    the recommended 'shoal serve' command line."""
    from shoal.bench import workload
    from shoal.ops import tune as tuning

    workload.set_threads(threads)
    model = model or workload.default_model()
    on_cuda = device == "cuda" or (device == "auto" and _cuda_available())
    base = {"dtype": dtype, "device": device, "max_model_len": max_model_len}
    base.update(
        {"gpu_memory_utilization": gpu_memory_utilization}
        if on_cuda
        else {"kv_cache_memory": kv_cache_memory}
    )
    console = _console()
    try:
        load = tuning.Load(num_prompts, input_len, output_len)
        run = tuning.engine_runner(model, load, base)
        result = tuning.tune(
            run, load, tuning.Targets(target_ttft_ms, target_tpot_ms), on_cuda, console.print
        )
    except (ValueError, RuntimeError, OSError) as e:
        typer.echo(f"shoal tune: error: {e}", err=True)
        raise typer.Exit(1) from None
    console.print(_rich_table(f"shoal tune: {model}", tuning.TABLE_HEADER, tuning.table_rows(result)))
    for note in result.notes:
        console.print(f"note: {note}")
    flags = " ".join(f"{k}={v}" for k, v in result.recommended.items())
    console.print(f"recommended: {flags}")
    extra = {k: v for k, v in base.items() if k in ("dtype", "max_model_len") and v not in (None, "auto")}
    result.recommended = {**extra, **result.recommended}
    if output_json:
        from dataclasses import asdict

        from shoal.bench.workload import write_json

        write_json({"model": model, "load": asdict(load), **asdict(result)}, output_json)
    typer.echo(result.command(model))


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def cost(
    bench: Annotated[
        Path,
        typer.Option(
            help="A `shoal bench serve --goodput ... --output-json` result (its goodput is priced)."
        ),
    ],
    prices: Annotated[
        Path, typer.Option(help="Price file, YAML or JSON (example prices: deploy/prices.example.yaml).")
    ],
    instance: Annotated[str, typer.Option(help="The price file's instance type the --bench run measured.")],
    measured: Annotated[
        list[str] | None,
        typer.Option(
            help="TYPE=RESULT.json: another instance type's own measurement (repeat it); types "
            "without one are scaled from --instance by CPU (GPU) count."
        ),
    ] = None,
    target_rps: Annotated[
        float | None, typer.Option(help="Target load in requests/s: replicas, right-sizing.")
    ] = None,
    target_output_tps: Annotated[float | None, typer.Option(help="Or the target in output tokens/s.")] = None,
    min_memory_gib: Annotated[
        float, typer.Option(help="Right-size only among types with this much memory.")
    ] = 0.0,
    quantized: Annotated[
        Path | None, typer.Option(help="Bench result of the quantized model on --instance (same SLA).")
    ] = None,
    quantization_speedup: Annotated[
        float | None, typer.Option(help="Or its goodput ratio to the 16-bit model (e.g. 1.6).")
    ] = None,
    prefix_cache: Annotated[
        Path | None, typer.Option(help="Bench result with prefix caching on --instance (same SLA).")
    ] = None,
    prefix_cache_speedup: Annotated[float | None, typer.Option(help="Or its goodput ratio.")] = None,
    output_json: Annotated[Path | None, typer.Option(help="Also write the report here.")] = None,
) -> None:
    """Cost per 1M output tokens and per request at the SLA of a `shoal bench serve` run, replicas and the
    cheapest instance type for a target load, and the saving from quantization, prefix caching and spot."""
    import json

    from shoal.ops import cost as oc

    try:
        report = oc.run(bench, prices, instance, measured or [], target_rps, target_output_tps, min_memory_gib,
                        {"quantization": (quantized, quantization_speedup),
                         "prefix caching": (prefix_cache, prefix_cache_speedup)})  # fmt: skip
    except (ValueError, OSError, KeyError) as e:
        typer.echo(f"shoal cost: error: {e}", err=True)
        raise typer.Exit(2) from None
    for table in oc.tables(report):
        _console().print(table)
    typer.echo("\n".join(oc.notes(report)))
    if output_json is not None:
        output_json.write_text(json.dumps(report, indent=2) + "\n")
        typer.echo(f"wrote {output_json}")
