"""The gateway (issue 21, acceptance 5 and the gateway half of 6) with real processes on 127.0.0.1.

Four `shoal serve` backends are started once, in parallel, for the whole module: A, B and C serve
stories260K as "stories" (C with fault injection and a high step-failure limit: the failing canary, then
the hung and the killed backend, so it is used last), D serves SmolLM2 (the different model the shadow
compares against). One `shoal gateway` process serves every scenario as a model of its own; the upstream
timeout test starts a second one with --upstream-timeout. Tests run in file order: C is killed last.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from shoal.gateway.config import ConfigError, parse_config

try:
    from server_fixture import (
        MODELS,
        _die_with_parent,
        _free_port,
        launch_own_server,
        metric_samples,
        wait_ready,
    )
except ImportError:  # tests/ became a package
    from tests.server_fixture import (  # type: ignore[no-redef]
        MODELS,
        _die_with_parent,
        _free_port,
        launch_own_server,
        metric_samples,
        wait_ready,
    )

REPO = Path(__file__).resolve().parents[1]
SMOL = MODELS / "SmolLM2-135M-Instruct"
PREFIX = "Once upon a time, in a small village by the sea, there lived a little girl named Lily. " * 4
STORIES = ["--served-model-name", "stories", "--max-num-seqs", "2", "--kv-cache-memory", str(32 << 20)]


def _v(*urls: str) -> dict:
    return {"backends": list(urls), "served_model": "stories"}


def _backend_config(urls: dict[str, str]) -> dict:
    a, b, c, d = urls["A"], urls["B"], urls["C"], urls["D"]
    canary = {"steps": [5, 100], "interval_s": 3600, "min_requests": 10_000, "max_p95_latency_ratio": 100}
    return {
        "gateway": {"saturation": {"max_waiting": 0}, "upstream_timeout_s": 60},
        "models": {
            "split": {"versions": {"stable": _v(a), "canary": _v(b)},
                      "canary": {"stable": "stable", "canary": "canary", **canary}},
            "rollback": {"versions": {"stable": _v(a), "canary": _v(c)},
                         "canary": {"stable": "stable", "canary": "canary", "steps": [50, 100], "interval_s": 3600,
                                    "min_requests": 20, "max_error_rate_increase": 0.2}},
            "promote": {"versions": {"stable": _v(a), "canary": _v(b)},
                        "canary": {"stable": "stable", "canary": "canary", "steps": [50, 100], "interval_s": 1,
                                   "min_requests": 5, "max_p95_latency_ratio": 100}},
            "bg": {"versions": {"blue": _v(a), "green": _v(b)},
                   "weights": {"blue": 100, "green": 0}},
            "twin": {"versions": {"main": _v(a), "twin": _v(b)},
                     "weights": {"main": 100, "twin": 0}, "shadow": {"version": "twin"}},
            "smol": {"versions": {"main": _v(a), "smol": {"backends": [d], "served_model": str(SMOL)}},
                     "weights": {"main": 100, "smol": 0}, "shadow": {"version": "smol"}},
            "dead-shadow": {"versions": {"main": _v(a), "gone": {"backends": ["http://127.0.0.1:9"]}},
                            "weights": {"main": 100, "gone": 0}, "shadow": {"version": "gone"}},
            "prefix": {"routing": "prefix", "versions": {"v1": _v(a, b)}},
            "retry": {"routing": "round_robin", "versions": {"v1": _v(c, a)}},
            "drain": {"routing": "round_robin", "versions": {"v1": _v(b, a)}},
        },
    }  # fmt: skip


class Gateway:
    def __init__(self, config: dict, tmp: Path, *args: str):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        path = tmp / f"gateway-{self.port}.yaml"
        path.write_text(yaml.safe_dump(config))
        self.log = tmp / f"gateway-{self.port}.log"
        cmd = [sys.executable, "-m", "shoal.gateway", "--config", str(path), "--port", str(self.port), *args]
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                         preexec_fn=_die_with_parent)  # fmt: skip
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log.read_text()
            try:
                if httpx.get(self.url + "/ready", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.1)
        raise RuntimeError(f"gateway not ready:\n{self.log.read_text()}")

    def admin(self, what: str) -> dict:
        return httpx.get(f"{self.url}/admin/{what}", timeout=10).json()

    def backend(self, url: str) -> dict:
        return next(b for b in self.admin("backends")["backends"] if b["url"] == url)

    def model(self, name: str) -> dict:
        return self.admin("models")["models"][name]

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    if not SMOL.exists():
        pytest.skip(f"{SMOL} missing")
    servers = {name: launch_own_server(f"gw-{name}", STORIES) for name in "AB"}
    servers["C"] = launch_own_server("gw-C", [*STORIES, "--enable-fault-injection",
                                               "--max-consecutive-step-failures", "100000"])  # fmt: skip
    servers["D"] = launch_own_server(
        "gw-D", ["--model", str(SMOL), "--kv-cache-memory", str(64 << 20), "--max-model-len", "512"]
    )
    for name in "ABC":  # D (slower to load) is waited for by the shadow test, the first to need it
        wait_ready(servers[name])
    tmp = tmp_path_factory.mktemp("gateway")
    gateway = Gateway(_backend_config({k: s.url for k, s in servers.items()}), tmp)
    yield servers, gateway, tmp
    gateway.stop()


def _served(url: str) -> float:
    """Requests a shoal backend has finished (its own counter, not the gateway's)."""
    return sum(
        metric_samples(httpx.get(url + "/metrics").text, "vllm:e2e_request_latency_seconds_count").values()
    )


async def _send_many(url: str, bodies: list[dict], concurrency: int = 8) -> list[httpx.Response]:
    limit = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:

        async def one(body: dict) -> httpx.Response:
            async with limit:
                resp = await client.post("/v1/completions", json=body)
                await resp.aread()
                return resp

        return await asyncio.gather(*(one(b) for b in bodies))


def _completion(model: str, prompt: str = "Once upon a time", max_tokens: int = 1, **extra) -> dict:
    return {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, **extra}


@pytest.mark.timeout(120)
def test_canary_at_5_percent_gets_5_percent_of_1000_requests(fleet):
    servers, gw, _ = fleet
    before = {k: _served(servers[k].url) for k in "AB"}
    responses = asyncio.run(_send_many(gw.url, [_completion("split")] * 1000))
    assert [r.status_code for r in responses] == [200] * 1000
    canary = _served(servers["B"].url) - before["B"]
    assert canary + _served(servers["A"].url) - before["A"] == 1000
    assert 30 <= canary <= 70, f"canary served {canary} of 1000"
    assert sum(r.headers["x-shoal-version"] == "canary" for r in responses) == canary
    assert gw.model("split")["weights"] == {"stable": 95, "canary": 5}


@pytest.mark.timeout(60)
def test_canary_error_rate_rolls_back_once_min_requests_reached(fleet):
    servers, gw, _ = fleet
    c = servers["C"].url
    assert httpx.post(c + "/debug/faults", json={"step_raise_rate": 1.0}).status_code == 200
    try:
        first = asyncio.run(_send_many(gw.url, [_completion("rollback")] * 20, concurrency=1))
        time.sleep(1.5)  # a few controller ticks: 10 canary requests are below min_requests (20)
        state = gw.model("rollback")["canary"]
        assert state["state"] == "progressing" and state["canary"]["requests"] == 10
        assert sum(r.status_code == 500 for r in first) == 10
        asyncio.run(_send_many(gw.url, [_completion("rollback")] * 20, concurrency=1))
        deadline = time.monotonic() + 5
        while gw.model("rollback")["canary"]["state"] != "rolled_back" and time.monotonic() < deadline:
            time.sleep(0.2)
        model = gw.model("rollback")
        assert model["canary"]["state"] == "rolled_back", model
        assert model["weights"] == {"stable": 100, "canary": 0}
        assert [h["action"] for h in model["canary"]["history"]] == ["start", "rollback"]
        after = asyncio.run(_send_many(gw.url, [_completion("rollback")] * 10))
        assert {(r.status_code, r.headers["x-shoal-version"]) for r in after} == {(200, "stable")}
        metrics = httpx.get(gw.url + "/metrics").text
        assert (
            metric_samples(metrics, "shoal:gateway_canary_steps_total")[
                '{action="rollback",model="rollback"}'
            ]
            == 1
        )
        assert (
            metric_samples(metrics, "shoal:gateway_version_weight")['{model="rollback",version="canary"}']
            == 0
        )
    finally:
        httpx.post(c + "/debug/faults", json={})


@pytest.mark.timeout(60)
def test_canary_promoted_after_a_healthy_interval(fleet):
    _, gw, _ = fleet
    deadline = time.monotonic() + 10
    while gw.model("promote")["canary"]["state"] == "progressing":
        assert time.monotonic() < deadline, gw.model("promote")
        responses = asyncio.run(_send_many(gw.url, [_completion("promote")] * 4))
        assert [r.status_code for r in responses] == [200] * 4
        time.sleep(0.2)
    model = gw.model("promote")
    assert model["canary"]["state"] == "promoted" and model["weights"] == {"stable": 0, "canary": 100}
    assert [h["action"] for h in model["canary"]["history"]] == ["start", "promote"]
    after = asyncio.run(_send_many(gw.url, [_completion("promote")] * 4))
    assert {r.headers["x-shoal-version"] for r in after} == {"canary"}


@pytest.mark.timeout(60)
def test_blue_green_switch_under_steady_stream_has_zero_failures(fleet):
    _, gw, _ = fleet

    async def stream_while_switching() -> list[httpx.Response]:
        stop = asyncio.Event()
        results: list[httpx.Response] = []

        async def client_loop(stream: bool) -> None:
            async with httpx.AsyncClient(base_url=gw.url, timeout=60) as client:
                while not stop.is_set():
                    resp = await client.post(
                        "/v1/completions", json=_completion("bg", max_tokens=8, stream=stream)
                    )
                    await resp.aread()
                    results.append(resp)

        async def switcher() -> None:
            await asyncio.sleep(0.7)
            cli = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "shoal.cli", "gateway", "switch", "--model", "bg", "--to", "green",
                "--url", gw.url, env={**os.environ, "PYTHONPATH": str(REPO)})  # fmt: skip
            assert await cli.wait() == 0
            await asyncio.sleep(0.7)
            async with httpx.AsyncClient(base_url=gw.url) as client:  # and back, through the endpoint
                resp = await client.post("/admin/models/bg/switch", json={"version": "blue"})
                assert resp.json()["weights"] == {"blue": 100, "green": 0}
            await asyncio.sleep(0.5)
            stop.set()

        await asyncio.gather(*(client_loop(i % 2 == 0) for i in range(4)), switcher())
        return results

    results = asyncio.run(stream_while_switching())
    versions = [r.headers["x-shoal-version"] for r in results]
    assert [r.status_code for r in results] == [200] * len(results)
    assert "green" in versions and versions[-1] == "blue", versions
    assert all(
        b"[DONE]" in r.content for r in results if r.headers["content-type"].startswith("text/event-stream")
    )


def _shadow_after(gw: Gateway, model: str, n: int) -> dict:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        shadow = gw.model(model)["shadow"]
        if shadow["compared"] + shadow["failed"] >= n:
            return shadow
        time.sleep(0.2)
    raise AssertionError(f"shadow of {model} incomplete: {gw.model(model)['shadow']}")


PROMPTS = ["Once upon a time", "The little dog", "Lily and Ben went", "One day, a big bird", "The sun was"]


@pytest.mark.timeout(90)
def test_shadow_agreement_identical_and_different_model_users_never_see_it(fleet):
    servers, gw, _ = fleet
    bodies = [_completion("twin", p, max_tokens=16, stream=i % 2 == 1) for i, p in enumerate(PROMPTS * 2)]
    twin = asyncio.run(_send_many(gw.url, bodies))
    assert {(r.status_code, r.headers["x-shoal-version"]) for r in twin} == {(200, "main")}
    same = _shadow_after(gw, "twin", len(bodies))
    assert (
        same["compared"] == len(bodies)
        and same["token_agreement"] >= 0.99
        and same["exact_match_rate"] == 1.0
    )

    wait_ready(servers["D"])
    deadline = time.monotonic() + 5
    while not gw.backend(servers["D"].url)["healthy"]:
        assert time.monotonic() < deadline, gw.admin("backends")
        time.sleep(0.1)
    smol = asyncio.run(_send_many(gw.url, [_completion("smol", p, max_tokens=16) for p in PROMPTS[:3]]))
    direct = asyncio.run(
        _send_many(servers["A"].url, [_completion("stories", p, max_tokens=16) for p in PROMPTS[:3]])
    )
    assert [r.json()["choices"][0]["text"] for r in smol] == [r.json()["choices"][0]["text"] for r in direct]
    different = _shadow_after(gw, "smol", 3)
    assert different["compared"] == 3 and different["token_agreement"] <= 0.8, different

    dead = asyncio.run(_send_many(gw.url, [_completion("dead-shadow", p) for p in PROMPTS]))
    assert [r.status_code for r in dead] == [200] * len(PROMPTS)
    assert _shadow_after(gw, "dead-shadow", len(PROMPTS))["failed"] == len(PROMPTS)
    metrics = httpx.get(gw.url + "/metrics").text
    assert metric_samples(metrics, "shoal:gateway_shadow_exact_matches_total")['{model="twin"}'] == len(
        bodies
    )


def _prefix_hits(url: str) -> float:
    return sum(metric_samples(httpx.get(url + "/metrics").text, "vllm:prefix_cache_hits_total").values())


@pytest.mark.timeout(90)
def test_prefix_affinity_then_spread_when_saturated(fleet):
    servers, gw, _ = fleet
    urls = [servers["A"].url, servers["B"].url]
    hits = [_prefix_hits(u) for u in urls]
    bodies = [_completion("prefix", PREFIX + f"Question {i}: what happened next?") for i in range(8)]
    landed = {r.headers["x-shoal-backend"] for r in asyncio.run(_send_many(gw.url, bodies, concurrency=1))}
    assert len(landed) == 1, landed
    home = landed.pop()
    other = next(u for u in urls if u != home)
    gained = {u: _prefix_hits(u) - h for u, h in zip(urls, hits, strict=True)}
    assert gained[home] > 0 and gained[other] == 0, gained

    async def saturate_then_route() -> set[str]:
        async with httpx.AsyncClient(base_url=home, timeout=120) as client:  # straight to the home replica
            flood: list[asyncio.Task] = []

            async def keep_queue_full() -> None:
                # 2 running (--max-num-seqs 2), the rest waiting: topped up to 12 pending for as long as the
                # test needs, since on a fast CPU stories260K drains a fixed flood between two scrapes
                while True:
                    for _ in range(12 - sum(not f.done() for f in flood)):
                        body = _completion(
                            "stories", f"Tim had a toy {len(flood)}", max_tokens=400, ignore_eos=True
                        )
                        flood.append(asyncio.create_task(client.post("/v1/completions", json=body)))
                    await asyncio.sleep(0.05)

            keeper = asyncio.create_task(keep_queue_full())
            while not gw.backend(home)["saturated"]:
                await asyncio.sleep(0.1)
            routed = await _send_many(gw.url, bodies[:4], concurrency=1)
            keeper.cancel()
            for f in flood:  # disconnecting aborts them
                f.cancel()
            await asyncio.gather(keeper, *flood, return_exceptions=True)
            # the backend's waiting gauge is refreshed by engine steps: one more request brings it to 0
            await client.post("/v1/completions", json=_completion("stories"))
        return {r.headers["x-shoal-backend"] for r in routed}

    assert asyncio.run(saturate_then_route()) == {other}


@pytest.mark.timeout(60)
def test_stream_passes_through_unbuffered(fleet):
    _, gw, _ = fleet
    body = _completion("bg", max_tokens=300, ignore_eos=True, stream=True)
    arrivals = []
    start = time.monotonic()
    with httpx.stream("POST", gw.url + "/v1/completions", json=body, timeout=60) as resp:
        for chunk in resp.iter_raw():
            arrivals.append((time.monotonic() - start, chunk))
    total = arrivals[-1][0]
    assert len(arrivals) > 10 and b"[DONE]" in b"".join(c for _, c in arrivals)
    assert arrivals[0][0] < total / 3, f"first chunk at {arrivals[0][0]:.3f} s of {total:.3f} s"


@pytest.mark.timeout(60)
def test_upstream_timeout_answers_504_with_openai_error(fleet):
    servers, _, tmp = fleet
    c = servers["C"].url
    config = {"models": {"stories": {"versions": {"v1": _v(c)}}}}
    gw = Gateway(config, tmp, "--upstream-timeout", "0.5")
    try:
        assert httpx.post(c + "/debug/faults", json={"step_hang_s": 2}).status_code == 200
        start = time.monotonic()
        resp = httpx.post(gw.url + "/v1/completions", json=_completion("stories"), timeout=10)
        assert resp.status_code == 504 and time.monotonic() - start < 1.5
        assert (
            resp.json()["error"]["code"] == "upstream_timeout" and "0.5 s" in resp.json()["error"]["message"]
        )
    finally:
        gw.stop()


@pytest.mark.timeout(60)
def _just_probed(gw: Gateway, url: str) -> None:
    """Until the gateway has just found `url` healthy and not saturated: the next probe is ~1 s away, so
    for a moment the backend stays in rotation whatever happens to it now."""
    deadline = time.monotonic() + 30
    while (b := gw.backend(url))["last_probe_age_s"] > 0.2 or b["saturated"] or not b["healthy"]:
        assert time.monotonic() < deadline, b
        time.sleep(0.02)


def _retries(gw: Gateway, model: str) -> float:
    return metric_samples(httpx.get(gw.url + "/metrics").text, "shoal:gateway_retries_total").get(
        f'{{model="{model}"}}', 0
    )


@pytest.mark.timeout(60)
def test_draining_backend_503_retried_on_another(fleet):
    """shoal serve drains on SIGTERM: its port stays open and new requests get 503 before any byte."""
    servers, gw, _ = fleet
    b, a = servers["B"], servers["A"].url

    async def drain_and_send() -> tuple[httpx.Response, list[httpx.Response]]:
        async with httpx.AsyncClient(timeout=60) as client:
            long = asyncio.create_task(client.post(b.url + "/v1/completions", json=_completion(
                "stories", "Tim had a toy", max_tokens=400, ignore_eos=True)))  # fmt: skip
            await asyncio.sleep(0.1)
            b.proc.send_signal(signal.SIGTERM)  # draining while the long request runs
            await asyncio.sleep(0.05)
            routed = await _send_many(gw.url, [_completion("drain")] * 6, concurrency=6)
            return await long, routed

    _just_probed(gw, b.url)
    long, responses = asyncio.run(drain_and_send())
    assert long.status_code == 200
    assert [r.status_code for r in responses] == [200] * 6
    assert {r.headers["x-shoal-backend"] for r in responses} == {a}
    assert _retries(gw, "drain") >= 1
    b.proc.wait(timeout=30)


@pytest.mark.timeout(60)
def test_dead_backend_retried_on_another_then_taken_out(fleet):
    servers, gw, _ = fleet
    c = servers["C"]
    wait_ready(c)  # past the hung step of the previous test
    _just_probed(gw, c.url)
    c.proc.send_signal(signal.SIGKILL)
    c.proc.wait()
    responses = asyncio.run(_send_many(gw.url, [_completion("retry")] * 6, concurrency=6))
    assert [r.status_code for r in responses] == [200] * 6
    assert {r.headers["x-shoal-backend"] for r in responses} == {servers["A"].url}
    assert _retries(gw, "retry") >= 1
    time.sleep(1.5)
    down = gw.backend(c.url)
    assert not down["healthy"] and "ConnectError" in down["last_error"]


@pytest.mark.timeout(60)
def test_backend_without_the_model_fails_gateway_start(fleet):
    servers, _, tmp = fleet
    path = tmp / "unserved.yaml"
    version = {"backends": [servers["A"].url], "served_model": "no-such-model"}
    path.write_text(yaml.safe_dump({"models": {"chat": {"versions": {"blue": version}}}}))
    out = subprocess.run([sys.executable, "-m", "shoal.gateway", "--config", str(path), "--port", str(_free_port())],
                         cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True,
                         timeout=30)  # fmt: skip
    assert out.returncode != 0
    expected = (
        f"models.chat.versions.blue: backend {servers['A'].url} serves ['stories'], not 'no-such-model'"
    )
    assert expected in out.stderr, out.stderr


BAD = [
    ({"versions": {"v1": {"backends": ["http://x"]}, "v2": {"backends": ["http://y"]}},
      "weights": {"v1": 60, "v2": 30}}, "models.m: Value error, weights {'v1': 60, 'v2': 30} must"),
    ({"versions": {"v1": {"backends": ["http://x"]}}, "canary": {"stable": "v1", "canary": "v9"}},
     "unknown version 'v9'"),
    ({"versions": {"v1": {"backends": ["http://x"]}}, "shadow": {"version": "v2"}}, "unknown version 'v2'"),
    ({"versions": {"v1": {"backends": ["x:80"]}}}, "models.m.versions.v1.backends: Value error, backend 'x:80'"),
    ({"versions": {"v1": {"backends": ["http://x"]}}, "canary": {"stable": "v1", "canary": "v1",
      "steps": [50, 25]}}, "models.m.canary.steps"),
    ({"versions": {"v1": {"backends": ["http://x"]}}, "routing": "random"}, "models.m.routing"),
]  # fmt: skip


@pytest.mark.timeout(30)
@pytest.mark.parametrize(("model", "message"), BAD)
def test_bad_config_names_the_entry(model, message):
    with pytest.raises(ConfigError) as e:
        parse_config({"models": {"m": model}})
    assert message in str(e.value), str(e.value)


@pytest.mark.timeout(30)
def test_bad_config_fails_gateway_start(tmp_path):
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump({"models": {"chat": {"versions": {"a": {"backends": ["http://127.0.0.1:1"]}},
                                                         "weights": {"a": 90, "b": 10}}}}))  # fmt: skip
    out = subprocess.run([sys.executable, "-m", "shoal.cli", "gateway", "--config", str(path)], cwd=REPO,
                         env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=30)  # fmt: skip
    assert out.returncode == 2
    assert "models.chat: Value error, unknown version 'b'" in out.stderr, out.stderr
