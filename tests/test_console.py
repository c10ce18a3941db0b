"""The console's JSON (/ui/api/*) and static files on the live `shoal serve` of tests/server_fixture.py
(stories260K, with an API key): the live view counts what a known workload did, the data routes follow
the /v1 key rule while the page itself is public, and the deployments view reads a real gateway.

The server is shared with other test files, so counts are checked as increases across this file's own
requests. About 8 s on 2 cores (the gateway's start included), once the shared server is up.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time

import httpx
import pytest
import yaml

from shoal.bench.serve_compare import die_with_parent, free_port
from shoal.server.recent import RecentActivity, nearest_rank

try:
    from server_fixture import REPO, SERVED_NAME, TINY_MODEL, live_server, stop_process  # noqa: F401 - fixture
except ImportError:  # tests/ became a package
    from tests.server_fixture import REPO, SERVED_NAME, TINY_MODEL, live_server, stop_process  # type: ignore[no-redef]  # noqa: F401

pytestmark = pytest.mark.timeout(60)
DATA_ROUTES = ("/ui/api/info", "/ui/api/live", "/ui/api/models", "/ui/api/deployments")


@pytest.fixture(scope="module")
def http(live_server):
    with live_server.client() as client:
        yield client


def _chat(http: httpx.Client, max_tokens: int = 8) -> dict:
    body = {"model": SERVED_NAME, "messages": [{"role": "user", "content": "Once upon a time"}],
            "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}  # fmt: skip
    response = http.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def test_live_counts_a_finished_request_and_its_latencies(http):
    before = http.get("/ui/api/live").json()
    usage = _chat(http, max_tokens=8)["usage"]
    live = http.get("/ui/api/live").json()
    assert live["model"] == SERVED_NAME
    assert (live["phase"], live["ready"], live["running"], live["waiting"]) == ("ready", True, 0, 0)
    assert live["totals"]["requests"] == before["totals"]["requests"] + 1
    assert live["totals"]["generation_tokens"] - before["totals"]["generation_tokens"] == 8
    assert live["totals"]["prompt_tokens"] - before["totals"]["prompt_tokens"] == usage["prompt_tokens"]
    recent = live["recent"]
    assert recent["choices"] >= before["recent"]["choices"] + 1
    ttft, tpot = recent["ttft_s"], recent["tpot_s"]
    assert 0 < ttft["p50"] <= ttft["p95"] <= ttft["p99"]
    assert 0 < tpot["p50"] <= tpot["p95"] <= tpot["p99"]
    # the request's steps ran in the last 10 s: its tokens are in the rates, at batch size >= 1
    assert recent["output_tokens_per_s"] >= 7 / recent["rate_window_s"]
    assert recent["prompt_tokens_per_s"] >= usage["prompt_tokens"] / recent["rate_window_s"]
    assert recent["mean_batch_size"] >= 1


def test_live_rates_count_errors_between_reads(http):
    http.get("/ui/api/live")
    time.sleep(0.05)  # the next read's window is not empty
    bad = http.post("/v1/chat/completions", json={"model": SERVED_NAME, "messages": []})
    assert bad.status_code == 400
    live = http.get("/ui/api/live").json()
    rates = live["rates"]
    assert rates["window_s"] > 0
    assert rates["errors_per_s"] > 0
    assert 0 < rates["error_ratio"] <= 1
    assert live["totals"]["errors"] >= 1


def test_data_routes_need_the_key_and_the_page_does_not(live_server):
    for path in DATA_ROUTES:
        r = httpx.get(live_server.url + path)
        assert r.status_code == 401, path
        assert r.json()["error"]["code"] == "invalid_api_key"
    for path in ("/ui/", "/ui/console.js", "/ui/console.css"):
        r = httpx.get(live_server.url + path)
        assert r.status_code == 200, path
        assert "default-src 'self'" in r.headers["content-security-policy"]
    assert httpx.get(live_server.url + "/ui").status_code == 307  # to /ui/
    assert httpx.get(live_server.url + "/ui/nothing-here").status_code == 404


def test_models_lists_the_served_model_and_quant_eval_is_a_clear_404(http):
    (model,) = http.get("/ui/api/models").json()["models"]
    assert (model["id"], model["state"], model["dtype"], model["quantization"]) == (
        SERVED_NAME, "loaded", "float32", None)  # fmt: skip
    assert model["kv_cache_tokens"] > 0 and model["resident_memory_bytes"] > 0
    assert model["quant_eval"] is False  # stories260K has no quant_eval.json
    r = http.get(f"/ui/api/models/{SERVED_NAME}/quant_eval.json")
    assert r.status_code == 404 and "shoal quant eval" in r.json()["error"]["message"]
    assert http.get("/ui/api/models/other/quant_eval.json").status_code == 404
    info = http.get("/ui/api/info").json()
    assert (info["kind"], info["models"], info["gateway"]) == ("single", [SERVED_NAME], None)
    r = http.get("/ui/api/deployments")
    assert r.status_code == 404 and "--gateway-url" in r.json()["error"]["message"]


def test_nearest_rank_percentiles_and_the_ring_is_bounded():
    assert nearest_rank(list(range(1, 101)), 0.95) == 95
    assert nearest_rank([3.0, 1.0, 2.0], 0.99) == 3.0
    assert nearest_rank([], 0.5) is None
    recent = RecentActivity(max_choices=5)
    for i in range(10):
        recent.on_choice(ttft=float(i), tpot=None, finished=True)
    summary = recent.summary()
    assert summary["choices"] == 5  # the five newest
    assert summary["ttft_s"] == {"p50": 7.0, "p95": 9.0, "p99": 9.0}
    assert summary["tpot_s"]["p50"] is None
    assert recent.summary(window_s=0.0)["choices"] == 0  # older than the window: left out


def _in_process(**settings):
    """The app of `shoal serve` with these settings, its engine not started (these routes need none)."""
    from shoal.engine.async_engine import AsyncEngine
    from shoal.engine.config import EngineConfig
    from shoal.server.app import build_app
    from shoal.server.settings import ServerSettings

    engine = AsyncEngine.deferred(EngineConfig(model=str(TINY_MODEL), dtype="float32", device="cpu"))
    return build_app(engine, ServerSettings(served_model_name=SERVED_NAME, **settings))


def _get(app, path: str) -> httpx.Response:
    async def run() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            return await client.get(path)

    return asyncio.run(run())


def test_no_ui_turns_the_console_off():
    app = _in_process(ui=False)
    for path in ("/ui/", "/ui/console.js", "/ui/api/live"):
        assert _get(app, path).status_code == 404, path


@pytest.fixture
def gateway(live_server, tmp_path):
    """`shoal gateway` with one model whose one version is the live server."""
    port = free_port()
    config = tmp_path / "gateway.yaml"
    config.write_text(
        yaml.safe_dump({"models": {"tales": {"versions": {"v1": {"backends": [live_server.url]}}}}})
    )
    cmd = [sys.executable, "-m", "shoal.gateway", "--config", str(config), "--port", str(port)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                            preexec_fn=die_with_parent)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(url + "/ready", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.1)
    yield url
    stop_process(proc)


def test_deployments_reads_the_gateway_admin_endpoints(gateway, live_server):
    body = _get(_in_process(gateway_url=gateway), "/ui/api/deployments").json()
    assert body["gateway"] == gateway
    (backend,) = body["backends"]
    assert backend["url"] == live_server.url and backend["healthy"] is True
    assert body["models"]["tales"]["weights"] == {"v1": 100}
    r = _get(_in_process(gateway_url="http://127.0.0.1:9"), "/ui/api/deployments")
    assert r.status_code == 502 and "cannot read the gateway" in r.json()["error"]["message"]


def test_quant_eval_files_of_the_served_model_directory(tmp_path):
    """`shoal quant eval` writes quant_eval.json/.png into the model directory: the console serves both."""
    for f in TINY_MODEL.iterdir():
        (tmp_path / f.name).symlink_to(f)
    (tmp_path / "quant_eval.json").write_text('{"rows": [{"method": "rtn", "bits": 8}]}')
    (tmp_path / "quant_eval.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    from shoal.engine.async_engine import AsyncEngine
    from shoal.engine.config import EngineConfig
    from shoal.server.app import build_app
    from shoal.server.settings import ServerSettings

    engine = AsyncEngine.deferred(EngineConfig(model=str(tmp_path), dtype="float32", device="cpu"))
    app = build_app(engine, ServerSettings(served_model_name=SERVED_NAME))
    assert _get(app, f"/ui/api/models/{SERVED_NAME}/quant_eval.json").json()["rows"][0]["method"] == "rtn"
    png = _get(app, f"/ui/api/models/{SERVED_NAME}/quant_eval.png")
    assert png.headers["content-type"] == "image/png"
