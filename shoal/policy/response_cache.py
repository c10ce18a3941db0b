"""The response cache: exact repeats of deterministic requests are answered without the engine.

What is cached: a completion or chat completion whose output does not depend on chance, i.e. with
`temperature: 0` or a fixed `seed`, and only a complete 200 answer (for a stream, one that ended with
`[DONE]` and carried no error event). The key is the SHA-256 of the route, the served model, the tenant
and the request body in canonical JSON (sorted keys) without the fields that do not change the output
(`user`, `metadata`, ...). Entries of one tenant are invisible to another unless the policy sets
`share_across_tenants`. A streamed request is answered by replaying the recorded events.

Stores: an in-process LRU bounded by entry count, total bytes and a TTL, or Redis (`SET key value EX
ttl`), which all replicas share. Config (policy file, section `response_cache`):

    response_cache:
      backend: memory          # or redis
      redis_url: redis://127.0.0.1:6379/0
      ttl_seconds: 300
      max_entries: 10000       # memory only
      max_bytes: 268435456     # memory only
      max_entry_bytes: 1048576 # larger answers are not cached
      share_across_tenants: false
      encryption_key_env: SHOAL_CACHE_ENCRYPTION_KEY  # redis: entries sealed with AES-256-GCM

Entries in Redis hold prompts' answers outside the process: with `encryption_key_env` they are stored
sealed (policy/encryption.py), and an entry that fails to open (changed, or another key) is a miss.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import OrderedDict
from typing import Any, Literal

from cryptography.exceptions import InvalidTag
from pydantic import BaseModel, ConfigDict, Field

from shoal.policy.encryption import Cipher

# Request fields that do not change what is generated: left out of the key.
IGNORED_FIELDS = frozenset(
    {"user", "metadata", "store", "service_tier", "safety_identifier", "prompt_cache_key"}
)
KEY_PREFIX = "shoal:response-cache:"


class ResponseCachePolicy(BaseModel):
    model_config = ConfigDict(extra="forbid")

    backend: Literal["memory", "redis"] = "memory"
    redis_url: str = "redis://127.0.0.1:6379/0"
    ttl_seconds: float = Field(300.0, gt=0)
    max_entries: int = Field(10_000, ge=1)
    max_bytes: int = Field(256 * 1024 * 1024, ge=1)
    max_entry_bytes: int = Field(1024 * 1024, ge=1)
    share_across_tenants: bool = False
    encryption_key_env: str | None = None  # redis backend: AES-256-GCM key (32 bytes, base64) variable


def is_deterministic(body: dict[str, Any]) -> bool:
    """Greedy decoding or a fixed seed: the same request gives the same answer."""
    return body.get("temperature") == 0 or body.get("seed") is not None


def cache_key(route: str, model: str, tenant: str | None, body: dict[str, Any]) -> str:
    """A hex SHA-256 naming one (route, model, tenant, normalized request); tenant None is shared."""
    kept = {k: v for k, v in body.items() if k not in IGNORED_FIELDS}
    canonical = json.dumps([route, model, tenant, kept], sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


class CachedResponse(BaseModel):
    """What is replayed: the media type and the body bytes (for a stream, all its events)."""

    media_type: str
    body: bytes

    def encode(self) -> bytes:
        return self.media_type.encode() + b"\n" + self.body

    @classmethod
    def decode(cls, raw: bytes) -> CachedResponse:
        media_type, _, body = raw.partition(b"\n")
        return cls(media_type=media_type.decode(), body=body)


class MemoryStore:
    """An LRU of encoded responses, bounded by count and bytes; entries expire after ttl seconds."""

    def __init__(self, policy: ResponseCachePolicy):
        self.policy = policy
        self._entries: OrderedDict[str, tuple[float, bytes]] = OrderedDict()
        self._bytes = 0

    async def get(self, key: str) -> bytes | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        expires, raw = entry
        if time.monotonic() >= expires:
            self._drop(key)
            return None
        self._entries.move_to_end(key)
        return raw

    async def set(self, key: str, raw: bytes) -> None:
        self._drop(key)
        self._entries[key] = (time.monotonic() + self.policy.ttl_seconds, raw)
        self._bytes += len(raw)
        while len(self._entries) > self.policy.max_entries or self._bytes > self.policy.max_bytes:
            self._drop(next(iter(self._entries)))

    def _drop(self, key: str) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self._bytes -= len(entry[1])


class RedisStore:
    """Entries in Redis under KEY_PREFIX, expiring after ttl seconds; shared by every replica."""

    def __init__(self, policy: ResponseCachePolicy):
        import redis.asyncio as redis  # only with a redis backend

        self.policy = policy
        self._client = redis.Redis.from_url(policy.redis_url)
        env = policy.encryption_key_env
        self._cipher = Cipher(Cipher.key_from_env(env, "the response cache encryption key")) if env else None

    async def get(self, key: str) -> bytes | None:
        raw = await self._client.get(KEY_PREFIX + key)
        if raw is None or self._cipher is None:
            return raw
        try:
            return self._cipher.open(raw)
        except InvalidTag:
            return None  # changed in Redis, or sealed under another key: not ours to serve

    async def set(self, key: str, raw: bytes) -> None:
        stored = self._cipher.seal(raw) if self._cipher is not None else raw
        await self._client.set(KEY_PREFIX + key, stored, ex=max(1, round(self.policy.ttl_seconds)))


class ResponseCache:
    """Looks up and stores responses by key; the policy decides the store and the tenant rule."""

    def __init__(self, policy: ResponseCachePolicy):
        self.policy = policy
        self.store = RedisStore(policy) if policy.backend == "redis" else MemoryStore(policy)

    def key(self, route: str, model: str, tenant: str | None, body: dict[str, Any]) -> str | None:
        """The key of a cacheable request, or None (sampled requests are never cached)."""
        if not is_deterministic(body):
            return None
        return cache_key(route, model, None if self.policy.share_across_tenants else tenant, body)

    async def get(self, key: str) -> CachedResponse | None:
        raw = await self.store.get(key)
        return CachedResponse.decode(raw) if raw is not None else None

    async def put(self, key: str, response: CachedResponse) -> None:
        if len(response.body) <= self.policy.max_entry_bytes:
            await self.store.set(key, response.encode())
