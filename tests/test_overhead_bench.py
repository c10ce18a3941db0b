"""bench/overhead.py's arithmetic (shoal.bench.overhead): per-round pairing against the baseline, the CPU
ratio over all rounds, and the docs table. The end-to-end run (three `shoal serve` and an OTLP receiver)
is too slow for the suite; its parts are tested elsewhere (the receiver in tests/test_tracing.py, the HTTP
load in tests/test_serve_compare.py), and its numbers are in docs/benchmarks.md."""

from __future__ import annotations

import pytest

from shoal.bench.overhead import _summary, markdown


def _run(round_: int, variant: str, tps: float, cpu: float) -> dict:
    return {
        "round": round_,
        "variant": variant,
        "output_tokens_per_s": tps,
        "server_cpu_ms_per_1k_tokens": cpu,
    }


@pytest.mark.timeout(10)
def test_loss_is_the_median_of_per_round_ratios_and_cpu_is_summed():
    # The machine slows down in round 2 for both variants alike: pairing keeps the loss at 2%.
    runs = [
        _run(1, "baseline", 100.0, 50.0),
        _run(1, "tracing_on", 98.0, 51.0),
        _run(2, "baseline", 50.0, 50.0),
        _run(2, "tracing_on", 49.0, 51.0),
        _run(3, "baseline", 100.0, 50.0),
        _run(3, "tracing_on", 90.0, 54.0),
    ]

    summary = _summary(runs, ["baseline", "tracing_on"])

    traced = summary["tracing_on"]
    assert traced["ratio_to_baseline_median"] == pytest.approx(0.98)
    assert traced["loss"] == pytest.approx(0.02) and traced["within_target"]
    assert traced["output_tokens_per_s_median"] == 90.0  # unpaired, it would say 10% slower
    assert traced["server_cpu_to_baseline"] == pytest.approx(156 / 150)
    assert summary["baseline"]["loss"] == 0.0

    result = {
        "model": "m",
        "dtype": "float32",
        "threads_per_server": 1,
        "load": "2 streams",
        "rounds": 3,
        "summary": summary,
        "skipped": {"metrics_off": "no flag"},
        "machine": {"cpu": "CPU X", "cpu_cores_usable": 2, "cpu_flags": ["avx2"]},
    }
    table = markdown(result)
    assert "| tracing_on | 90 (49-98) | 0.980 (" in table and "| 2.0% |" in table
    assert "| metrics_off | skipped: no flag |" in table
