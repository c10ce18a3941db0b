"""Content filtering: blocked prompts are a 400 `content_filter`; a blocked output ends at the match with
finish_reason "content_filter", and no blocked text is ever sent, streamed or not.

stories260K greedy from "Once upon a time" writes ", there was a little girl named Lily. She loved to
play outside in the park. One day, she saw a big, red ball. ..." The policy blocks "in the park" and a
pattern for "red ball"; a server of its own runs it.
"""

from __future__ import annotations

import json

import httpx
import pytest

from shoal.policy.content_filter import ContentFilter, ContentFilterPolicy, OutputGuard

try:
    from server_fixture import launch_own_server, stop_process, wait_ready
except ImportError:  # tests/ became a package
    from tests.server_fixture import launch_own_server, stop_process, wait_ready  # type: ignore[no-redef]

pytestmark = pytest.mark.timeout(60)
POLICY = """
content_filter:
  keywords: ["In The Park", "forbidden words"]
  patterns: ["r[e]d\\\\s+ball"]
  max_match_chars: 16
"""
STORY = {"prompt": "Once upon a time", "max_tokens": 60, "temperature": 0, "ignore_eos": True}


@pytest.fixture(scope="module")
def filter_server(tmp_path_factory):
    policy = tmp_path_factory.mktemp("policy") / "policy.yaml"
    policy.write_text(POLICY)
    server = launch_own_server("content-filter", ["--policy", str(policy)])
    wait_ready(server)
    yield server
    stop_process(server.proc)


def test_a_blocked_output_ends_before_the_match(filter_server):
    r = httpx.post(f"{filter_server.url}/v1/completions", json=STORY)
    choice = r.json()["choices"][0]
    assert r.status_code == 200 and choice["finish_reason"] == "content_filter", choice
    assert choice["text"].endswith("She loved to play outside ") and "park" not in choice["text"]


def test_a_streamed_blocked_output_never_sends_the_blocked_text(filter_server):
    with httpx.stream("POST", f"{filter_server.url}/v1/completions", json={**STORY, "stream": True}) as r:
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    text = "".join(c["choices"][0]["text"] for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "content_filter"
    assert text.endswith("She loved to play outside ") and "park" not in text.lower()


def test_blocked_prompts_and_logprobs_are_400(filter_server):
    url = filter_server.url
    r = httpx.post(f"{url}/v1/completions", json={"prompt": "we met IN THE PARK", "max_tokens": 2})
    assert r.status_code == 400 and r.json()["error"]["code"] == "content_filter"
    assert r.json()["error"]["param"] == "prompt"
    r = httpx.post(f"{url}/v1/completions", json={"prompt": "a red   ball", "max_tokens": 2})
    assert r.status_code == 400, "patterns apply to prompts too"
    r = httpx.post(f"{url}/v1/completions", json={"prompt": "hello", "max_tokens": 2, "logprobs": 1})
    assert r.status_code == 400 and r.json()["error"]["param"] == "logprobs"
    ok = httpx.post(f"{url}/v1/completions", json={"prompt": "hello", "max_tokens": 2})
    assert ok.status_code == 200


def test_output_guard_holds_back_what_may_still_match():
    guard = OutputGuard(ContentFilter(ContentFilterPolicy(keywords=["forbidden words"])))
    shown = [guard.visible(t, False)[0] for t in ("say the forb", "say the forbidden wo")]
    assert all("forb" not in s for s in shown)  # held back: it may become the keyword
    text, blocked = guard.visible("say the forbidden words now", False)
    assert blocked and text == "say the " and guard.visible("anything", True) == ("say the ", True)
    done = OutputGuard(ContentFilter(ContentFilterPolicy(keywords=["forbidden words"])))
    assert done.visible("say the forb", True) == ("say the forb", False)  # finished: nothing to wait for


def test_a_bad_pattern_fails_policy_validation():
    with pytest.raises(ValueError, match="does not compile"):
        ContentFilterPolicy(patterns=["(unclosed"])
