"""Fault injection (POST /debug/faults) and what it proves: when engine steps fail, no request is lost or
left hanging. Every waiting client gets an error response (a 500 body, or an error event and [DONE] in a
stream that had started), and the engine goes on serving the next requests.

Runs on the shared stories260K server, which is started with --enable-fault-injection; every test here
clears the plan before it ends.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

try:
    from server_fixture import live_server, metric_samples  # noqa: F401 - fixture
except ImportError:  # tests/ became a package
    from tests.server_fixture import live_server, metric_samples  # type: ignore[no-redef] # noqa: F401

pytestmark = pytest.mark.timeout(60)
LONG = {"max_tokens": 400, "ignore_eos": True, "temperature": 0}


@pytest.fixture
def http(live_server):
    with live_server.client() as client:
        yield client
        assert client.post("/debug/faults", json={}).status_code == 200  # clear, whatever happened


def _outcome(http: httpx.Client, route: str, stream: bool) -> str:
    """'ok', 'error' (500 in OpenAI's shape, or an error event then [DONE]), or a description of a fault."""
    if route.endswith("chat/completions"):
        body = {"messages": [{"role": "user", "content": "hi"}], **LONG}
    else:
        body = {"prompt": "Once upon a time", **LONG}
    if not stream:
        r = http.post(route, json=body)
        if r.status_code == 200:
            return "ok"
        return "error" if r.status_code == 500 and r.json()["error"]["type"] == "server_error" else r.text
    with http.stream("POST", route, json={**body, "stream": True}) as r:
        if r.status_code != 200:
            r.read()
            return "error" if r.status_code == 500 else r.text
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    if events[-1] != "[DONE]":
        return f"stream without [DONE]: {events[-3:]}"
    last = json.loads(events[-2])
    return "error" if "error" in last else "ok"


def _running(http: httpx.Client) -> float:
    return sum(metric_samples(http.get("/metrics").text, "vllm:num_requests_running").values())


def test_failed_step_fails_every_request_in_flight_and_the_engine_goes_on(http):
    routes = ["/v1/completions", "/v1/chat/completions"]
    cases = [(route, stream) for route in routes for stream in (False, True)] * 2
    with ThreadPoolExecutor(len(cases)) as pool:
        futures = [pool.submit(_outcome, http, route, stream) for route, stream in cases]
        deadline = time.monotonic() + 20
        while _running(http) < len(cases) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert _running(http) == len(cases), "the requests should all be running"
        assert http.post("/debug/faults", json={"step_raise": 1}).json()["step_raise"] == 1
        outcomes = [f.result(timeout=30) for f in futures]
    assert outcomes == ["error"] * len(cases)
    assert http.get("/debug/faults").json()["step_raise"] == 0  # used up by one step
    assert (
        _outcome(http, "/v1/completions", False) == "ok"
        and _outcome(http, "/v1/chat/completions", True) == "ok"
    )
    assert http.get("/ready").status_code == 200


def test_random_step_failures_lose_no_request(http):
    assert http.post("/debug/faults", json={"step_raise_rate": 0.05}).status_code == 200
    cases = [("/v1/completions", i % 2 == 0) for i in range(8)] + [
        ("/v1/chat/completions", i % 2 == 0) for i in range(8)
    ]
    with ThreadPoolExecutor(len(cases)) as pool:
        outcomes = list(pool.map(lambda c: _outcome(http, *c), cases, timeout=45))
    assert set(outcomes) <= {"ok", "error"}, outcomes
    assert "error" in outcomes
    assert http.post("/debug/faults", json={}).json()["step_raise_rate"] == 0
    assert _outcome(http, "/v1/completions", True) == "ok"


def test_hung_step_delays_but_answers(http):
    assert http.post("/debug/faults", json={"step_hang_s": 0.5}).status_code == 200
    t0 = time.monotonic()
    r = http.post("/v1/completions", json={"prompt": "Once", "max_tokens": 2})
    assert r.status_code == 200 and time.monotonic() - t0 >= 0.5
    assert http.get("/debug/faults").json()["step_hang_s"] == 0


@pytest.mark.parametrize(
    ("plan", "param"),
    [
        ({"step_raise": -1}, "faults"),
        ({"step_raise_rate": 2}, "faults"),
        ({"nope": 1}, "faults"),
        ({"step_hang_s": "x"}, "faults"),
        ([1], None),
    ],  # fmt: skip
)
def test_bad_fault_plans_are_400(http, plan, param):
    r = http.post("/debug/faults", json=plan)
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_fault_injection_is_refused_unless_enabled(stories_dir):
    import asyncio

    from shoal.server.app import build_app
    from shoal.server.settings import ServerSettings

    try:
        from test_api_faults import _TokenizerOnlyEngine
    except ImportError:
        from tests.test_api_faults import _TokenizerOnlyEngine  # type: ignore[no-redef]

    app = build_app(_TokenizerOnlyEngine(stories_dir), ServerSettings(served_model_name="stories"))

    async def run():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.post("/debug/faults", json={"step_raise": 1}), await client.get(
                "/debug/faults"
            )

    for r in asyncio.run(run()):
        assert r.status_code == 403 and r.json()["error"]["code"] == "fault_injection_disabled"


def test_load_delay_from_the_environment(monkeypatch):
    """SHOAL_FAULTS is the plan at start-up: its load_delay_s slows the first model load once."""
    from shoal.engine.faults import FaultInjector

    monkeypatch.setenv("SHOAL_FAULTS", json.dumps({"load_delay_s": 0.3}))
    faults = FaultInjector.from_env()
    t0 = time.monotonic()
    faults.before_load()
    assert time.monotonic() - t0 >= 0.3 and faults.current()["load_delay_s"] == 0
