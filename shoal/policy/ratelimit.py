"""Rate limits per key, per tenant and global: requests per window and tokens per window.

- **Requests**: the `limits` package's moving window (https://limits.readthedocs.io/en/stable/strategies.html),
  which keeps one timestamp per request, so a limit of N holds for *any* window of `window_seconds`,
  whatever the boundaries.
- **Tokens**: a sliding-window counter (Cloudflare, "How we built rate limiting capable of scaling to
  millions of domains", 2017): two fixed buckets per scope, the previous one weighted by how much of it
  still overlaps the sliding window. `limits`' moving window cannot count tokens: it stores one entry per
  unit and a hit larger than what is left records nothing, so an overshooting request would go
  unrecorded. Here usage is always recorded, even past the limit: prompt tokens when a request is
  admitted, completion tokens when it ends. A request is admitted only while the estimated remainder
  covers its prompt. Each update is one Lua call, atomic in Redis, and takes its time from Redis (`TIME`),
  so that all replicas agree on bucket boundaries.
- **Backends**: in-process (the default: each replica counts alone) or Redis (`backend: redis`: every
  replica shares one limit; LiteLLM #40291 is what happens otherwise).

Over a limit the server answers 429 with `Retry-After` and OpenAI's headers
(https://platform.openai.com/docs/guides/rate-limits#rate-limits-in-headers):
`x-ratelimit-limit-requests`, `x-ratelimit-remaining-requests`, `x-ratelimit-reset-requests` and the
`-tokens` equivalents. Anonymous callers (no authentication) share the key `anonymous`.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Literal

from limits import RateLimitItemPerSecond
from limits.aio.storage import MemoryStorage, Storage
from limits.aio.strategies import MovingWindowRateLimiter
from limits.storage import storage_from_string
from pydantic import BaseModel, ConfigDict, Field

from shoal.policy.identity import ANONYMOUS, Identity

ANONYMOUS_KEY = "anonymous"


class Limit(BaseModel):
    model_config = ConfigDict(extra="forbid")
    requests: int | None = Field(None, ge=1, description="Requests per window (moving window).")
    tokens: int | None = Field(None, ge=1, description="Prompt + completion tokens per window.")


class RateLimitPolicy(BaseModel):
    """The `rate_limits` section of the policy file."""

    model_config = ConfigDict(extra="forbid")
    window_seconds: int = Field(60, ge=1, description="The window of every limit (60: per minute).")
    backend: Literal["memory", "redis"] = "memory"
    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_prefix: str = Field("shoal", min_length=1, description="Namespace of this deployment's keys.")
    per_key: Limit | None = Field(None, description="Each API key's limit (unless `keys` names it).")
    keys: dict[str, Limit] = Field(default_factory=dict, description="Limits of particular key ids.")
    per_tenant: Limit | None = None
    tenants: dict[str, Limit] = Field(default_factory=dict)
    global_: Limit | None = Field(None, alias="global", description="One limit over all callers.")


@dataclass(frozen=True)
class Scope:
    """One limited bucket: ("key", "k1"), ("tenant", "acme") or ("global", "all")."""

    kind: str
    name: str
    limit: Limit

    @property
    def id(self) -> str:
        return f"{self.kind}:{self.name}"


def scopes_of(policy: RateLimitPolicy, identity: Identity | None) -> list[Scope]:
    """The limits that apply to a caller, most specific first."""
    who = identity or ANONYMOUS
    key = who.key_id or ANONYMOUS_KEY
    out = []
    key_limit = _own_limit(who) or policy.keys.get(key, policy.per_key)
    if key_limit is not None:
        out.append(Scope("key", key, key_limit))
    if who.tenant is not None:
        tenant_limit = policy.tenants.get(who.tenant, policy.per_tenant)
        if tenant_limit is not None:
            out.append(Scope("tenant", who.tenant, tenant_limit))
    if policy.global_ is not None:
        out.append(Scope("global", "all", policy.global_))
    return out


def _own_limit(who: Identity) -> Limit | None:
    """The limits stored with the key itself (`shoal keys create --rpm --tpm`), read as per window."""
    own = getattr(who, "limits", None)  # Identity.limits, where authentication provides it
    requests = getattr(own, "requests_per_minute", None)
    tokens = getattr(own, "tokens_per_minute", None)
    return Limit(requests=requests, tokens=tokens) if requests or tokens else None


@dataclass(frozen=True)
class Quota:
    """One limit's state after a check, for the x-ratelimit-* headers."""

    limit: int
    remaining: int
    reset_s: float  # until the limit is back to its full value
    retry_after_s: float = 0.0  # when refused: until this request would be admitted


@dataclass(frozen=True)
class Decision:
    allowed: bool
    quota: Quota | None  # the tightest of the scopes (None: no limit of this kind applies)
    scope: Scope | None = None  # the scope that refused


# ---- requests: limits' moving window ---------------------------------------------------------------


class RequestLimiter:
    """Requests per window for each scope, all-or-nothing: a request refused by one scope uses no quota
    of the others."""

    def __init__(self, policy: RateLimitPolicy):
        self.window_s = policy.window_seconds
        self.storage: Storage = _limits_storage(policy)
        self.strategy = MovingWindowRateLimiter(self.storage)
        self.namespace = policy.redis_prefix

    def _item(self, scope: Scope) -> RateLimitItemPerSecond:
        return RateLimitItemPerSecond(scope.limit.requests, self.window_s)

    async def hit(self, scopes: list[Scope]) -> Decision:
        limited = [s for s in scopes if s.limit.requests is not None]
        if not limited:
            return Decision(True, None)
        for scope in limited:
            if not await self.strategy.test(self._item(scope), self.namespace, scope.id):
                return Decision(False, await self._quota(scope, refused=True), scope)
        for scope in limited:
            # A race with another replica between test and hit is refused here.
            if not await self.strategy.hit(self._item(scope), self.namespace, scope.id):
                return Decision(False, await self._quota(scope, refused=True), scope)
        quotas = [await self._quota(s) for s in limited]
        return Decision(True, min(quotas, key=lambda q: (q.remaining, -q.reset_s)))

    async def _quota(self, scope: Scope, refused: bool = False) -> Quota:
        stats = await self.strategy.get_window_stats(self._item(scope), self.namespace, scope.id)
        # reset_time is when the oldest entry of the window expires: one more request is possible then.
        until = max(stats.reset_time - time.time(), 0.0)
        return Quota(scope.limit.requests, stats.remaining, until, until if refused else 0.0)

    async def close(self) -> None:
        await _close_storage(self.storage)


def _limits_storage(policy: RateLimitPolicy) -> Storage:
    if policy.backend == "memory":
        return MemoryStorage()
    url = "async+" + policy.redis_url
    # limits' async Redis storage defaults to coredis; shoal ships redis-py.
    return storage_from_string(url, implementation="redispy", key_prefix=f"{policy.redis_prefix}:req")


async def _close_storage(storage: Storage) -> None:
    bridge = getattr(storage, "bridge", None)
    client = getattr(bridge, "storage", None)
    if client is not None and hasattr(client, "aclose"):
        await client.aclose()


# ---- tokens: a sliding-window counter ---------------------------------------------------------------


@dataclass(frozen=True)
class Buckets:
    """A scope's two fixed buckets at some instant: usage in the current and the previous bucket, and
    how far into the current bucket that instant is (0 to 1)."""

    current: int
    previous: int
    elapsed: float

    def estimate(self) -> float:
        """Usage over the sliding window: the previous bucket counts for the part still inside it."""
        return self.current + self.previous * (1.0 - self.elapsed)


def seconds_until_room(b: Buckets, limit: int, need: int, window_s: float) -> float:
    """How long until the estimate leaves `need` tokens of room, with no more usage meanwhile."""
    room = limit - need
    if room < 0:
        return 2 * window_s  # never, at this size: the client should not retry soon
    if b.current <= room:
        if b.previous == 0 or b.estimate() <= room:
            return 0.0
        # In this bucket the estimate falls linearly as the previous one slides out.
        frac = 1.0 - (room - b.current) / b.previous
        return max(frac - b.elapsed, 0.0) * window_s
    # Only in the next bucket, where the current one becomes the previous one.
    frac = 1.0 - room / b.current
    return (1.0 - b.elapsed + frac) * window_s


def seconds_until_reset(b: Buckets, window_s: float) -> float:
    if b.current:
        return (2.0 - b.elapsed) * window_s
    if b.previous:
        return (1.0 - b.elapsed) * window_s
    return 0.0


def token_quota(b: Buckets, limit: int, window_s: float, need: int = 0) -> Quota:
    remaining = max(limit - math.ceil(b.estimate()), 0)
    wait = seconds_until_room(b, limit, need, window_s) if need else 0.0
    return Quota(limit, remaining, seconds_until_reset(b, window_s), wait)


class TokenCounter:
    """Tokens per window for each scope (memory or Redis, same arithmetic)."""

    def __init__(self, policy: RateLimitPolicy):
        self.window_s = policy.window_seconds
        self.store: _MemoryBuckets | _RedisBuckets = (
            _MemoryBuckets(self.window_s)
            if policy.backend == "memory"
            else _RedisBuckets(policy.redis_url, f"{policy.redis_prefix}:tok", self.window_s)
        )

    async def admit(self, scopes: list[Scope], prompt_tokens: int) -> Decision:
        """Record the prompt's tokens in every scope if each has room for them; otherwise none."""
        limited = [s for s in scopes if s.limit.tokens is not None]
        if not limited:
            return Decision(True, None)
        limits = [s.limit.tokens for s in limited]
        ok, buckets = await self.store.admit([s.id for s in limited], limits, prompt_tokens)
        if ok:  # the quota after this request's prompt
            buckets = [Buckets(b.current + prompt_tokens, b.previous, b.elapsed) for b in buckets]
        quotas = [
            token_quota(b, lim, self.window_s, prompt_tokens) for b, lim in zip(buckets, limits, strict=True)
        ]
        if not ok:
            worst = max(range(len(quotas)), key=lambda i: quotas[i].retry_after_s)
            return Decision(False, quotas[worst], limited[worst])
        return Decision(True, min(quotas, key=lambda q: q.remaining))

    async def record(self, scopes: list[Scope], tokens: int) -> None:
        """Add usage (completion tokens at the end of a request), even past the limit."""
        ids = [s.id for s in scopes if s.limit.tokens is not None]
        if ids and tokens > 0:
            await self.store.add(ids, tokens)

    async def close(self) -> None:
        await self.store.close()


class _MemoryBuckets:
    def __init__(self, window_s: int):
        self.window_s = window_s
        self.counts: dict[tuple[str, int], int] = {}
        self.pruned_at = -1

    def _read(self, scope_id: str, now: float) -> Buckets:
        index = int(now // self.window_s)
        return Buckets(
            self.counts.get((scope_id, index), 0),
            self.counts.get((scope_id, index - 1), 0),
            (now % self.window_s) / self.window_s,
        )

    async def admit(self, ids: list[str], limits: list[int], cost: int) -> tuple[bool, list[Buckets]]:
        now = time.time()
        buckets = [self._read(i, now) for i in ids]
        ok = all(lim - b.estimate() >= cost for b, lim in zip(buckets, limits, strict=True))
        if ok:
            await self.add(ids, cost, now)
        return ok, buckets

    async def add(self, ids: list[str], tokens: int, now: float | None = None) -> None:
        index = int((time.time() if now is None else now) // self.window_s)
        for scope_id in ids:
            self.counts[(scope_id, index)] = self.counts.get((scope_id, index), 0) + tokens
        if index != self.pruned_at:  # once a bucket: those older than the previous one never count again
            self.pruned_at = index
            for key in [k for k in self.counts if k[1] < index - 1]:
                del self.counts[key]

    async def close(self) -> None:
        pass


# KEYS: one base key per scope. ARGV: window seconds, cost, force (1: add even past a limit), then one
# limit per scope. Reads both buckets of every scope at Redis' own clock; adds the cost to every current
# bucket when all scopes have room (or when forced). Returns {admitted, elapsed*1e6, cur1, prev1, ...}.
_SLIDING_WINDOW_LUA = """
local window = tonumber(ARGV[1])
local cost = tonumber(ARGV[2])
local force = ARGV[3] == '1'
local t = redis.call('TIME')
local now_us = tonumber(t[1]) * 1000000 + tonumber(t[2])
local window_us = window * 1000000
local index = math.floor(now_us / window_us)
local elapsed = (now_us - index * window_us) / window_us
local out = {0, math.floor(elapsed * 1000000)}
local ok = true
for i, base in ipairs(KEYS) do
  local cur = tonumber(redis.call('GET', base .. ':' .. index) or '0')
  local prev = tonumber(redis.call('GET', base .. ':' .. (index - 1)) or '0')
  out[#out + 1] = cur
  out[#out + 1] = prev
  local limit = tonumber(ARGV[3 + i])
  if limit and limit - (cur + prev * (1 - elapsed)) < cost then ok = false end
end
if ok or force then
  for _, base in ipairs(KEYS) do
    local key = base .. ':' .. index
    redis.call('INCRBY', key, cost)
    redis.call('EXPIRE', key, window * 2 + 1)
  end
end
if ok then out[1] = 1 end
return out
"""


class _RedisBuckets:
    def __init__(self, url: str, prefix: str, window_s: int):
        import redis.asyncio as aioredis  # only with backend: redis

        self.client = aioredis.from_url(url)
        self.script = self.client.register_script(_SLIDING_WINDOW_LUA)
        self.prefix = prefix
        self.window_s = window_s

    async def _call(self, ids: list[str], cost: int, force: bool, limits: list[int]) -> tuple[bool, list]:
        keys = [f"{self.prefix}:{i}" for i in ids]
        reply = await self.script(keys=keys, args=[self.window_s, cost, int(force), *limits])
        elapsed = int(reply[1]) / 1e6
        pairs = reply[2:]
        buckets = [Buckets(int(pairs[2 * i]), int(pairs[2 * i + 1]), elapsed) for i in range(len(ids))]
        return bool(reply[0]), buckets

    async def admit(self, ids: list[str], limits: list[int], cost: int) -> tuple[bool, list[Buckets]]:
        return await self._call(ids, cost, False, limits)

    async def add(self, ids: list[str], tokens: int) -> None:
        await self._call(ids, tokens, True, [])

    async def close(self) -> None:
        await self.client.aclose()
