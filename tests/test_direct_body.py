"""Streamed chunks skip the middlewares' send wrappers (shoal/server/direct_body.py), and only them.

A Starlette app with the same arrangement as the server's (DirectBodyOffer outermost, Starlette's own
middlewares, a pure-ASGI layer that counts the messages it sees) streams an SSEResponse to an httpx
client over the ASGI interface. Runs in about 0.1 s.
"""

from __future__ import annotations

import asyncio

import httpx
import pytest
from starlette.applications import Starlette
from starlette.routing import Route

from shoal.server.direct_body import SSEResponse, needs_every_chunk, offer_direct_body

pytestmark = pytest.mark.timeout(30)

CHUNKS = [f"data: {i}\n\n".encode() for i in range(20)]


class Counting:
    """A pure-ASGI layer that records the type of every message it passes, and adds a header."""

    def __init__(self, app, seen: list, every_chunk: bool = False):
        self.app, self.seen, self.every_chunk = app, seen, every_chunk

    async def __call__(self, scope, receive, send):
        if self.every_chunk:
            needs_every_chunk(scope)

        async def counting_send(message):
            more = message.get("more_body", False)
            self.seen.append((message["type"], more))
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), (b"x-seen", b"yes")]
            await send(message)

        await self.app(scope, receive, counting_send)


async def _events():
    for chunk in CHUNKS:
        yield chunk


def _app(seen: list, every_chunk: bool, offer: bool = True) -> Starlette:
    app = Starlette(routes=[Route("/sse", lambda request: SSEResponse(_events()))])
    app.add_middleware(Counting, seen=seen, every_chunk=every_chunk)
    if offer:
        offer_direct_body(app)
    return app


def _get(app: Starlette) -> httpx.Response:
    async def go() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            return await c.get("/sse")

    return asyncio.run(go())


def test_wrappers_see_the_start_and_the_end_but_no_chunk():
    seen: list = []
    r = _get(_app(seen, every_chunk=False))
    assert r.status_code == 200 and r.content == b"".join(CHUNKS)
    assert r.headers["x-seen"] == "yes"  # the start went through the chain
    assert r.headers["content-type"].startswith("text/event-stream")
    assert seen == [("http.response.start", False), ("http.response.body", False)]


@pytest.mark.parametrize("every_chunk, offer", [(True, True), (False, False)])
def test_a_layer_that_needs_every_chunk_or_no_offer_sees_them_all(every_chunk, offer):
    seen: list = []
    r = _get(_app(seen, every_chunk=every_chunk, offer=offer))
    assert r.content == b"".join(CHUNKS)
    bodies = [m for m in seen if m[0] == "http.response.body"]
    assert bodies == [("http.response.body", True)] * len(CHUNKS) + [("http.response.body", False)]
