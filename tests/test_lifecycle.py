"""Lifecycle against real `shoal serve` processes: readiness while loading and warming up, liveness when
the engine hangs, breaks or dies, the SIGTERM drain, and request timeouts with partial answers.

Servers that get drained, hung or killed are each test's own (stories260K, fault injection on); the
timeout tests use the shared server and clear its fault plan after.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

try:
    from server_fixture import launch_own_server, live_server, metric_samples, wait_ready  # noqa: F401
except ImportError:  # tests/ became a package
    from tests.server_fixture import (  # type: ignore[no-redef] # noqa: F401
        launch_own_server,
        live_server,
        metric_samples,
        wait_ready,
    )

LONG = {"max_tokens": 400, "ignore_eos": True, "temperature": 0}


def _stream(url: str, body: dict, headers: dict | None = None) -> tuple[list[dict], bool]:
    """The JSON events of a streamed completion, and whether it ended with [DONE]."""
    with httpx.stream(
        "POST", f"{url}/v1/completions", json={**body, "stream": True}, headers=headers, timeout=60
    ) as r:
        assert r.status_code == 200, r.read()
        data = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    done = bool(data) and data[-1] == "[DONE]"
    return [json.loads(d) for d in data if d != "[DONE]"], done


def _finish_reason(events: list[dict]) -> str | None:
    reasons = [c["finish_reason"] for e in events for c in e.get("choices", []) if c.get("finish_reason")]
    return reasons[-1] if reasons else None


def _text(events: list[dict]) -> str:
    return "".join(c.get("text", "") for e in events for c in e.get("choices", []))


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _running(url: str) -> float:
    return sum(metric_samples(httpx.get(f"{url}/metrics").text, "vllm:num_requests_running").values())


def _arrived(url: str) -> float:
    """Requests the engine has: running, waiting, or already finished (a short one may end before the last
    one arrives, so the running count alone can be reached with a request still on its way)."""
    text = httpx.get(f"{url}/metrics").text
    names = ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:request_success_total")
    return sum(sum(metric_samples(text, name).values()) for name in names)


# ---- start-up and drain ---------------------------------------------------------------------------
@pytest.mark.timeout(120)
def test_ready_only_after_load_and_warm_up_then_sigterm_drains_every_request():
    faults = {"load_delay_s": 2.0, "warmup_delay_s": 2.0}
    server = launch_own_server(
        "drain",
        ["--enable-fault-injection", "--drain-timeout", "3"],
        env={"SHOAL_FAULTS": json.dumps(faults)},
    )
    phases, health, gated = _watch_start_up(server.url, server.proc)
    assert "loading" in phases and "warming up" in phases, phases
    assert health == {200}, "liveness must hold while the model loads"
    assert gated.status_code == 503 and gated.headers["Retry-After"].isdigit(), gated.text
    wait_ready(server)

    httpx.post(f"{server.url}/debug/faults", json={"step_delay_s": 0.03}).raise_for_status()
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0)
    prompts = [f"Once upon a time {i}" for i in range(20)]
    short = {0, 1, 2, 3}  # these finish within the drain timeout
    with ThreadPoolExecutor(22) as pool:
        streams = [
            pool.submit(_stream, server.url, {"prompt": p, **LONG, "max_tokens": 8 if i in short else 400})
            for i, p in enumerate(prompts)
        ]
        plain = [
            pool.submit(client.completions.create, model=str(server.model), prompt="One day", **_sdk(LONG))
            for _ in range(2)
        ]
        _wait_for(lambda: _arrived(server.url) >= len(streams) + len(plain), 30, "every request to arrive")
        _wait_for(lambda: _running(server.url) >= 18, 30, "the requests to run")
        t_term = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        _wait_for(lambda: httpx.get(f"{server.url}/ready").status_code == 503, 5, "readiness to drop")
        assert httpx.get(f"{server.url}/ready").json()["status"] == "draining"
        late = httpx.post(f"{server.url}/v1/completions", json={"prompt": "late", "max_tokens": 4})
        assert late.status_code == 503 and int(late.headers["Retry-After"]) > 0, late.text
        results = [f.result(timeout=30) for f in streams]
        answers = [f.result(timeout=30) for f in plain]
    exit_code = server.proc.wait(timeout=3 + 5 + 5)
    assert exit_code == 0 and time.monotonic() - t_term < 3 + 5 + 2

    for i, (events, done) in enumerate(results):
        assert done, f"stream {i} did not end with [DONE]"
        expected = "length" if i in short else "abort"
        assert _finish_reason(events) == expected, (i, events[-2:])
        assert _text(events), f"stream {i} returned no text"
    for answer in answers:  # the openai client parses vLLM's "abort" finish reason
        assert answer.choices[0].finish_reason == "abort" and answer.choices[0].text
        assert 0 < answer.usage.completion_tokens < 400


def _watch_start_up(url: str, proc) -> tuple[list[str], set[int], httpx.Response]:
    """Poll the probes until ready: the /ready phases seen, the /health codes, and a gated /v1 answer."""
    phases: list[str] = []
    health: set[int] = set()
    gated = None
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            ready = httpx.get(f"{url}/ready", timeout=2)
            health.add(httpx.get(f"{url}/health", timeout=2).status_code)
        except httpx.TransportError:
            time.sleep(0.05)  # not listening yet
            continue
        if ready.status_code == 200:
            break
        if not phases or phases[-1] != ready.json()["status"]:
            phases.append(ready.json()["status"])
        if gated is None:
            gated = httpx.post(f"{url}/v1/completions", json={"prompt": "hi", "max_tokens": 2})
        time.sleep(0.05)
    return phases, health, gated


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(c) for c in f.read().split()]
    except OSError:
        return []


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[-1][0] != "Z"
    except OSError:
        return False


@pytest.mark.timeout(120)
def test_an_engine_core_does_not_outlive_a_server_killed_while_the_model_loads():
    server = launch_own_server(
        "orphan", ["--enable-fault-injection"], env={"SHOAL_FAULTS": json.dumps({"load_delay_s": 3.0})}
    )
    _wait_for(lambda: _children(server.proc.pid), 60, "the engine core process to start")
    cores = _children(server.proc.pid)
    server.proc.kill()
    server.proc.wait(10)
    # It notices once the model has loaded (3 s of delay and the load itself) and exits.
    _wait_for(
        lambda: not any(_alive(pid) for pid in cores), 60, f"the orphaned core processes {cores} to exit"
    )


def _sdk(body: dict) -> dict:
    """A request body as openai-client keyword arguments (vLLM's extras in extra_body)."""
    return {"max_tokens": body["max_tokens"], "temperature": 0, "extra_body": {"ignore_eos": True}}


# ---- liveness -------------------------------------------------------------------------------------
@pytest.mark.timeout(120)
def test_liveness_fails_while_hung_and_after_consecutive_step_failures():
    server = launch_own_server(
        "liveness",
        ["--enable-fault-injection", "--engine-hang-timeout", "0.5", "--max-consecutive-step-failures", "3"],
    )
    wait_ready(server)
    url = server.url
    body = {"prompt": "Once upon a time", "max_tokens": 4}

    # A hung step: liveness fails while it hangs, and recovers when the step finishes.
    httpx.post(f"{url}/debug/faults", json={"step_hang_s": 2.5}).raise_for_status()
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(httpx.post, f"{url}/v1/completions", json=body, timeout=30)
        _wait_for(lambda: httpx.get(f"{url}/health").status_code == 503, 2.0, "liveness to fail")
        assert "hung" in httpx.get(f"{url}/health").json()["error"]["message"]
        assert httpx.get(f"{url}/ready").status_code == 503
        assert pending.result(timeout=10).status_code == 200
    assert httpx.get(f"{url}/health").status_code == 200 and httpx.get(f"{url}/ready").status_code == 200

    # Failed steps: a run shorter than the limit leaves the engine alive ...
    httpx.post(f"{url}/debug/faults", json={"step_raise": 2}).raise_for_status()
    codes = [httpx.post(f"{url}/v1/completions", json=body).status_code for _ in range(3)]
    assert codes == [500, 500, 200] and httpx.get(f"{url}/health").status_code == 200
    # ... the limit in a row breaks it: liveness fails and every request, waiting or new, gets an error.
    httpx.post(f"{url}/debug/faults", json={"step_raise": 3}).raise_for_status()
    codes = [httpx.post(f"{url}/v1/completions", json=body).status_code for _ in range(4)]
    assert codes[:3] == [500, 500, 500] and codes[3] in (500, 503), codes
    health = httpx.get(f"{url}/health")
    assert health.status_code == 503 and "3 engine steps failed in a row" in health.json()["error"]["message"]
    assert httpx.get(f"{url}/ready").json()["status"] == "failed"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", ["process", "thread"])
def test_liveness_fails_when_the_engine_dies(mode):
    server = launch_own_server(f"death-{mode}", ["--enable-fault-injection", "--engine-mode", mode])
    wait_ready(server)
    url = server.url
    httpx.post(f"{url}/debug/faults", json={"step_delay_s": 0.05}).raise_for_status()
    with ThreadPoolExecutor(3) as pool:
        waiting = [pool.submit(_stream, url, {"prompt": "Once", **LONG}) for _ in range(2)]
        _wait_for(lambda: _running(url) >= 2, 20, "the requests to run")
        httpx.post(f"{url}/debug/faults", json={"engine_die": 1}).raise_for_status()
        for future in waiting:  # each waiting stream ends with an error event and [DONE], none hangs
            events, done = future.result(timeout=20)
            assert done and "error" in events[-1], events[-1:]
    health = httpx.get(f"{url}/health")
    assert health.status_code == 503 and "engine" in health.json()["error"]["message"]
    assert httpx.get(f"{url}/ready").status_code == 503
    late = httpx.post(f"{url}/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=10)
    assert late.status_code in (500, 503) and "error" in late.json()


# ---- request timeouts -----------------------------------------------------------------------------
@pytest.fixture
def slow_server(live_server):
    with live_server.client() as client:
        client.post("/debug/faults", json={"step_delay_s": 0.02}).raise_for_status()
        try:
            yield live_server, client
        finally:
            client.post("/debug/faults", json={})


def _kv_usage(client: httpx.Client) -> float:
    return sum(metric_samples(client.get("/metrics").text, "vllm:kv_cache_usage_perc").values())


@pytest.mark.timeout(60)
def test_request_timeout_returns_partial_text_with_abort_and_frees_the_cache(slow_server):
    server, client = slow_server
    idle = _kv_usage(client)
    body = {"model": server.model, "prompt": "Once upon a time", **LONG}
    t0 = time.monotonic()
    r = client.post("/v1/completions", json=body, headers={"X-Request-Timeout": "0.6"})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "abort" and choice["text"]
    assert 0 < r.json()["usage"]["completion_tokens"] < 400 and time.monotonic() - t0 < 5

    events, done = _stream(server.url, body, {**server.headers, "X-Request-Timeout": "0.6"})
    assert done and _finish_reason(events) == "abort" and _text(events)

    chat = client.post(
        "/v1/chat/completions",
        json={"model": server.model, "messages": [{"role": "user", "content": "hi"}], **LONG},
        headers={"X-Request-Timeout": "0.6"},
    )
    assert chat.json()["choices"][0]["finish_reason"] == "abort"
    assert client.get("/health").status_code == 200
    _wait_for(lambda: _kv_usage(client) == idle, 5, "the KV cache to return to its idle level")


@pytest.mark.timeout(30)
@pytest.mark.parametrize("value", ["0", "-1", "soon", "nan", "1e9"])
def test_bad_request_timeout_header_is_400(live_server, value):
    with live_server.client() as client:
        r = client.post(
            "/v1/completions",
            json={"model": live_server.model, "prompt": "hi", "max_tokens": 2},
            headers={"X-Request-Timeout": value},
        )
    assert r.status_code == 400 and r.json()["error"]["param"] == "X-Request-Timeout", r.text


def test_only_shoal_serve_freezes_the_heap(stories_dir):
    """The server freezes its heap (shoal/gc_heap.py) only when asked, as `shoal serve` does: an app
    that is dropped later (a fleet's unloaded model, a test's) must stay collectable. In a fresh
    interpreter, as a freeze is for the whole process."""
    code = (
        "import asyncio, gc\n"
        "from shoal.engine.async_engine import AsyncEngine\n"
        "from shoal.engine.config import EngineConfig\n"
        "from shoal.server.app import build_app\n"
        "from shoal.server.settings import ServerSettings\n"
        "async def frozen_after_start(freeze):\n"
        f"    config = EngineConfig(model={str(stories_dir)!r}, dtype='float32', kv_cache_memory=8 << 20)\n"
        "    app = build_app(AsyncEngine.from_config(config), ServerSettings('s'), freeze_heap=freeze)\n"
        "    async with app.router.lifespan_context(app):\n"
        "        return gc.get_freeze_count()\n"
        "print(asyncio.run(frozen_after_start(False)), asyncio.run(frozen_after_start(True)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    default, asked = (int(v) for v in out.stdout.split()[-2:])
    assert default == 0 and asked > 10_000
