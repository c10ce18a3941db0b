"""shoal serve --models: several models in one server (shoal/fleet/), against one real server.

stories260K registered under several names and versions, in a 100 MiB budget:
- stories@v1: pre-loaded and pinned (40 MiB);
- stories@v2: lazy, keep_alive 2 s (30 MiB);
- other: lazy, never idle-unloaded (30 MiB); big: lazy (50 MiB): loading big after other needs an LRU
  eviction, and stories@v1, pinned, stays;
- broken (weights that fail to load) and slow (lazy, so a short deadline misses its load): both fall
  back to stories@v1.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from shoal.fleet.registry import load_registry

try:
    from server_fixture import REPO, TINY_MODEL, launch_own_server, metric_samples, stop_process, wait_ready
except ImportError:  # tests/ became a package
    from tests.server_fixture import (
        REPO,
        TINY_MODEL,
        launch_own_server,
        metric_samples,
        stop_process,
        wait_ready,
    )  # type: ignore[no-redef]

KEY = "fleet-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


def _models_yaml(tmp: Path) -> Path:
    broken = tmp / "broken"
    broken.mkdir()
    for f in TINY_MODEL.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, broken / f.name)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    src = str(TINY_MODEL)
    path = tmp / "models.yaml"
    path.write_text(f"""
models:
  - {{name: stories, version: v1, source: {src}, memory: 40MiB, preload: true, pinned: true}}
  - {{name: stories, version: v2, source: {src}, memory: 30MiB, keep_alive: 2}}
  - {{name: other, source: {src}, memory: 30MiB, keep_alive: -1}}
  - {{name: big, source: {src}, memory: 50MiB, keep_alive: -1}}
  - {{name: broken, source: {broken}, memory: 5MiB, fallback: [stories@v1]}}
  - {{name: slow, source: {src}, memory: 5MiB, keep_alive: 0, fallback: [stories@v1]}}
""")
    return path


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    models = _models_yaml(tmp_path_factory.mktemp("fleet"))
    server = launch_own_server(
        "fleet", ["--models", str(models), "--memory-budget", "100MiB", "--api-key", KEY]
    )
    wait_ready(server)
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=60) as client:
        yield client


def _complete(client: httpx.Client, model: str, **extra) -> httpx.Response:
    headers = extra.pop("headers", {})
    body = {"model": model, "prompt": "Once upon", "max_tokens": 4, "temperature": 0, **extra}
    return client.post("/v1/completions", json=body, headers=headers)


def _states(client: httpx.Client) -> dict[str, str]:
    return {m["id"]: m["state"] for m in client.get("/v1/models").json()["data"]}


def _until(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return False


@pytest.mark.timeout(60)
def test_lazy_load_serves_others_meanwhile_then_keep_alive_unloads(fleet):
    assert _states(fleet)["stories@v2"] == "unloaded" and _states(fleet)["stories@v1"] == "loaded"
    lazy: dict[str, httpx.Response] = {}
    thread = threading.Thread(target=lambda: lazy.update(r=_complete(fleet, "stories@v2")))
    thread.start()
    assert _until(lambda: _states(fleet)["stories@v2"] == "loading", 5)
    answered_meanwhile = 0
    while thread.is_alive():  # the first model answers while the second loads
        assert _complete(fleet, "stories@v1").status_code == 200
        answered_meanwhile += 1
    thread.join()
    assert answered_meanwhile >= 2
    assert lazy["r"].status_code == 200 and lazy["r"].json()["model"] == "stories@v2"
    assert "x-shoal-fallback" not in lazy["r"].headers
    assert _complete(fleet, "stories").json()["model"] == "stories@v1"  # a bare name: its first version
    assert _states(fleet)["stories@v2"] == "loaded"
    assert _until(lambda: _states(fleet)["stories@v2"] == "unloaded", 4)  # keep_alive 2 s
    assert _states(fleet)["stories@v1"] == "loaded"  # pinned: never idle-unloaded
    unloads = metric_samples(fleet.get("/metrics").text, "shoal:model_unloads_total")
    assert unloads == {'{model_name="stories@v2",reason="keep_alive"}': 1.0}


@pytest.mark.timeout(60)
def test_lru_eviction_keeps_the_pinned_model(fleet):
    assert _complete(fleet, "other").status_code == 200  # 40 + 30 of 100 MiB
    assert _complete(fleet, "big").status_code == 200  # + 50 > 100: other, least recently used, goes
    states = _states(fleet)
    assert states["other"] == "unloaded" and states["big"] == "loaded" and states["stories@v1"] == "loaded"
    admin = fleet.get("/v1/admin/models").json()
    assert admin["budget"]["used"] == 90 << 20
    text = fleet.get("/metrics").text
    assert metric_samples(text, "shoal:model_unloads_total")['{model_name="other",reason="lru"}'] == 1
    loaded = metric_samples(text, "shoal:model_loaded")
    assert loaded['{model_name="big"}'] == 1 and loaded['{model_name="other"}'] == 0
    assert metric_samples(text, "vllm:request_success_total")  # the models' own series, merged in
    assert {'{model_name="big"}', '{model_name="stories@v1"}'} <= set(metric_samples(text, "shoal:ready"))


@pytest.mark.timeout(60)
def test_fallback_when_the_primary_fails_or_misses_its_deadline(fleet):
    failed = _complete(fleet, "broken")
    assert failed.status_code == 200, failed.text
    assert failed.json()["model"] == "stories@v1" and failed.headers["x-shoal-fallback"] == "stories@v1"
    body = {"model": "broken", "prompt": "Once", "max_tokens": 3, "stream": True}
    with fleet.stream("POST", "/v1/completions", json=body) as stream:
        assert stream.headers["x-shoal-fallback"] == "stories@v1"
        chunks = [line for line in stream.iter_lines() if line.startswith("data: {")]
    assert chunks and all('"model":"stories@v1"' in c for c in chunks)
    late = _complete(fleet, "slow", headers={"X-Request-Timeout": "0.3"})  # slow loads in ~seconds
    assert late.status_code == 200 and late.headers["x-shoal-fallback"] == "stories@v1"
    fallbacks = metric_samples(fleet.get("/metrics").text, "shoal:model_fallbacks_total")
    assert fallbacks['{fallback="stories@v1",model_name="broken"}'] == 2  # the second without a retry
    assert "not a readable safetensors file" in _admin(fleet, "broken")["last_error"]


def _admin(client: httpx.Client, ref: str) -> dict:
    return next(m for m in client.get("/v1/admin/models").json()["models"] if m["id"] == ref)


@pytest.mark.timeout(60)
def test_admin_api_is_protected_and_loads_unloads_with_per_request_keep_alive(fleet):
    no_key = {"Authorization": ""}
    assert fleet.get("/v1/admin/models", headers=no_key).status_code == 401
    assert fleet.post("/v1/admin/models/stories@v2/load", headers=no_key).status_code == 401
    assert fleet.get("/health", headers=no_key).status_code == 200
    assert fleet.post("/v1/admin/models/nope/load").status_code == 404
    loaded = fleet.post("/v1/admin/models/stories@v2/load")
    assert loaded.status_code == 200 and loaded.json()["state"] == "loaded"
    assert _complete(fleet, "stories@v2", keep_alive=0).status_code == 200  # Ollama's: unload right after
    assert _until(lambda: _states(fleet)["stories@v2"] == "unloaded", 3)
    too_large = fleet.post("/v1/completions", content=b"x" * (9 << 20))  # the default 8 MiB limit
    assert too_large.status_code == 413
    unknown = _complete(fleet, "nope")
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "model_not_found"


@pytest.mark.timeout(60)
def test_console_lists_the_registry_and_reads_a_loaded_models_live_view(fleet):
    """The console of a fleet (shoal/fleet/console.py): read-only, so the other tests' states hold."""
    no_key = {"Authorization": ""}
    assert fleet.get("/ui/", headers=no_key).status_code == 200  # the page: public
    assert fleet.get("/ui/api/models", headers=no_key).status_code == 401  # its data: the /v1 rule
    info = fleet.get("/ui/api/info").json()
    assert info["kind"] == "fleet" and "stories@v1" in info["models"] and "big" in info["models"]
    body = fleet.get("/ui/api/models").json()
    assert body["admin"] is True
    views = {m["id"]: m for m in body["models"]}
    assert views["stories@v1"]["state"] == "loaded" and views["stories@v1"]["pinned"] is True
    assert views["stories@v1"]["memory_bytes"] == 40 << 20
    assert views["stories@v1"]["keep_alive_left_s"] is None  # pinned: never unloaded for idleness
    assert _complete(fleet, "stories@v1").status_code == 200
    live = fleet.get("/ui/api/live", params={"model": "stories@v1"}).json()
    assert live["model"] == "stories@v1" and live["ready"] is True and live["totals"]["requests"] >= 1
    not_loaded = fleet.get("/ui/api/live", params={"model": "broken"})
    assert not_loaded.status_code == 409 and "not loaded" in not_loaded.json()["error"]["message"]


BAD_CONFIGS = {
    "fallback 'ghost' is not a registered model": "- {{name: a, source: {src}, fallback: [ghost]}}",
    "unknown model": "- {{name: a, source: /nonexistent/model-dir}}",
    "dtype: Input should be": "- {{name: a, source: {src}, dtype: float8}}",
    "registered twice": "- {{name: a, source: {src}}}\n  - {{name: a, source: {src}}}",
}


@pytest.mark.timeout(60)
def test_bad_registry_fails_at_start_naming_the_entry(tmp_path):
    """Every bad entry is named; one goes through `shoal serve` for its exit code and message."""
    for i, (expected, entries) in enumerate(BAD_CONFIGS.items()):
        path = tmp_path / f"models{i}.yaml"
        path.write_text("models:\n  " + entries.format(src=TINY_MODEL))
        with pytest.raises(ValueError, match=r"models\[\d\] \(a\): .*" + re.escape(expected)):
            load_registry(path)
    cmd = [
        sys.executable,
        "-m",
        "shoal.cli",
        "serve",
        "--models",
        str(tmp_path / "models0.yaml"),
        "--port",
        "1",
    ]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=50)
    assert out.returncode == 2, out.stderr
    assert "models0.yaml: models[0] (a): fallback 'ghost' is not a registered model" in out.stderr


@pytest.mark.timeout(60)
def test_a_preloaded_model_that_cannot_load_stops_the_server(tmp_path):
    """As one model's server does (exit 1): the pod's main model is missing."""
    path = tmp_path / "models.yaml"
    path.write_text(f"models:\n  - {{name: a, source: {TINY_MODEL}, memory: 1GiB, preload: true}}\n")
    cmd = [sys.executable, "-m", "shoal.cli", "serve", "--models", str(path), "--memory-budget", "100MiB",
           "--port", "0", "--device", "cpu"]  # fmt: skip
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=50)
    assert out.returncode == 1, out.stderr
    assert "a needs 1024 MiB, more than the whole budget" in out.stderr


def _request_behind_a_backlog(client: httpx.Client) -> httpx.Response | None:
    """Two long requests to `busy` (one runs, one waits), then a third once one is seen waiting; None if
    none was seen waiting within 20 s."""
    long = {"max_tokens": 480, "ignore_eos": True}
    backlog = [threading.Thread(target=_complete, args=(client, "busy"), kwargs=long) for _ in range(2)]
    for thread in backlog:
        thread.start()

    def busy_waiting() -> bool:
        text = client.get("/metrics").text
        return metric_samples(text, "vllm:num_requests_waiting").get('{model_name="busy"}', 0) >= 1

    shed = _complete(client, "busy") if _until(busy_waiting, 20) else None
    for thread in backlog:
        thread.join(60)
    return shed


@pytest.mark.timeout(120)  # up to three backlog rounds (see below), each a few seconds
def test_fallback_when_the_primary_sheds_load(tmp_path):
    """--max-num-seqs 1 and --max-waiting-requests 1, per model: with one long request running on `busy`
    and one waiting, the next request to `busy` would be shed (503); its fallback `spare` answers it."""
    path = tmp_path / "models.yaml"
    path.write_text(
        "models:\n"
        f"  - {{name: busy, source: {TINY_MODEL}, memory: 20MiB, preload: true, fallback: [spare]}}\n"
        f"  - {{name: spare, source: {TINY_MODEL}, memory: 20MiB, preload: true}}\n"
    )
    server = launch_own_server(
        "fleet-shed",
        ["--models", str(path), "--memory-budget", "100MiB", "--max-num-seqs", "1", "--max-waiting-requests", "1"],
    )  # fmt: skip
    try:
        wait_ready(server)
        with httpx.Client(base_url=server.url, timeout=60) as client:
            # The backlog lasts as long as two 480-token requests of a tiny model (about a second): on a
            # busy machine it can drain before it is seen, or before the third request arrives (then
            # `busy` answers it, with no fallback). Such a round shows nothing; up to three are tried.
            for _ in range(3):
                shed = _request_behind_a_backlog(client)
                if shed is not None and shed.json().get("model") == "spare":
                    break
            assert shed is not None, "the backlog never built up on busy"
            assert shed.status_code == 200, shed.text
            assert shed.json()["model"] == "spare" and shed.headers["x-shoal-fallback"] == "spare"
            fallbacks = metric_samples(client.get("/metrics").text, "shoal:model_fallbacks_total")
            assert fallbacks['{fallback="spare",model_name="busy"}'] == 1
    finally:
        stop_process(server.proc)
