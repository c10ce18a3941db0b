"""deploy/k8s: every Kustomize overlay renders, every object validates, and the rendered objects do what
docs/operations/kubernetes.md says.

- Core kinds: `kubernetes-validate` (offline schemas; strict: unknown fields fail).
- Custom resources: the `openAPIV3Schema` of their official CRDs, read from ../shared/k8s/crds (see its
  SOURCES.md), made strict like the API server's field validation (an unknown field fails, except under
  `x-kubernetes-preserve-unknown-fields`). CEL rules (`x-kubernetes-validations`) are not applied.
- Every PromQL expression (alerts, KEDA triggers, prometheus-adapter rules, the AnalysisTemplate, the
  Grafana dashboard) parses with `promql-parser` (Prometheus's grammar, in Rust) and names only metrics of
  shoal/metric_names.py (or `up`), and labels those metrics have (or that Prometheus adds to a target).

Skips, with the reason, only where `kubectl` or ../shared/k8s is missing.
"""

from __future__ import annotations

import copy
import functools
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from test_dashboard import _expressions as dashboard_expressions

from shoal import metric_names as mn

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "deploy" / "k8s"
OVERLAYS_DIR = K8S / "overlays"
CRDS = REPO.parent / "shared" / "k8s" / "crds"
RUNBOOKS = REPO / "docs" / "operations"
KUBERNETES_VERSION = "1.32.0"  # kubectl's here (kustomize 5.5)
OVERLAYS = ("cpu", "gpu", "hpa", "keda", "keda-scale-to-zero", "tls", "rollout", "inference-pool")
# Labels Prometheus attaches to every scraped series from its Kubernetes service discovery.
TARGET_LABELS = {"namespace", "pod", "service", "job", "instance", "container", "rollouts_pod_template_hash"}

pytestmark = pytest.mark.timeout(60)
needs_kubectl = pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
needs_crds = pytest.mark.skipif(not CRDS.is_dir(), reason=f"{CRDS} (the official CRDs) is missing")


# ---- rendering and validation --------------------------------------------------------------------------


@functools.cache
def render(overlay: str) -> tuple[dict, ...]:
    out = subprocess.run(
        ["kubectl", "kustomize", str(OVERLAYS_DIR / overlay)], capture_output=True, text=True, timeout=30
    )
    assert out.returncode == 0, f"kubectl kustomize {overlay}: {out.stderr}"
    return tuple(d for d in yaml.safe_load_all(out.stdout) if d)


def find(objects, kind: str, name: str | None = None) -> list[dict]:
    return [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]


def one(objects, kind: str, name: str | None = None) -> dict:
    found = find(objects, kind, name)
    assert len(found) == 1, f"{len(found)} {kind} {name or ''}"
    return found[0]


def _strict(schema):
    """The schema with additionalProperties: false wherever the API server would reject unknown fields."""
    if isinstance(schema, dict):
        schema = {k: _strict(v) for k, v in schema.items()}
        if (
            schema.get("type") == "object"
            and "properties" in schema
            and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")
        ):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    return schema


@functools.cache
def crd_schemas() -> dict[tuple[str, str], dict]:
    """(apiVersion, kind) -> strict openAPIV3Schema, for every served version of every CRD."""
    schemas = {}
    for path in sorted(CRDS.glob("*.yaml")):
        crd = yaml.safe_load(path.read_text())
        assert crd["kind"] == "CustomResourceDefinition", path
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        for version in crd["spec"]["versions"]:
            if version.get("served"):
                schema = _strict(version["schema"]["openAPIV3Schema"])
                schemas[(f"{group}/{version['name']}", kind)] = schema
    return schemas


def validate(obj: dict) -> None:
    """Raise when obj is not a valid object of its kind (core: kubernetes-validate; custom: its CRD)."""
    import jsonschema
    import kubernetes_validate

    key = (obj["apiVersion"], obj["kind"])
    if key in crd_schemas():
        jsonschema.Draft7Validator(crd_schemas()[key]).validate(obj)
    else:
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
@needs_crds
def test_overlay_renders_and_every_object_validates(overlay):
    objects = render(overlay)
    assert one(objects, "Deployment", "shoal")
    for obj in objects:
        try:
            validate(obj)
        except Exception as e:  # name the object, then fail
            pytest.fail(f"{overlay}: {obj['kind']}/{obj['metadata']['name']}: {type(e).__name__}: {e}"[:2000])


def test_every_overlay_directory_is_tested():
    assert {p.parent.name for p in OVERLAYS_DIR.glob("*/kustomization.yaml")} == set(OVERLAYS)


@needs_crds
def test_the_crds_are_the_official_ones_and_cover_every_custom_kind():
    kinds = {kind for _, kind in crd_schemas()}
    assert kinds == {"ServiceMonitor", "PrometheusRule", "ScaledObject", "Rollout", "AnalysisTemplate",
                     "HTTPRoute", "InferencePool"}  # fmt: skip
    assert ("inference.networking.k8s.io/v1", "InferencePool") in crd_schemas()
    assert (CRDS / "SOURCES.md").is_file()


@needs_kubectl
@needs_crds
def test_validation_rejects_broken_objects():
    """The validators can fail: a typo, a wrong type or a missing field in core and custom objects."""
    objects = render("keda")
    deployment = copy.deepcopy(one(objects, "Deployment", "shoal"))
    probe = deployment["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["httpGet"]
    probe["prot"] = probe.pop("port")  # a typo
    scaled = copy.deepcopy(one(objects, "ScaledObject"))
    scaled["spec"]["triggers"][0]["metdata"] = scaled["spec"]["triggers"][0].pop("metadata")
    wrong_type = copy.deepcopy(one(objects, "ScaledObject"))
    wrong_type["spec"]["minReplicaCount"] = "one"
    rule = copy.deepcopy(one(objects, "PrometheusRule"))
    del rule["spec"]["groups"][0]["name"]  # required
    for broken in (deployment, scaled, wrong_type, rule):
        with pytest.raises(Exception):  # noqa: B017 - kubernetes_validate's or jsonschema's ValidationError
            validate(broken)
    for good in (one(objects, "Deployment", "shoal"), one(objects, "ScaledObject")):
        validate(good)
    # Every custom kind is checked strictly, as the API server's field validation would: an unknown field
    # in its spec fails.
    custom = {(o["apiVersion"], o["kind"]): o for overlay in OVERLAYS for o in render(overlay)}
    custom = {key: obj for key, obj in custom.items() if key in crd_schemas()}
    assert {kind for _, kind in custom} == {kind for _, kind in crd_schemas()}
    for obj in custom.values():
        broken = copy.deepcopy(obj)
        broken["spec"]["replicaz"] = 1
        with pytest.raises(Exception, match="replicaz"):  # noqa: B017
            validate(broken)


# ---- the Deployment, in every overlay --------------------------------------------------------------------


def shoal_container(objects) -> dict:
    spec = one(objects, "Deployment", "shoal")["spec"]["template"]["spec"]
    return next(c for c in spec["containers"] if c["name"] == "shoal")


def flag(args: list[str], name: str) -> str | None:
    for i, arg in enumerate(args):
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
        if arg == name and i + 1 < len(args):
            return args[i + 1]
    return None


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probes_drain_and_rollout_safety(overlay):
    objects = render(overlay)
    deployment = one(objects, "Deployment", "shoal")
    pod = deployment["spec"]["template"]["spec"]
    container = shoal_container(objects)
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    startup = container["startupProbe"]
    assert startup["httpGet"]["path"] == "/ready", "/health is 200 during the load: it would not wait"
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300, "a slow model load must fit"
    # SIGTERM comes after preStop; then shoal drains for --drain-timeout; then the engine process exits.
    pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    drain = float(flag(container["args"], "--drain-timeout"))
    margin = 10
    assert pod["terminationGracePeriodSeconds"] > pre_stop + drain + margin
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] and security["allowPrivilegeEscalation"] is False
    assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["runAsUser"] != 0
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(container["resources"][kind])
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert int(flag(container["args"], "--port")) == ports["http"]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    claims = {v["name"]: v.get("persistentVolumeClaim", {}).get("claimName") for v in pod["volumes"]}
    assert one(objects, "PersistentVolumeClaim", claims["model-cache"])
    assert {"name": "HF_HOME", "value": mounts["model-cache"]} in container["env"]
    assert "/tmp" in mounts.values(), "a read-only root needs a writable /tmp"
    assert {"name": "XDG_CACHE_HOME", "value": "/tmp/cache"} in container["env"]
    selector = deployment["spec"]["selector"]["matchLabels"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert one(objects, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert one(objects, "Service", "shoal")["spec"]["selector"].items() <= labels.items()
    assert selector.items() <= labels.items()
    monitor = one(objects, "ServiceMonitor")
    assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"
    assert (
        monitor["spec"]["selector"]["matchLabels"].items()
        <= one(objects, "Service", "shoal")["metadata"]["labels"].items()
    )


@needs_kubectl
def test_gpu_and_tls_overlays():
    gpu = shoal_container(render("gpu"))
    assert gpu["resources"]["limits"]["nvidia.com/gpu"] == "1" and "--device=cuda" in gpu["args"]
    assert "--device=cpu" in shoal_container(render("cpu"))["args"]
    objects = render("tls")
    container = shoal_container(objects)
    secret = one(objects, "Secret", "shoal-tls")
    assert secret["type"] == "kubernetes.io/tls"
    volumes = one(objects, "Deployment", "shoal")["spec"]["template"]["spec"]["volumes"]
    tls_volume = next(
        v for v in volumes if v.get("secret", {}).get("secretName") == secret["metadata"]["name"]
    )
    mount = next(m["mountPath"] for m in container["volumeMounts"] if m["name"] == tls_volume["name"])
    assert flag(container["args"], "--ssl-certfile") == f"{mount}/tls.crt"
    assert flag(container["args"], "--ssl-keyfile") == f"{mount}/tls.key"
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"]["scheme"] == "HTTPS"
    assert one(objects, "ServiceMonitor")["spec"]["endpoints"][0]["scheme"] == "https"


# ---- autoscaling -------------------------------------------------------------------------------------------

SCALE_UP = {
    "stabilizationWindowSeconds": 0,
    "policies": [{"type": "Percent", "value": 100, "periodSeconds": 60}],
}
SCALE_DOWN = {
    "stabilizationWindowSeconds": 300,
    "policies": [{"type": "Percent", "value": 10, "periodSeconds": 300}],
}


def assert_behavior(behavior: dict) -> None:
    for direction, expected in (("scaleUp", SCALE_UP), ("scaleDown", SCALE_DOWN)):
        got = behavior[direction]
        assert got["stabilizationWindowSeconds"] == expected["stabilizationWindowSeconds"], direction
        assert got["policies"] == expected["policies"], direction


@needs_kubectl
def test_keda_scaled_object():
    objects = render("keda")
    scaled = one(objects, "ScaledObject")
    target = scaled["spec"]["scaleTargetRef"]
    assert one(objects, target["kind"], target["name"])
    assert scaled["spec"]["minReplicaCount"] == 1
    assert_behavior(scaled["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"])
    triggers = {t["name"]: t for t in scaled["spec"]["triggers"]}
    assert all(t["type"] == "prometheus" for t in triggers.values())
    queue = triggers["queue-depth"]["metadata"]
    assert queue["query"] == f"sum({mn.NUM_REQUESTS_WAITING})" and float(queue["threshold"]) > 0
    gpu = triggers["gpu-utilization"]["metadata"]
    assert f"min_over_time({mn.GPU_UTILIZATION}[5m])" in gpu["query"] and float(gpu["threshold"]) == 85
    ttft = triggers["ttft-p95"]["metadata"]
    assert (
        ttft["query"].startswith("histogram_quantile(0.95,")
        and mn.TIME_TO_FIRST_TOKEN + "_bucket" in ttft["query"]
    )
    assert "activationThreshold" not in queue
    zero = one(render("keda-scale-to-zero"), "ScaledObject")
    assert zero["spec"]["minReplicaCount"] == 0
    assert zero["spec"]["triggers"][0]["metadata"]["activationThreshold"] == "0"


@needs_kubectl
def test_hpa_and_its_adapter_rule():
    objects = render("hpa")
    hpa = one(objects, "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert_behavior(hpa["spec"]["behavior"])
    target = hpa["spec"]["scaleTargetRef"]
    assert one(objects, target["kind"], target["name"])
    (rule,) = adapter_rules(objects)
    assert rule["name"]["as"] == hpa["spec"]["metrics"][0]["pods"]["metric"]["name"]
    assert re.fullmatch(rule["name"]["matches"], mn.NUM_REQUESTS_WAITING)


def autoscaled_twice(objects) -> list[str]:
    """Deployments that both a ScaledObject (KEDA's own HPA) and an HPA scale."""
    keda = {o["spec"]["scaleTargetRef"]["name"] for o in find(objects, "ScaledObject")}
    hpa = {o["spec"]["scaleTargetRef"]["name"] for o in find(objects, "HorizontalPodAutoscaler")}
    return sorted(keda & hpa)


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_keda_and_hpa_never_scale_one_deployment(overlay):
    assert not autoscaled_twice(render(overlay))
    assert autoscaled_twice(render("keda") + render("hpa")) == ["shoal"]  # applying both would be caught


# ---- progressive delivery ---------------------------------------------------------------------------------


@needs_kubectl
def test_rollout_canary():
    objects = render("rollout")
    rollout = one(objects, "Rollout")
    ref = rollout["spec"]["workloadRef"]
    deployment = one(objects, ref["kind"], ref["name"])
    assert "template" not in rollout["spec"], "the pod template lives in the Deployment only"
    assert rollout["spec"]["selector"] == deployment["spec"]["selector"]
    canary = rollout["spec"]["strategy"]["canary"]
    weights = [s["setWeight"] for s in canary["steps"] if "setWeight" in s]
    assert weights == [5, 25, 50, 100]
    assert all("pause" in s for s in canary["steps"][1:-1:2])
    for name in (canary["stableService"], canary["canaryService"]):
        assert one(objects, "Service", name)
    template = one(objects, "AnalysisTemplate", canary["analysis"]["templates"][0]["templateName"])
    assert {m["name"] for m in template["spec"]["metrics"]} == {"error-rate", "ttft-p95"}
    passed = {a["name"] for a in canary["analysis"]["args"]}
    needed = {a["name"] for a in template["spec"]["args"] if "value" not in a}
    assert needed <= passed
    route = one(
        objects, "HTTPRoute", canary["trafficRouting"]["plugins"]["argoproj-labs/gatewayAPI"]["httpRoute"]
    )
    backends = {b["name"]: b["weight"] for b in route["spec"]["rules"][0]["backendRefs"]}
    assert backends == {canary["stableService"]: 100, canary["canaryService"]: 0}


# ---- inference pool ---------------------------------------------------------------------------------------


@needs_kubectl
def test_inference_pool():
    objects = render("inference-pool")
    pool = one(objects, "InferencePool")
    assert pool["apiVersion"] == "inference.networking.k8s.io/v1"
    pod_labels = one(objects, "Deployment", "shoal")["spec"]["template"]["metadata"]["labels"]
    assert pool["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert pool["spec"]["targetPorts"][0]["number"] == shoal_container(objects)["ports"][0]["containerPort"]
    picker_ref = pool["spec"]["endpointPickerRef"]
    service = one(objects, "Service", picker_ref["name"])
    assert picker_ref["port"]["number"] in {p["port"] for p in service["spec"]["ports"]}
    epp = [d for d in find(objects, "Deployment") if d["spec"]["template"]["metadata"]["labels"].items()
           >= service["spec"]["selector"].items()]  # fmt: skip
    assert len(epp) == 1
    epp_pod = epp[0]["spec"]["template"]["spec"]
    (container,) = epp_pod["containers"]
    assert container["image"].startswith("registry.k8s.io/gateway-api-inference-extension/epp:")
    assert flag(container["args"], "--pool-name") == pool["metadata"]["name"]
    config_map = one(objects, "ConfigMap", epp_pod["volumes"][0]["configMap"]["name"])
    picker_config = yaml.safe_load(config_map["data"][Path(flag(container["args"], "--config-file")).name])
    assert picker_config["kind"] == "EndpointPickerConfig"
    declared = {p["type"] for p in picker_config["plugins"]}
    for profile in picker_config["schedulingProfiles"]:
        assert {p["pluginRef"] for p in profile["plugins"]} <= declared
    account = one(objects, "ServiceAccount", epp_pod["serviceAccountName"])
    for binding in find(objects, "RoleBinding") + find(objects, "ClusterRoleBinding"):
        (subject,) = binding["subjects"]
        assert (subject["name"], subject["namespace"]) == (
            account["metadata"]["name"],
            account["metadata"]["namespace"],
        )
    role_rules = one(objects, "Role")["rules"]
    assert any("inferencepools" in r["resources"] and pool["apiVersion"].split("/")[0] in r["apiGroups"]
               for r in role_rules)  # fmt: skip
    route = one(objects, "HTTPRoute")
    (backend,) = route["spec"]["rules"][0]["backendRefs"]
    assert (backend["kind"], backend["name"]) == ("InferencePool", pool["metadata"]["name"])
    assert route["spec"]["parentRefs"][0]["name"] != "GATEWAY", "the overlay sets the Gateway"


# ---- PromQL and runbooks ----------------------------------------------------------------------------------


def references(expr: str) -> tuple[set[str], set[str]]:
    """(metric names, label names) of a PromQL expression; ValueError when it does not parse."""
    import promql_parser

    metrics, labels = set(), set()

    def visit(node):
        if isinstance(node, promql_parser.VectorSelector):
            metrics.add(node.name)
            labels.update(m.name for m in node.matchers.matchers)
        elif isinstance(node, promql_parser.AggregateExpr) and node.modifier is not None:
            labels.update(node.modifier.labels)
        elif isinstance(node, promql_parser.BinaryExpr) and node.modifier and node.modifier.matching:
            labels.update(node.modifier.matching.labels)

    promql_parser.walk(promql_parser.parse(expr), visit)
    return metrics, labels


def test_the_promql_reader_refuses_what_it_must():
    assert references(
        'sum by (le) (rate(shoal:x_bucket{status=~"5.."}[5m])) / on (model_name) group_left sum(vllm:y)'
    ) == ({"shoal:x_bucket", "vllm:y"}, {"le", "status", "model_name"})
    for bad in ("sum(rate(x[5m])", "rate(x[5m]))", "sumx(x)", "x{a=1}", "rate(x)"):
        with pytest.raises(ValueError):
            references(bad)


def adapter_rules(objects) -> list[dict]:
    config = one(objects, "ConfigMap", "shoal-prometheus-adapter")["data"]["config.yaml"]
    return yaml.safe_load(config)["rules"]


def promql_expressions() -> list[tuple[str, str]]:
    """(where, expression) for every PromQL expression in every overlay, templates filled in."""
    exprs = []
    for overlay in OVERLAYS:
        objects = render(overlay)
        for group in one(objects, "PrometheusRule")["spec"]["groups"]:
            exprs += [(f"alert {r['alert']}", r["expr"]) for r in group["rules"]]
        for scaled in find(objects, "ScaledObject"):
            exprs += [(f"KEDA {t['name']}", t["metadata"]["query"]) for t in scaled["spec"]["triggers"]]
        for template in find(objects, "AnalysisTemplate"):
            for metric in template["spec"]["metrics"]:
                query = re.sub(r"\{\{args\.[\w-]+\}\}", "x", metric["provider"]["prometheus"]["query"])
                exprs.append((f"analysis {metric['name']}", query))
        if find(objects, "ConfigMap", "shoal-prometheus-adapter"):
            for rule in adapter_rules(objects):
                series = rule["seriesQuery"]
                name = series.split("{")[0]
                exprs.append(("adapter seriesQuery", series))
                query = rule["metricsQuery"].replace("<<.Series>>", name)
                query = query.replace("<<.LabelMatchers>>", 'namespace="x"').replace("<<.GroupBy>>", "pod")
                exprs.append(("adapter metricsQuery", query))
    for expr in dashboard_expressions():  # Grafana's variables: $__rate_interval is a duration
        exprs.append(("dashboard", re.sub(r"\$\w+", "x", re.sub(r"\$__\w*interval", "5m", expr))))
    return exprs


@needs_kubectl
def test_every_promql_expression_parses_and_names_declared_metrics():
    exprs = promql_expressions()
    where = {w.split()[0] for w, _ in exprs}
    assert where == {"alert", "KEDA", "analysis", "adapter", "dashboard"}
    for place, expr in exprs:
        metrics, labels = references(expr)
        assert metrics, f"{place}: no metric in {expr}"
        specs = [mn.spec_of_sample(m) for m in metrics if m != "up"]
        assert None not in specs, f"{place}: undeclared metric in {expr}"
        allowed = {"le"} | TARGET_LABELS | set().union(*(s.labels for s in specs))
        assert labels <= allowed, f"{place}: {expr} uses labels {labels - allowed}"
    undeclared = references("sum(rate(vllm:num_request_waiting[5m]))")[0].pop()  # a typo fails the check
    assert mn.spec_of_sample(undeclared) is None


def alerts() -> list[dict]:
    return [r for g in one(render("cpu"), "PrometheusRule")["spec"]["groups"] for r in g["rules"]]


@needs_kubectl
def test_the_issues_alerts_each_with_a_runbook():
    rules = alerts()
    names = {r["alert"] for r in rules}
    assert names == {"ShoalTTFTP95High", "ShoalErrorRateHigh", "ShoalKVCacheNearFull", "ShoalEngineStepStalled",
                     "ShoalReplicaNotReady", "ShoalGPUMemoryHigh"}  # fmt: skip
    for rule in rules:
        url = rule["annotations"]["runbook_url"]
        m = re.fullmatch(r"https://github\.com/[\w-]+/shoal/blob/main/(docs/operations/[\w-]+\.md)", url)
        assert m, url
        runbook = REPO / m.group(1)
        assert runbook.is_file(), f"{rule['alert']}: no {runbook}"
        assert rule["alert"] in runbook.read_text()
        assert rule["labels"]["severity"] in ("warning", "critical")


RUNBOOK_TOPICS = ("oom", "slow-requests", "gpu-hang", "high-latency", "quality-regression",
                  "rate-limit-storm", "cold-start")  # fmt: skip


def test_runbooks_name_declared_metrics_and_have_their_sections():
    files = [RUNBOOKS / f"{t}.md" for t in RUNBOOK_TOPICS] + sorted(RUNBOOKS.glob("Shoal*.md"))
    assert len(files) == len(RUNBOOK_TOPICS) + 6
    for path in files:
        text = path.read_text()
        named = set(re.findall(r"\b(?:vllm|shoal):[a-z0-9_]+", text))
        assert named, f"{path.name} names no metric"
        undeclared = {n for n in named if mn.spec_of_sample(n) is None}
        assert not undeclared, f"{path.name}: undeclared {undeclared}"
        for section in ("## Symptoms", "## Confirm", "## Mitigate", "## Resolve"):
            assert section in text, f"{path.name} lacks {section}"
    for path in RUNBOOKS.glob("*.md"):  # relative links between the documents resolve
        for target in re.findall(r"\]\(([\w./-]+\.md)(?:#[\w-]+)?\)", path.read_text()):
            assert (path.parent / target).is_file(), f"{path.name} links to a missing {target}"
    text = (RUNBOOKS / "incident-response.md").read_text()
    for section in ("Detect", "Triage", "Mitigate", "Resolve", "Postmortem", "SEV1"):
        assert section in text
