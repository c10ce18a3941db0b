"""The gateway's stream relay against a scripted OpenAI-compatible upstream (an aiohttp server on
127.0.0.1 in a thread of this process), for what shoal serve cannot be made to do on cue: an event split
across writes, a backend that stops sending without closing, and noticing that the client left. The
gateway itself is the real process (`python -m shoal.gateway`)."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import httpx
import pytest
from aiohttp import web

from shoal.bench.gateway import gateway_server

TIMEOUT_S = 1.0  # the gateway's upstream timeout


def _event(text: str) -> bytes:
    return b"data: " + json.dumps({"choices": [{"index": 0, "text": text}]}).encode() + b"\n\n"


class Upstream:
    """POST /v1/completions streams the events of the script named by the prompt; `gone` is set once a
    client of the endless script has disconnected."""

    def __init__(self):
        self.gone = threading.Event()
        self.loop = asyncio.new_event_loop()
        self.port = 0
        started = threading.Event()
        threading.Thread(target=self._serve, args=(started,), daemon=True).start()
        assert started.wait(10)
        self.url = f"http://127.0.0.1:{self.port}"

    def _serve(self, started: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)
        app = web.Application()
        app.add_routes([web.get("/ready", self._ready), web.get("/v1/models", self._models),
                        web.post("/v1/completions", self._complete)])  # fmt: skip
        # handler_cancellation: a handler ends when its client (the gateway) closes the connection
        runner = self.runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
        self.loop.run_until_complete(runner.setup())
        site = web.TCPSite(runner, "127.0.0.1", 0)
        self.loop.run_until_complete(site.start())
        self.port = site._server.sockets[0].getsockname()[1]
        started.set()
        self.loop.run_forever()

    @staticmethod
    async def _ready(_: web.Request) -> web.Response:
        return web.json_response({"ready": True})

    @staticmethod
    async def _models(_: web.Request) -> web.Response:
        return web.json_response({"data": [{"id": "up"}]})

    async def _complete(self, request: web.Request) -> web.StreamResponse:
        script = (await request.json())["prompt"]
        resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await resp.prepare(request)
        if script == "split":  # each event in two writes, cut mid-JSON, then two events in one write
            for i in range(3):
                event = _event(f"word{i}")
                await resp.write(event[:9])
                await asyncio.sleep(0.05)
                await resp.write(event[9:])
            await resp.write(_event("a") + _event("b") + b"data: [DONE]\n\n")
        elif script == "silent":  # one event, then nothing, the connection left open
            await resp.write(_event("first"))
            await asyncio.sleep(30)
        elif script == "endless":
            try:
                while True:
                    await resp.write(_event("more"))
                    await asyncio.sleep(0.02)
            except (ConnectionError, asyncio.CancelledError):
                self.gone.set()
                raise
        return resp

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    upstream = Upstream()
    config = {"gateway": {"upstream_timeout_s": TIMEOUT_S},
              "models": {"up": {"versions": {"v1": {"backends": [upstream.url]}}}}}  # fmt: skip
    gw = gateway_server(config, tmp_path_factory.mktemp("relay"), "gateway")
    gw.start()
    try:
        gw.wait_ready(30)
        yield upstream, gw
    finally:
        gw.stop()
        upstream.stop()


def _stream(gw, script: str) -> list[bytes]:
    body = {"model": "up", "prompt": script, "stream": True}
    with httpx.stream("POST", gw.url + "/v1/completions", json=body, timeout=10, trust_env=False) as resp:
        assert resp.status_code == 200
        assert resp.headers["x-shoal-backend"] == gw_backend(gw) and resp.headers["x-shoal-version"] == "v1"
        return list(resp.iter_raw())


def gw_backend(gw) -> str:
    return httpx.get(gw.url + "/admin/backends", trust_env=False).json()["backends"][0]["url"]


@pytest.mark.timeout(30)
def test_events_split_across_reads_reach_the_client_whole(gateway):
    _, gw = gateway
    chunks = _stream(gw, "split")
    assert all(c.endswith(b"\n\n") for c in chunks), chunks
    assert b"".join(chunks) == b"".join(_event(w) for w in ("word0", "word1", "word2", "a", "b")) + (
        b"data: [DONE]\n\n"
    )


@pytest.mark.timeout(30)
def test_silent_stream_ends_with_a_504_event_after_the_timeout(gateway):
    _, gw = gateway
    start = time.monotonic()
    raw = b"".join(_stream(gw, "silent"))
    elapsed = time.monotonic() - start
    events = [e for e in raw.split(b"\n\n") if e]
    assert events[0] == _event("first").rstrip(b"\n") and events[-1] == b"data: [DONE]"
    error = json.loads(events[1][len(b"data: ") :])["error"]
    assert error["code"] == "upstream_timeout" and "sent nothing for 1 s" in error["message"]
    assert TIMEOUT_S <= elapsed < 10 * TIMEOUT_S


@pytest.mark.timeout(30)
def test_client_leaving_a_stream_closes_the_upstream_connection(gateway):
    upstream, gw = gateway
    body = {"model": "up", "prompt": "endless", "stream": True}
    with httpx.stream("POST", gw.url + "/v1/completions", json=body, timeout=10, trust_env=False) as resp:
        for i, _ in enumerate(resp.iter_raw()):
            if i == 3:
                break
    assert upstream.gone.wait(10), "the upstream stream was still being read after the client left"
    deadline = time.monotonic() + 10
    while httpx.get(gw.url + "/admin/backends", trust_env=False).json()["backends"][0]["in_flight"]:
        assert time.monotonic() < deadline, "the gateway still counts the stream in flight"
        time.sleep(0.05)


@pytest.mark.timeout(30)
def test_other_methods_on_the_proxied_path_are_405_and_the_model_list_still_answers(gateway):
    _, gw = gateway
    assert httpx.get(gw.url + "/v1/completions", trust_env=False).status_code == 405
    assert httpx.get(gw.url + "/v1/models", trust_env=False).json()["data"] == [
        {"id": "up", "object": "model", "owned_by": "shoal-gateway"}
    ]
