"""Errors in OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, for every failure.

Clients (the `openai` package above all) parse this body to raise their typed exceptions, so no route
may answer with FastAPI's default `{"detail": ...}` or a 422: validation problems are 400 here, as
OpenAI and vLLM answer them.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from shoal.server.request_context import request_context

logger = logging.getLogger("shoal.server")

INVALID_REQUEST = "invalid_request_error"
SERVER_ERROR = "server_error"


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """The body of every non-2xx answer."""

    error: ErrorDetail


class APIError(Exception):
    """Raised anywhere in a route to answer with an OpenAI error body and a status code."""

    def __init__(
        self,
        message: str,
        status_code: int = 400,
        *,
        type: str = INVALID_REQUEST,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.headers = headers  # e.g. Retry-After on a 503
        self.message = message
        self.status_code = status_code
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(
    message: str, type: str = INVALID_REQUEST, param: str | None = None, code: str | None = None
) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def error_response(
    status_code: int,
    message: str,
    type: str = INVALID_REQUEST,
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    return JSONResponse(error_body(message, type, param, code), status_code=status_code, headers=headers)


# Responses every JSON route may give, for the OpenAPI schema (FastAPI's 422 is removed in app.py).
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorResponse, "description": "Invalid request (bad JSON, bad or unsupported parameter)"},
    401: {"model": ErrorResponse, "description": "Missing or wrong API key"},
    404: {"model": ErrorResponse, "description": "Unknown model"},
    413: {"model": ErrorResponse, "description": "Request body too large"},
    429: {
        "model": ErrorResponse,
        "description": "Rate limit exceeded (with Retry-After and x-ratelimit-* headers)",
    },
    500: {"model": ErrorResponse, "description": "Engine failure"},
    503: {
        "model": ErrorResponse,
        "description": "Not ready: loading, warming up, draining, overloaded or unhealthy (with Retry-After)",
    },
}


def generation_responses(model: type[BaseModel]) -> dict[int | str, dict[str, Any]]:
    """The OpenAPI responses of a generation route: its JSON body, or server-sent events with `stream`,
    every error above, and the 499 logged (never sent) when the client disconnects first."""
    events = {
        "schema": {
            "type": "string",
            "description": "Server-sent events: `data: <chunk JSON>` lines, an error object in-band if the "
            "engine fails after the 200, then `data: [DONE]`.",
        }
    }
    return {
        200: {
            "model": model,
            "description": "JSON, or server-sent events with stream",
            "content": {"text/event-stream": events},
        },
        **ERROR_RESPONSES,
        499: {"description": "The client closed the connection before the answer (nothing is sent)"},
    }


# Pydantic error types raised by our own validators, mapped to OpenAI error codes.
_CODES = {
    "unsupported_parameter": "unsupported_parameter",
    "extra_forbidden": "unknown_parameter",
    "json_invalid": "invalid_json",
}


def _param_of(loc: tuple) -> str | None:
    """("body", "messages", 0, "role") -> "messages.0.role"; union-member tags are not parameters."""
    parts = [str(p) for p in loc[1:] if not (isinstance(p, str) and ("[" in p or p in _UNION_TAGS))]
    return ".".join(parts) or None


_UNION_TAGS = {"str", "int", "float", "bool", "list", "dict", "none", "function-after", "function-before"}


def validation_error_to_api_error(exc: RequestValidationError) -> APIError:
    """Turn the first pydantic/FastAPI validation error into one readable 400 that names the parameter."""
    errors = exc.errors()
    if not errors:
        return APIError("invalid request body")
    err = errors[0]
    # A union (prompt, stop, content) reports one error per member: the one that is not "wrong type"
    # is about the member the client meant (e.g. too many stop strings, not "stop should be a string").
    same_param = [
        e for e in errors if _param_of(tuple(e.get("loc", ()))) == _param_of(tuple(err.get("loc", ())))
    ]
    err = next((e for e in same_param if not str(e.get("type", "")).endswith("_type")), err)
    kind = err.get("type", "")
    loc = tuple(err.get("loc", ()))
    ctx = err.get("ctx") or {}
    msg = str(err.get("msg", "invalid value"))
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    param = ctx.get("param") if isinstance(ctx.get("param"), str) else _param_of(loc)
    if kind == "json_invalid":
        detail = ctx.get("error", "")
        return APIError(f"Invalid JSON body: {detail}".rstrip(": "), code="invalid_json")
    if kind == "missing" and len(loc) <= 1:
        return APIError("Request body is missing: a JSON object is expected")
    if len(loc) <= 1 and kind in ("model_attributes_type", "dict_type", "model_type"):
        return APIError("Request body must be a JSON object")
    if kind == "extra_forbidden":
        return APIError(
            f"Unrecognized request argument supplied: {param}", param=param, code="unknown_parameter"
        )
    if kind == "missing":
        return APIError(
            f"Missing required parameter: '{param}'", param=param, code="missing_required_parameter"
        )
    text = msg if kind in _CODES or kind.startswith("shoal_") or param is None else f"{param}: {msg}"
    return APIError(text, param=param, code=_CODES.get(kind, "invalid_value"))


def install_error_handlers(app: FastAPI) -> None:
    """Make every failure path answer in OpenAI's error shape."""

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        _note_kind(request, exc.code or exc.type)
        return JSONResponse(exc.body(), status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        api_error = validation_error_to_api_error(exc)
        _note_kind(request, api_error.code or api_error.type)
        return JSONResponse(api_error.body(), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        _note_kind(request, code or "http_error")
        message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        return error_response(exc.status_code, message, code=code, headers=getattr(exc, "headers", None))


def _note_kind(request: Request, kind: str) -> None:
    """The error's kind for shoal:request_errors_total{kind} (the OpenAI error code, else its type)."""
    request_context(request).error_kind = kind


class UnexpectedErrorMiddleware:
    """Turns an exception no handler took into a 500 in OpenAI's shape, and keeps the connection.

    Why not `app.exception_handler(Exception)`: Starlette runs that handler in ServerErrorMiddleware,
    which sends its response and then re-raises, so uvicorn logs the error again and closes the
    keep-alive connection: the client's next request on it fails with a reset. This middleware sits
    inside, answers, and does not re-raise. Only when the answer had already begun (a stream broken
    midway) is the exception passed on, since the connection cannot carry a complete answer any more."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state = {"started": False, "ended": False}

        async def tracking_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                state["started"] = True
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                state["ended"] = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as exc:  # noqa: BLE001 - this is the last place an error can become an answer
            logger.error("unhandled error on %s %s", scope.get("method"), scope.get("path"), exc_info=exc)
            if state["ended"]:
                return  # the answer is complete; the connection stays usable
            if state["started"]:
                raise
            ctx = scope.get("state", {}).get("ctx")
            if ctx is not None:
                ctx.error_kind = SERVER_ERROR
            response = error_response(500, f"internal server error: {type(exc).__name__}", type=SERVER_ERROR)
            await response(scope, receive, send)
