"""The response cache: repeated deterministic requests answered without the engine, per tenant.

The HTTP tests run a server of their own with a policy that turns the cache on (memory backend) and
--record-schedule, whose record shows which requests reached the engine. The stores are tested on their
own, the Redis one against the real Redis at 127.0.0.1:6379.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass

import httpx
import pytest

from shoal.policy.response_cache import MemoryStore, ResponseCache, ResponseCachePolicy

try:
    from server_fixture import launch_own_server, stop_process, wait_ready
except ImportError:  # tests/ became a package
    from tests.server_fixture import launch_own_server, stop_process, wait_ready  # type: ignore[no-redef]

pytestmark = pytest.mark.timeout(60)


@dataclass
class CacheServer:
    url: str
    tenants: dict[str, httpx.Client]  # tenant name -> a client holding one of its API keys

    def post(self, path: str, body: dict, tenant: str = "a", **kwargs) -> httpx.Response:
        return self.tenants[tenant].post(f"{self.url}{path}", json=body, **kwargs)


@pytest.fixture(scope="module")
def cache_server(tmp_path_factory):
    from shoal.policy.keys import create_key

    folder = tmp_path_factory.mktemp("policy")
    keys = folder / "keys.json"
    secrets = {tenant: create_key(keys, tenant)[1] for tenant in ("a", "b")}
    policy = folder / "policy.yaml"
    policy.write_text(f"auth:\n  keys_file: {keys}\nresponse_cache:\n  backend: memory\n  ttl_seconds: 60\n")
    server = launch_own_server("response-cache", ["--policy", str(policy), "--record-schedule"])
    clients = {
        t: httpx.Client(headers={"Authorization": f"Bearer {k}"}, timeout=60) for t, k in secrets.items()
    }
    try:
        wait_ready(server)
        yield CacheServer(server.url, clients)
    finally:
        for client in clients.values():
            client.close()
        stop_process(server.proc)


def _engine_requests(server: CacheServer) -> int:
    """How many requests have entered the engine (from the schedule record)."""
    steps = server.tenants["a"].get(f"{server.url}/debug/schedule").json()["steps"]
    return sum(len(step["added"]) for step in steps)


def _sse(r: httpx.Response) -> list[str]:
    return [line for line in r.text.split("\n") if line.startswith("data: ")]


def test_repeated_deterministic_requests_are_answered_from_the_cache(cache_server):
    server = cache_server
    body = {"prompt": f"Once upon a time {uuid.uuid4().hex}", "max_tokens": 8, "temperature": 0}
    first = server.post("/v1/completions", body)
    before = _engine_requests(server)
    again = server.post("/v1/completions", {**body, "user": "someone else"})  # user: not in the key
    assert first.headers["x-shoal-cache"] == "miss" and again.headers["x-shoal-cache"] == "hit"
    assert again.json() == first.json()
    assert _engine_requests(server) == before, "a hit must not reach the engine"

    streamed = {**body, "stream": True}
    miss = server.post("/v1/completions", streamed)
    hit = server.post("/v1/completions", streamed)
    assert miss.headers["x-shoal-cache"] == "miss" and hit.headers["x-shoal-cache"] == "hit"
    assert hit.headers["content-type"].startswith("text/event-stream")
    assert _sse(hit) == _sse(miss) and _sse(hit)[-1] == "data: [DONE]"

    seeded = {"prompt": "The cat", "max_tokens": 4, "temperature": 1, "seed": 7}  # sampled, but seeded
    first = server.post("/v1/completions", seeded)
    again = server.post("/v1/completions", seeded)
    assert again.headers["x-shoal-cache"] == "hit" and again.json() == first.json()


def test_sampled_and_failed_requests_are_never_cached(cache_server):
    server = cache_server
    sampled = {"prompt": "Once upon a time", "max_tokens": 4, "temperature": 1.0}
    for _ in range(2):
        r = server.post("/v1/completions", sampled)
        assert r.status_code == 200 and "x-shoal-cache" not in r.headers
    bad = {"prompt": "Once", "max_tokens": -1, "temperature": 0}
    assert [server.post("/v1/completions", bad).status_code for _ in range(2)] == [400, 400]
    before = _engine_requests(server)
    cut = {"prompt": f"cut {uuid.uuid4().hex}", "max_tokens": 300, "ignore_eos": True, "temperature": 0}
    timed_out = server.post("/v1/completions", cut, headers={"X-Request-Timeout": "0.05"})
    assert timed_out.json()["choices"][0]["finish_reason"] == "abort"
    retry = server.post("/v1/completions", cut)
    assert (
        retry.headers["x-shoal-cache"] == "miss" and retry.json()["choices"][0]["finish_reason"] == "length"
    )
    assert _engine_requests(server) == before + 2


def test_one_tenants_entries_are_invisible_to_another(cache_server):
    body = {"prompt": f"Tenants {uuid.uuid4().hex}", "max_tokens": 4, "temperature": 0}
    a_first = cache_server.post("/v1/completions", body, tenant="a")
    b_first = cache_server.post("/v1/completions", body, tenant="b")
    assert a_first.headers["x-shoal-cache"] == "miss" and b_first.headers["x-shoal-cache"] == "miss"
    assert cache_server.post("/v1/completions", body, tenant="b").headers["x-shoal-cache"] == "hit"
    assert cache_server.post("/v1/completions", body, tenant="a").headers["x-shoal-cache"] == "hit"


def test_entries_are_per_tenant_unless_shared():
    body = {"prompt": "x", "temperature": 0}
    private = ResponseCache(ResponseCachePolicy())
    assert private.key("/v1/completions", "m", "a", body) != private.key("/v1/completions", "m", "b", body)
    assert private.key("/v1/completions", "m", "a", {**body, "temperature": 0.7}) is None
    shared = ResponseCache(ResponseCachePolicy(share_across_tenants=True))
    assert shared.key("/v1/completions", "m", "a", body) == shared.key("/v1/completions", "m", "b", body)


def test_memory_store_bounds_entries_bytes_and_age():
    async def run():
        store = MemoryStore(ResponseCachePolicy(max_entries=2, max_bytes=10, ttl_seconds=0.2))
        await store.set("a", b"12345")
        await store.set("b", b"12345")
        await store.get("a")  # a is now the most recent
        await store.set("c", b"1")  # over both bounds: b, the least recent, goes
        kept = [await store.get(k) for k in "abc"]
        time.sleep(0.25)
        return kept, await store.get("a")

    kept, expired = asyncio.run(run())
    assert kept == [b"12345", None, b"1"] and expired is None


def test_redis_store_round_trips_and_expires():
    redis = pytest.importorskip("redis")
    try:
        redis.Redis(socket_connect_timeout=1).ping()
    except redis.exceptions.ConnectionError:
        pytest.skip("no Redis at 127.0.0.1:6379")

    async def run():
        cache = ResponseCache(ResponseCachePolicy(backend="redis", ttl_seconds=1))
        key = f"test-{uuid.uuid4().hex}"
        from shoal.policy.response_cache import CachedResponse

        await cache.put(key, CachedResponse(media_type="application/json", body=b'{"a": 1}'))
        got = await cache.get(key)
        await asyncio.sleep(2.1)
        return got, await cache.get(key)

    got, expired = asyncio.run(run())
    assert got.media_type == "application/json" and got.body == b'{"a": 1}' and expired is None


def test_redis_entries_are_sealed_when_encryption_is_on(monkeypatch):
    """With encryption_key_env the bytes in Redis are ciphertext; a changed entry is a miss, not garbage."""
    import base64
    import os

    redis = pytest.importorskip("redis")
    try:
        client = redis.Redis(socket_connect_timeout=1)
        client.ping()
    except redis.exceptions.ConnectionError:
        pytest.skip("no Redis at 127.0.0.1:6379")
    monkeypatch.setenv("TEST_CACHE_KEY", base64.b64encode(os.urandom(32)).decode())
    from shoal.policy.response_cache import KEY_PREFIX, CachedResponse

    cache = ResponseCache(ResponseCachePolicy(backend="redis", encryption_key_env="TEST_CACHE_KEY"))
    key = f"test-{uuid.uuid4().hex}"
    secret = b'{"text": "a very private answer"}'

    async def run():
        await cache.put(key, CachedResponse(media_type="application/json", body=secret))
        got = await cache.get(key)
        stored = client.get(KEY_PREFIX + key)
        client.set(KEY_PREFIX + key, stored[:-1] + bytes([stored[-1] ^ 1]), ex=5)  # one bit flipped
        return got, stored, await cache.get(key)

    got, stored, tampered = asyncio.run(run())
    client.delete(KEY_PREFIX + key)
    assert got.body == secret and tampered is None
    assert b"private" not in stored and b"application/json" not in stored
