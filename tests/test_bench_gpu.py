"""bench/gpu.py, the GPU decode benchmark, on toy shapes on the CPU: it parses its options, needs torch and
shoal alone (the GPU machine has no FastAPI, typer, and perhaps no safetensors or tokenizers), builds the three weight variants and reports each against
the bandwidth limit. The numbers themselves belong to a GPU run (docs/gpu.md)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from shoal.bench import gpu

pytestmark = pytest.mark.timeout(60)
SCRIPT = Path(__file__).resolve().parent.parent / "bench" / "gpu.py"


BLOCKED = ("fastapi", "typer", "pydantic", "safetensors", "tokenizers", "transformers", "jinja2")


def test_help_names_the_options(capsys):
    with pytest.raises(SystemExit) as exited:
        gpu.parser().parse_args(["--help"])
    assert exited.value.code == 0
    assert "--variants" in capsys.readouterr().out


def test_runs_with_torch_and_shoal_alone():
    """The GPU machine has torch and triton, not necessarily the server stack, safetensors or tokenizers:
    the script runs every variant with those unimportable."""
    argv = [
        "--device",
        "cpu",
        "--tiny",
        "--models",
        "qwen3-0.6b",
        "--batch",
        "1",
        "--steps",
        "1",
        "--context",
        "8",
    ]
    code = (
        "import sys\n"
        f"for m in {BLOCKED!r}: sys.modules[m] = None  # importing them fails\n"
        f"sys.argv = ['bench/gpu.py', *{argv!r}, '--copy-bytes', '100000']\n"
        f"exec(compile(open({str(SCRIPT)!r}).read(), 'bench/gpu.py', 'exec'), {{'__name__': '__main__'}})\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    assert all(f"| qwen3-0.6b | {v} | 1 |" in out.stdout for v in gpu.VARIANTS)


def test_tiny_run_reports_every_variant_against_the_limit(tmp_path):
    out = tmp_path / "gpu.json"
    argv = ["--device", "cpu", "--tiny", "--models", "qwen3-0.6b", "--batch", "1", "2", "--steps", "1"]
    results = gpu.main([*argv, "--context", "20", "--copy-bytes", "1000000", "--out", str(out)])
    rows = json.loads(out.read_text())["results"]
    assert [(r["variant"], r["batch"]) for r in rows] == [(v, b) for v in gpu.VARIANTS for b in (1, 2)]
    assert all(
        r["step_ms"] > 0 and r["limit_ms"] > 0 and r["ratio"] == r["step_ms"] / r["limit_ms"] for r in rows
    )
    size = {r.variant: r.weight_bytes for r in results}
    cfg = gpu.model_config("qwen3-0.6b", tiny=True)
    model = gpu.build_model(cfg, gpu.torch.device("cpu"), gpu.torch.bfloat16, "bf16")
    assert size["bf16"] == 2 * sum(p.numel() for p in model.parameters())  # tied lm_head counted once
    assert size["w4a16"] < size["fp8"] < size["bf16"]  # 4-bit + scales < 8-bit + scales < 16-bit
