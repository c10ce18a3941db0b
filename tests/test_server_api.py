"""The HTTP API of a live `shoal serve` (stories260K): routes, shapes, every documented error, metrics.

Bad inputs must get their documented status and an OpenAI error body, and the server must keep serving
after each of them.
"""

from __future__ import annotations

import json
import time

import httpx
import pytest

try:
    from server_fixture import (
        API_KEY,
        MAX_REQUEST_BYTES,
        SERVED_NAME,
        TINY_MODEL,
        live_server,  # noqa: F401 - fixture
        metric_samples,
    )
except ImportError:  # tests/ became a package
    from tests.server_fixture import (  # type: ignore[no-redef]
        API_KEY,
        MAX_REQUEST_BYTES,
        SERVED_NAME,
        TINY_MODEL,
        live_server,  # noqa: F401
        metric_samples,
    )

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def http(live_server):
    with live_server.client() as client:
        yield client


def assert_error(
    response: httpx.Response, status: int, param: str | None = "<any>", contains: str = ""
) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"]
    assert error["type"] in ("invalid_request_error", "server_error")
    if param != "<any>":
        assert error["param"] == param, error
    assert contains.lower() in error["message"].lower(), error
    return error


def complete(http: httpx.Client, **body) -> dict:
    body.setdefault("model", SERVED_NAME)
    body.setdefault("temperature", 0)
    r = http.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def tokenize(http: httpx.Client, text: str) -> list[int]:
    r = http.post("/tokenize", json={"prompt": text})
    assert r.status_code == 200, r.text
    return r.json()["tokens"]


# ---- info routes -------------------------------------------------------------------------------------


def test_models_health_ready_version(http):
    models = http.get("/v1/models").json()
    assert models["object"] == "list"
    assert [m["id"] for m in models["data"]] == [SERVED_NAME]
    assert models["data"][0]["max_model_len"] == 512
    assert http.get(f"/v1/models/{SERVED_NAME}").json()["id"] == SERVED_NAME
    assert_error(http.get("/v1/models/nope"), 404, "model")
    assert http.get("/health").status_code == 200
    assert http.get("/ready").status_code == 200
    assert http.get("/version").json()["version"]


def test_openapi_documents_400_not_422(http):
    spec = http.get("/openapi.json").json()
    for path in ("/v1/completions", "/v1/chat/completions"):
        responses = spec["paths"][path]["post"]["responses"]
        assert "422" not in responses
        assert responses["400"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorResponse")
    assert "HTTPValidationError" not in spec["components"]["schemas"]


def test_tokenize_detokenize(http):
    r = http.post(
        "/tokenize", json={"model": SERVED_NAME, "prompt": "Once upon a time", "return_token_strs": True}
    )
    body = r.json()
    assert body["count"] == len(body["tokens"]) == len(body["token_strs"]) and body["max_model_len"] == 512
    assert body["tokens"][0] == 1  # BOS
    assert http.post("/detokenize", json={"tokens": body["tokens"][1:]}).json() == {
        "prompt": "Once upon a time"
    }
    chat = http.post("/tokenize", json={"messages": [{"role": "user", "content": "hi"}]}).json()
    text = http.post("/detokenize", json={"tokens": chat["tokens"]}).json()["prompt"]
    assert text.strip() == "user: hi\nassistant:"
    assert_error(http.post("/tokenize", json={"model": "nope", "prompt": "x"}), 404, "model")
    assert_error(http.post("/detokenize", json={"tokens": [10**6]}), 400, "tokens")
    assert_error(http.post("/tokenize", json={}), 400)
    both = {"prompt": "x", "messages": [{"role": "user", "content": "x"}]}
    assert_error(http.post("/tokenize", json=both), 400, "prompt")


# ---- completions ---------------------------------------------------------------------------------------


def test_completion_greedy_and_usage(http):
    prompt = "Once upon a time"
    a = complete(http, prompt=prompt, max_tokens=12)
    b = complete(http, prompt=prompt, max_tokens=12)
    assert a["object"] == "text_completion" and a["model"] == SERVED_NAME and a["id"].startswith("cmpl-")
    choice = a["choices"][0]
    assert choice["text"] and choice["text"] == b["choices"][0]["text"]
    assert choice["finish_reason"] in ("length", "stop") and choice["index"] == 0
    n_prompt = len(tokenize(http, prompt))
    usage = a["usage"]
    assert usage["prompt_tokens"] == n_prompt
    assert usage["completion_tokens"] <= 12 and usage["total_tokens"] == n_prompt + usage["completion_tokens"]
    if choice["finish_reason"] == "length":
        assert usage["completion_tokens"] == 12


def test_completion_default_max_tokens_is_16(http):
    out = complete(http, prompt="Once", ignore_eos=True)
    assert out["usage"]["completion_tokens"] == 16


def test_completion_batch_of_prompts_times_n(http):
    out = complete(
        http, prompt=["Once upon", "The cat"], n=2, max_tokens=5, temperature=1.0, seed=3, ignore_eos=True
    )
    assert sorted(c["index"] for c in out["choices"]) == [0, 1, 2, 3]
    prompt_tokens = len(tokenize(http, "Once upon")) + len(tokenize(http, "The cat"))
    assert out["usage"] == {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": 20,
        "total_tokens": prompt_tokens + 20,
    }


def test_completion_token_id_prompts_and_stop(http):
    ids = tokenize(http, "Once upon a time")
    by_ids = complete(http, prompt=ids, max_tokens=8)
    by_text = complete(http, prompt="Once upon a time", max_tokens=8)
    assert by_ids["choices"][0]["text"] == by_text["choices"][0]["text"]
    text = by_text["choices"][0]["text"]
    stop = text.strip().split()[1]  # a word the greedy continuation produces
    stopped = complete(http, prompt=ids, max_tokens=8, stop=[stop])["choices"][0]
    assert stopped["finish_reason"] == "stop" and stopped["stop_reason"] == stop
    assert stop not in stopped["text"] and text.startswith(stopped["text"])


def test_echo_logprobs_like_lm_eval(http):
    """lm-evaluation-harness local-completions: token-id batches, echo, logprobs 1, max_tokens 1."""
    prompts = [tokenize(http, "Once upon a time"), tokenize(http, "The little dog")]
    out = complete(http, prompt=prompts, echo=True, logprobs=1, max_tokens=1)
    assert len(out["choices"]) == 2
    for choice, ids in zip(sorted(out["choices"], key=lambda c: c["index"]), prompts, strict=True):
        lp = choice["logprobs"]
        n = len(ids) + 1  # the prompt, then the generated token
        assert (
            len(lp["tokens"])
            == len(lp["token_logprobs"])
            == len(lp["top_logprobs"])
            == len(lp["text_offset"])
            == n
        )
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        for token, logprob, top in zip(
            lp["tokens"][1:], lp["token_logprobs"][1:], lp["top_logprobs"][1:], strict=True
        ):
            assert logprob <= 0 and token in top and top[token] == logprob and 1 <= len(top) <= 2
        assert lp["text_offset"] == sorted(lp["text_offset"])
        # greedy generated token: its logprob is the best of its top_logprobs
        assert lp["token_logprobs"][-1] == max(lp["top_logprobs"][-1].values())
    assert out["usage"]["completion_tokens"] == 2


def test_lm_eval_loglikelihoods_match_transformers(http):
    """The exact request shape of lm-evaluation-harness scoring gives transformers' log-softmax values."""
    import torch
    from transformers import AutoModelForCausalLM

    texts = ["Once upon a time there was a cat", "Lily and Ben went to the park to play", "The sun"]
    prompts = [tokenize(http, t) for t in texts]
    out = complete(http, prompt=prompts, echo=True, logprobs=1, max_tokens=1, temperature=0)
    ref = AutoModelForCausalLM.from_pretrained(TINY_MODEL, dtype=torch.float32)
    worst = 0.0
    for choice in out["choices"]:
        ids = prompts[choice["index"]]
        with torch.no_grad():
            logp = torch.log_softmax(ref(torch.tensor([ids])).logits[0].float(), -1)
        expected = logp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
        got = torch.tensor(choice["logprobs"]["token_logprobs"][1:-1])  # lm-eval drops the generated last
        worst = max(worst, (got - expected).abs().max().item())
    assert worst < 1e-4, f"max |loglikelihood - transformers| = {worst:.2e}"
    print(f"lm-eval loglikelihoods: max abs diff vs transformers {worst:.2e}")


def test_echo_max_tokens_zero_returns_prompt_only(http):
    out = complete(http, prompt="Once upon a time", echo=True, logprobs=2, max_tokens=0)
    choice = out["choices"][0]
    n_prompt = len(tokenize(http, "Once upon a time"))
    assert choice["text"] == "Once upon a time"
    assert len(choice["logprobs"]["tokens"]) == n_prompt
    assert out["usage"] == {"prompt_tokens": n_prompt, "completion_tokens": 0, "total_tokens": n_prompt}
    # without echo, 0 is refused
    assert_error(http.post("/v1/completions", json={"prompt": "x", "max_tokens": 0}), 400, "max_tokens")


def test_completion_stream_matches_non_stream(http):
    body = {"model": SERVED_NAME, "prompt": "Once upon a time", "max_tokens": 10, "temperature": 0}
    expected = complete(http, **body)
    with http.stream(
        "POST", "/v1/completions", json={**body, "stream": True, "stream_options": {"include_usage": True}}
    ) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line[len("data: ") :] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    text = "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
    assert text == expected["choices"][0]["text"]
    assert chunks[-2]["choices"][0]["finish_reason"] == expected["choices"][0]["finish_reason"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == expected["usage"]
    assert all(c["usage"] is None for c in chunks[:-1])


def test_stream_batch_of_prompts_times_n(http):
    body = {"prompt": ["Once upon", "The cat"], "n": 2, "max_tokens": 6, "temperature": 0, "ignore_eos": True}
    expected = {c["index"]: c["text"] for c in complete(http, **body)["choices"]}
    with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    texts: dict[int, str] = {}
    finished = []
    for chunk in chunks:
        (choice,) = chunk["choices"]
        texts[choice["index"]] = texts.get(choice["index"], "") + choice["text"]
        if choice["finish_reason"]:
            finished.append(choice["index"])
    assert texts == expected and sorted(finished) == [0, 1, 2, 3]


def test_stream_echo_logprobs(http):
    body = {
        "prompt": "Once upon",
        "max_tokens": 3,
        "temperature": 0,
        "echo": True,
        "logprobs": 1,
        "stream": True,
    }
    with http.stream("POST", "/v1/completions", json=body) as r:
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    tokens = [t for c in chunks for t in c["choices"][0]["logprobs"]["tokens"]]
    assert chunks[0]["choices"][0]["text"].startswith("Once upon")
    assert len(tokens) == len(tokenize(http, "Once upon")) + 3


def test_prompt_logprobs_extra(http):
    ids = tokenize(http, "Once upon a time")
    out = complete(http, prompt=ids, max_tokens=1, prompt_logprobs=0)
    plp = out["choices"][0]["prompt_logprobs"]
    assert len(plp) == len(ids) and plp[0] is None
    assert all(str(t) in entry for t, entry in zip(ids[1:], plp[1:], strict=True))


# ---- chat ----------------------------------------------------------------------------------------------


def test_chat_completion_and_stream(http):
    messages = [
        {"role": "developer", "content": "Tell a story."},
        {
            "role": "user",
            "content": [{"type": "text", "text": "Once upon"}, {"type": "text", "text": "a time"}],
        },
    ]
    body = {"model": SERVED_NAME, "messages": messages, "max_completion_tokens": 10, "temperature": 0}
    r = http.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["object"] == "chat.completion" and out["id"].startswith("chatcmpl-")
    message = out["choices"][0]["message"]
    assert message["role"] == "assistant" and message["content"]
    prompt = http.post("/tokenize", json={"messages": messages}).json()["count"]
    usage = out["usage"]
    assert usage["prompt_tokens"] == prompt and usage["total_tokens"] == prompt + usage["completion_tokens"]
    with http.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as s:
        chunks = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: {")]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == message["content"]
    assert chunks[-1]["choices"][0]["finish_reason"] == out["choices"][0]["finish_reason"]
    assert chunks[-1]["choices"][0]["delta"] == {}


def test_chat_default_max_tokens_is_rest_of_context(http):
    body = {"model": SERVED_NAME, "messages": [{"role": "user", "content": "hi"}], "ignore_eos": True}
    out = http.post("/v1/chat/completions", json=body).json()
    assert out["usage"]["total_tokens"] == 512 and out["choices"][0]["finish_reason"] == "length"


def test_chat_logprobs(http):
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "temperature": 0, "logprobs": True,
            "top_logprobs": 3, "n": 2}  # fmt: skip
    out = http.post("/v1/chat/completions", json=body).json()
    assert len(out["choices"]) == 2
    content = out["choices"][0]["logprobs"]["content"]
    assert len(content) == out["usage"]["completion_tokens"] // 2
    for entry in content:
        assert len(entry["top_logprobs"]) == 3 and entry["logprob"] == entry["top_logprobs"][0]["logprob"]
        assert entry["bytes"] == list(entry["token"].encode())


# ---- errors --------------------------------------------------------------------------------------------

LONG = [5] * 600
BAD_COMPLETIONS = [
    ({"prompt": "x", "max_tokens": -1}, 400, "max_tokens"),
    ({"prompt": "x", "max_tokens": 1.5}, 400, "max_tokens"),
    ({"prompt": "x", "temperature": -0.5}, 400, "temperature"),
    ({"prompt": "x", "top_p": 0}, 400, "top_p"),
    ({"prompt": "x", "top_p": 1.5}, 400, "top_p"),
    ({"prompt": "x", "n": 0}, 400, "n"),
    ({"prompt": "x", "top_k": -5}, 400, "top_k"),
    ({"prompt": "x", "presence_penalty": 3}, 400, "presence_penalty"),
    ({"prompt": "x", "logprobs": 21}, 400, "logprobs"),
    ({"prompt": "x", "min_tokens": 5, "max_tokens": 2}, 400, "min_tokens"),
    ({"prompt": "x", "logit_bias": {"abc": 1}}, 400, "logit_bias"),
    ({"prompt": "x", "logit_bias": {"5": "high"}}, 400, "logit_bias"),
    ({"prompt": "x", "logit_bias": {"5": 500}}, 400, "logit_bias"),
    ({"prompt": "x", "logit_bias": {"99999": 1}}, 400, "logit_bias"),
    ({"prompt": "x", "stop_token_ids": [99999]}, 400, "stop_token_ids"),
    ({"prompt": "x", "stop": ["a"] * 65}, 400, "stop"),
    ({"prompt": "x", "stop": 5}, 400, "stop"),
    ({"prompt": "x", "suffix": "end"}, 400, "suffix"),
    ({"prompt": "x", "best_of": 3}, 400, "best_of"),
    ({"prompt": "x", "tools": [{"type": "function"}]}, 400, "tools"),
    ({"prompt": "x", "frobnicate": 1}, 400, "frobnicate"),
    ({"prompt": "x", "stream_options": {"include_usage": True}}, 400, "stream_options"),
    ({"prompt": "x", "stream": True, "stream_options": {"bogus": True}}, 400, "stream_options.bogus"),
    ({"max_tokens": 3}, 400, "prompt"),
    ({"prompt": []}, 400, "prompt"),
    ({"prompt": [1, "a"]}, 400, "prompt"),
    ({"prompt": {"text": "x"}}, 400, "prompt"),
    ({"prompt": [[1, 2], []]}, 400, "prompt"),
    ({"prompt": [1, 99999]}, 400, "prompt"),
    ({"prompt": "x", "model": "gpt-4"}, 404, "model"),
]


@pytest.mark.parametrize(
    ("body", "status", "param"), BAD_COMPLETIONS, ids=[str(b[0])[:60] for b in BAD_COMPLETIONS]
)
def test_bad_completion_requests(http, body, status, param):
    assert_error(http.post("/v1/completions", json=body), status, param)
    if "stream_options" not in body:
        assert_error(http.post("/v1/completions", json={**body, "stream": True}), status)


def test_context_length_errors_name_both_lengths(http):
    error = assert_error(http.post("/v1/completions", json={"prompt": LONG, "max_tokens": 1}), 400, "prompt")
    assert "512" in error["message"] and "600" in error["message"]
    error = assert_error(
        http.post("/v1/completions", json={"prompt": [1] * 500, "max_tokens": 20}), 400, "max_tokens"
    )
    assert "512" in error["message"] and "500" in error["message"] and "20" in error["message"]
    assert error["code"] == "context_length_exceeded"


BAD_CHATS = [
    ({"messages": []}, 400, "messages"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, 400, "messages.0.role"),
    ({"messages": [{"role": "tool", "content": "x"}]}, 400, "messages.0.role"),
    ({"messages": [{"role": "user"}]}, 400, "messages.0.content"),
    (
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
        400,
        "messages.0.content",
    ),  # fmt: skip
    ({"messages": "hello"}, 400, "messages"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tools"),
    ({"tool_choice": "auto"}, 400, "tool_choice"),
    ({"functions": [{"name": "f"}]}, 400, "functions"),
    ({"response_format": {"type": "json_object"}}, 400, "response_format"),
    ({"reasoning_effort": "high"}, 400, "reasoning_effort"),
    ({"store": True}, 400, "store"),
    ({"top_logprobs": 3}, 400, "top_logprobs"),
    ({"logprobs": True, "top_logprobs": 30}, 400, "top_logprobs"),
    ({"max_completion_tokens": 0}, 400, "max_completion_tokens"),
    ({"max_tokens": 600}, 400, "max_tokens"),
    ({"echo": True}, 400, "echo"),
    ({"model": "other"}, 404, "model"),
]


@pytest.mark.parametrize(("extra", "status", "param"), BAD_CHATS, ids=[str(b[0])[:60] for b in BAD_CHATS])
def test_bad_chat_requests(http, extra, status, param):
    body = {"messages": [{"role": "user", "content": "hi"}], **extra}
    assert_error(http.post("/v1/chat/completions", json=body), status, param)


def test_harmless_openai_fields_are_accepted(http):
    body = {
        "messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "hi", "name": "bob"}],
        "max_tokens": 2,
        "user": "u1",
        "metadata": {"k": "v"},
        "store": False,
        "parallel_tool_calls": None,
        "tools": [],
        "tool_choice": "none",
        "response_format": {"type": "text"},
        "service_tier": "auto",
        "stream": False,
    }
    r = http.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text


def test_malformed_bodies(http):
    post = http.post
    headers = {"content-type": "application/json"}
    assert_error(post("/v1/completions", content=b'{"prompt": "x",', headers=headers), 400, None, "json")
    assert_error(post("/v1/completions", content=b"[1, 2]", headers=headers), 400, None, "object")
    assert_error(post("/v1/completions", content=b"", headers=headers), 400, None)
    assert_error(post("/v1/completions", content=b"\xff\xfe", headers=headers), 400, None)
    assert_error(
        post("/v1/completions", content=b"prompt=x", headers={"content-type": "text/plain"}), 400, None
    )
    assert_error(http.get("/v1/nothing-here"), 404)
    assert_error(http.get("/v1/completions"), 405)


def test_api_key(live_server):
    url = f"{live_server.url}/v1/models"
    assert_error(httpx.get(url), 401, None, "api key")
    assert_error(httpx.get(url, headers={"Authorization": "Bearer wrong"}), 401)
    assert_error(httpx.post(f"{live_server.url}/v1/completions", json={"prompt": "x"}), 401)
    assert httpx.get(url, headers={"Authorization": f"Bearer {API_KEY}"}).status_code == 200
    assert httpx.get(f"{live_server.url}/health").status_code == 200  # a probe: open
    for path in ("/docs", "/openapi.json"):  # everything else follows the /v1 rule
        assert_error(httpx.get(f"{live_server.url}{path}"), 401)
    assert_error(httpx.post(f"{live_server.url}/tokenize", json={"prompt": "x"}), 401)


def test_body_over_limit_is_413(http):
    big = "word " * (MAX_REQUEST_BYTES // 4)
    r = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": big}]})
    assert_error(r, 413, None, "too large")
    small = http.post(
        "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    )
    assert small.status_code == 200


def test_server_still_serves_after_bad_inputs(http):
    assert http.get("/health").status_code == 200
    assert complete(http, prompt="Once", max_tokens=2)["usage"]["completion_tokens"] >= 1


# ---- disconnect, metrics ------------------------------------------------------------------------------


def _metrics(http: httpx.Client) -> str:
    r = http.get("/metrics")
    assert r.status_code == 200
    return r.text


def test_client_disconnect_aborts_the_stream(http):
    aborted = 'finished_reason="abort"'

    def aborts() -> float:
        samples = metric_samples(_metrics(http), "vllm:request_success_total")
        return sum(v for k, v in samples.items() if aborted in k)

    before = aborts()
    body = {"prompt": "Once", "max_tokens": 500, "ignore_eos": True, "n": 4, "stream": True}
    with http.stream("POST", "/v1/completions", json=body) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                break  # hang up after the first chunk
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and aborts() < before + 4:
        time.sleep(0.05)
    assert aborts() == before + 4
    # The engine refreshes its stats at each step: run one so that the aborted sequences are gone from them.
    assert complete(http, prompt="Once", max_tokens=2)["choices"][0]["text"]
    running = metric_samples(_metrics(http), "vllm:num_requests_running")
    assert sum(running.values()) == 0


def test_metrics_names(http):
    complete(http, prompt="Once upon a time", max_tokens=3)
    text = _metrics(http)
    for name in (
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:gpu_cache_usage_perc",
        "vllm:prompt_tokens_total",
        "vllm:generation_tokens_total",
        "vllm:prefix_cache_queries_total",
        "vllm:prefix_cache_hits_total",
        "vllm:num_preemptions_total",
        "vllm:time_to_first_token_seconds_bucket",
        "vllm:e2e_request_latency_seconds_bucket",
        "vllm:request_success_total",
        "shoal:batch_size_bucket",
    ):
        assert metric_samples(text, name), name
    assert sum(metric_samples(text, "vllm:prompt_tokens_total").values()) > 0
    assert sum(metric_samples(text, "vllm:generation_tokens_total").values()) >= 3
    labels = metric_samples(text, "vllm:request_success_total")
    assert any('finished_reason="length"' in k for k in labels)
    assert all(f'model_name="{SERVED_NAME}"' in k for k in metric_samples(text, "vllm:num_requests_running"))


# ---- in process: the real engine where it can show the behaviour, a stand-in only to inject failures -----


@pytest.fixture(scope="module")
def real_engine():
    """The real AsyncEngine over stories260K (no chat template), started once for this module."""
    import asyncio

    from shoal.engine.async_engine import AsyncEngine
    from shoal.engine.config import EngineConfig

    engine = AsyncEngine.from_config(
        EngineConfig(model=str(TINY_MODEL), dtype="float32", kv_cache_memory=16 << 20)
    )
    asyncio.run(engine.start())
    return engine


class _StubEngine:
    """The AsyncEngine surface over the real stories260K tokenizer (no chat template); generate yields one
    snapshot then fails, or fails at once, or finishes."""

    def __init__(self, mode: str):
        from types import SimpleNamespace

        from shoal.engine.stats import EngineStats
        from shoal.model.tokenizer import Tokenizer

        self.tokenizer = Tokenizer(TINY_MODEL)
        self.config = SimpleNamespace(max_model_len=512)
        self.generation_config: dict = {}
        self.model_name = "stub"
        self.ready = True
        self.stats = EngineStats()
        self.mode = mode

    async def start(self) -> None: ...

    async def shutdown(self) -> None: ...

    def add_step_listener(self, fn) -> None: ...

    def abort(self, request_id: str) -> None: ...

    async def generate(
        self, request_id, prompt_token_ids, params, arrival_time=None, priority=0, cache_salt=None
    ):
        from shoal.engine.outputs import CompletionOutput, RequestOutput

        if self.mode == "fail_at_once":
            raise RuntimeError("CUDA error: device-side assert")
        finished = self.mode == "ok"
        yield RequestOutput(
            request_id, prompt_token_ids, [CompletionOutput(0, "a", [5], None, "length")], finished=finished
        )
        if not finished:
            raise RuntimeError("CUDA error: device-side assert")


def _in_process(engine, requests: list[tuple[str, str, dict]]) -> list[httpx.Response]:
    import asyncio

    from shoal.server.app import build_app
    from shoal.server.settings import ServerSettings

    app = build_app(engine, ServerSettings(served_model_name=engine.model_name))

    async def run():
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return [await client.request(method, path, json=body) for method, path, body in requests]

    return asyncio.run(run())


@pytest.mark.parametrize("mode", ["fail_at_once", "fail_after_first"])
def test_engine_failure_is_500_or_error_event(mode):
    body = {"prompt": "Once", "max_tokens": 3}
    plain, streamed = _in_process(
        _StubEngine(mode),
        [("POST", "/v1/completions", body), ("POST", "/v1/completions", {**body, "stream": True})],
    )
    error = assert_error(plain, 500, None, "engine failure")
    assert error["type"] == "server_error"
    if mode == "fail_at_once":
        assert_error(streamed, 500)
    else:
        events = [line[6:] for line in streamed.text.splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        assert json.loads(events[-2])["error"]["type"] == "server_error"


def test_chunked_body_over_limit_is_413(real_engine):
    """No Content-Length (chunked upload): the limit is enforced while the body is read."""
    import asyncio

    from shoal.server.app import build_app
    from shoal.server.settings import ServerSettings

    settings = ServerSettings(served_model_name=real_engine.model_name, max_request_bytes=1000)
    app = build_app(real_engine, settings)

    async def chunks(total: int):
        yield b'{"prompt": "'
        for _ in range(total // 100):
            yield b"x" * 100
        yield b'", "max_tokens": 1}'

    async def run():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            headers = {"content-type": "application/json"}
            big = await client.post("/v1/completions", content=chunks(5000), headers=headers)
            small = await client.post("/v1/completions", content=chunks(500), headers=headers)
            return big, small

    big, small = asyncio.run(run())
    assert "content-length" not in big.request.headers
    assert_error(big, 413, None, "too large")
    assert small.status_code == 200, small.text


def test_chat_without_template_is_400(real_engine):
    chat = {"messages": [{"role": "user", "content": "hi"}]}
    (r,) = _in_process(real_engine, [("POST", "/v1/chat/completions", chat)])
    error = assert_error(r, 400, "messages", contains="chat template")
    assert "--chat-template" in error["message"]


def test_cli_help():
    from typer.testing import CliRunner

    from shoal.cli import app

    result = CliRunner().invoke(app, ["serve", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    for option in ("--model", "--served-model-name", "--api-key", "--chat-template", "--max-request-bytes",
                   "--no-prefix-caching", "--kv-cache-memory", "--gpu-memory-utilization"):  # fmt: skip
        assert option in result.output
