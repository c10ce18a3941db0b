"""The autoscaling policy as code (shoal/ops/autoscale.py) and its simulator (shoal/ops/autoscale_sim.py).

- The policy's built-in values are the keda overlay's, and the hpa overlay has the same behavior: read
  back from the rendered manifests (needs kubectl).
- On a spike trace the simulator makes, sync by sync, the decisions of a table computed by hand with the
  Kubernetes HPA algorithm; it scales up within the reaction time (one sync period, no up window) and
  never scales down faster than 10% (rounded to a whole pod) per 300 s.
- The TTFT trigger counts Ready pods only (an External Value metric), also checked against a hand table.
- `shoal autoscale simulate` prints the table and writes the PNG; bad input is an error, not a traceback.

Takes about 3 s (the kubectl renders and the CLI's matplotlib import).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
from typer.testing import CliRunner

from shoal.cli import app
from shoal.ops.autoscale import (
    PODS,
    QUEUE_DEPTH,
    AutoscalePolicy,
    HorizontalController,
    Observation,
    Trigger,
    load_policy,
)
from shoal.ops.autoscale_sim import ReplicaModel, capacity_from_bench, load_trace, simulate

REPO = Path(__file__).resolve().parents[1]
OVERLAYS = REPO / "deploy" / "k8s" / "overlays"
EXAMPLE_TRACE = REPO / "docs" / "operations" / "spike-trace.csv"

pytestmark = pytest.mark.timeout(60)
needs_kubectl = pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")

# The hpa overlay's policy: the keda overlay's behavior and replica range, one Pods metric on queue depth.
HPA_POLICY = replace(
    AutoscalePolicy(),
    triggers=(Trigger("shoal_num_requests_waiting", QUEUE_DEPTH, "AverageValue", 5.0, PODS),),
)


@needs_kubectl
def test_builtin_policy_is_the_keda_overlay():
    assert load_policy(OVERLAYS / "keda") == AutoscalePolicy(ignored=("gpu-utilization",))


@needs_kubectl
def test_hpa_overlay_has_the_same_policy_on_queue_depth():
    assert load_policy(OVERLAYS / "hpa") == HPA_POLICY


def test_policy_from_a_single_manifest_file(tmp_path):
    """A plain file (not an overlay) works too; a manifest without an autoscaler is a ValueError."""
    policy = load_policy(OVERLAYS / "keda" / "scaledobject.yaml")
    assert policy.scale_down.stabilization_window_s == 300
    assert [t.name for t in policy.triggers] == ["queue-depth", "ttft-p95"]
    empty = tmp_path / "svc.yaml"
    empty.write_text("apiVersion: v1\nkind: Service\nmetadata: {name: x}\n")
    with pytest.raises(ValueError, match="no ScaledObject or HorizontalPodAutoscaler"):
        load_policy(empty)


# ---- the hand table ------------------------------------------------------------------------------------
# Replica: 10 requests/s, Ready 30 s after the decision. HPA: sync every 15 s, tolerance 10%.
# Load: 5 rps, then 60 rps from t=30 to t=300, then 5 rps until the trace ends at t=1560.
SPIKE = [(0, 5), (30, 60), (300, 5), (1560, 5)]
SPIKE_MODEL = ReplicaModel(capacity_rps=10, ttft_s=0, pod_startup_s=30)

# (t, queue seen, recommendation, replicas after the sync). The sync at t sees the queue after second
# t-1; the queue grows by 60 - 10 * Ready per second during the spike. recommendation = ceil(queue / 5)
# (a Pods AverageValue metric: ceil(avg per Ready pod / 5 * Ready pods); a pod still starting has no sample
# and counts as 0 on a scale-up, which gives the same count). Scale-up limit: ceil(2 * the count at the
# start of the last 60 s), i.e. the current count minus what was added in (t-60, t]. Scale-down:
# stabilized to the highest recommendation in (t-300, t], then limited to int(0.9 * the count at the
# start of the last 300 s).
HAND_TABLE = [
    (0, 0, 0, 1),  # no queue: recommends 0, minReplicas keeps 1
    (15, 0, 0, 1),
    (30, 0, 0, 1),  # the spike starts during second 30: not seen yet
    (45, 750, 150, 2),  # 15 s x (60 - 10) = 750; 750 / 5 = 150; limit ceil(1 x 2) = 2
    (60, 1500, 300, 2),  # 30 s x 50; the +1 at 45 is in (0, 60]: start 1, limit 2
    (75, 2250, 450, 2),  # the 2nd pod is Ready from 75; the +1 at 45 is still in (15, 75]
    (90, 2850, 570, 2),  # 2250 + 15 x (60 - 20)
    (105, 3450, 690, 4),  # 45 is not after the cutoff 105 - 60: start 2, limit ceil(2 x 2) = 4
    (120, 4050, 810, 4),  # the +2 at 105 is in (60, 120]: start 2, limit 4
    (135, 4650, 930, 4),  # pods 3-4 Ready from 135
    (150, 4950, 990, 4),  # 4650 + 15 x (60 - 40)
    (165, 5250, 1050, 8),  # 105 is out of (105, 165]: start 4, limit 8
    (225, 5250, 1050, 10),  # 8 Ready from 195: 5850 at 195, then -20/s for 30 s; limit 16, maxReplicas 10
    (240, 4950, 990, 10),  # 2 pods still starting (count 0): ceil(4950 / 10 / 5 x 10) = 990
    (300, 2850, 570, 10),  # 10 Ready from 255: 4650 at 255, then -40/s for 45 s
    (315, 1425, 285, 10),  # load back to 5 rps: -95/s; recommendations fall but 1050 (t=165) is in the window
    (330, 0, 0, 10),  # 2850 / 95 = 30 s: empty at 330; the highest in (30, 330] is 1050
    (600, 0, 0, 10),  # 285 (t=315) is still in (300, 600]
    (615, 0, 0, 9),  # (315, 615] holds only 0s: stabilized 0; limit int(10 x 0.9) = 9
    (630, 0, 0, 9),  # the -1 at 615 is in (330, 630]: start 10, limit 9 = current
    (900, 0, 0, 9),  # still in (600, 900]
    (915, 0, 0, 8),  # 615 is out: start 9, int(8.1) = 8
    (1215, 0, 0, 7),  # int(7.2) = 7
    (1515, 0, 0, 6),  # int(6.3) = 6
]
HAND_SCALE_EVENTS = [(45, 1, 2), (105, 2, 4), (165, 4, 8), (225, 8, 10), (615, 10, 9), (915, 9, 8),
                     (1215, 8, 7), (1515, 7, 6)]  # fmt: skip


def test_decisions_follow_the_hand_table():
    sim = simulate(SPIKE, SPIKE_MODEL, HPA_POLICY)
    by_time = {d.time_s: d for d in sim.decisions}
    got = [
        (t, round(by_time[t].observation.queue_depth), by_time[t].recommendation, by_time[t].desired)
        for t, *_ in HAND_TABLE
    ]
    assert got == HAND_TABLE
    assert sim.scale_events == HAND_SCALE_EVENTS  # and no other sync changed the count
    assert len(sim.decisions) == 1560 // 15


@pytest.mark.parametrize("policy", [HPA_POLICY, AutoscalePolicy()], ids=["hpa", "keda"])
@pytest.mark.parametrize("trace", [SPIKE, "example"], ids=["hand-trace", "example-trace"])
def test_scales_up_within_the_reaction_time(policy, trace):
    """The first sync that sees the spike scales up: within one sync period (the up window is 0)."""
    rows = load_trace(EXAMPLE_TRACE) if trace == "example" else trace
    spike_start = next(t for (t, rps), (_, prev) in zip(rows[1:], rows, strict=False) if rps > prev)
    sim = simulate(rows, SPIKE_MODEL, policy)
    first_up = next(t for t, old, new in sim.scale_events if new > old)
    assert policy.reaction_s == 15
    assert spike_start < first_up <= spike_start + policy.reaction_s


@pytest.mark.parametrize("policy", [HPA_POLICY, AutoscalePolicy()], ids=["hpa", "keda"])
def test_never_scales_down_faster_than_10_percent_per_period(policy):
    """Over any 300 s, the count never falls below int(0.9 x the count at the window's start) (at most
    10% of the pods, rounded up to a whole pod), and the first scale-down waits for the 300 s window."""
    trace = [(0, 5), (30, 60), (300, 0), (4000, 0)]  # the load stops: everything would go at once
    sim = simulate(trace, SPIKE_MODEL, policy)
    counts = [s.replicas for s in sim.seconds]
    assert max(counts) == 10 and counts[-1] < 10
    period = 300  # the "10% per 5 minutes", not read from the policy under test
    for t in range(period, len(counts)):
        assert counts[t] >= int(counts[t - period] * 0.9), f"t={t}: {counts[t - period]} -> {counts[t]}"
    last_high = max(d.time_s for d in sim.decisions if d.recommendation >= 10)
    first_down = next(t for t, old, new in sim.scale_events if new < old)
    assert first_down - last_high >= 300


def test_ttft_trigger_counts_ready_pods():
    """KEDA's TTFT trigger is an External Value metric: ceil(Ready pods x P95 / 2 s). A replica whose TTFT
    is 3 s even without load (an SLA below what one replica can do) drives the count to maxReplicas.

    Load 2 rps < capacity: no queue, P95 = 3 s, ratio 1.5. t=0: no data yet (read as 0), stays 1.
    t=15: ceil(1.5 x 1) = 2 -> 1 to 2. t=30 to 60: still 1 Ready pod (the new one is Ready at 45, then
    the +1 at 15 holds the limit at 2 until 75). t=75: 2 Ready: 3, limit 4 -> 3. t=105: 3 Ready: 5, limit
    ceil(2 x 2) = 4 (the +1 at 75 counts). t=135: 4 Ready: 6, start 3 (the +1 at 105): limit 6 -> 6.
    t=165: 6 Ready: 9, start 4 (the +2 at 135): limit 8. t=195: 8 Ready: 12, start 6: limit 12, max 10."""
    sim = simulate([(0, 2), (240, 2)], ReplicaModel(10, ttft_s=3, pod_startup_s=30), AutoscalePolicy())
    assert sim.scale_events == [(15, 1, 2), (75, 2, 3), (105, 3, 4), (135, 4, 6), (165, 6, 8), (195, 8, 10)]
    assert sim.decisions[2].proposals == {"queue-depth": 0, "ttft-p95": 2}  # t=30: 1 Ready pod


def test_capacity_from_a_bench_serve_result(tmp_path):
    one = tmp_path / "one.json"
    one.write_text(json.dumps({"request_throughput": 4.5, "median_ttft_ms": 250}))
    assert capacity_from_bench(one) == {"capacity_rps": 4.5, "ttft_s": 0.25}
    sweep = tmp_path / "sweep.json"
    runs = [
        {"request_throughput": 1.0, "median_ttft_ms": 100},
        {"request_throughput": 3.0, "median_ttft_ms": 900},
    ]
    sweep.write_text(json.dumps({"runs": runs}))
    assert capacity_from_bench(sweep) == {"capacity_rps": 3.0, "ttft_s": 0.1}
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    with pytest.raises(ValueError, match="request_throughput"):
        capacity_from_bench(bad)


def test_cli_prints_the_table_and_writes_the_plot(tmp_path):
    png = tmp_path / "sim.png"
    args = ["autoscale", "simulate", "--trace", str(EXAMPLE_TRACE), "--capacity-rps", "4", "--ttft-s", "0.5"]
    result = CliRunner().invoke(app, [*args, "--plot", str(png), "--every", "300"])
    assert result.exit_code == 0, result.output
    assert "1 -> 2 (ScaleUpLimit)" in result.output and "peak_replicas: 10" in result.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    capped = CliRunner().invoke(app, [*args, "--queue-threshold", "50", "--max-replicas", "4"])
    assert capped.exit_code == 0, capped.output
    assert "queue-depth AverageValue 50" in capped.output and "peak_replicas: 4" in capped.output


@pytest.mark.parametrize(
    ("rows", "extra", "message"),
    [
        ("time_s,rps\n0,1\n60,1\n", [], "give --capacity-rps or --bench"),
        ("t,rps\n0,1\n60,1\n", ["--capacity-rps", "1"], "must name time_s and rps"),
        ("time_s,rps\n0,1\n", ["--capacity-rps", "1"], "at least two rows"),
        ("time_s,rps\n0,-1\n60,1\n", ["--capacity-rps", "1"], "must not be negative"),
        ("time_s,rps\n0,1\n60,1\n", ["--capacity-rps", "0"], "capacity_rps must be positive"),
        (
            "time_s,rps\n0,1\n60,1\n",
            ["--capacity-rps", "1", "--min-replicas", "5", "--max-replicas", "2"],
            "minReplicas",
        ),
    ],
)
def test_cli_rejects_bad_input(tmp_path, rows, extra, message):
    trace = tmp_path / "trace.csv"
    trace.write_text(rows)
    result = CliRunner().invoke(app, ["autoscale", "simulate", "--trace", str(trace), *extra])
    assert result.exit_code == 2
    assert message in result.output and "Traceback" not in result.output


def test_pods_metric_fills_starting_pods_like_kubernetes():
    """calcPlainMetricReplicas: a pod without a sample counts as the target on a scale-down and as 0 on a
    scale-up. 4 pods, 2 of them Ready, target 5 waiting requests per pod:
    - queue 2: 1 per Ready pod (ratio 0.2 < 1), filled (2 + 2 x 5) / 4 / 5 = 0.6 -> ceil(0.6 x 4) = 3;
    - queue 60: ratio 6 > 1, the starting pods count 0: 60 / 4 / 5 = 3 -> ceil(3 x 4) = 12;
    - queue 19: ratio 1.9, filled 19 / 4 / 5 = 0.95, within the 10% tolerance -> keep 4;
    - queue 12: ratio 1.2, filled 12 / 4 / 5 = 0.6: the missing pods flip the direction -> keep 4."""
    controller = HorizontalController(HPA_POLICY)
    for queue, proposal in [(2, 3), (60, 12), (19, 4), (12, 4)]:
        assert controller._proposal(HPA_POLICY.triggers[0], 4, Observation(queue, None, ready=2)) == proposal
