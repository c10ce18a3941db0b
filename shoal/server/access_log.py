"""The access log: one line per HTTP request, written once its response has been sent.

It replaces uvicorn's access log (run with access_log=False), which knows neither the request id nor the
model's numbers. Fields (`--log-format json` makes them top-level JSON keys): request_id, method, path,
status, model, prompt_tokens, completion_tokens, queue_s, ttft_s and latency_s (seconds, from the HTTP arrival),
finish_reasons, streamed, and error_kind / timed_out / cache_hit / tenant when they apply. The prompt
text is never logged unless the server runs with `--log-prompts` (prompts may hold personal data); it is
then decoded from the prompt token ids after the fact, off the request path.
"""

from __future__ import annotations

import logging
from typing import Any

from shoal.server.request_context import RequestContext
from shoal.server.request_summary import summarize

ACCESS_LOGGER = "shoal.access"
logger = logging.getLogger(ACCESS_LOGGER)


class AccessLog:
    """The end listener writing the access line of each request (at INFO on logger "shoal.access")."""

    def __init__(self, model_name: str, engine: Any = None, log_prompts: bool = False):
        self.model_name = model_name
        self.engine = engine  # its tokenizer decodes prompts, with log_prompts (read late: it may load after)
        self.log_prompts = log_prompts

    def on_end(self, ctx: RequestContext) -> None:
        if not logger.isEnabledFor(logging.INFO):
            return
        fields = self.fields(ctx)
        logger.info("%s %s %s", ctx.method, ctx.path, ctx.status, extra={"fields": fields})

    def fields(self, ctx: RequestContext) -> dict[str, Any]:
        summary = summarize(ctx)
        fields: dict[str, Any] = {
            "request_id": ctx.request_id,
            "method": ctx.method,
            "path": ctx.path,
            "status": ctx.status,
            "model": ctx.model or (self.model_name if ctx.outputs else None),
            "prompt_tokens": summary.prompt_tokens,
            "completion_tokens": summary.completion_tokens,
            "queue_s": _rounded(summary.queue),
            "ttft_s": _rounded(summary.ttft),
            "latency_s": _rounded(summary.latency),
            "finish_reasons": summary.finish_reasons,
            "streamed": ctx.streamed,
        }
        if ctx.error_kind:
            fields["error_kind"] = ctx.error_kind
        if ctx.timed_out:
            fields["timed_out"] = True
        if ctx.cache_hit:
            fields["cache_hit"] = True  # answered from the response cache: no engine request, no tokens
        tenant = getattr(ctx.identity, "tenant", None)
        if tenant is not None:
            fields["tenant"] = tenant  # who, for per-tenant accounting (never the key's secret)
        if self.log_prompts and self.engine is not None and ctx.outputs:
            fields["prompts"] = [
                self.engine.tokenizer.decode(out.prompt_token_ids, skip_special_tokens=False)
                for out in ctx.outputs
            ]
        return fields


def _rounded(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds, 6)
