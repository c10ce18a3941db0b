"""Which version, then which replica, serves a request.

Versions: a weighted split by smooth weighted round-robin (nginx's), so a 5% canary gets 5 of every 100
requests exactly rather than about 5 by chance; the split is replaced as a whole (blue-green's atomic switch).

Replicas, among the healthy ones that are not saturated (all healthy ones if every one is):
- `prefix`: the prompt's first block picks the replica by rendezvous hashing, so requests sharing a system
  prompt land where its KV blocks are cached -- the prefix scoring of the Gateway API Inference Extension's
  endpoint picker and vLLM production-stack's prefix-aware router, without a per-prefix table. A saturated
  replica drops out of the ranking, so its prefixes spread to the next ranked replica; and, as in
  consistent hashing with bounded loads (Mirrokni, Thorup and Zadimoghaddam, 2018; HAProxy's
  hash-balance-factor), a replica already holding more than BOUNDED_LOAD times the mean of the gateway's
  requests in flight passes the request on to the next ranked one, so a few hot prefixes cannot pile onto
  one replica.
- `least_loaded`: fewest waiting requests (scraped), then fewest in flight from this gateway.
- `round_robin`: in turn.
"""

from __future__ import annotations

import hashlib
import itertools
import math

from shoal.gateway.config import Saturation
from shoal.gateway.health import Backend


class WeightedSplit:
    """Smooth weighted round-robin over versions; `set` swaps the whole split in one assignment."""

    def __init__(self, weights: dict[str, int]):
        self.set(weights)

    def set(self, weights: dict[str, int]) -> None:
        self._state = (dict(weights), dict.fromkeys(weights, 0))  # one object: readers never see half

    @property
    def weights(self) -> dict[str, int]:
        return dict(self._state[0])

    def pick(self) -> str:
        weights, current = self._state
        total = sum(weights.values())
        for name, w in weights.items():
            current[name] += w
        best = max(current, key=current.__getitem__)
        current[best] -= total
        return best


def prompt_prefix(body: dict, block_chars: int) -> str | None:
    """The first `block_chars` characters of the prompt (completions) or of the joined messages (chat)."""
    prompt = body.get("prompt")
    if isinstance(prompt, list):
        prompt = prompt[0] if prompt and isinstance(prompt[0], str) else str(prompt[:block_chars])
    if prompt is None and isinstance(body.get("messages"), list):
        prompt = "\n".join(str(m.get("content", "")) for m in body["messages"] if isinstance(m, dict))
    return prompt[:block_chars] if isinstance(prompt, str) and prompt else None


def _rendezvous(key: str, backend: Backend) -> int:
    # a mixing hash: with a linear one (CRC32) keys of equal length all rank the replicas alike
    return int.from_bytes(hashlib.blake2b(f"{key}\0{backend.url}".encode(), digest_size=8).digest(), "big")


BOUNDED_LOAD = 2.0


def _bounded_rank(pool: list[Backend], prefix: str) -> Backend:
    cap = math.ceil(BOUNDED_LOAD * (sum(b.in_flight for b in pool) + 1) / len(pool))
    ranked = sorted(pool, key=lambda b: _rendezvous(prefix, b), reverse=True)
    return next((b for b in ranked if b.in_flight < cap), ranked[0])


class ReplicaPicker:
    def __init__(self, policy: str, limits: Saturation):
        self.policy, self.limits = policy, limits
        self._turn = itertools.count()

    def pick(self, replicas: list[Backend], prefix: str | None, exclude: set[str]) -> Backend | None:
        healthy = [b for b in replicas if b.healthy and b.url not in exclude]
        pool = [b for b in healthy if not b.saturated(self.limits)] or healthy
        if not pool:
            return None
        if self.policy == "prefix" and prefix is not None:
            return _bounded_rank(pool, prefix)
        turn = next(self._turn)
        if self.policy == "round_robin":
            return pool[turn % len(pool)]
        # least_loaded, and prefix routing without a prompt; the turn breaks ties fairly
        return min(pool, key=lambda b: (b.load(), (pool.index(b) - turn) % len(pool)))
