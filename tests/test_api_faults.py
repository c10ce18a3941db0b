"""Five kinds of API fault (issue 16), each on every route and field where it can occur, streamed and not:

1. invalid Unicode (a lone surrogate escape) is a 400 naming the field, and no answer closes a
   keep-alive connection;
2. min_tokens defers every stop condition: stop strings, stop_token_ids and EOS;
3. the token that ends a sequence is not part of its text (unless include_stop_str_in_output);
4. logprob `bytes` are each token's own bytes, and partial-character tokens read `\\xNN`;
5. vLLM's request dialect (stream_options.continuous_usage_stats and friends) is honoured, and the
   fields that would change results are refused by name.

Most run on the shared stories260K server; the cases that need a real chat model (an emoji split over
byte tokens, `<|im_end|>`) run SmolLM2-135M-Instruct in process, in float32.
"""

from __future__ import annotations

import asyncio
import http.client as http_client
import json
import threading
import time
from urllib.parse import urlparse

import httpx
import pytest

from shoal.bench.serve_compare import free_port
from shoal.server.logprobs import render_bytes

try:
    from server_fixture import API_KEY, live_server  # noqa: F401 - fixture
except ImportError:  # tests/ became a package
    from tests.server_fixture import API_KEY, live_server  # type: ignore[no-redef] # noqa: F401

pytestmark = pytest.mark.timeout(60)

EOS = 2  # stories260K's </s>
ROUTES = ("/v1/completions", "/v1/chat/completions")


@pytest.fixture(scope="module")
def http(live_server):
    with live_server.client() as client:
        yield client


def _body(route: str, **extra) -> dict:
    base = (
        {"prompt": "Once upon a time"}
        if route == ROUTES[0]
        else {"messages": [{"role": "user", "content": "hi"}]}
    )
    return {**base, "temperature": 0, **extra}


def _run(http: httpx.Client, route: str, stream: bool = False, **extra) -> tuple[str, dict, list[dict]]:
    """(text, final choice fields, chunks) of one choice, streamed or not."""
    body = _body(route, stream=stream, **extra)
    if not stream:
        r = http.post(route, json=body)
        assert r.status_code == 200, r.text
        out = r.json()
        choice = out["choices"][0]
        text = choice["text"] if route == ROUTES[0] else choice["message"]["content"]
        return text, {**choice, "usage": out["usage"]}, []
    with http.stream("POST", route, json={**body, "stream_options": {"include_usage": True}}) as r:
        assert r.status_code == 200, r.read()
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    text, final = "", {}
    for c in chunks:
        for ch in c["choices"]:
            text += ch["text"] if route == ROUTES[0] else ch["delta"].get("content") or ""
            if ch["finish_reason"]:
                final = dict(ch)
    final["usage"] = chunks[-1]["usage"]
    return text, final, chunks


# ---- 1. invalid Unicode --------------------------------------------------------------------------------

SURROGATE_CASES = [
    ("/v1/completions", '{"prompt": "abc\\ud800def", "max_tokens": 2}', "prompt"),
    ("/v1/completions", '{"prompt": ["ok", "x\\udfff"], "max_tokens": 2}', "prompt.1"),
    ("/v1/completions", '{"prompt": "ok", "stop": "\\ud83d"}', "stop"),
    ("/v1/completions", '{"prompt": "ok", "stop": ["a", "\\ud83dz"]}', "stop.1"),
    ("/v1/completions", '{"prompt": "ok", "model": "\\ud800"}', "model"),
    ("/v1/completions", '{"prompt": "ok", "user": "u\\ud800"}', "user"),
    ("/v1/completions", '{"prompt": "ok", "logit_bias": {"\\ud800": 1}}', "logit_bias.\\ud800"),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "\\ud800"}]}', "messages.0.content"),
    (
        "/v1/chat/completions",
        '{"messages": [{"role": "user", "content": [{"type": "text", "text": "a\\udc00"}]}]}',
        "messages.0.content.0.text",
    ),
    (
        "/v1/chat/completions",
        '{"messages": [{"role": "user", "content": "x", "name": "\\ud800"}]}',
        "messages.0.name",
    ),
    (
        "/v1/chat/completions",
        '{"messages": [{"role": "user", "content": "x"}], "stop": ["\\ud800"]}',
        "stop.0",
    ),
    (
        "/v1/chat/completions",
        '{"messages": [{"role": "user", "content": "x"}], "chat_template_kwargs": {"k": "\\ud800"}}',
        "chat_template_kwargs.k",
    ),
    ("/tokenize", '{"prompt": "abc\\ud800"}', "prompt"),
    ("/tokenize", '{"messages": [{"role": "user", "content": "\\udbff"}]}', "messages.0.content"),
]


def _post_raw(conn: http_client.HTTPConnection, path: str, raw: str) -> tuple[int, dict, str | None]:
    conn.request(
        "POST",
        path,
        body=raw.encode(),
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {API_KEY}"},
    )
    r = conn.getresponse()
    data = r.read()
    return r.status, json.loads(data) if data.startswith(b"{") else {}, r.getheader("connection")


def test_lone_surrogates_are_400_naming_the_field_and_keep_the_connection(live_server):
    url = urlparse(live_server.url)
    conn = http_client.HTTPConnection(url.hostname, url.port, timeout=30)
    conn.connect()
    sock = conn.sock
    for path, raw, param in SURROGATE_CASES:
        for stream in (False, True):
            body = raw if not stream or path == "/tokenize" else raw[:-1] + ', "stream": true}'
            status, out, connection = _post_raw(conn, path, body)
            assert status == 400, (path, body, out)
            assert out["error"]["param"] == param, (path, body, out)
            assert "invalid unicode" in out["error"]["message"].lower()
            assert out["error"]["type"] == "invalid_request_error"
            assert connection != "close"
    # A valid surrogate pair is an emoji: fine. The same connection still serves.
    status, out, _ = _post_raw(conn, "/v1/completions", '{"prompt": "a \\ud83d\\ude00 b", "max_tokens": 2}')
    assert status == 200, out
    assert conn.sock is sock, "the server closed the keep-alive connection"
    conn.close()


def test_unexpected_exception_is_500_and_keeps_the_connection(stories_dir):
    """A bug that raises in a route: a 500 in OpenAI's shape, and the next request on the same
    keep-alive connection is served (uvicorn closes it when an exception escapes the app)."""
    import uvicorn

    from shoal.server.app import build_app
    from shoal.server.settings import ServerSettings

    engine = _TokenizerOnlyEngine(stories_dir)
    app = build_app(engine, ServerSettings(served_model_name="stories"))

    @app.get("/boom")
    async def boom():
        raise RuntimeError("a bug")

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="critical"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 20
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.05)
        conn = http_client.HTTPConnection("127.0.0.1", port, timeout=10)
        for _ in range(2):
            conn.request("GET", "/boom")
            r = conn.getresponse()
            body = json.loads(r.read())
            assert r.status == 500 and body["error"]["type"] == "server_error", body
            assert r.getheader("connection") != "close"
            sock = conn.sock
            conn.request("GET", "/health")
            r = conn.getresponse()
            r.read()
            assert r.status == 200 and conn.sock is sock
    finally:
        server.should_exit = True
        thread.join(10)


class _TokenizerOnlyEngine:
    """The AsyncEngine surface with the real stories260K tokenizer; the /boom route never reaches it."""

    def __init__(self, model_dir):
        from shoal.engine.stats import EngineStats
        from shoal.model.tokenizer import Tokenizer

        self.tokenizer = Tokenizer(model_dir)
        self.config = type("Config", (), {"max_model_len": 512, "model": "stories"})()
        self.generation_config, self.model_name, self.ready, self.stats = {}, "stories", True, EngineStats()

    async def start(self) -> None: ...

    async def shutdown(self) -> None: ...

    def add_step_listener(self, fn) -> None: ...


# ---- 2. min_tokens defers every stop condition ------------------------------------------------------


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("stream", [False, True])
def test_min_tokens_defers_stop_strings(http, route, stream):
    free, _, _ = _run(http, route, stream, max_tokens=8, ignore_eos=True)
    word = free.split()[1]  # a stop string the greedy text holds early
    stopped, choice, _ = _run(http, route, stream, max_tokens=8, stop=[word], ignore_eos=True)
    assert choice["finish_reason"] == "stop" and choice["stop_reason"] == word
    deferred, choice, _ = _run(http, route, stream, max_tokens=8, min_tokens=8, stop=[word], ignore_eos=True)
    assert (deferred, choice["finish_reason"], choice["usage"]["completion_tokens"]) == (free, "length", 8)


def test_min_tokens_stop_string_must_lie_after_the_first_min_tokens(http):
    """A stop string that begins inside the first min_tokens tokens does not count, even if it ends after."""
    ids = http.post("/tokenize", json={"prompt": "Once upon a time"}).json()["tokens"]
    free = http.post("/v1/completions", json={"prompt": ids, "max_tokens": 8, "temperature": 0}).json()
    gen = free["choices"][0]["text"]
    first = http.post("/v1/completions", json={"prompt": ids, "max_tokens": 1, "temperature": 0}).json()
    boundary = len(first["choices"][0]["text"])
    spanning = gen[boundary - 1 : boundary + 2]  # starts in token 1, ends in token 2
    body = {"prompt": ids, "max_tokens": 8, "temperature": 0, "min_tokens": 1, "stop": [spanning]}
    out = http.post("/v1/completions", json=body).json()["choices"][0]
    assert spanning not in gen[:boundary] and gen.count(spanning) == 1
    assert (out["text"], out["finish_reason"]) == (gen, "length")


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("stream", [False, True])
def test_min_tokens_defers_eos_and_stop_token_ids(http, route, stream):
    # EOS pushed up by logit_bias: it comes as soon as min_tokens allows, and ends the sequence there.
    text, choice, _ = _run(http, route, stream, max_tokens=10, min_tokens=3, logit_bias={str(EOS): 100})
    assert choice["finish_reason"] == "stop" and choice["stop_reason"] is None
    assert choice["usage"]["completion_tokens"] == 4
    forced = 300
    text, choice, _ = _run(
        http,
        route,
        stream,
        max_tokens=10,
        min_tokens=5,
        logit_bias={str(forced): 100},
        stop_token_ids=[forced],
    )
    assert (choice["finish_reason"], choice["stop_reason"]) == ("stop", forced)
    assert choice["usage"]["completion_tokens"] == 6


# ---- 3. the terminating token is not text --------------------------------------------------------------


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("stream", [False, True])
def test_terminating_eos_is_not_in_the_text(http, route, stream):
    common = {"max_tokens": 10, "min_tokens": 3, "logit_bias": {str(EOS): 100}}
    shown, a, _ = _run(http, route, stream, skip_special_tokens=False, **common)
    skipped, b, _ = _run(http, route, stream, skip_special_tokens=True, **common)
    assert shown == skipped and "</s>" not in shown and shown
    assert a["usage"]["completion_tokens"] == b["usage"]["completion_tokens"] == 4  # EOS still counts
    kept, _, _ = _run(
        http, route, stream, skip_special_tokens=False, include_stop_str_in_output=True, **common
    )
    assert kept == shown + "</s>"


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("stream", [False, True])
def test_terminating_stop_token_id_is_not_in_the_text(http, route, stream):
    forced = 300  # an ordinary token; its text must be left out when it stops the sequence
    piece = http.post("/detokenize", json={"tokens": [forced]}).json()["prompt"]
    common = {"max_tokens": 10, "min_tokens": 2, "logit_bias": {str(forced): 100}, "stop_token_ids": [forced]}
    text, choice, _ = _run(http, route, stream, **common)
    kept, _, _ = _run(http, route, stream, include_stop_str_in_output=True, **common)
    assert choice["stop_reason"] == forced and kept == text + piece.lstrip() or kept.endswith(piece)
    assert len(kept) > len(text)


@pytest.mark.parametrize("route", ROUTES)
def test_special_tokens_mid_output_stay_unless_skipped(http, route):
    common = {"max_tokens": 3, "ignore_eos": True, "logit_bias": {str(EOS): 100}}
    shown, choice, _ = _run(http, route, skip_special_tokens=False, **common)
    skipped, _, _ = _run(http, route, skip_special_tokens=True, **common)
    assert (shown, skipped, choice["finish_reason"]) == ("</s></s></s>", "", "length")
    bare, _, _ = _run(http, route, skip_special_tokens=False, spaces_between_special_tokens=False, **common)
    assert bare == "</s></s></s>"


# ---- 4. logprob bytes and partial-character tokens ------------------------------------------------------

EMOJI_BYTES = [0xF0, 0x9F, 0x98, 0x80]  # U+1F600; stories260K spells it with four byte-fallback tokens


def test_completion_logprobs_render_partial_tokens(http):
    body = {"prompt": "a😀", "max_tokens": 1, "echo": True, "logprobs": 2, "temperature": 0}
    for stream in (False, True):
        if stream:
            with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
                chunks = [json.loads(x[6:]) for x in r.iter_lines() if x.startswith("data: {")]
            tokens = [t for c in chunks for t in c["choices"][0]["logprobs"]["tokens"]]
            tops = [t for c in chunks for t in c["choices"][0]["logprobs"]["top_logprobs"]]
        else:
            lp = http.post("/v1/completions", json=body).json()["choices"][0]["logprobs"]
            tokens, tops = lp["tokens"], lp["top_logprobs"]
        assert tokens[2:6] == ["\\xf0", "\\x9f", "\\x98", "\\x80"], tokens
        assert all("\ufffd" not in t for t in tokens)
        assert all("\ufffd" not in key for top in tops if top for key in top)
        assert "\\x98" in tops[4]  # the chosen token is among its top_logprobs keys, rendered the same way


@pytest.mark.parametrize("stream", [False, True])
def test_chat_logprob_bytes_are_the_tokens_own(http, stream):
    """Forced byte tokens: each entry's bytes is its byte, its token "\\xNN"; top_logprobs alike."""
    byte_ids = {243: 0xF0, 162: 0x9F}  # <0xF0>, <0x9F>
    body = _body(
        ROUTES[1], max_tokens=4, logprobs=True, top_logprobs=2, logit_bias={str(i): 100 for i in byte_ids}
    )
    if stream:
        with http.stream("POST", ROUTES[1], json={**body, "stream": True}) as r:
            chunks = [json.loads(x[6:]) for x in r.iter_lines() if x.startswith("data: {")]
        content = [
            e for c in chunks for ch in c["choices"] if ch["logprobs"] for e in ch["logprobs"]["content"]
        ]
    else:
        content = http.post(ROUTES[1], json=body).json()["choices"][0]["logprobs"]["content"]
    assert len(content) == 4
    for entry in content:
        assert len(entry["bytes"]) == 1 and entry["bytes"][0] in byte_ids.values(), entry
        assert entry["token"] == f"\\x{entry['bytes'][0]:02x}"
        for top in entry["top_logprobs"]:  # the model's own choices (logprobs are of the raw logits)
            assert top["token"] == render_bytes(bytes(top["bytes"]))


def test_return_tokens_as_token_ids(http):
    body = _body(ROUTES[1], max_tokens=3, logprobs=True, top_logprobs=1, return_tokens_as_token_ids=True)
    content = http.post(ROUTES[1], json=body).json()["choices"][0]["logprobs"]["content"]
    assert all(e["token"].startswith("token_id:") and int(e["token"][9:]) >= 0 for e in content)
    body = _body(ROUTES[0], max_tokens=3, logprobs=1, return_tokens_as_token_ids=True)
    lp = http.post(ROUTES[0], json=body).json()["choices"][0]["logprobs"]
    assert all(t.startswith("token_id:") for t in lp["tokens"])
    assert all(k.startswith("token_id:") for top in lp["top_logprobs"] for k in top)


# ---- 5. vLLM's dialect ---------------------------------------------------------------------------------


@pytest.mark.parametrize("route", ROUTES)
def test_continuous_usage_stats_like_guidellm(http, route):
    """guidellm's request: stream_options with continuous_usage_stats, ignore_eos, stop: null."""
    body = _body(route, max_tokens=5, stream=True, ignore_eos=True, stop=None)
    body["stream_options"] = {"include_usage": True, "continuous_usage_stats": True}
    with http.stream("POST", route, json=body) as r:
        assert r.status_code == 200, r.read()
        chunks = [json.loads(x[6:]) for x in r.iter_lines() if x.startswith("data: {")]
    usages = [c["usage"] for c in chunks]
    assert all(u is not None for u in usages)
    prompt = usages[0]["prompt_tokens"]
    assert all(
        u["prompt_tokens"] == prompt and u["total_tokens"] == prompt + u["completion_tokens"] for u in usages
    )
    done = [u["completion_tokens"] for u in usages]
    assert done == sorted(done) and done[-1] == 5 and chunks[-1]["choices"] == []
    # Without continuous_usage_stats only the last chunk carries usage.
    body["stream_options"] = {"include_usage": True}
    with http.stream("POST", route, json=body) as r:
        chunks = [json.loads(x[6:]) for x in r.iter_lines() if x.startswith("data: {")]
    assert [c["usage"] is not None for c in chunks] == [False] * (len(chunks) - 1) + [True]


def test_chat_template_options(http):
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Once upon"}]
    tok = lambda **kw: http.post("/tokenize", json={"messages": messages, **kw}).json()  # noqa: E731
    detok = lambda ids: http.post("/detokenize", json={"tokens": ids}).json()["prompt"]  # noqa: E731
    assert detok(tok()["tokens"]).endswith("assistant: Once upon\nassistant:")
    assert detok(tok(add_generation_prompt=False)["tokens"]).endswith("assistant: Once upon\n")
    assert detok(tok(continue_final_message=True)["tokens"]).endswith("assistant: Once upon")
    with_bos = tok(add_special_tokens=True)["tokens"]
    assert with_bos[0] == 1 and with_bos[1:] == tok()["tokens"]
    # The same options on the chat route: usage counts the prompt it rendered.
    body = {"messages": messages, "max_tokens": 1, "temperature": 0}
    for options, expected in [
        ({}, tok()),
        ({"continue_final_message": True}, tok(continue_final_message=True)),
    ]:
        out = http.post(ROUTES[1], json={**body, **options}).json()
        assert out["usage"]["prompt_tokens"] == expected["count"], (options, out)


def test_chat_template_kwargs_reach_the_template(live_server, stories_dir, tmp_path):
    """chat_template_kwargs are template variables (the fixture's template ignores them: render here)."""
    from shoal.model.tokenizer import Tokenizer

    tokenizer = Tokenizer(
        stories_dir, chat_template="{{ greeting }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    )
    assert tokenizer.apply_chat_template([{"role": "user", "content": "x"}], greeting="Hey ") == "Hey x"
    with live_server.client() as http:
        out = http.post(
            ROUTES[1],
            json={**_body(ROUTES[1], max_tokens=1), "chat_template_kwargs": {"enable_thinking": False}},
        )
        assert out.status_code == 200, out.text


def test_truncate_prompt_tokens(http):
    ids = http.post("/tokenize", json={"prompt": "Once upon a time there was a dog"}).json()["tokens"]
    for route in ROUTES:
        out = http.post(route, json=_body(route, max_tokens=1, truncate_prompt_tokens=3)).json()
        assert out["usage"]["prompt_tokens"] == 3, out
    full = http.post(ROUTES[0], json={"prompt": ids[-3:], "max_tokens": 4, "temperature": 0}).json()
    cut = http.post(
        ROUTES[0], json={"prompt": ids, "max_tokens": 4, "temperature": 0, "truncate_prompt_tokens": 3}
    )
    assert cut.json()["choices"][0]["text"] == full["choices"][0]["text"]
    big = http.post(ROUTES[0], json={"prompt": ids, "truncate_prompt_tokens": 100000})
    assert big.status_code == 400 and big.json()["error"]["param"] == "truncate_prompt_tokens"


def test_vllm_fields_accepted(http):
    extras = {"priority": 0, "add_special_tokens": True, "spaces_between_special_tokens": False,
              "return_tokens_as_token_ids": False, "stop": None, "ignore_eos": True}  # fmt: skip
    for route in ROUTES:
        r = http.post(route, json=_body(route, max_tokens=2, **extras))
        assert r.status_code == 200, r.text
    r = http.post(
        ROUTES[1], json=_body(ROUTES[1], max_tokens=2, add_generation_prompt=True, tool_choice="none")
    )
    assert r.status_code == 200, r.text


REFUSED = [
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools", ROUTES[1:]),
    ({"tool_choice": "auto"}, "tool_choice", ROUTES[1:]),
    ({"response_format": {"type": "json_object"}}, "response_format", ROUTES),
    ({"guided_json": {"type": "object"}}, "guided_json", ROUTES),
    ({"guided_regex": "a+"}, "guided_regex", ROUTES),
    ({"guided_choice": ["a", "b"]}, "guided_choice", ROUTES),
    ({"guided_grammar": "root ::= 'a'"}, "guided_grammar", ROUTES),
    ({"structured_outputs": {"regex": "a"}}, "structured_outputs", ROUTES),
    ({"logits_processors": ["x"]}, "logits_processors", ROUTES),
    ({"priority": 1}, "priority", ROUTES),
    ({"continue_final_message": True, "add_generation_prompt": True}, "continue_final_message", ROUTES[1:]),
    ({"chat_template_kwargs": {"messages": []}}, "chat_template_kwargs", ROUTES[1:]),
    ({"truncate_prompt_tokens": 0}, "truncate_prompt_tokens", ROUTES),
]


@pytest.mark.parametrize(("extra", "param", "routes"), REFUSED, ids=[r[1] for r in REFUSED])
def test_fields_that_would_change_results_are_refused(http, extra, param, routes):
    for route in routes:
        for stream in (False, True):
            body = _body(route, max_tokens=2, stream=stream, **extra)
            if param == "continue_final_message":
                body["messages"].append({"role": "assistant", "content": "x"})
            r = http.post(route, json=body)
            assert r.status_code == 400, r.text
            assert r.json()["error"]["param"] == param, r.json()


# ---- SmolLM2-135M-Instruct in process: the issue's own inputs ------------------------------------------


@pytest.fixture(scope="module")
def smol_app(smollm2_dir):
    from shoal.engine.async_engine import AsyncEngine
    from shoal.engine.config import EngineConfig
    from shoal.server.app import build_app
    from shoal.server.settings import ServerSettings

    engine = AsyncEngine.from_config(
        EngineConfig(model=str(smollm2_dir), dtype="float32", kv_cache_memory=64 << 20, max_model_len=512)
    )
    app = build_app(engine, ServerSettings(served_model_name="smol"))
    asyncio.run(engine.start())
    yield app
    asyncio.run(engine.shutdown())


def _smol(app, route: str, body: dict) -> dict:
    async def run():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=60) as client:
            return await client.post(route, json=body)

    r = asyncio.run(run())
    assert r.status_code == 200, r.text
    return r.json()


def test_smollm2_min_tokens_example(smol_app):
    body = {"prompt": "Once upon a time, there was a little", "temperature": 0, "max_tokens": 8, "min_tokens": 8,
            "stop": ["girl"]}  # fmt: skip
    out = _smol(smol_app, ROUTES[0], body)
    assert out["usage"]["completion_tokens"] == 8 and out["choices"][0]["finish_reason"] == "length"


def test_smollm2_im_end_not_in_content(smol_app):
    body = {"messages": [{"role": "user", "content": "Say hello."}], "temperature": 0, "max_tokens": 32}
    shown = _smol(smol_app, ROUTES[1], {**body, "skip_special_tokens": False})["choices"][0]
    skipped = _smol(smol_app, ROUTES[1], {**body, "skip_special_tokens": True})["choices"][0]
    assert shown["finish_reason"] == "stop"
    assert shown["message"]["content"] == skipped["message"]["content"]
    assert "<|im_end|>" not in shown["message"]["content"]


def test_smollm2_emoji_logprob_bytes_spell_the_content(smol_app):
    body = {"messages": [{"role": "user", "content": "Repeat exactly: 😀"}], "temperature": 0, "max_tokens": 12,
            "logprobs": True, "top_logprobs": 2}  # fmt: skip
    choice = _smol(smol_app, ROUTES[1], body)["choices"][0]
    content = choice["logprobs"]["content"]
    assert bytes(b for e in content for b in e["bytes"]) == choice["message"]["content"].encode()
    partial = [e for e in content if not _is_utf8(bytes(e["bytes"]))]
    assert partial, "the reply should hold an emoji split over byte tokens"
    for e in [x for entry in content for x in (entry, *entry["top_logprobs"])]:
        assert "\ufffd" not in e["token"]
        if not _is_utf8(bytes(e["bytes"])):
            assert "\\x" in e["token"]


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True
