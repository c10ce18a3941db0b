"""The traffic policies as units: the sliding-window counter (in memory and in the real Redis), the
circuit breaker's states, the shedding verdicts and the input caps. The server-level behaviour is in
test_traffic_server.py."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from shoal.policy.breaker import BreakerPolicy, CircuitBreaker, State
from shoal.policy.caps import CapExceeded, Caps, InputLimits
from shoal.policy.config import PolicyConfig
from shoal.policy.identity import Identity
from shoal.policy.ratelimit import (
    Buckets,
    RateLimitPolicy,
    RequestLimiter,
    TokenCounter,
    scopes_of,
    seconds_until_room,
)
from shoal.policy.shedding import Load, SheddingPolicy, verdict
from shoal.server.protocol import ChatCompletionRequest

pytestmark = pytest.mark.timeout(30)
REDIS_URL = "redis://127.0.0.1:6379/0"


def redis_or_skip() -> None:
    """Skip, saying why, where no Redis answers (CI starts one: .ci/run)."""
    import redis

    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=1).ping()
    except redis.RedisError as e:
        pytest.skip(f"no Redis at {REDIS_URL} ({e}): the Redis backend is not tested")


def delete_prefix(prefix: str) -> None:
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    keys = list(client.scan_iter(f"{prefix}*"))
    if keys:
        client.delete(*keys)


def test_the_estimate_weights_the_previous_bucket_by_its_overlap():
    b = Buckets(current=30, previous=100, elapsed=0.25)
    assert b.estimate() == 30 + 75
    # room for 20 under a limit of 100: the estimate must fall to 80, i.e. previous * (1 - f) = 50
    assert seconds_until_room(b, 100, 20, window_s=10) == pytest.approx((0.5 - 0.25) * 10)
    # the current bucket alone leaves no room: only in the next bucket, once 1 - f <= 20/30 ... of it
    assert seconds_until_room(Buckets(90, 0, 0.5), 100, 20, 10) == pytest.approx((0.5 + (1 - 80 / 90)) * 10)
    assert seconds_until_room(Buckets(0, 0, 0.5), 100, 101, 10) == 20  # larger than the limit: never


@pytest.mark.parametrize("backend", ["memory", "redis"])
def test_token_usage_is_recorded_even_past_the_limit(backend):
    """An admitted request that overshoots is counted in full; the next one waits for it to age out."""
    if backend == "redis":
        redis_or_skip()
    prefix = f"shoal-test-{uuid.uuid4().hex}"
    policy = RateLimitPolicy(window_seconds=60, backend=backend, redis_prefix=prefix, per_key={"tokens": 100})
    scopes = scopes_of(policy, Identity("k1", None))

    async def run() -> None:
        counter = TokenCounter(policy)
        try:
            first = await counter.admit(scopes, 10)
            assert first.allowed and first.quota.remaining == 90
            await counter.record(scopes, 500)  # its completion overshoots the limit: still recorded
            second = await counter.admit(scopes, 10)
            assert not second.allowed and second.quota.remaining == 0
            assert second.quota.retry_after_s > 0 and second.scope.name == "k1"
            other = scopes_of(policy, Identity("k2", None))
            assert (await counter.admit(other, 10)).allowed  # another key has its own budget
        finally:
            await counter.close()

    try:
        asyncio.run(run())
    finally:
        if backend == "redis":
            delete_prefix(prefix)


def test_exactly_n_requests_per_window_in_memory():
    policy = RateLimitPolicy(window_seconds=60, per_key={"requests": 3})
    limiter = RequestLimiter(policy)

    async def run() -> list:
        return [await limiter.hit(scopes_of(policy, None)) for _ in range(5)]

    decisions = asyncio.run(run())
    assert [d.allowed for d in decisions] == [True, True, True, False, False]
    assert [d.quota.remaining for d in decisions[:3]] == [2, 1, 0]
    assert 59 < decisions[3].quota.retry_after_s <= 60


def test_a_refusal_in_one_scope_records_nothing_in_the_others():
    policy = RateLimitPolicy(per_key={"tokens": 1000}, per_tenant={"tokens": 50})
    scopes = scopes_of(policy, Identity("k1", "acme"))
    assert [s.kind for s in scopes] == ["key", "tenant"]

    async def run() -> None:
        counter = TokenCounter(policy)
        assert not (await counter.admit(scopes, 60)).allowed
        solo = scopes_of(RateLimitPolicy(per_key={"tokens": 1000}), Identity("k1", None))
        assert (await counter.admit(solo, 10)).quota.remaining == 990  # the key's bucket is untouched

    asyncio.run(run())


def test_the_breaker_opens_on_failures_and_probes_close_it():
    now = [0.0]
    breaker = CircuitBreaker(BreakerPolicy(failure_threshold=3, open_seconds=5), clock=lambda: now[0])
    for _ in range(3):
        assert breaker.allow() is None
        breaker.failed()
    assert breaker.state == State.OPEN and breaker.allow() == pytest.approx(5)
    now[0] = 6
    assert breaker.allow() is None and breaker.state == State.HALF_OPEN
    assert breaker.allow() is not None  # one probe at a time
    breaker.abstain()  # the probe was a bad request: its place goes to the next one
    assert breaker.allow() is None
    breaker.failed()  # the probe fails: open again
    assert breaker.state == State.OPEN
    now[0] = 12
    assert breaker.allow() is None
    breaker.succeeded()
    assert breaker.state == State.CLOSED


def test_the_breaker_opens_on_timeouts_and_on_an_unhealthy_engine():
    breaker = CircuitBreaker(BreakerPolicy(timeout_ratio=0.5, window=4, min_requests=4))
    for timed_out in (False, True, False, False):
        breaker.succeeded(timed_out)
    assert breaker.state == State.CLOSED
    breaker.succeeded(True)  # 2 of the last 4
    assert breaker.state == State.OPEN and "timed out" in breaker.reason
    problem, now = ["hung"], [0.0]
    sick = CircuitBreaker(BreakerPolicy(open_seconds=1), unhealthy=lambda: problem[0], clock=lambda: now[0])
    assert sick.allow() is not None and sick.state == State.OPEN
    now[0] = 2
    assert sick.allow() is not None  # still unhealthy: stays open past open_seconds
    problem[0] = None
    assert sick.allow() is None  # healthy again: a probe


def test_shedding_sheds_low_priority_first_and_degrades_before():
    policy = SheddingPolicy(protected_priority=0, low_priority_share=0.5, degrade_at_share=0.25)

    def at(waiting: int, priority: int) -> str:
        return verdict(policy, 8, Load(waiting, 0.0), priority)[0]

    assert [at(w, 10) for w in (1, 2, 4)] == ["admit", "degrade", "shed"]
    assert [at(w, 0) for w in (4, 7, 8)] == ["admit", "admit", "shed"]
    # Classes 0, 10 and 20: the least urgent is shed first (at 4 of 8), the middle one at 6, premium at 8.
    graded = [
        [verdict(policy, 8, Load(w, 0.0), p, least_urgent=20)[0] for w in (4, 6, 8)] for p in (20, 10, 0)
    ]
    assert graded == [["shed"] * 3, ["degrade", "shed", "shed"], ["admit", "admit", "shed"]]
    timed = SheddingPolicy(max_queue_wait_s=10)
    assert (
        verdict(timed, None, Load(0, 6.0), 5)[0] == "shed"
        and verdict(timed, None, Load(0, 6.0), 0)[0] == "admit"
    )


def test_caps_name_the_flag_or_the_policy_value():
    caps = Caps(InputLimits(max_stop=2, control_chars="strip"), max_tokens_flag=8)
    with pytest.raises(CapExceeded, match=r"--max-tokens-cap") as err:
        caps.check_request(
            n=1, max_tokens=9, max_tokens_param="max_tokens", stop=[], logit_bias=0,
            top_logprobs=None, top_logprobs_param="logprobs",
        )  # fmt: skip
    assert err.value.param == "max_tokens"
    with pytest.raises(CapExceeded, match=r"limits.max_stop\b"):
        caps.check_request(
            n=1, max_tokens=1, max_tokens_param="max_tokens", stop=["a", "b", "c"], logit_bias=0,
            top_logprobs=None, top_logprobs_param="logprobs",
        )  # fmt: skip
    assert caps.clean_text("a\x01b\x7fc\td\n", "prompt") == "abc\td\n"
    refuse = Caps(InputLimits(control_chars="refuse"))
    with pytest.raises(CapExceeded, match="U\\+0001"):
        refuse.clean_text("a\x01", "prompt")
    assert Caps(InputLimits()).clean_text("a\x01", "prompt") == "a\x01"  # off by default


def test_a_nul_character_is_always_invalid():
    with pytest.raises(ValueError, match="NUL"):
        ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "a\x00b"}]})


def test_the_policy_sections_validate_with_their_paths():
    with pytest.raises(ValueError, match="rate_limits.per_key.requests"):
        PolicyConfig.model_validate({"rate_limits": {"per_key": {"requests": 0}}})
    policy = PolicyConfig.model_validate({"rate_limits": {"global": {"requests": 5}}})
    assert policy.rate_limits.global_.requests == 5 and policy.limits.max_n == 128


def test_a_keys_own_limits_win_over_the_policys_per_key_limit():
    from types import SimpleNamespace

    policy = RateLimitPolicy(per_key={"requests": 100})
    own = SimpleNamespace(requests_per_minute=5, tokens_per_minute=None)
    keyed = scopes_of(policy, SimpleNamespace(key_id="k1", tenant=None, limits=own))
    assert keyed[0].limit.requests == 5
    assert scopes_of(policy, None)[0].name == "anonymous" and scopes_of(policy, None)[0].limit.requests == 100
