"""Logs (issue 19, acceptance 7): the shared `shoal serve` subprocess runs with --log-format json.

Every line it writes parses as JSON; each request has one access line carrying its X-Request-Id (the
client's, or a generated one that the response header also carries), its status, model, token counts
and times, and no prompt text unless --log-prompts is set (checked in process, with build_app).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid

import httpx
import pytest

try:
    from server_fixture import access_lines, live_server  # noqa: F401 - fixture
except ImportError:  # tests/ became a package
    from tests.server_fixture import access_lines, live_server  # type: ignore[no-redef] # noqa: F401

# Words stories260K's tiny vocabulary splits into pieces, so the text can only reach the log whole if
# the prompt itself is logged.
PROMPT = "Marmaduke quizzically juxtaposed"


def _access_line(server, request_id: str, timeout_s: float = 10.0) -> dict:
    """The access line of one request; it is written just after the response is sent, so wait for it."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = [line for line in access_lines(server) if line["request_id"] == request_id]
        if found:
            assert len(found) == 1, found
            return found[0]
        time.sleep(0.05)
    raise AssertionError(f"no access line for {request_id}:\n{server.log_tail()}")


@pytest.mark.timeout(60)
def test_json_access_line_carries_propagated_request_id_and_no_prompt(live_server):
    request_id = f"client-{uuid.uuid4().hex[:8]}"
    body = {"model": live_server.model, "prompt": PROMPT, "max_tokens": 5, "temperature": 0}
    with live_server.client() as http:
        r = http.post("/v1/completions", json=body, headers={"X-Request-Id": request_id})

    assert r.status_code == 200, r.text
    assert r.headers["x-request-id"] == request_id
    line = _access_line(live_server, request_id)
    usage = r.json()["usage"]
    assert line["method"] == "POST" and line["path"] == "/v1/completions" and line["status"] == 200
    assert line["model"] == live_server.model and line["level"] == "INFO"
    assert line["prompt_tokens"] == usage["prompt_tokens"]
    assert line["completion_tokens"] == usage["completion_tokens"] == 5
    assert line["finish_reasons"] == ["length"] and line["streamed"] is False
    assert 0 < line["queue_s"] < line["ttft_s"] <= line["latency_s"] < 30
    log = live_server.log_path.read_text()
    assert PROMPT not in log and "Marmaduke" not in log
    for text in log.splitlines():  # every line the process wrote (shoal, uvicorn, engine core) is JSON
        if text.strip():
            json.loads(text)


@pytest.mark.timeout(60)
def test_generated_request_id_is_returned_and_logged_for_streams_and_errors(live_server):
    body = {"model": live_server.model, "prompt": "Once", "max_tokens": 3, "stream": True}
    with live_server.client() as http:
        with http.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200
            streamed_id = r.headers["x-request-id"]
            r.read()
        bad = http.post("/v1/completions", json={"prompt": "x", "max_tokens": -1})
        invalid = http.post("/v1/completions", json={"prompt": "x"}, headers={"X-Request-Id": "bad id!"})

    assert len(streamed_id) == 32 and int(streamed_id, 16) >= 0  # a generated uuid4 hex
    streamed = _access_line(live_server, streamed_id)
    assert streamed["streamed"] is True and streamed["completion_tokens"] == 3
    assert streamed["finish_reasons"] == ["length"]
    failed = _access_line(live_server, bad.headers["x-request-id"])
    assert bad.status_code == failed["status"] == 400
    # An unprintable client id is not echoed into logs and headers: a new one replaces it.
    assert invalid.headers["x-request-id"] != "bad id!"
    assert _access_line(live_server, invalid.headers["x-request-id"])["status"] == 200


@pytest.mark.timeout(60)
def test_log_prompts_puts_prompt_text_in_access_line(stories_dir, caplog):
    """--log-prompts (settings.log_prompts), in process: the access line then holds the prompt."""
    from shoal.engine.async_engine import AsyncEngine
    from shoal.engine.config import EngineConfig
    from shoal.server.app import build_app
    from shoal.server.settings import ServerSettings

    engine = AsyncEngine.from_config(
        EngineConfig(model=str(stories_dir), dtype="float32", device="cpu", kv_cache_memory=4 << 20)
    )
    app = build_app(engine, ServerSettings(served_model_name="stories", log_prompts=True))

    async def run() -> httpx.Response:
        await engine.start()
        try:
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t", timeout=60) as client:
                return await client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 2})
        finally:
            await engine.shutdown()

    with caplog.at_level(logging.INFO, logger="shoal.access"):
        r = asyncio.run(run())
    assert r.status_code == 200, r.text
    (record,) = [rec for rec in caplog.records if rec.name == "shoal.access"]
    assert record.fields["request_id"] == r.headers["x-request-id"]
    (prompt,) = record.fields["prompts"]
    assert PROMPT in prompt


@pytest.mark.timeout(10)
def test_text_format_appends_fields_and_json_format_makes_them_keys():
    from shoal.logging_config import JsonFormatter, TextFormatter

    record = logging.LogRecord("shoal.access", logging.INFO, __file__, 1, "GET %s %d", ("/health", 200), None)
    record.fields = {"request_id": "r-1", "ttft_s": None, "finish_reasons": ["stop"]}

    text = TextFormatter().format(record)
    assert text.endswith('shoal.access: GET /health 200 request_id="r-1" ttft_s=None finish_reasons=["stop"]')
    line = json.loads(JsonFormatter().format(record))
    assert line["message"] == "GET /health 200" and line["request_id"] == "r-1"
    assert line["finish_reasons"] == ["stop"] and line["logger"] == "shoal.access"


@pytest.mark.timeout(60)
def test_echo_without_generation_logs_no_completion_tokens(live_server):
    """echo with max_tokens 0 runs one hidden step in the engine; the access line, like the usage, says 0."""
    request_id = f"echo-{uuid.uuid4().hex[:8]}"
    body = {"model": live_server.model, "prompt": "Once upon", "max_tokens": 0, "echo": True}
    with live_server.client() as http:
        r = http.post("/v1/completions", json=body, headers={"X-Request-Id": request_id})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 0, r.text
    assert _access_line(live_server, request_id)["completion_tokens"] == 0
