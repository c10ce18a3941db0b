"""`shoal cost` (shoal/ops/cost.py) on a small price file, against numbers computed by hand."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from shoal.cli import app
from shoal.ops import cost as oc

PRICES = """
currency: USD
note: test prices
instances:
  - {name: small, cpus: 2, memory_gib: 4, on_demand_per_hour: 0.10, spot_per_hour: 0.04}
  - {name: large, cpus: 8, memory_gib: 16, on_demand_per_hour: 0.36, spot_per_hour: 0.12}
  - {name: gpu, cpus: 8, gpus: 1, memory_gib: 32, on_demand_per_hour: 1.00}
"""


def _bench(rps: float, tps: float, goodput: bool = True) -> dict:
    """The fields of a `shoal bench serve` result that cost reads (goodput on or off)."""
    return {"benchmark": "bench_serve", "goodput_targets_ms": {"ttft": 500.0} if goodput else {},
            "request_goodput": rps if goodput else None, "goodput_output_throughput": tps if goodput else None,
            "request_throughput": rps * 1.5, "output_throughput": tps * 1.5}  # fmt: skip


@pytest.fixture
def files(tmp_path):
    (tmp_path / "prices.yaml").write_text(PRICES)
    for name, (rps, tps) in {"base": (2.0, 100.0), "quant": (2.5, 125.0), "big": (6.0, 300.0)}.items():
        (tmp_path / f"{name}.json").write_text(json.dumps(_bench(rps, tps)))
    return tmp_path


def _cost(files, *extra: str) -> tuple[dict, str]:
    args = ["cost", "--bench", str(files / "base.json"), "--prices", str(files / "prices.yaml"),
            "--instance", "small", "--output-json", str(files / "cost.json"), *extra]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    return json.loads((files / "cost.json").read_text()), result.output


@pytest.mark.timeout(10)
def test_costs_replicas_and_right_size_by_hand(files):
    """small, measured: 2 req/s, 100 tok/s at the SLA -> 0.10 $/h / (100 x 3600) x 1e6 = 0.2778 $/1M tokens,
    0.10 / (2 x 3600) = 1.389e-5 $/request; 10 req/s needs 5 replicas, 0.50 $/h (spot 0.20).
    large, 4x the CPUs -> 8 req/s, 400 tok/s: 0.36 / (400 x 3600) x 1e6 = 0.25 $/1M; 2 replicas, 0.72 $/h.
    gpu: no measurement, no scaling from a CPU type. Cheapest fleet: small (0.50 < 0.72 $/h)."""
    report, output = _cost(files, "--target-rps", "10")
    rows = {r["name"]: r for r in report["instances"]}
    small, large, gpu = rows["small"], rows["large"], rows["gpu"]
    assert small["per_million_tokens"] == pytest.approx(0.1 / 0.36)
    assert small["per_million_tokens_spot"] == pytest.approx(0.04 / 0.36)
    assert small["per_request"] == pytest.approx(0.1 / 7200)
    assert (small["replicas"], small["fleet_per_hour"], small["fleet_per_hour_spot"]) == (5, 0.5, 0.2)
    assert large["requests_per_s"] == 8 and large["per_million_tokens"] == pytest.approx(0.25)
    assert (large["replicas"], large["fleet_per_hour"]) == (2, 0.72)
    assert gpu["per_million_tokens"] is None and "not measured" in gpu["throughput_source"]
    assert report["right_size"] == "small" and report["right_size_by"] == "fleet cost per hour at the target"
    assert "small *" in output and "scaled x4 by CPU count from small" in output


@pytest.mark.timeout(10)
def test_memory_floor_measured_types_and_token_targets(files):
    """Memory >= 8 GiB leaves large; its own measurement (6 req/s, 300 tok/s) replaces the scaled one:
    0.36 / (300 x 3600) x 1e6 = 0.3333 $/1M; 1000 output tok/s needs ceil(1000 / 300) = 4 replicas."""
    report, _ = _cost(files, "--min-memory-gib", "8", "--measured", f"large={files / 'big.json'}",
                      "--target-output-tps", "1000")  # fmt: skip
    large = next(r for r in report["instances"] if r["name"] == "large")
    assert large["per_million_tokens"] == pytest.approx(1 / 3)
    assert (large["replicas"], large["fleet_per_hour"]) == (4, pytest.approx(1.44))
    assert report["right_size"] == "large"
    report, _ = _cost(files)  # no target: the lowest cost per token, large's 0.25 against small's 0.2778
    assert report["right_size"] == "large" and report["right_size_by"] == "cost per 1M output tokens"


@pytest.mark.timeout(10)
def test_savings_from_quantization_prefix_caching_and_spot(files):
    """On small (the right size for 10 req/s): quantized goodput 125 / 100 tok/s -> cost x0.8 (20%); prefix caching x2 -> x0.5 (50%);
    spot 0.04 / 0.10 -> x0.4 (60%); together 0.8 x 0.5 x 0.4 = 0.16: 0.2778 x 0.16 = 0.0444 $/1M (84%)."""
    report, output = _cost(files, "--quantized", str(files / "quant.json"), "--prefix-cache-speedup", "2",
                           "--target-rps", "10")  # fmt: skip
    s = {x["name"]: x for x in report["savings"]}
    assert s["quantization"]["factor"] == pytest.approx(0.8) and s["quantization"]["saving"] == pytest.approx(
        0.2
    )
    assert s["prefix caching"]["factor"] == pytest.approx(0.5)
    assert s["spot"]["factor"] == pytest.approx(0.4)
    assert s["all of the above"]["factor"] == pytest.approx(0.16)
    assert s["all of the above"]["per_million_tokens"] == pytest.approx(0.16 * 0.1 / 0.36)
    assert "84%" in output and report["right_size"] == "small"


@pytest.mark.timeout(10)
def test_bad_inputs_are_errors_not_tracebacks(files, tmp_path):
    (tmp_path / "no_sla.json").write_text(json.dumps(_bench(2.0, 100.0, goodput=False)))
    through = oc.measured_throughput(json.loads((tmp_path / "no_sla.json").read_text()), "no_sla.json")
    assert through.output_tokens_per_s == 150 and "no SLA" in through.source  # throughput stands in
    (tmp_path / "zero.json").write_text(json.dumps(_bench(0.0, 0.0)))
    (tmp_path / "bad.yaml").write_text(
        "instances:\n  - {name: x, cpus: 0, memory_gib: 1, on_demand_per_hour: 1}\n"
    )
    cases = [
        (["--instance", "nope"], "not in the price file"),
        (["--bench", str(tmp_path / "zero.json")], "no request met the SLA"),
        (["--prices", str(tmp_path / "bad.yaml")], "cpus"),
        (["--target-rps", "1", "--target-output-tps", "1"], "one target"),
        (["--quantization-speedup", "0"], "> 0"),
    ]
    for extra, message in cases:
        args = ["cost", "--bench", str(files / "base.json"), "--prices", str(files / "prices.yaml"),
                "--instance", "small", *extra]  # fmt: skip
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 2 and message in result.output, (extra, result.output)
