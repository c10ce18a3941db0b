"""The engine and model packages run without the server stack (a GPU box may have only torch,
safetensors and tokenizers), and the engine knows nothing about HTTP, nor about OpenTelemetry (spans are
built in the server from the engine's timestamps, shoal/server/tracing.py)."""

import subprocess
import sys

import pytest

SERVER_STACK = (
    "fastapi",
    "uvicorn",
    "starlette",
    "pydantic",
    "prometheus_client",
    "typer",
    "transformers",
    "opentelemetry",
)


@pytest.mark.timeout(60)
def test_engine_and_model_import_no_server_stack():
    code = (
        "import sys\n"
        "import shoal.engine.async_engine, shoal.engine.llm_engine, shoal.model.loader\n"
        "import shoal.engine.core_client, shoal.engine.core_process\n"
        "import shoal.engine.tp_worker, shoal.model.tensor_parallel, shoal.model.tp_group\n"
        f"print(sorted(m for m in {SERVER_STACK!r} if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", f"engine/model pulled in: {out.stdout}"


@pytest.mark.timeout(60)
def test_engine_never_imports_server_policy_gateway_or_fleet():
    """Policies decide before the engine; what it needs (priority, cache salt) arrives as plain fields."""
    code = (
        "import sys, pkgutil, importlib, shoal.engine\n"
        "for m in pkgutil.iter_modules(shoal.engine.__path__): importlib.import_module('shoal.engine.' + m.name)\n"
        "print(sorted({n.split('.')[1] for n in sys.modules if n.startswith('shoal.')} & {'server', 'policy', 'gateway', 'fleet'}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", f"shoal.engine imports {out.stdout}"


@pytest.mark.timeout(60)
def test_metric_names_import_nothing_heavy():
    """shoal/metric_names.py is read by gateways, docs checks and tests: the standard library only."""
    code = (
        "import sys\n"
        "import shoal.metric_names\n"
        "heavy = ('torch', 'shoal.engine', 'shoal.server', 'prometheus_client', 'fastapi', 'numpy')\n"
        "print(sorted(m for m in heavy if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", f"shoal.metric_names pulled in: {out.stdout}"


@pytest.mark.timeout(60)
def test_shoal_stats_needs_no_torch_or_engine():
    code = "import sys\nimport shoal.live_stats\nprint(sorted(m for m in ('torch', 'shoal.engine') if m in sys.modules))\n"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", f"shoal.live_stats pulled in: {out.stdout}"


@pytest.mark.timeout(60)
def test_gateway_never_imports_torch_engine_or_model():
    """The gateway runs on a small box in front of the GPU servers, with neither torch nor the engine."""
    code = (
        "import sys, pkgutil, importlib, shoal.gateway\n"
        "for m in pkgutil.iter_modules(shoal.gateway.__path__):\n"
        "    if m.name != '__main__': importlib.import_module('shoal.gateway.' + m.name)\n"
        "from shoal.gateway.app import build_app\n"
        "from shoal.gateway.config import parse_config\n"
        "build_app(parse_config({'models': {'m': {'versions': {'v': {'backends': ['http://127.0.0.1:1']}}}}}))\n"
        "print(sorted({n for n in sys.modules if n == 'torch' or n.startswith(('shoal.engine', 'shoal.model'))}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", f"shoal.gateway imports {out.stdout}"


@pytest.mark.timeout(10)
def test_console_page_ships_as_package_data_and_names_no_other_host():
    """The console (shoal/server/ui/) is plain files: declared package data (a wheel or an image has
    them), with no URL of another host (no CDN): the page talks only to the server that serves it."""
    import re
    from fnmatch import fnmatch
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    declared = re.search(r'^"shoal.server" = \[(.*)\]', (repo / "pyproject.toml").read_text(), re.M)
    assert declared, "pyproject.toml: no package data for shoal.server"
    patterns = re.findall(r'"([^"]+)"', declared.group(1))
    ui = repo / "shoal" / "server" / "ui"
    files = [p for p in ui.iterdir() if p.is_file()]
    assert {"index.html", "console.js", "console.css"} <= {p.name for p in files}
    for path in files:
        relative = path.relative_to(repo / "shoal" / "server").as_posix()
        assert any(fnmatch(relative, pattern) for pattern in patterns), relative
        assert not re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}", path.read_text()), path.name


@pytest.mark.timeout(60)
def test_autoscale_simulator_needs_no_torch_or_engine():
    """`shoal autoscale simulate` runs on an operator's laptop: no torch, no engine (matplotlib only to plot)."""
    code = (
        "import sys\n"
        "import shoal.ops.autoscale, shoal.ops.autoscale_sim, shoal.ops.cli\n"
        "print(sorted(m for m in ('torch', 'shoal.engine', 'shoal.server', 'matplotlib') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", f"shoal.ops pulled in: {out.stdout}"


@pytest.mark.timeout(60)
def test_engine_runs_without_triton(stories_dir):
    """triton is a test dependency here and comes with CUDA builds of torch, but the engine must not need it:
    with `import triton` failing, the engine imports, the Triton kernels never serve (not even CUDA tensors:
    the PyTorch paths run there), and a CPU model generates. An eager engine never imports torch._dynamo
    either (~3 s of every engine start: a meta-device op through torch._refs, or a compiler decorator)."""
    code = (
        "import sys\n"
        "sys.modules['triton'] = None  # import triton raises ImportError, find_spec finds nothing\n"
        "import torch\n"
        "from shoal.engine.config import EngineConfig\n"
        "from shoal.engine.llm_engine import LLMEngine\n"
        "from shoal.engine.sampling_params import SamplingParams\n"
        "from shoal.kernels import triton_support\n"
        "assert not triton_support.serves(torch.device('cuda'))\n"
        f"engine = LLMEngine(EngineConfig(model={str(stories_dir)!r}, device='cpu', dtype='float32', "
        "max_model_len=64, kv_cache_memory=1 << 20))\n"
        "out = engine.generate([[1, 5, 9]], SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True))\n"
        "print('torch._dynamo' in sys.modules, len(out[0].outputs[0].token_ids))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "False 3"


@pytest.mark.timeout(60)
def test_http_process_of_serve_imports_no_torch():
    """With the engine core in its own process, `shoal serve`'s HTTP process needs no torch (~4 s and
    ~250 MB of every start): the CLI, the app, the core client and the thread choice."""
    code = (
        "import sys\n"
        "import shoal.cli, shoal.server.launch, shoal.engine.core_client\n"
        "from shoal.cpu_quota import ThreadChoice, apply_threads\n"
        "apply_threads(ThreadChoice(1, '--threads'), {})\n"
        "print('torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.timeout(60)
def test_bench_serve_and_cost_need_no_torch_or_engine():
    """The load client and the cost report run on any box that reaches the server (no torch, no engine)."""
    code = (
        "import sys\n"
        "import shoal.bench.serve, shoal.bench.serve_report, shoal.ops.cost\n"
        "print(sorted(m for m in ('torch', 'shoal.engine', 'shoal.server') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", f"shoal bench serve / shoal cost pulled in: {out.stdout}"
