"""Priority scheduling over HTTP, asserted on order (from GET /debug/schedule), never on time; and
cache_salt on the request path.

A server of its own: stories260K with --scheduling-policy priority, --max-num-seqs 2 and
--record-schedule; its steps are slowed with the fault hook so that a backlog builds up.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

try:
    from server_fixture import (  # noqa: F401
        completion_request_id,
        launch_priority_server,
        live_server,
        metric_samples,
        stop_process,
    )
except ImportError:  # tests/ became a package
    from tests.server_fixture import (  # type: ignore[no-redef] # noqa: F401
        completion_request_id,
        launch_priority_server,
        live_server,
        metric_samples,
        stop_process,
    )


@pytest.fixture(scope="module")
def priority_server():
    server = launch_priority_server("priority", max_num_seqs=2)
    yield server
    stop_process(server.proc)


def _complete(client: httpx.Client, prompt: str, priority: int) -> str:
    return completion_request_id(client, prompt, priority, max_tokens=3)


def _hits(client: httpx.Client) -> float:
    return sum(metric_samples(client.get("/metrics").text, "vllm:prefix_cache_hits_total").values())


def _waiting(url: str) -> float:
    return sum(metric_samples(httpx.get(f"{url}/metrics").text, "vllm:num_requests_waiting").values())


@pytest.mark.timeout(90)
def test_premium_requests_are_admitted_before_every_low_request_waiting_at_their_arrival(priority_server):
    url = priority_server.url
    # Steps of 80 ms: the 40 low requests (3 tokens each, 2 seats) take seconds to drain, so the backlog
    # builds even where the client is slow to send them (with 30 ms steps a CI run once drained them as
    # fast as they arrived, and the premium requests then found no backlog). One client for every thread:
    # no TLS context built per request.
    httpx.post(f"{url}/debug/faults", json={"step_delay_s": 0.08}).raise_for_status()
    try:
        with (
            ThreadPoolExecutor(50) as pool,
            httpx.Client(base_url=url, limits=httpx.Limits(max_connections=60)) as client,
        ):
            lows = [pool.submit(_complete, client, f"low {i}", 1) for i in range(40)]
            deadline = time.monotonic() + 20
            while _waiting(url) < 30 and time.monotonic() < deadline:
                time.sleep(0.02)
            # Hold the engine for a moment so that the premium requests reach it while the backlog
            # waits, however slow this machine's HTTP side is under load.
            httpx.post(
                f"{url}/debug/faults", json={"step_delay_s": 0.08, "step_hang_s": 2.0}
            ).raise_for_status()
            premiums = [pool.submit(_complete, client, f"premium {i}", 0) for i in range(10)]
            low_ids = {f.result(timeout=60) for f in lows}
            premium_ids = {f.result(timeout=60) for f in premiums}
    finally:
        httpx.post(f"{url}/debug/faults", json={})
    order, added_at, admitted_at = _admissions(httpx.get(f"{url}/debug/schedule").json()["steps"])
    assert low_ids | premium_ids <= set(order), "every request appears in the schedule record"
    for premium in premium_ids:
        # Still waiting when the premium request reached the engine: not admitted by an earlier step.
        waiting = [low for low in low_ids if admitted_at[low] >= added_at[premium]]
        assert len(waiting) >= 5, "the premium requests must arrive while a backlog waits"
        assert all(order[premium] < order[low] for low in waiting), premium


def _admissions(steps: list[dict]) -> tuple[dict[str, int], dict[str, int], dict[str, int]]:
    """From the schedule record: each request's place in the order of first admission, the step before
    which it was added to the engine, and the step that first admitted it."""
    order: dict[str, int] = {}
    added_at: dict[str, int] = {}
    admitted_at: dict[str, int] = {}
    for step in steps:
        for request_id in step["added"]:
            added_at.setdefault(request_id, step["step"])
        for request_id, _arrival, _priority in step["admitted"]:
            if request_id not in order:
                order[request_id] = len(order)
                admitted_at[request_id] = step["step"]
    return order, added_at, admitted_at


@pytest.mark.timeout(30)
def test_schedule_record_is_refused_unless_enabled(live_server):
    with live_server.client() as client:
        r = client.get("/debug/schedule")
    assert r.status_code == 403 and r.json()["error"]["code"] == "schedule_record_disabled"


@pytest.mark.timeout(30)
def test_fcfs_server_refuses_priority_and_honours_cache_salt(live_server):
    """On the shared (fcfs) server: a non-zero priority is a 400 naming it; cache_salt isolates the
    prefix cache (the same salt hits, another misses)."""
    prompt = " ".join(f"w{i}" for i in range(60))  # several full KV blocks
    with live_server.client() as client:
        body = {"model": live_server.model, "prompt": prompt, "max_tokens": 1}
        r = client.post("/v1/completions", json={**body, "priority": -1})
        assert r.status_code == 400 and r.json()["error"]["param"] == "priority", r.text

        def cached(salt: str) -> float:
            """Prompt tokens this request found in the prefix cache (vllm:prefix_cache_hits)."""
            before = _hits(client)
            r = client.post("/v1/completions", json={**body, "cache_salt": salt})
            assert r.status_code == 200, r.text
            return _hits(client) - before

        salt = f"tenant-{time.monotonic_ns()}"
        assert cached(salt) == 0
        assert cached(salt) > 0
        assert cached(salt + "-other") == 0
        bad = client.post("/v1/completions", json={**body, "cache_salt": ""})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "cache_salt"
