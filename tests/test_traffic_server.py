"""Rate limits, caps, shedding and the circuit breaker, against real `shoal serve` processes.

Three stories260K servers, started together: two replicas with one key file sharing one Redis rate limit
(a unique key prefix, deleted at the end), and one with the caps, shedding and the breaker (and fault
injection, to slow and break engine steps).
"""

from __future__ import annotations

import threading
import time
import uuid

import httpx
import pytest
from server_fixture import (
    CHAT_TEMPLATE,
    LiveServer,
    launch_own_server,
    metric_samples,
    stop_process,
    wait_ready,
)
from test_security import create_key
from test_traffic_policies import REDIS_URL, delete_prefix, redis_or_skip

WINDOW_S = 3  # long enough for 12 quick requests on a loaded machine, short for the tests
TOKENS_PER_WINDOW = 300


@pytest.fixture(scope="module")
def servers(tmp_path_factory) -> dict:
    redis_or_skip()
    tmp = tmp_path_factory.mktemp("traffic")
    prefix = f"shoal-test-{uuid.uuid4().hex}"
    keys_file = tmp / "keys.json"
    # Keys made with `shoal keys create`: their limits are per window (window_seconds).
    keys = {
        "ten": create_key(keys_file, "--tenant", "t", "--rpm", "10")[1],
        "tok": create_key(keys_file, "--tenant", "t", "--tpm", str(TOKENS_PER_WINDOW))[1],
    }
    rate = tmp / "rate.yaml"
    rate.write_text(
        f"auth: {{keys_file: {keys_file}}}\n"
        f"rate_limits:\n  backend: redis\n  redis_url: {REDIS_URL}\n  redis_prefix: {prefix}\n"
        f"  window_seconds: {WINDOW_S}\n  per_tenant: {{requests: 1000}}\n"
    )
    guard = tmp / "guard.yaml"
    guard.write_text(
        "limits: {max_messages: 4, max_prompt_tokens: 64, max_stop: 2, max_stop_length: 8,\n"
        "         max_logit_bias: 2, max_top_logprobs: 2, control_chars: refuse}\n"
        "shedding: {low_priority_share: 0.5, degrade_at_share: 0.25, degraded_max_tokens: 2}\n"
        "breaker: {failure_threshold: 3, open_seconds: 1}\n"
    )
    template = tmp / "chat.jinja"
    template.write_text(CHAT_TEMPLATE)
    started = {
        "a": launch_own_server("rate-a", ["--policy", str(rate)]),
        "b": launch_own_server("rate-b", ["--policy", str(rate)]),
        "guard": launch_own_server(
            "guard",
            [
                "--policy",
                str(guard),
                "--max-tokens-cap",
                "32",
                "--max-n",
                "2",
                "--max-waiting-requests",
                "4",
                "--max-num-seqs",
                "2",
                "--scheduling-policy",
                "priority",
                "--enable-fault-injection",
                "--max-consecutive-step-failures",
                "1000",
                "--chat-template",
                str(template),
            ],
        ),  # fmt: skip
    }
    try:
        for server in started.values():
            wait_ready(server)
        yield {**started, "keys": keys}
    finally:
        for server in started.values():
            stop_process(server.proc)
        delete_prefix(prefix)


def complete(server: LiveServer, key: str | None = None, **body) -> httpx.Response:
    payload = {"prompt": "Once upon a time", "max_tokens": 1, **body}
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(f"{server.url}/v1/completions", json=payload, headers=headers, timeout=60)


def chat(server: LiveServer, **body) -> httpx.Response:
    payload = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1, **body}
    return httpx.post(f"{server.url}/v1/chat/completions", json=payload, timeout=60)


# ---- rate limits ------------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_two_replicas_share_one_request_limit(servers):
    """A key with 10 requests per window, alternating between two processes: exactly 10 succeed,
    counted down together, then both answer 429 with Retry-After and OpenAI's headers."""
    answers = [complete(servers["ab"[i % 2]], servers["keys"]["ten"]) for i in range(12)]
    assert [r.status_code for r in answers] == [200] * 10 + [429] * 2, [r.text for r in answers]
    remaining = [int(r.headers["x-ratelimit-remaining-requests"]) for r in answers[:10]]
    assert remaining == list(range(9, -1, -1))
    for refused in answers[10:]:
        assert refused.json()["error"]["code"] == "rate_limit_exceeded"
        assert 1 <= int(refused.headers["Retry-After"]) <= WINDOW_S
        assert refused.headers["x-ratelimit-limit-requests"] == "10"
        assert refused.headers["x-ratelimit-remaining-requests"] == "0"
        assert refused.headers["x-ratelimit-reset-requests"].endswith("s")


@pytest.mark.timeout(60)
def test_token_limit_counts_real_usage_until_it_ages_out(servers):
    """A key's request admitted with room for its prompt overshoots the token limit with its completion;
    the key's next request (on the other replica) gets 429 until that usage slides out of the window."""
    key = servers["keys"]["tok"]
    big = complete(servers["a"], key, max_tokens=TOKENS_PER_WINDOW + 50, ignore_eos=True)
    assert big.status_code == 200, big.text
    assert big.json()["usage"]["completion_tokens"] == TOKENS_PER_WINDOW + 50
    assert "x-ratelimit-remaining-tokens" in big.headers
    time.sleep(0.1)  # the completion is recorded once the answer has been sent
    refused = complete(servers["b"], key)
    assert refused.status_code == 429, refused.text
    assert "tokens" in refused.json()["error"]["message"]
    assert refused.headers["x-ratelimit-limit-tokens"] == str(TOKENS_PER_WINDOW)
    assert refused.headers["x-ratelimit-remaining-tokens"] == "0"
    assert int(refused.headers["Retry-After"]) >= 1 and "x-ratelimit-reset-tokens" in refused.headers
    assert len(refused.headers.get_list("x-ratelimit-limit-requests")) == 1  # the tenant's, once
    start = time.monotonic()
    while (answer := complete(servers["b"], key)).status_code == 429:
        assert time.monotonic() - start < 2 * WINDOW_S + 2, "the usage never aged out"
        time.sleep(0.2)
    assert answer.status_code == 200, answer.text


# ---- caps -------------------------------------------------------------------------------------------

CAPS = [
    (chat, {"messages": [{"role": "user", "content": "x"}] * 5}, "messages", "limits.max_messages"),
    (complete, {"prompt": [5] * 100}, "prompt", "limits.max_prompt_tokens"),
    (complete, {"max_tokens": 33}, "max_tokens", "--max-tokens-cap"),
    (chat, {"max_tokens": None, "max_completion_tokens": 33}, "max_completion_tokens", "--max-tokens-cap"),
    (complete, {"n": 3}, "n", "--max-n"),
    (complete, {"stop": ["a", "b", "c"]}, "stop", "limits.max_stop"),
    (complete, {"stop": ["123456789"]}, "stop", "limits.max_stop_length"),
    (complete, {"logit_bias": {"1": 1, "2": 1, "3": 1}}, "logit_bias", "limits.max_logit_bias"),
    (chat, {"logprobs": True, "top_logprobs": 3}, "top_logprobs", "limits.max_top_logprobs"),
    (complete, {"logprobs": 3}, "logprobs", "limits.max_top_logprobs"),
    (complete, {"prompt": "a\x01b"}, "prompt", "limits.control_chars"),
    (chat, {"messages": [{"role": "user", "content": "a\x00b"}]}, "messages.0.content", "NUL"),
]


@pytest.mark.timeout(60)
def test_every_cap_is_a_400_naming_it_and_the_server_keeps_serving(servers):
    guard = servers["guard"]
    for send, body, param, name in CAPS:
        answer = send(guard, **body)
        assert answer.status_code == 400, (body, answer.text)
        error = answer.json()["error"]
        assert error["param"] == param and name in error["message"], (body, error)
    # Within the caps all is well, and a chat without max_tokens gets the cap, not the context window.
    assert complete(guard, n=2, stop=["a", "b"], logit_bias={"1": 1, "2": 1}).status_code == 200
    free = chat(guard, max_tokens=None, ignore_eos=True)
    assert free.status_code == 200 and free.json()["usage"]["completion_tokens"] == 32


# ---- shedding and the breaker ----------------------------------------------------------------------


def _faults(server: LiveServer, plan: dict) -> None:
    httpx.post(f"{server.url}/debug/faults", json=plan, timeout=10).raise_for_status()


@pytest.mark.timeout(60)
def test_overload_sheds_low_priority_and_premium_still_succeeds(servers):
    """max_num_seqs 2 and --max-waiting-requests 4. Low priority (10): two run, the third waits in full,
    the fourth (1 waiting: degrade_at_share 0.25 x 4) is degraded to 2 tokens, the rest (2 waiting:
    low_priority_share 0.5 x 4) are shed. Premium (0) is still admitted behind them and succeeds."""
    guard = servers["guard"]
    _faults(guard, {"step_delay_s": 0.2})  # a low request runs >= 2 s: all arrive before one ends
    answers: dict[str, httpx.Response] = {}

    def send(name: str, priority: int, max_tokens: int) -> None:
        answers[name] = complete(guard, priority=priority, max_tokens=max_tokens, ignore_eos=True)

    threads = [threading.Thread(target=send, args=(f"low{i}", 10, 10)) for i in range(7)]
    threads.append(threading.Thread(target=send, args=("premium", 0, 2)))
    try:
        for thread in threads:
            thread.start()
            time.sleep(0.05)
        for thread in threads:
            thread.join(30)
    finally:
        _faults(guard, {})
    low = [answers[f"low{i}"] for i in range(7)]
    shed = [r for r in low if r.status_code == 503]
    degraded = [r for r in low if r.status_code == 200 and "x-shoal-degraded" in r.headers]
    full = [r for r in low if r.status_code == 200 and "x-shoal-degraded" not in r.headers]
    assert (len(full), len(degraded), len(shed)) == (3, 1, 3), [(r.status_code, r.text[:80]) for r in low]
    assert all(r.json()["usage"]["completion_tokens"] == 10 for r in full)
    for r in degraded:
        assert r.headers["x-shoal-degraded"] == "max_tokens=2" and r.json()["usage"]["completion_tokens"] == 2
    for r in shed:
        assert r.json()["error"]["code"] == "overloaded" and int(r.headers["Retry-After"]) >= 1
    premium = answers["premium"]
    assert premium.status_code == 200 and "x-shoal-degraded" not in premium.headers, premium.text


@pytest.mark.timeout(60)
def test_a_premium_arrival_at_a_full_queue_evicts_the_newest_queued_low_priority_request(servers):
    """max_num_seqs 2, --max-waiting-requests 4. Four low (10) requests: two run, two wait (the fourth
    degraded). Two premium (0) ones are admitted (waiting 2, then 3) and take the seats of running lows.
    The third premium finds 4 waiting, which would shed it: instead the newest low request that is still
    waiting for its first token (low3) is shed with 503, and the premium one takes its place."""
    guard = servers["guard"]
    _faults(guard, {"step_delay_s": 0.15})
    answers: dict[str, httpx.Response] = {}

    def send(name: str, priority: int) -> threading.Thread:
        def run() -> None:  # each runs >= 2.4 s: none ends before all have arrived
            answers[name] = complete(guard, priority=priority, max_tokens=16, ignore_eos=True)

        thread = threading.Thread(target=run)
        thread.start()
        return thread

    names = [(f"low{i}", 10) for i in range(4)] + [(f"premium{i}", 0) for i in range(3)]
    threads = []
    try:
        # Each arrival once the engine has seen the previous ones, however slow this machine is.
        for name, priority in names[:-1]:
            threads.append(send(name, priority))
            _wait_for_engine(guard, len(threads) - len(answers))
        threads.append(send(*names[-1]))
        for thread in threads:
            thread.join(30)
    finally:
        _faults(guard, {})
    status = {name: answers[name].status_code for name, _ in names}
    assert status == {**{name: 200 for name, _ in names}, "low3": 503}, {
        n: r.text[:120] for n, r in answers.items()
    }
    error = answers["low3"].json()["error"]
    assert error["code"] == "overloaded" and "shed for more urgent" in error["message"]
    assert int(answers["low3"].headers["Retry-After"]) >= 1


def _wait_for_engine(server: LiveServer, requests: int, timeout_s: float = 10) -> None:
    """Until the engine holds this many requests, running or waiting."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        text = httpx.get(f"{server.url}/metrics", timeout=10).text
        names = ("vllm:num_requests_running", "vllm:num_requests_waiting")
        if sum(sum(metric_samples(text, name).values()) for name in names) >= requests:
            return
        time.sleep(0.02)
    raise AssertionError(f"the engine never held {requests} requests")


def _breaker_state(server: LiveServer) -> float:
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    return metric_samples(text, "shoal:circuit_breaker_state")[""]


@pytest.mark.timeout(60)
def test_step_failures_open_the_breaker_and_a_probe_closes_it(servers):
    guard = servers["guard"]
    assert _breaker_state(guard) == 0
    _faults(guard, {"step_raise": 1000})
    try:
        assert [complete(guard).status_code for _ in range(3)] == [500] * 3
        start = time.monotonic()
        fast = complete(guard)
        assert fast.status_code == 503 and time.monotonic() - start < 1.0, fast.text
        assert fast.json()["error"]["code"] == "circuit_open" and int(fast.headers["Retry-After"]) >= 1
        assert _breaker_state(guard) == 1
    finally:
        _faults(guard, {})
    time.sleep(1.1)  # open_seconds: the next request is a probe
    probe = complete(guard)
    assert probe.status_code == 200, probe.text
    assert _breaker_state(guard) == 0
