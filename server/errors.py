"""Errors as OpenAI returns them: ``{"error": {"message", "type", "param", "code"}}``.

:func:`api_error` is the one place that turns an exception raised while serving a request into
the error the client gets (status, body, headers), as TGI's single ``From<InferError>``: the
app's exception handlers call it, and so does a stream for the error event it ends with.
:func:`retry_after` is the one place that decides ``Retry-After``.
"""

from __future__ import annotations

import json
import math
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException

from engine.client import EngineDead, EngineNotReady, EngineRequestError
from server.protocol import ErrorInfo, ErrorResponse

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    500: "internal_server_error",
    503: "service_unavailable",
}

#: how long a client is told to wait while the model or the retrieval index loads
LOADING_RETRY_SECONDS = 5

ENGINE_FAILED = "the engine failed while generating this response"


class APIError(Exception):
    """Raised anywhere in request handling; becomes an OpenAI-style error response."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        info = ErrorInfo(message=self.message, type=ERROR_TYPES.get(self.status, "error"),
                         param=self.param, code=self.code or self.status)
        return ErrorResponse(error=info).model_dump()

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


class QueueTimeout(Exception):
    """An admitted request had no output within ``--max-queue-wait`` of its arrival;
    ``retry_seconds``: the expected time for the queue to free a slot."""

    def __init__(self, waited: float, bound: float, retry_seconds: float = 0.0) -> None:
        super().__init__(f"the request waited {waited:.1f} s for a sequence slot without "
                         f"starting (--max-queue-wait {bound:g} s); the server is overloaded, "
                         "retry later")
        self.waited = waited
        self.bound = bound
        self.retry_seconds = retry_seconds


class ClientDisconnected(Exception):
    """The client went away before its (non-streamed) response was ready."""


#: what may end a generation after it was admitted (a stream sends them as its last event)
GENERATION_ERRORS: tuple[type[Exception], ...] = (EngineDead, EngineNotReady, EngineRequestError,
                                                  QueueTimeout)


def retry_after(seconds: float | None) -> dict[str, str]:
    """The ``Retry-After`` header of a 429 or 503 the client may retry after about ``seconds``
    (rounded up, at least 1); none for ``None``, when waiting will not help (a failed engine).

    >>> retry_after(LOADING_RETRY_SECONDS), retry_after(0.2), retry_after(None)
    ({'Retry-After': '5'}, {'Retry-After': '1'}, {})
    """
    return {} if seconds is None else {"Retry-After": str(max(1, math.ceil(seconds)))}


def bad_request(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param=param)


def model_loading() -> APIError:
    return APIError(503, "the model is still loading", code="model_loading",
                    headers=retry_after(LOADING_RETRY_SECONDS))


def engine_unavailable(reason: str | None = None) -> APIError:
    return APIError(503, "the engine is not available" + (f": {reason}" if reason else ""),
                    code="engine_unavailable")


def engine_step_failed(streamed: bool = False) -> APIError:
    """The engine failed one request's step and keeps serving the others (a final output with
    finish reason ``error``, not an exception); a stream's event says less."""
    if streamed:
        return APIError(500, ENGINE_FAILED)
    return APIError(500, f"{ENGINE_FAILED}; the server keeps serving other requests",
                    code="engine_step_failed")


def validation_message(errors: list[dict[str, Any]]) -> tuple[str, str | None]:
    """The first pydantic error as an OpenAI-style message and its parameter name."""
    if not errors:
        return "invalid request", None
    e = errors[0]
    loc = [str(x) for x in e.get("loc", ()) if x != "body"]
    param = loc[-1] if loc else None
    if e.get("type") == "extra_forbidden":
        return f"Unrecognized request argument supplied: {'.'.join(loc)}", param
    where = ".".join(loc) or "body"
    return f"{where}: {e.get('msg', 'invalid value')}", param


def invalid_json(reason: str | None) -> APIError:
    return bad_request("the body is not valid JSON" + (f": {reason}" if reason else ""))


def api_error(exc: Exception, request: Request | None = None) -> APIError:
    """The OpenAI error for ``exc``, raised while serving ``request`` (whose method and path
    name an unknown route). It knows :data:`HANDLED` (the app's handlers) and pydantic's
    ``ValidationError`` (a body validated by hand); anything else is a bug, answered 500
    without its text."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, QueueTimeout):  # the server's capacity, not the request, is the problem
        return APIError(503, str(exc), code="queue_timeout",
                        headers=retry_after(exc.retry_seconds))
    if isinstance(exc, (EngineDead, EngineNotReady)):  # it stopped, or was not ready yet
        return engine_unavailable(str(exc))
    if isinstance(exc, EngineRequestError):
        return APIError(exc.status, str(exc))
    if isinstance(exc, ClientDisconnected):
        return APIError(499, "client disconnected")
    if isinstance(exc, RequestValidationError):
        errors = list(exc.errors())
        if errors and errors[0].get("type") == "json_invalid":  # server.body.BodyError
            return invalid_json((errors[0].get("ctx") or {}).get("error"))
        return APIError(400, *validation_message(errors))
    if isinstance(exc, ValidationError):  # not in HANDLED: a bug building a response is no 400
        return APIError(400, *validation_message(exc.errors()))
    if isinstance(exc, json.JSONDecodeError):
        return invalid_json(exc.msg)
    if isinstance(exc, HTTPException):  # Starlette's own: unknown path, wrong method, ...
        return _http_error(exc, request)
    return APIError(500, "internal server error")


#: the exception types :func:`api_error` maps (the app registers a handler for each)
HANDLED: tuple[type[Exception], ...] = (APIError, *GENERATION_ERRORS, ClientDisconnected,
                                        RequestValidationError, json.JSONDecodeError,
                                        HTTPException)


def _http_error(exc: HTTPException, request: Request | None) -> APIError:
    """Starlette's and FastAPI's errors in OpenAI's shape instead of ``{"detail": ...}``."""
    headers = dict(exc.headers or {})
    path = request.url.path if request is not None else "this path"
    if exc.status_code == 404:
        message = f"no route {path} (see /openapi.json)"
    elif exc.status_code == 405:
        allowed = headers.get("Allow") or headers.get("allow")
        method = request.method if request is not None else "this method"
        message = f"method {method} is not allowed on {path}" + (
            f" (allowed: {allowed})" if allowed else "")
    else:
        message = str(exc.detail)
    return APIError(exc.status_code, message, headers=headers)


def error_response(status: int, message: str, param: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    """An error answered before any route runs (the middlewares' 401 and 413)."""
    return APIError(status, message, param=param, headers=headers).response()
