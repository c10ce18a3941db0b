"""The autoscaling policy of deploy/k8s as code: what the Kubernetes HPA decides for shoal, sync by sync.

The keda and hpa overlays scale the shoal Deployment on queue depth (`sum(vllm:num_requests_waiting)`,
5 waiting requests per pod) and, with KEDA, on TTFT P95 over the 2 s SLA; up by 100% (2x pods) per
minute with no stabilization, down by 10% per 5 minutes after a 300 s stabilization window; between
minReplicaCount (1) and maxReplicaCount (10). `AutoscalePolicy()` holds those values, and
`load_policy(path)` reads them from the manifests themselves (a ScaledObject or an autoscaling/v2 HPA, in
a file or a kustomize directory rendered with `kubectl kustomize`), so code and manifests cannot drift
(tests/test_autoscale.py checks that the two agree).

`HorizontalController.reconcile` is the HPA controller's loop for one sync (every 15 s, the
kube-controller-manager's `--horizontal-pod-autoscaler-sync-period`), following the Kubernetes docs
(https://kubernetes.io/docs/tasks/run-application/horizontal-pod-autoscale/#algorithm-details and
#configurable-scaling-behavior) and the controller's code (kubernetes/kubernetes,
pkg/controller/podautoscaler/horizontal.go and replica_calculator.go):

1. Each metric proposes a replica count, `ceil(current * metric / target)`, or no change when the ratio
   metric/target is within the 10% tolerance; KEDA's queue-depth trigger is an External AverageValue
   metric (`ceil(sum / target)`), its TTFT trigger an External Value metric (`ceil(ready * value /
   target)`), the hpa overlay's metric a Pods AverageValue one (pods without a sample yet, i.e. still
   starting, count as 0 on a scale-up and as the target on a scale-down). The largest proposal wins.
2. Stabilization: the result is clamped between the lowest recommendation of the scale-up window and
   the highest of the scale-down window (each window includes this sync's recommendation); a 300 s
   scale-down window means "scale down only to the highest recommendation of the last 5 minutes".
3. Rate limits: each policy allows `ceil(start * (1 + percent/100))` pods up, `int(start * (1 -
   percent/100))` down (truncated, so 10% of fewer than 10 pods is still one pod), where `start` is the
   replica count at the start of the policy's period (current minus the changes made in the last
   periodSeconds); selectPolicy Max takes the largest change, Min the smallest; then min/max replicas.

Not modeled: the GPU-utilization trigger (absent on CPU replicas, where KEDA reads it as 0), Prometheus's
scrape and rule-evaluation delays, and KEDA's scale-to-zero activation. Metric values are floats here
(Kubernetes carries them as milli-units).
"""

from __future__ import annotations

import math
import re
import shutil
import subprocess
from dataclasses import dataclass, field, replace
from pathlib import Path

from shoal import metric_names as mn

QUEUE_DEPTH = "queue_depth"  # sum(vllm:num_requests_waiting) over the pods
TTFT_P95 = "ttft_p95"  # histogram_quantile(0.95, ...vllm:time_to_first_token_seconds_bucket...)
EXTERNAL, PODS = "External", "Pods"  # the HPA metric source type (KEDA makes External metrics)
QUEUE_QUERY = f"sum({mn.NUM_REQUESTS_WAITING})"
TTFT_QUERY = re.compile(
    rf"histogram_quantile\(\s*0?\.95\s*,.*{re.escape(mn.TIME_TO_FIRST_TOKEN)}_bucket\[(\d+)([smh])\]"
)
UNITS_S = {"s": 1, "m": 60, "h": 3600}


@dataclass(frozen=True)
class ScalingPolicy:
    """One HPAScalingPolicy: at most `value` pods (type Pods) or percent (type Percent) per `period_s`."""

    type: str
    value: int
    period_s: int


@dataclass(frozen=True)
class ScalingRules:
    """HPAScalingRules for one direction."""

    stabilization_window_s: int
    policies: tuple[ScalingPolicy, ...]
    select_policy: str = "Max"  # Max | Min | Disabled


@dataclass(frozen=True)
class Trigger:
    """One metric of the HPA: `signal` (QUEUE_DEPTH or TTFT_P95) against `target`.

    target_type: AverageValue (target per pod) or Value (target for the metric as a whole); source:
    EXTERNAL (a KEDA trigger) or PODS (a per-pod metric through prometheus-adapter)."""

    name: str
    signal: str
    target_type: str
    target: float
    source: str = EXTERNAL


# The keda overlay's values (deploy/k8s/overlays/keda/scaledobject.yaml); load_policy reads the real ones.
SCALE_UP = ScalingRules(0, (ScalingPolicy("Percent", 100, 60),), "Max")
SCALE_DOWN = ScalingRules(300, (ScalingPolicy("Percent", 10, 300),), "Min")
KEDA_TRIGGERS = (
    Trigger("queue-depth", QUEUE_DEPTH, "AverageValue", 5.0),
    Trigger("ttft-p95", TTFT_P95, "Value", 2.0),
)


@dataclass(frozen=True)
class AutoscalePolicy:
    """The HPA spec that matters for decisions, plus the controller's own settings (not in the spec)."""

    min_replicas: int = 1
    max_replicas: int = 10
    triggers: tuple[Trigger, ...] = KEDA_TRIGGERS
    scale_up: ScalingRules = SCALE_UP
    scale_down: ScalingRules = SCALE_DOWN
    ttft_window_s: int = 120  # the rate() window of the TTFT query: P95 over the last 2 minutes
    sync_period_s: int = 15  # kube-controller-manager --horizontal-pod-autoscaler-sync-period
    tolerance: float = 0.1  # kube-controller-manager --horizontal-pod-autoscaler-tolerance
    ignored: tuple[str, ...] = ()  # triggers of the manifest that are not modeled (named in the output)

    def __post_init__(self) -> None:
        if not 0 <= self.min_replicas <= self.max_replicas or self.max_replicas < 1:
            raise ValueError(
                f"need 0 <= minReplicas <= maxReplicas and maxReplicas >= 1, got {self.min_replicas} and "
                f"{self.max_replicas}"
            )

    def with_targets(
        self, queue_depth: float | None = None, ttft_p95: float | None = None
    ) -> AutoscalePolicy:
        """This policy with other thresholds for the triggers on a signal (None: keep), to try them out."""
        new = {QUEUE_DEPTH: queue_depth, TTFT_P95: ttft_p95}
        triggers = tuple(
            t if new[t.signal] is None else replace(t, target=float(new[t.signal])) for t in self.triggers
        )
        return replace(self, triggers=triggers)

    @property
    def reaction_s(self) -> int:
        """Longest time from a load step to the first scale-up decision: one sync, plus the up window."""
        return self.sync_period_s + self.scale_up.stabilization_window_s


@dataclass(frozen=True)
class Observation:
    """What the metrics say at one sync. queue_depth: waiting requests summed over the pods; ttft_p95:
    seconds, or None when the query has no data (KEDA's ignoreNullValues then reads 0)."""

    queue_depth: float
    ttft_p95: float | None
    ready: int  # pods Ready (they export metrics and take traffic)


@dataclass
class Decision:
    """One sync of the controller: the inputs, each metric's proposal and the replica count it sets."""

    time_s: float
    current: int
    observation: Observation
    proposals: dict[str, int]
    recommendation: int  # the largest proposal, before stabilization and rate limits
    stabilized: int
    desired: int
    reason: str


@dataclass
class HorizontalController:
    """The HPA controller's memory for one target: past recommendations and scale events (time, change)."""

    policy: AutoscalePolicy
    recommendations: list[tuple[float, int]] = field(default_factory=list)
    up_events: list[tuple[float, int]] = field(default_factory=list)
    down_events: list[tuple[float, int]] = field(default_factory=list)

    def reconcile(self, now: float, current: int, obs: Observation) -> Decision:
        """One sync at `now` (seconds) with `current` pods (spec replicas, Ready or not)."""
        p = self.policy
        proposals: dict[str, int] = {}
        if current > p.max_replicas:
            rec = stabilized = desired = p.max_replicas
            reason = "above maxReplicas"
        elif current < p.min_replicas:
            rec = stabilized = desired = p.min_replicas
            reason = "below minReplicas"
        else:
            proposals = {t.name: self._proposal(t, current, obs) for t in p.triggers}
            rec = max(proposals.values(), default=current)
            stabilized = self._stabilize(now, current, rec)
            desired, reason = self._rate_limit(now, current, stabilized)
        if desired != current:
            events = self.up_events if desired > current else self.down_events
            events.append((now, abs(desired - current)))
        return Decision(now, current, obs, proposals, rec, stabilized, desired, reason)

    # ---- 1. metrics (replica_calculator.go) -------------------------------------------------------------
    def _proposal(self, t: Trigger, current: int, obs: Observation) -> int:
        value = obs.queue_depth if t.signal == QUEUE_DEPTH else (obs.ttft_p95 or 0.0)
        if t.source == PODS:
            return self._pods_average(value, t.target, current, obs.ready)
        if t.target_type == "AverageValue":  # GetExternalPerPodMetricReplicas: the sum over target per pod
            ratio = value / (t.target * current)
            return current if self._within_tolerance(ratio) else math.ceil(value / t.target)
        ratio = value / t.target  # GetExternalMetricReplicas -> getUsageRatioReplicaCount: ready pods
        return current if self._within_tolerance(ratio) else math.ceil(ratio * obs.ready)

    def _pods_average(self, total: float, target: float, current: int, ready: int) -> int:
        """calcPlainMetricReplicas: pods still starting have no sample yet ("missing pods")."""
        if ready == 0:
            return current  # no metrics at all: the HPA keeps the count (and reports an error)
        ratio = total / ready / target
        missing = current - ready
        if missing <= 0:
            return current if self._within_tolerance(ratio) else math.ceil(ratio * ready)
        filled = total + (missing * target if ratio < 1.0 else 0.0)  # target on a scale-down, 0 on a scale-up
        new_ratio = filled / current / target
        crossed = (ratio < 1.0 < new_ratio) or (
            new_ratio < 1.0 < ratio
        )  # the missing pods flip the direction
        if self._within_tolerance(new_ratio) or crossed:
            return current
        proposed = math.ceil(new_ratio * current)
        if (new_ratio < 1.0 and proposed > current) or (new_ratio > 1.0 and proposed < current):
            return current
        return proposed

    def _within_tolerance(self, ratio: float) -> bool:
        return abs(1.0 - ratio) <= self.policy.tolerance

    # ---- 2. stabilization (stabilizeRecommendationWithBehaviors) --------------------------------------
    def _stabilize(self, now: float, current: int, recommendation: int) -> int:
        up_cutoff = now - self.policy.scale_up.stabilization_window_s
        down_cutoff = now - self.policy.scale_down.stabilization_window_s
        up = min([r for t, r in self.recommendations if t > up_cutoff] + [recommendation])
        down = max([r for t, r in self.recommendations if t > down_cutoff] + [recommendation])
        keep_after = min(up_cutoff, down_cutoff)  # older samples can never matter again
        self.recommendations = [(t, r) for t, r in self.recommendations if t > keep_after]
        self.recommendations.append((now, recommendation))
        return min(max(current, up), down)

    # ---- 3. rate limits (convertDesiredReplicasWithBehaviorRate) ---------------------------------------
    def _rate_limit(self, now: float, current: int, desired: int) -> tuple[int, str]:
        p = self.policy
        if desired > current:
            limit = max(self._limit(now, current, p.scale_up, up=True), current)
            if desired > min(limit, p.max_replicas):
                return min(
                    limit, p.max_replicas
                ), "ScaleUpLimit" if limit < p.max_replicas else "TooManyReplicas"
        elif desired < current:
            limit = min(self._limit(now, current, p.scale_down, up=False), current)
            if desired < max(limit, p.min_replicas):
                return max(
                    limit, p.min_replicas
                ), "ScaleDownLimit" if limit > p.min_replicas else "TooFewReplicas"
        return desired, "DesiredWithinRange"

    def _limit(self, now: float, current: int, rules: ScalingRules, up: bool) -> int:
        """calculateScale{Up,Down}Limit...: the furthest count the policies allow in this direction."""
        if rules.select_policy == "Disabled":
            return current
        proposals = []
        for pol in rules.policies:
            added = sum(n for t, n in self.up_events if t > now - pol.period_s)
            removed = sum(n for t, n in self.down_events if t > now - pol.period_s)
            start = current - added + removed
            if pol.type == "Pods":
                proposals.append(start + pol.value if up else start - pol.value)
            elif up:  # rounded up, or a small deployment could never grow
                proposals.append(math.ceil(start * (1 + pol.value / 100)))
            else:  # truncated, as Go's int32() does
                proposals.append(int(start * (1 - pol.value / 100)))
        # Max selects the biggest change: the highest count up, the lowest down; Min the smallest change.
        pick = max if (rules.select_policy == "Max") == up else min
        return pick(proposals)


# ---- the policy from the manifests -------------------------------------------------------------------


def load_policy(path: Path, **controller) -> AutoscalePolicy:
    """The policy of a ScaledObject or autoscaling/v2 HorizontalPodAutoscaler in `path`: a YAML file (one
    or many documents, e.g. `kubectl kustomize` output) or a kustomize directory (rendered with kubectl).

    controller: AutoscalePolicy fields not in the manifest (sync_period_s, tolerance).
    Raises ValueError when there is no such object, or when it has no trigger the simulator models."""
    import yaml

    docs = [d for d in yaml.safe_load_all(_manifest_text(Path(path))) if isinstance(d, dict)]
    for doc in docs:
        if doc.get("kind") == "ScaledObject":
            return replace(_from_scaled_object(doc["spec"]), **controller)
        if doc.get("kind") == "HorizontalPodAutoscaler":
            return replace(_from_hpa(doc["spec"], _adapter_renames(docs)), **controller)
    raise ValueError(f"{path}: no ScaledObject or HorizontalPodAutoscaler found")


def _manifest_text(path: Path) -> str:
    if not path.is_dir():
        return path.read_text()
    if shutil.which("kubectl") is None:
        raise ValueError(f"{path} is a kustomize directory and kubectl is not installed to render it")
    out = subprocess.run(["kubectl", "kustomize", str(path)], capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        raise ValueError(f"kubectl kustomize {path}: {out.stderr.strip()}")
    return out.stdout


def _rules(spec: dict | None, default: ScalingRules) -> ScalingRules:
    if not spec:
        return default
    policies = tuple(
        ScalingPolicy(p["type"], int(p["value"]), int(p["periodSeconds"])) for p in spec.get("policies", [])
    )
    return ScalingRules(
        int(spec.get("stabilizationWindowSeconds", default.stabilization_window_s)),
        policies or default.policies,
        spec.get("selectPolicy", "Max"),
    )


def _behavior(behavior: dict | None) -> dict:
    # Kubernetes' defaults where the manifest says nothing (HorizontalPodAutoscalerBehavior's doc).
    up_default = ScalingRules(0, (ScalingPolicy("Pods", 4, 15), ScalingPolicy("Percent", 100, 15)), "Max")
    down_default = ScalingRules(300, (ScalingPolicy("Percent", 100, 15),), "Max")
    behavior = behavior or {}
    return {
        "scale_up": _rules(behavior.get("scaleUp"), up_default),
        "scale_down": _rules(behavior.get("scaleDown"), down_default),
    }


def _from_scaled_object(spec: dict) -> AutoscalePolicy:
    triggers, ignored, window = [], [], AutoscalePolicy.ttft_window_s
    for trig in spec.get("triggers", []):
        meta, name = trig.get("metadata", {}), trig.get("name", trig.get("type", "?"))
        query = " ".join(str(meta.get("query", "")).split())
        kind = trig.get("metricType", "AverageValue")
        if trig.get("type") == "prometheus" and query == QUEUE_QUERY:
            triggers.append(Trigger(name, QUEUE_DEPTH, kind, float(meta["threshold"])))
        elif trig.get("type") == "prometheus" and (m := TTFT_QUERY.search(query)):
            triggers.append(Trigger(name, TTFT_P95, kind, float(meta["threshold"])))
            window = int(m.group(1)) * UNITS_S[m.group(2)]
        else:
            ignored.append(name)
    if not triggers:
        raise ValueError(f"ScaledObject: no trigger on {QUEUE_QUERY} or TTFT P95 to simulate")
    hpa = spec.get("advanced", {}).get("horizontalPodAutoscalerConfig", {})
    return AutoscalePolicy(
        min_replicas=int(spec.get("minReplicaCount", 0)),  # KEDA's default is 0
        max_replicas=int(spec.get("maxReplicaCount", 100)),
        triggers=tuple(triggers),
        ttft_window_s=window,
        ignored=tuple(ignored),
        **_behavior(hpa.get("behavior")),
    )


def _adapter_renames(docs: list[dict]) -> dict[str, str]:
    """prometheus-adapter's renames (`as` name -> series) from its rule ConfigMap, if rendered alongside."""
    import yaml

    renames = {}
    for doc in docs:
        for text in (doc.get("data") or {}).values() if doc.get("kind") == "ConfigMap" else ():
            config = yaml.safe_load(text)
            for rule in (config or {}).get("rules", []) if isinstance(config, dict) else ():
                name = rule.get("name", {})
                if "as" in name:
                    renames[name["as"]] = name.get("matches", "").strip("^$")
    return renames


def _from_hpa(spec: dict, renames: dict[str, str]) -> AutoscalePolicy:
    triggers, ignored = [], []
    for metric in spec.get("metrics", []):
        body = metric.get(metric["type"].lower(), {})
        name = body.get("metric", {}).get("name", metric["type"])
        target = body.get("target", {})
        series = renames.get(name, name)
        if series == mn.NUM_REQUESTS_WAITING and metric["type"] in (PODS, EXTERNAL):
            kind = target.get("type", "AverageValue")
            value = target.get("averageValue" if kind == "AverageValue" else "value")
            triggers.append(Trigger(name, QUEUE_DEPTH, kind, float(value), metric["type"]))
        else:
            ignored.append(name)
    if not triggers:
        raise ValueError(f"HorizontalPodAutoscaler: no metric on {mn.NUM_REQUESTS_WAITING} to simulate")
    return AutoscalePolicy(
        min_replicas=int(spec.get("minReplicas", 1)),
        max_replicas=int(spec["maxReplicas"]),
        triggers=tuple(triggers),
        ignored=tuple(ignored),
        **_behavior(spec.get("behavior")),
    )
