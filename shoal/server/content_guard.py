"""The content filter (shoal/policy/content_filter.py) on the request path: prompts before the engine,
outputs as they stream.

`check_prompts` refuses a request whose prompt (as the engine would see it: the decoded token ids, so
that text, token-id and chat prompts are checked alike) matches, with a 400 of code `content_filter`.
`guarded` wraps one engine request's snapshots: each choice shows only what its OutputGuard allows, and a
blocked choice ends with finish_reason "content_filter". When every choice is blocked the request ends
there, and closing the engine request frees its KV blocks.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from typing import Any

import anyio
from starlette.requests import Request

from shoal.engine.outputs import RequestOutput
from shoal.policy.content_filter import ContentFilter, OutputGuard
from shoal.server.errors import APIError

BLOCKED = "content_filter"


async def check_prompts(
    request: Request,
    tokenizer: Any,
    prompts: list[list[int]],
    content_filter: ContentFilter,
    wants_logprobs: bool,
) -> None:
    """400 for a blocked prompt; 400 for logprobs while outputs are filtered (their token strings would
    show held-back text)."""
    policy = content_filter.policy
    if policy.output and wants_logprobs:
        raise APIError(
            "logprobs are not available while the server filters outputs", param="logprobs", code=BLOCKED
        )
    if not policy.input:
        return
    param = "messages" if request.url.path.endswith("/chat/completions") else "prompt"
    for ids in prompts:
        text = await anyio.to_thread.run_sync(tokenizer.decode, ids)
        if content_filter.find(text) is not None:
            raise APIError("the prompt was blocked by the server's content policy", param=param, code=BLOCKED)


async def guarded(
    agen: AsyncIterator[RequestOutput], content_filter: ContentFilter
) -> AsyncIterator[RequestOutput]:
    """The snapshots of agen with every choice's text filtered (see the module docstring)."""
    guards: list[OutputGuard] = []
    try:
        async for out in agen:
            if not guards:
                guards = [OutputGuard(content_filter) for _ in out.outputs]
            view = _filtered(out, guards)
            yield view
            if view.finished:
                return
    finally:
        await agen.aclose()  # an unfinished engine request is aborted


def _filtered(out: RequestOutput, guards: list[OutputGuard]) -> RequestOutput:
    outputs = []
    for guard, o in zip(guards, out.outputs, strict=True):
        text, blocked = guard.visible(o.text, o.finished)
        reason = (BLOCKED, None) if blocked else (o.finish_reason, o.stop_reason)
        outputs.append(dataclasses.replace(o, text=text, finish_reason=reason[0], stop_reason=reason[1]))
    finished = out.finished or all(o.finish_reason is not None for o in outputs)
    return dataclasses.replace(out, outputs=outputs, finished=finished)
