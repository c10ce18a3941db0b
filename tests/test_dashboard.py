"""deploy/grafana/shoal.json and docs/observability.md name only metrics declared in shoal/metric_names.py.

Every PromQL expression of the dashboard is tokenized and parsed far enough to tell metric names from
functions, keywords and label names: brackets must balance, functions must be PromQL's, metric names
must be declared (a histogram through its _bucket/_sum/_count series), and the labels an expression
matches or aggregates by must be labels of the metrics it uses. No Prometheus needed.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from shoal import metric_names as mn

REPO = Path(__file__).resolve().parents[1]
DASHBOARD = REPO / "deploy" / "grafana" / "shoal.json"
DOCS = REPO / "docs" / "observability.md"
pytestmark = pytest.mark.timeout(30)

FUNCTIONS = {
    "histogram_quantile", "rate", "irate", "increase", "delta", "deriv", "sum", "min", "max", "avg",
    "count", "topk", "bottomk", "quantile", "time", "clamp_min", "clamp_max", "abs", "vector", "scalar",
    "absent", "label_replace", "avg_over_time", "max_over_time", "min_over_time", "sum_over_time",
}  # fmt: skip
KEYWORDS = {
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "bool",
    "and",
    "or",
    "unless",
    "offset",
}
_TOKEN = re.compile(
    r"""\s*(?:(?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*')"""
    r"""|(?P<range>\[[^\]]*\])"""
    r"""|(?P<number>\d+(?:\.\d+)?(?:e[+-]?\d+)?)"""
    r"""|(?P<name>[A-Za-z_:][A-Za-z0-9_:]*)"""
    r"""|(?P<op>=~|!~|!=|==|>=|<=|[-+*/%^=<>,(){}]))"""
)


def tokenize(expr: str) -> list[tuple[str, str]]:
    """PromQL tokens (kind, text); ValueError on anything PromQL does not have."""
    tokens, pos = [], 0
    expr = expr.strip()
    while pos < len(expr):
        m = _TOKEN.match(expr, pos)
        if m is None or m.end() == pos:
            raise ValueError(f"cannot tokenize {expr[pos:]!r} in {expr!r}")
        kind = m.lastgroup
        tokens.append((kind, m.group(kind)))
        pos = m.end()
    return tokens


def references(expr: str) -> tuple[set[str], set[str]]:
    """(metric names, label names) an expression uses; AssertionError when it is not valid PromQL."""
    tokens = tokenize(expr)
    metrics, labels, stack = set(), set(), []
    for i, (kind, text) in enumerate(tokens):
        after = tokens[i + 1][1] if i + 1 < len(tokens) else ""
        if text in "({":
            grouping = text == "(" and i > 0 and tokens[i - 1][1] in ("by", "without", "on", "ignoring")
            stack.append("group" if grouping else text)
        elif text in ")}":
            opened = stack.pop() if stack else None
            assert opened in (("(", "group") if text == ")" else ("{",)), f"unbalanced {text!r} in {expr}"
        elif kind == "name":
            inside = stack[-1] if stack else None
            if inside in ("{", "group"):
                labels.add(text)
            elif text in KEYWORDS:
                continue
            elif after == "(" or after in ("by", "without"):  # a call, or an aggregation's clause first
                assert text in FUNCTIONS, f"unknown function {text} in {expr}"
            else:
                metrics.add(text)
    assert not stack, f"unclosed {stack} in {expr}"
    return metrics, labels


def _expressions() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]


def test_the_parser_refuses_what_it_must():
    assert references('sum by (le) (rate(vllm:e2e_request_latency_seconds_bucket{model_name="x"}[5m]))') == (
        {"vllm:e2e_request_latency_seconds_bucket"},
        {"le", "model_name"},
    )
    for bad in ("sum(rate(x[5m])", "rate(x[5m]))", "sumx(x)", "x{a=1}}", "x # y"):
        with pytest.raises((AssertionError, ValueError)):
            references(bad)


def test_every_dashboard_expression_uses_declared_metrics_and_labels():
    expressions = _expressions()
    assert expressions
    used = set()
    for expr in expressions:
        metrics, labels = references(expr)
        assert metrics, f"no metric in {expr}"
        undeclared = [m for m in metrics if mn.spec_of_sample(m) is None]
        assert not undeclared, f"undeclared metric in {expr}: {undeclared}"
        specs = [mn.spec_of_sample(m) for m in metrics]
        allowed = {"le"}.union(*(s.labels for s in specs))
        assert labels <= allowed, f"{expr} uses labels {labels - allowed} its metrics lack"
        used.update(s.name for s in specs)
    # The seed's panels: TTFT and TPOT percentiles, E2E, RPS, TPS, batch size, KV usage, GPU utilization and
    # memory, errors and timeouts, cost per token.
    for name in (mn.TIME_TO_FIRST_TOKEN, mn.TIME_PER_OUTPUT_TOKEN, mn.E2E_LATENCY, mn.REQUEST_SUCCESS,
                 mn.GENERATION_TOKENS, mn.BATCH_SIZE, mn.KV_CACHE_USAGE, mn.GPU_UTILIZATION, mn.GPU_MEMORY_USED,
                 mn.REQUEST_ERRORS, mn.REQUEST_TIMEOUTS, mn.REQUEST_COST):  # fmt: skip
        assert name in used, f"no panel shows {name}"


def test_dashboard_variables_use_declared_metrics():
    dashboard = json.loads(DASHBOARD.read_text())
    for variable in dashboard["templating"]["list"]:
        if variable["type"] != "query":
            continue
        m = re.fullmatch(r"label_values\(([\w:]+),\s*(\w+)\)", variable["definition"])
        assert m, variable["definition"]
        spec = mn.spec_of_sample(m.group(1))
        assert spec is not None and m.group(2) in spec.labels


def test_docs_describe_every_metric_and_only_declared_ones():
    text = DOCS.read_text()
    named = set(re.findall(r"\b(?:vllm|shoal):[a-z0-9_:]+", text))
    undeclared = {n for n in named if mn.spec_of_sample(n) is None}
    assert not undeclared, f"docs/observability.md names undeclared metrics: {sorted(undeclared)}"
    missing = {m.name for m in mn.METRICS} - named
    assert not missing, f"docs/observability.md does not describe {sorted(missing)}"
