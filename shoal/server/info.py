"""Routes about the server itself: models, liveness, readiness, version, Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

import shoal
from shoal.server.errors import ERROR_RESPONSES, SERVER_ERROR, error_body
from shoal.server.protocol import ModelCard, ModelList
from shoal.server.state import ServerState, get_state

router = APIRouter()


def _card(state: ServerState) -> ModelCard:
    return ModelCard(
        id=state.model_name,
        created=state.created,
        root=str(state.engine.model_name),
        max_model_len=state.max_model_len,
    )


@router.get("/v1/models", response_model=ModelList, responses=ERROR_RESPONSES)
async def list_models(request: Request) -> ModelList:
    """The one served model (--served-model-name, default the --model argument)."""
    return ModelList(data=[_card(get_state(request))])


@router.get("/v1/models/{model:path}", response_model=ModelCard, responses=ERROR_RESPONSES)
async def retrieve_model(model: str, request: Request) -> ModelCard:
    state = get_state(request)
    state.check_model(model)
    return _card(state)


@router.get(
    "/health",
    response_class=Response,
    responses={200: {"description": "Alive (an empty body)", "content": {}}, 503: ERROR_RESPONSES[503]},
)
async def health(request: Request) -> Response:
    """Liveness: 200 unless the process is broken (the load failed; the engine died, failed
    --max-consecutive-step-failures steps in a row, or made no progress for --engine-hang-timeout s with
    work pending). 200 while loading and draining: a restart would not help then."""
    problem = get_state(request).lifecycle.liveness_problem()
    if problem is None:
        return Response(status_code=200)
    return JSONResponse(error_body(problem, SERVER_ERROR, code="engine_unhealthy"), 503)


@router.get("/ready", responses={503: ERROR_RESPONSES[503]})
async def ready(request: Request) -> Response:
    """Readiness: 200 {"status": "ready"} once loaded, warmed up and healthy; otherwise 503 whose
    `status` says why: "loading", "warming up", "draining" or "failed"."""
    lifecycle = get_state(request).lifecycle
    if lifecycle.ready:
        return JSONResponse({"status": "ready"})
    phase = lifecycle.phase()
    if phase == "ready":  # alive by its phase, but hung
        phase = "failed"
    body = error_body(f"the server is {phase}", SERVER_ERROR, code="engine_not_ready")
    return JSONResponse({"status": phase, **body}, 503)


@router.get("/version")
async def version() -> dict[str, str]:
    return {"version": shoal.__version__}


@router.get("/metrics", response_class=Response)
async def metrics(request: Request) -> Response:
    """Prometheus text format: vLLM's metric names, and shoal's (all in shoal/metric_names.py).
    `?name[]=A&name[]=B` returns only those series (prometheus_client's filter, which vLLM's /metrics
    honours too): the gateway scrapes two gauges a second without rendering the rest."""
    names = request.query_params.getlist("name[]")
    return Response(await get_state(request).metrics.render(names), media_type=CONTENT_TYPE_LATEST)
