"""The operator console at /ui: a static page (shoal/server/ui/) and the JSON it reads (/ui/api/*).

The page is plain HTML, CSS and JavaScript shipped in the package (no build step, no CDN); it talks only
to this server. Security follows the /v1 rule (shoal/policy/auth.py): the static files are public and hold
no data, every /ui/api/* route needs a credential whenever the server has keys, and the page sends the
key the operator types. A Content-Security-Policy of 'self' on the page makes the browser refuse any
other host, so that a future edit cannot quietly add one.

The live view's numbers come from the same sources as /metrics: the app's Prometheus registry, read
in-process as `shoal stats` reads a scrape (shoal/live_stats.py: totals, and rates between two reads),
and the ring buffer of recent requests and steps (shoal/server/recent.py) for the last minutes'
percentiles, which the cumulative histograms cannot give.
"""

from __future__ import annotations

import json
import os
import time
from collections import deque
from pathlib import Path
from typing import Any

import httpx
from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from starlette.staticfiles import StaticFiles
from starlette.types import Scope

import shoal
from shoal import metric_names as mn
from shoal.live_stats import Scrape, summarize
from shoal.server.errors import SERVER_ERROR, error_response
from shoal.server.state import ServerState, get_state

UI_DIR = Path(__file__).parent / "ui"
RATE_WINDOW_S = 30.0  # request, error and timeout rates: over the reads of the last half minute
MAX_READS = 256  # however often the page is polled (many tabs), the history stays small
GATEWAY_TOKEN_ENV = "SHOAL_GATEWAY_ADMIN_TOKEN"  # the gateway's admin_token, when it has one
GATEWAY_TIMEOUT_S = 3.0
# 'self' only: the page cannot reach another host even by mistake (point 4 of issue 24).
CSP = "default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self'; frame-ancestors 'none'"


class ConsoleFiles(StaticFiles):
    """The page's files, with the CSP above and no caching (a new server version serves new files)."""

    async def get_response(self, path: str, scope: Scope) -> Response:
        response = await super().get_response(path, scope)
        response.headers["Content-Security-Policy"] = CSP
        response.headers["Cache-Control"] = "no-cache"
        return response


def mount_static(app: Any) -> None:
    """/ui/ serves index.html; registered after the /ui/api routes, which therefore win."""
    app.mount("/ui", ConsoleFiles(directory=UI_DIR, html=True), name="ui")


class ScrapeHistory:
    """The registry reads of the last RATE_WINDOW_S: each live read is compared with the oldest one."""

    def __init__(self, window_s: float = RATE_WINDOW_S):
        self._window_s = window_s
        self._reads: deque[Scrape] = deque(maxlen=MAX_READS)

    def push(self, scrape: Scrape) -> Scrape:
        """Keep scrape; return the oldest read still in the window (scrape itself on the first read)."""
        self._reads.append(scrape)
        while len(self._reads) > 1 and scrape.at - self._reads[0].at > self._window_s:
            self._reads.popleft()
        return self._reads[0]


async def live_snapshot(state: ServerState, history: ScrapeHistory) -> dict[str, Any]:
    """What the live view shows, JSON-ready: gauges now, totals, rates over the last reads, and the
    ring buffer's last minutes. Seconds for latencies, fractions for the KV cache and error ratio."""
    metrics = state.metrics
    await metrics.refresh()
    now = Scrape.of_registry(metrics.registry)
    before = history.push(now)
    rates = summarize(before, now)
    window = now.minus(before)
    requests, errors = window.total(mn.REQUEST_SUCCESS), window.total(mn.REQUEST_ERRORS)
    return {
        "model": state.model_name,
        "phase": state.lifecycle.phase(),
        "ready": state.ready,
        "running": now.total(mn.NUM_REQUESTS_RUNNING),
        "waiting": now.total(mn.NUM_REQUESTS_WAITING),
        "kv_cache_usage": now.total(mn.KV_CACHE_USAGE),
        "stats_enabled": metrics.enabled,
        "totals": {
            "requests": now.total(mn.REQUEST_SUCCESS),
            "errors": now.total(mn.REQUEST_ERRORS),
            "timeouts": now.total(mn.REQUEST_TIMEOUTS),
            "prompt_tokens": now.total(mn.PROMPT_TOKENS),
            "generation_tokens": now.total(mn.GENERATION_TOKENS),
        },
        "rates": {
            "window_s": rates.window_s if before is not now else 0.0,
            "requests_per_s": rates.requests_per_s,
            "errors_per_s": errors / rates.window_s,
            "timeouts_per_s": window.total(mn.REQUEST_TIMEOUTS) / rates.window_s,
            "error_ratio": errors / (requests + errors) if requests + errors else 0.0,
        },
        "recent": metrics.recent.summary(),
        "time": time.time(),
    }


def model_view(state: ServerState) -> dict[str, Any]:
    """The served model as the Models page lists it (a single server: always loaded, no keep-alive)."""
    engine = state.engine
    config = engine.config
    stats = engine.stats
    model_dir = _model_dir(state)
    return {
        "id": state.model_name,
        "source": str(engine.model_name),
        "state": "loaded" if engine.ready else state.lifecycle.phase(),
        "dtype": str(config.dtype),
        "quantization": _quantization(model_dir),
        "max_model_len": config.max_model_len,
        "kv_cache_tokens": stats.block_size * stats.num_kv_blocks,
        "resident_memory_bytes": Scrape.of_registry(state.metrics.registry).total(mn.RESIDENT_MEMORY),
        "keep_alive": None,
        "quant_eval": model_dir is not None and (model_dir / "quant_eval.json").exists(),
    }


def _model_dir(state: ServerState) -> Path | None:
    path = Path(str(state.engine.config.model)).expanduser()
    return path if path.is_dir() else None


def _quantization(model_dir: Path | None) -> str | None:
    """The checkpoint's quantization_config.quant_method (Hugging Face config.json), if any."""
    try:
        config = json.loads((model_dir / "config.json").read_text()) if model_dir else {}
    except (OSError, ValueError):
        return None
    quant = config.get("quantization_config") or {}
    return quant.get("quant_method") or quant.get("format") or (quant and "yes") or None


def quant_eval_response(model_dir: Path | None, name: str, suffix: str) -> Response:
    """quant_eval.json or .png (suffix) from a model's directory, or a 404 that says how to make one."""
    path = model_dir / f"quant_eval{suffix}" if model_dir else None
    if suffix not in (".json", ".png") or path is None or not path.exists():
        return error_response(404, f"no quant_eval{suffix} for {name}: run `shoal quant eval`",
                              code="not_found")  # fmt: skip
    return FileResponse(path)


async def gateway_view(gateway_url: str | None) -> Response:
    """The gateway's /admin/backends and /admin/models in one answer; 404 without --gateway-url, 502
    when the gateway cannot be read (its error is named)."""
    if not gateway_url:
        return error_response(404, "no gateway configured: start with `shoal serve --gateway-url URL`",
                              code="no_gateway")  # fmt: skip
    token = os.environ.get(GATEWAY_TOKEN_ENV)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    base = gateway_url.rstrip("/")
    try:
        async with httpx.AsyncClient(timeout=GATEWAY_TIMEOUT_S, headers=headers) as client:
            backends = await client.get(base + "/admin/backends")
            models = await client.get(base + "/admin/models")
        backends.raise_for_status()
        models.raise_for_status()
        body = {"gateway": base, **backends.json(), **models.json()}
    except (httpx.HTTPError, ValueError) as e:
        return error_response(502, f"cannot read the gateway at {base}: {e}", type=SERVER_ERROR,
                              code="gateway_unreachable")  # fmt: skip
    return JSONResponse(body)


router = APIRouter(prefix="/ui/api", include_in_schema=False)


@router.get("/info")
async def info(request: Request) -> dict[str, Any]:
    """What the page needs to lay itself out: the model, the server kind and the optional parts."""
    state = get_state(request)
    return {
        "version": shoal.__version__,
        "kind": "single",
        "models": [state.model_name],
        "gateway": state.settings.gateway_url,
        "max_model_len": state.max_model_len if state.engine.ready else None,
    }


@router.get("/live")
async def live(request: Request) -> dict[str, Any]:
    state = get_state(request)
    return await live_snapshot(state, state.console_history)


@router.get("/models")
async def models(request: Request) -> dict[str, Any]:
    return {"models": [model_view(get_state(request))], "admin": False}


@router.get("/models/{name:path}/quant_eval{suffix}")
async def quant_eval(name: str, suffix: str, request: Request) -> Response:
    state = get_state(request)
    state.check_model(name)
    return quant_eval_response(_model_dir(state), name, suffix)


@router.get("/deployments")
async def deployments(request: Request) -> Response:
    return await gateway_view(get_state(request).settings.gateway_url)
