"""The live `shoal serve` subprocess shared by the server test files (started once per test session).

stories260K (tiny, float32, deterministic) served as "stories", with an API key, a simple
--chat-template (the model has none) and a small --max-request-bytes (for the 413 test). It logs JSON
lines at info, so that its log (`access_lines`) holds one access line per request. The process is
cached in this module (imported once per session however many test files use it) and stopped at exit.
"""

from __future__ import annotations

import atexit
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from shoal.bench.serve_compare import die_with_parent as _die_with_parent
from shoal.bench.serve_compare import free_port as _free_port

REPO = Path(__file__).resolve().parents[1]
MODELS = Path(os.environ.get("SHOAL_TEST_MODELS", REPO / "models"))
TINY_MODEL = MODELS / "stories260K"
API_KEY = "test-key"
SERVED_NAME = "stories"
MAX_REQUEST_BYTES = 256 * 1024
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)
START_TIMEOUT_S = 90
# Metrics flags: goodput targets (loose, so that a loaded test machine still meets them) and a price.
SLO_TTFT_MS = 5000.0
SLO_TPOT_MS = 1000.0
COST_PER_HOUR = 3.6
# The main server logs JSON lines at info: its log then holds one access line per request (access_lines).
MAIN_LOG_FLAGS = ("--log-level", "info", "--log-format", "json")


@dataclass
class LiveServer:
    name: str
    url: str
    proc: subprocess.Popen
    log_path: Path
    headers: dict[str, str]
    model: str

    def client(self, **kwargs) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers=self.headers, timeout=60, **kwargs)

    def log_tail(self, chars: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]


_servers: dict[str, LiveServer] = {}
_own_servers: list[LiveServer] = []
_ready: set[str] = set()
_tmp = Path(tempfile.mkdtemp(prefix="shoal-test-server-"))


def _launch(
    name: str,
    extra: list[str],
    headers: dict[str, str],
    model: str,
    env_extra: dict | None = None,
    log_flags: tuple[str, ...] = ("--log-level", "warning"),
) -> LiveServer:
    port = _free_port()
    log_path = _tmp / f"{name}.log"
    cmd = [sys.executable, "-m", "shoal.cli", "serve", "--model", str(TINY_MODEL), "--dtype", "float32",
           "--device", "cpu", "--port", str(port), *log_flags, *extra]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **(env_extra or {})}
    env.pop("SHOAL_API_KEY", None)
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent
        )
    return LiveServer(name, f"http://127.0.0.1:{port}", proc, log_path, headers, model)


def _launch_all() -> None:
    if _servers:
        return
    template = _tmp / "chat_template.jinja"
    template.write_text(CHAT_TEMPLATE)
    extra = ["--api-key", API_KEY, "--served-model-name", SERVED_NAME, "--chat-template", str(template),
             "--max-request-bytes", str(MAX_REQUEST_BYTES), "--enable-fault-injection",
             "--slo-ttft-ms", str(SLO_TTFT_MS), "--slo-tpot-ms", str(SLO_TPOT_MS),
             "--cost-per-hour", str(COST_PER_HOUR)]  # fmt: skip
    _servers["main"] = _launch(
        "main", extra, {"Authorization": f"Bearer {API_KEY}"}, SERVED_NAME, log_flags=MAIN_LOG_FLAGS
    )


def _wait_ready(server: LiveServer) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise RuntimeError(
                f"shoal serve ({server.name}) exited with {server.proc.returncode}:\n{server.log_tail()}"
            )
        try:
            if httpx.get(f"{server.url}/ready", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(
        f"shoal serve ({server.name}) not ready after {START_TIMEOUT_S}s:\n{server.log_tail()}"
    )


def launch_own_server(name: str, extra: list[str], env: dict | None = None) -> LiveServer:
    """A stories260K server of a test's own (one it may drain, hang or kill), without an API key; it is
    not waited for (see wait_ready) and is stopped at exit if still running. `extra` comes after the
    fixture's own flags, and a repeated option takes its last value (click), so `["--model", OTHER,
    "--dtype", "auto"]` serves another model."""
    if not TINY_MODEL.exists():
        pytest.skip(f"{TINY_MODEL} missing: run `python ../shared/models/prepare.py models`")
    server = _launch(name, extra, {}, str(TINY_MODEL), env)
    _own_servers.append(server)
    return server


def launch_priority_server(name: str, max_num_seqs: int) -> LiveServer:
    """A ready server of the test's own with the priority policy, max_num_seqs seats, the schedule
    recorded (/debug/schedule) and fault injection on (/debug/faults slows its steps)."""
    flags = ["--scheduling-policy", "priority", "--max-num-seqs", str(max_num_seqs), "--record-schedule"]
    server = launch_own_server(name, [*flags, "--enable-fault-injection"])
    wait_ready(server)
    return server


def completion_request_id(client: httpx.Client, prompt: str, priority: int, max_tokens: int) -> str:
    """The engine request id (the response id + "-0") of a finished greedy completion, EOS ignored."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0}
    r = client.post("/v1/completions", json={**body, "priority": priority}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["id"] + "-0"


def wait_ready(server: LiveServer) -> None:
    """Until /ready answers 200 (RuntimeError with the log if the server exits or takes too long)."""
    _wait_ready(server)


def get_server(name: str) -> LiveServer:
    if not TINY_MODEL.exists():
        pytest.skip(
            f"{TINY_MODEL} missing: run `python ../shared/models/prepare.py models` (or set SHOAL_TEST_MODELS)"
        )
    _launch_all()
    server = _servers[name]
    if name not in _ready:
        _wait_ready(server)
        _ready.add(name)
    return server


def stop_process(proc: subprocess.Popen, timeout_s: float = 60) -> None:
    """SIGTERM, then SIGKILL if the process has not exited within timeout_s. A server drains on SIGTERM,
    and on a loaded machine (CI shares 2 cores) an idle one can take over 10 s to stop."""
    proc.terminate()
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


@atexit.register
def _stop_all() -> None:
    servers = [*_servers.values(), *_own_servers]
    for server in servers:
        if server.proc.poll() is None:
            server.proc.terminate()
    for server in servers:
        try:
            server.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.proc.kill()


@pytest.fixture(scope="session")
def live_server() -> LiveServer:
    """stories260K served as "stories": API key, simple chat template, 256 KiB request limit."""
    return get_server("main")


def access_lines(server: LiveServer) -> list[dict]:
    """The access log lines written so far by a server (it runs with --log-format json)."""
    lines = [json.loads(line) for line in server.log_path.read_text().splitlines() if line.startswith("{")]
    return [line for line in lines if line.get("logger") == "shoal.access"]


def metric_samples(text: str, name: str) -> dict[str, float]:
    """Prometheus text -> {label string: value} for the samples of one metric name."""
    out = {}
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            key, _, value = line.rpartition(" ")
            out[key[len(name) :]] = float(value)
    return out


def steps_with_batch_over_one(metrics_text: str) -> float:
    """How many engine steps ran more than one sequence, from the shoal:batch_size histogram."""
    count = sum(metric_samples(metrics_text, "shoal:batch_size_count").values())
    le1 = sum(
        v for k, v in metric_samples(metrics_text, "shoal:batch_size_bucket").items() if 'le="1.0"' in k
    )
    return count - le1
