"""The official `openai` client, unchanged, against a live `shoal serve` (stories260K, float32)."""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest

try:
    from server_fixture import API_KEY, SERVED_NAME, live_server, steps_with_batch_over_one  # noqa: F401
except ImportError:  # tests/ became a package
    from tests.server_fixture import API_KEY, SERVED_NAME, live_server, steps_with_batch_over_one  # noqa: F401

pytestmark = pytest.mark.timeout(60)

PROMPT = "Once upon a time"
MESSAGES = [{"role": "user", "content": "Tell me a story about a cat."}]


@pytest.fixture(scope="module")
def client(live_server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{live_server.url}/v1", api_key=API_KEY, max_retries=0, timeout=60)


def _prompt_tokens(live_server, **body) -> int:
    r = httpx.post(f"{live_server.url}/tokenize", json=body, headers=live_server.headers, timeout=10)
    return r.json()["count"]


def test_models(client):
    assert [m.id for m in client.models.list().data] == [SERVED_NAME]
    assert client.models.retrieve(SERVED_NAME).id == SERVED_NAME


def test_completion(client, live_server):
    out = client.completions.create(
        model=SERVED_NAME, prompt=PROMPT, max_tokens=10, temperature=0, extra_body={"ignore_eos": True}
    )
    assert out.choices[0].text and out.choices[0].finish_reason == "length"
    n_prompt = _prompt_tokens(live_server, prompt=PROMPT)
    assert (out.usage.prompt_tokens, out.usage.completion_tokens, out.usage.total_tokens) == (
        n_prompt,
        10,
        n_prompt + 10,
    )


def test_completion_stream_with_usage(client):
    kwargs = dict(model=SERVED_NAME, prompt=PROMPT, max_tokens=10, temperature=0)
    expected = client.completions.create(**kwargs)
    stream = client.completions.create(**kwargs, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected.choices[0].text
    assert chunks[-1].choices == [] and chunks[-1].usage == expected.usage


def test_completion_n_and_extras(client):
    out = client.completions.create(
        model=SERVED_NAME,
        prompt=[PROMPT, "The dog"],
        n=3,
        max_tokens=4,
        seed=7,
        stop=["\n"],
        extra_body={"top_k": 20, "min_p": 0.05, "repetition_penalty": 1.1, "ignore_eos": True},
    )
    assert sorted(c.index for c in out.choices) == list(range(6))
    assert all(c.finish_reason in ("length", "stop") for c in out.choices)
    assert 6 <= out.usage.completion_tokens <= 24


def test_chat(client, live_server):
    out = client.chat.completions.create(
        model=SERVED_NAME, messages=MESSAGES, max_completion_tokens=12, temperature=0
    )
    message = out.choices[0].message
    assert message.role == "assistant" and message.content
    n_prompt = _prompt_tokens(live_server, messages=MESSAGES)
    usage = out.usage
    assert usage.prompt_tokens == n_prompt and usage.total_tokens == n_prompt + usage.completion_tokens
    assert 1 <= usage.completion_tokens <= 12


def test_chat_stream_with_usage(client):
    kwargs = dict(model=SERVED_NAME, messages=MESSAGES, max_tokens=12, temperature=0)
    expected = client.chat.completions.create(**kwargs)
    chunks = list(
        client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True})
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [expected.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage == expected.usage


def test_chat_logprobs(client):
    out = client.chat.completions.create(
        model=SERVED_NAME, messages=MESSAGES, max_tokens=5, temperature=0, logprobs=True, top_logprobs=2
    )
    content = out.choices[0].logprobs.content
    assert len(content) == out.usage.completion_tokens
    assert "".join(t.token for t in content) == out.choices[0].message.content
    assert all(len(t.top_logprobs) == 2 and t.top_logprobs[0].logprob == t.logprob for t in content)


def test_echo_logprobs_shape(client, live_server):
    ids = httpx.post(
        f"{live_server.url}/tokenize", json={"prompt": PROMPT}, headers=live_server.headers
    ).json()["tokens"]
    out = client.completions.create(
        model=SERVED_NAME, prompt=[ids, ids[:3]], echo=True, logprobs=1, max_tokens=1
    )
    for choice in out.choices:
        lp = choice.logprobs
        n = (len(ids) if choice.index == 0 else 3) + 1
        assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == n
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        assert all(
            top[tok] == lp_
            for tok, lp_, top in zip(lp.tokens[1:], lp.token_logprobs[1:], lp.top_logprobs[1:], strict=True)
        )


def test_errors_become_typed_exceptions(client, live_server):
    with pytest.raises(openai.BadRequestError) as bad:
        client.completions.create(model=SERVED_NAME, prompt=PROMPT, temperature=-1)
    assert bad.value.param == "temperature"
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(
            model=SERVED_NAME, messages=MESSAGES, tools=[{"type": "function", "function": {"name": "f"}}]
        )
    assert bad.value.param == "tools"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4o", prompt=PROMPT)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{live_server.url}/v1", api_key="wrong", max_retries=0).models.list()


def test_32_concurrent_streams_batch_together(live_server):
    """32 streams at once all complete, and the engine ran steps with more than one sequence meanwhile."""
    metrics_url = f"{live_server.url}/metrics"
    before = steps_with_batch_over_one(httpx.get(metrics_url).text)

    async def one(client: openai.AsyncOpenAI, i: int) -> tuple[str, str | None, int]:
        stream = await client.chat.completions.create(
            model=SERVED_NAME,
            messages=[{"role": "user", "content": f"Story number {i}."}],
            max_tokens=24,
            temperature=0.8,
            seed=i,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
        text, finish, usage = "", None, 0
        async for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
                finish = chunk.choices[0].finish_reason or finish
            if chunk.usage:
                usage = chunk.usage.completion_tokens
        return text, finish, usage

    async def run() -> list[tuple[str, str | None, int]]:
        async with openai.AsyncOpenAI(
            base_url=f"{live_server.url}/v1", api_key=API_KEY, max_retries=0, timeout=60
        ) as client:
            return await asyncio.gather(*(one(client, i) for i in range(32)))

    results = asyncio.run(run())
    assert len(results) == 32
    assert all(finish == "length" and usage == 24 and text for text, finish, usage in results)
    after = steps_with_batch_over_one(httpx.get(metrics_url).text)
    assert after > before, "no engine step ran more than one sequence during 32 concurrent streams"
