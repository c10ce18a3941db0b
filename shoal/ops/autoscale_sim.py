"""Replay a request-rate trace against the autoscaling policy, to choose thresholds before touching a cluster.

The load: a CSV trace of `time_s,rps` rows, the rate holding from each row's time to the next row's (the
last row ends the trace). The replicas: a fluid queueing model, advanced in steps of one second.

- One replica completes at most `capacity_rps` requests per second (its throughput at saturation, from
  `shoal bench serve` or a flag). Requests wait in one FIFO queue in front of the Ready replicas (the
  Service spreads them; their `vllm:num_requests_waiting` gauges sum to this queue), and a request is
  admitted as soon as capacity is free in its second: below capacity nothing waits, above it the queue
  grows by (rps - ready * capacity_rps) per second.
- A request's TTFT is its wait plus `ttft_s` (the replica's TTFT at low load); the TTFT P95 that the
  KEDA trigger reads is the 95th percentile over the requests admitted in the query's window (2 minutes),
  exact, where Prometheus would interpolate within histogram buckets.
- A new pod serves `pod_startup_s` after the scale decision (scheduling, image pull, model load, readiness
  probe); a scale-down removes pods at once, the not-yet-Ready ones first (what a ReplicaSet deletes
  first), their queued requests staying in the shared queue.

Each HPA sync (every `policy.sync_period_s`, at t = 0, 15, 30, ...) happens at the start of its second and
sees the queue and TTFT as they stand after the previous second. The controller is
shoal.ops.autoscale.HorizontalController.
"""

from __future__ import annotations

import csv
import json
import math
from collections import deque
from dataclasses import dataclass, field, replace
from pathlib import Path

from shoal.ops.autoscale import TTFT_P95, AutoscalePolicy, Decision, HorizontalController, Observation


@dataclass(frozen=True)
class ReplicaModel:
    """What one replica can do. capacity_rps: requests/s at saturation; ttft_s: seconds to the first token
    at low load; pod_startup_s: seconds from the scale decision to Ready."""

    capacity_rps: float
    ttft_s: float = 0.0
    pod_startup_s: float = 60.0

    def __post_init__(self) -> None:
        if self.capacity_rps <= 0:
            raise ValueError(f"capacity_rps must be positive, got {self.capacity_rps}")
        if self.ttft_s < 0 or self.pod_startup_s < 0:
            raise ValueError("ttft_s and pod_startup_s must not be negative")


# Field names looked for in a `shoal bench serve` JSON result (vLLM's benchmark_serving names first).
CAPACITY_FIELDS = ("request_throughput", "requests_per_s", "rps")
TTFT_FIELDS_MS = ("median_ttft_ms", "p50_ttft_ms")


def capacity_from_bench(path: Path) -> dict:
    """ReplicaModel fields from a `shoal bench serve` JSON result: capacity_rps from its
    `request_throughput` (requests/s, vLLM's name; `requests_per_s` also read) and ttft_s from its
    `median_ttft_ms` (or `p50_ttft_ms`). A result with a `runs` list (several request rates) gives the run
    of the highest throughput (the saturated one) for capacity and the lowest-rate run for TTFT.

    Raises ValueError when no throughput field is found."""
    data = json.loads(Path(path).read_text())
    runs = data.get("runs") if isinstance(data.get("runs"), list) else [data]
    rated = [(_first(r, CAPACITY_FIELDS), r) for r in runs if isinstance(r, dict)]
    rated = [(c, r) for c, r in rated if c]
    if not rated:
        raise ValueError(f"{path}: no {' or '.join(CAPACITY_FIELDS)} field (requests/s) in the JSON")
    fields = {"capacity_rps": max(c for c, _ in rated)}
    ttft_ms = _first(min(rated, key=lambda cr: cr[0])[1], TTFT_FIELDS_MS)
    if ttft_ms is not None:
        fields["ttft_s"] = ttft_ms / 1000
    return fields


def _first(record: dict, names: tuple[str, ...]) -> float | None:
    return next((float(record[n]) for n in names if isinstance(record.get(n), int | float)), None)


def load_trace(path: Path) -> list[tuple[float, float]]:
    """(time_s, rps) rows of a CSV with a `time_s,rps` header, sorted by time. Raises ValueError on a
    missing column, a negative rate, or fewer than two rows (the last row marks the end)."""
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if not {"time_s", "rps"} <= set(reader.fieldnames or ()):
            raise ValueError(f"{path}: the header must name time_s and rps, got {reader.fieldnames}")
        rows = sorted((float(r["time_s"]), float(r["rps"])) for r in reader)
    if len(rows) < 2:
        raise ValueError(f"{path}: a trace needs at least two rows (the last one marks its end)")
    if any(rps < 0 for _, rps in rows):
        raise ValueError(f"{path}: rps must not be negative")
    return rows


@dataclass
class Second:
    """The state after one simulated second [time_s, time_s + 1)."""

    time_s: int
    rps: float
    replicas: int  # pods (spec replicas), Ready or starting
    ready: int
    queue_depth: float  # requests waiting at the end of the second
    ttft_p95: float | None  # over the trailing window, seconds


@dataclass
class Simulation:
    seconds: list[Second]
    decisions: list[Decision]
    policy: AutoscalePolicy
    model: ReplicaModel

    @property
    def scale_events(self) -> list[tuple[float, int, int]]:
        """(time_s, from, to) of every sync that changed the replica count."""
        return [(d.time_s, d.current, d.desired) for d in self.decisions if d.desired != d.current]

    def summary(self) -> dict:
        sla = next((t.target for t in self.policy.triggers if t.signal == TTFT_P95), None)
        p95s = [s.ttft_p95 for s in self.seconds if s.ttft_p95 is not None]
        return {
            "peak_replicas": max(s.replicas for s in self.seconds),
            "pod_seconds": sum(s.replicas for s in self.seconds),
            "peak_queue_depth": max(s.queue_depth for s in self.seconds),
            "peak_ttft_p95_s": max(p95s, default=None),
            "seconds_over_sla": sum(1 for p in p95s if sla is not None and p > sla),
            "scale_events": len(self.scale_events),
        }


@dataclass
class _Queue:
    """FIFO cohorts of waiting requests (arrival second, count) and the recent admissions' waits."""

    window_s: int
    cohorts: deque = field(default_factory=deque)
    admitted: deque = field(default_factory=deque)  # (second, wait_s, count)

    @property
    def depth(self) -> float:
        return sum(n for _, n in self.cohorts)

    def serve(self, t: int, arrivals: float, capacity: float) -> None:
        if arrivals > 0:
            self.cohorts.append((t, arrivals))
        while self.cohorts and capacity > 0:
            arrived, n = self.cohorts[0]
            take = min(n, capacity)
            capacity -= take
            self.admitted.append((t, t - arrived, take))
            if take < n:
                self.cohorts[0] = (arrived, n - take)
            else:
                self.cohorts.popleft()
        while self.admitted and self.admitted[0][0] <= t - self.window_s:
            self.admitted.popleft()

    def wait_p95(self) -> float | None:
        """The 95th percentile of the waits admitted in the window (the lowest wait with 95% at or below)."""
        total = sum(n for _, _, n in self.admitted)
        if total <= 0:
            return None
        seen = 0.0
        for wait, n in sorted((w, n) for _, w, n in self.admitted):
            seen += n
            if seen >= 0.95 * total - 1e-9:
                return float(wait)
        return None  # unreachable: the loop ends at seen == total


def simulate(
    trace: list[tuple[float, float]],
    model: ReplicaModel,
    policy: AutoscalePolicy | None = None,
    start_replicas: int | None = None,
) -> Simulation:
    """Replay `trace` second by second. start_replicas: pods at t=0, all Ready (default minReplicas).
    Scale-to-zero (KEDA's activation, minReplicaCount 0) is not modeled: minReplicas 0 is taken as 1."""
    policy = policy or AutoscalePolicy()
    if policy.min_replicas < 1:
        policy = replace(policy, min_replicas=1)
    controller = HorizontalController(policy)
    ready_at = [0.0] * (start_replicas or policy.min_replicas)  # one entry per pod
    queue = _Queue(policy.ttft_window_s)
    seconds: list[Second] = []
    decisions: list[Decision] = []
    end = int(math.ceil(trace[-1][0]))
    for t in range(end):
        ready = sum(1 for r in ready_at if r <= t)
        if t % policy.sync_period_s == 0:
            p95 = queue.wait_p95()
            obs = Observation(queue.depth, None if p95 is None else p95 + model.ttft_s, ready)
            decision = controller.reconcile(t, len(ready_at), obs)
            decisions.append(decision)
            ready_at = _resize(ready_at, decision.desired, t + model.pod_startup_s)
            ready = sum(1 for r in ready_at if r <= t)
        rps = _rate_at(trace, t)
        queue.serve(t, rps, ready * model.capacity_rps)
        p95 = queue.wait_p95()
        seconds.append(
            Second(t, rps, len(ready_at), ready, queue.depth, None if p95 is None else p95 + model.ttft_s)
        )
    return Simulation(seconds, decisions, policy, model)


def _rate_at(trace: list[tuple[float, float]], t: float) -> float:
    rate = 0.0
    for time_s, rps in trace:
        if time_s > t:
            break
        rate = rps
    return rate


def _resize(ready_at: list[float], n: int, new_ready_at: float) -> list[float]:
    """Add pods Ready at new_ready_at, or remove the least ready ones (latest ready time) first."""
    if n >= len(ready_at):
        return ready_at + [new_ready_at] * (n - len(ready_at))
    return sorted(ready_at)[:n]


# ---- output --------------------------------------------------------------------------------------------


def table_rows(sim: Simulation, every_s: int = 60) -> list[list[str]]:
    """Rows at every `every_s` seconds and at every sync that changed the replica count."""
    changed = {int(t) for t, _, _ in sim.scale_events}
    by_time = {int(d.time_s): d for d in sim.decisions}
    rows = []
    for s in sim.seconds:
        if s.time_s % every_s and s.time_s not in changed:
            continue
        d = by_time.get(s.time_s)
        change = f"{d.current} -> {d.desired} ({d.reason})" if d and d.desired != d.current else ""
        rows.append(
            [
                str(s.time_s),
                f"{s.rps:g}",
                f"{s.ready}/{s.replicas}",
                f"{s.queue_depth:.0f}",
                "-" if s.ttft_p95 is None else f"{s.ttft_p95:.1f}",
                str(d.recommendation) if d else "",
                change,
            ]
        )
    return rows


TABLE_HEADER = ["t (s)", "rps", "ready/pods", "queue", "TTFT P95 (s)", "recommended", "scale"]


def plot(sim: Simulation, path: Path) -> None:
    """A PNG of replicas (and the load), queue depth and TTFT P95 over time (matplotlib, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [s.time_s for s in sim.seconds]
    fig, (ax_r, ax_q, ax_l) = plt.subplots(3, 1, sharex=True, figsize=(9, 7.5))
    ax_r.step(t, [s.replicas for s in sim.seconds], where="post", label="pods")
    ax_r.step(t, [s.ready for s in sim.seconds], where="post", label="Ready pods")
    ax_r.set_ylabel("replicas")
    load = ax_r.twinx()
    load.plot(t, [s.rps for s in sim.seconds], color="grey", alpha=0.5, label="load (rps)")
    load.plot(
        t,
        [s.ready * sim.model.capacity_rps for s in sim.seconds],
        color="grey",
        ls=":",
        label="capacity (rps)",
    )
    load.set_ylabel("requests/s")
    ax_r.legend(loc="upper left")
    load.legend(loc="upper right")
    ax_q.plot(t, [s.queue_depth for s in sim.seconds], color="tab:red", label="waiting")
    queue = next((tr for tr in sim.policy.triggers if tr.signal != TTFT_P95), None)
    if (
        queue is not None and queue.target_type == "AverageValue"
    ):  # the level where the trigger holds the count
        target = [queue.target * s.replicas for s in sim.seconds]
        ax_q.step(t, target, where="post", color="black", ls="--", lw=1, label=f"{queue.target:g} x pods")
        ax_q.legend(loc="upper right")
    ax_q.set_ylabel("queue depth\n(requests waiting)")
    ax_l.plot(
        t, [s.ttft_p95 if s.ttft_p95 is not None else math.nan for s in sim.seconds], color="tab:purple"
    )
    sla = next((tr.target for tr in sim.policy.triggers if tr.signal == TTFT_P95), None)
    if sla is not None:
        ax_l.axhline(sla, color="black", ls="--", lw=1, label=f"SLA {sla:g} s")
        ax_l.legend(loc="upper right")
    ax_l.set_ylabel(f"TTFT P95 (s)\nover {sim.policy.ttft_window_s} s")
    ax_l.set_xlabel("time (s)")
    fig.suptitle(
        f"capacity {sim.model.capacity_rps:g} rps/replica, pod start-up {sim.model.pod_startup_s:g} s"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
