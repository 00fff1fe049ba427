"""OpenAI-shaped errors: `{"error": {"message", "type", "param", "code"}}` on every path.

Status -> type (as OpenAI's API answers):

    400 invalid_request_error           bad JSON, bad field, prompt too long (code context_length_exceeded)
    401 invalid_request_error           missing or wrong API key (code invalid_api_key)
    404 invalid_request_error           unknown model (code model_not_found) or route (code unknown_url)
    405 invalid_request_error           wrong method (code method_not_allowed)
    408 invalid_request_error           body not received in time (code request_timeout), connection closed
    413 invalid_request_error           body too large (code request_too_large)
    415 invalid_request_error           body not declared application/json (code unsupported_media_type)
    429 rate_limit_error                admission refused (code rate_limit_exceeded), with Retry-After
    500 server_error                    anything unexpected (never caused by input)
    503 server_error                    backend not ready (code service_unavailable), with Retry-After

A worker's RequestError is answered the same way: the type follows its status, and the worker's own
label (service_unavailable, internal_error) becomes the code, in a stream's error event too.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from services.common.errors import InvalidRequestError
from services.common.messages import RequestError
from services.gateway.protocol import ErrorInfo, ErrorResponse

logger = logging.getLogger(__name__)

_TYPE_BY_STATUS = {429: "rate_limit_error"}
OPENAI_ERROR_TYPES = frozenset({"invalid_request_error", "rate_limit_error", "server_error"})


def error_type(status: int) -> str:
    if status in _TYPE_BY_STATUS:
        return _TYPE_BY_STATUS[status]
    return "server_error" if status >= 500 else "invalid_request_error"


class ApiError(Exception):
    """An answer other than success, with everything its OpenAI-shaped body and headers need."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        type: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.info = ErrorInfo(message=message, type=type or error_type(status), param=param, code=code)
        self.headers = headers or {}

    @classmethod
    def invalid(cls, exc: InvalidRequestError) -> ApiError:
        return cls(400, exc.message, param=exc.param, code=getattr(exc, "code", None))

    @classmethod
    def from_request_error(cls, error: RequestError, retry_after_s: int | None = None) -> ApiError:
        """A worker's or the cluster's refusal in OpenAI's terms: the type follows the status (a worker's
        own label, e.g. "service_unavailable", becomes the code), and a 429 or 503 says when to retry."""
        code = None if error.type in OPENAI_ERROR_TYPES else error.type
        headers = (
            {"Retry-After": str(retry_after_s)} if retry_after_s is not None and error.status in (429, 503) else None
        )
        return cls(error.status, error.message, param=error.param, code=code, headers=headers)

    def body(self) -> dict:
        return ErrorResponse(error=self.info).model_dump()

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


class ClientGone(Exception):
    """The client disconnected; its request was aborted and nobody reads the answer."""


CLIENT_CLOSED_REQUEST = 499  # the status access logs show for a request its client abandoned


def internal_error() -> ApiError:
    return ApiError(500, "The server had an error while processing your request.")


# ----------------------------------------------------------------------------------------------
# Validation errors -> 400 naming the field

_UNION_MEMBER_TAGS = {"str", "int", "float", "bool", "none"}


def _is_union_tag(part: object) -> bool:
    return isinstance(part, str) and ("[" in part or part in _UNION_MEMBER_TAGS)


def _format_loc(loc: tuple) -> str:
    path = ""
    for part in loc:
        if _is_union_tag(part) or part == "body":
            continue
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path


def _specificity(loc: tuple) -> tuple[int, list[int]]:
    """Deeper locations first; among union members, the one that failed furthest into a list."""
    return len(loc), [part for part in loc if isinstance(part, int)]


def validation_error(errors: Sequence[Mapping[str, Any]]) -> ApiError:
    """The most specific of pydantic's errors, with its top-level field as `param`."""
    if any(error["type"] == "json_invalid" for error in errors):
        return ApiError(400, "We could not parse the JSON body of your request. The body must be a JSON object.")
    loc_errors = [(tuple(p for p in e["loc"] if p != "body"), e) for e in errors]
    loc, error = max(loc_errors, key=lambda item: _specificity(item[0]))
    if not loc:
        return ApiError(400, f"Invalid request body: {error['msg']}")
    path = _format_loc(loc)
    param = str(loc[0])
    if error["type"] == "missing":
        return ApiError(400, f"Missing required parameter: '{path}'.", param=param)
    return ApiError(400, f"Invalid value for '{path}': {error['msg']}.", param=param)


def parse_error(exc: ValidationError) -> ApiError:
    return validation_error(exc.errors(include_url=False))


# ----------------------------------------------------------------------------------------------
# Exception handlers: whatever fails, the client gets the OpenAI shape

_HTTP_CODES = {404: "unknown_url", 405: "method_not_allowed", 413: "request_too_large"}


async def _api_error_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    return exc.response()


async def _validation_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    return validation_error(list(exc.errors())).response()


async def _http_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    if exc.status_code == 404:
        message = f"Invalid URL ({request.method} {request.url.path})"
    elif exc.status_code == 405:
        message = f"Method {request.method} is not allowed on {request.url.path}"
    else:
        message = str(exc.detail)
    error = ApiError(exc.status_code, message, code=_HTTP_CODES.get(exc.status_code), headers=dict(exc.headers or {}))
    return error.response()


async def _client_gone_handler(request: Request, exc: Exception) -> Response:
    return Response(status_code=CLIENT_CLOSED_REQUEST)


async def _unexpected_handler(request: Request, exc: Exception) -> JSONResponse:
    logger.exception("unexpected error on %s %s", request.method, request.url.path, exc_info=exc)
    return internal_error().response()


def install_error_handlers(app) -> None:
    app.add_exception_handler(ApiError, _api_error_handler)
    app.add_exception_handler(RequestValidationError, _validation_handler)
    app.add_exception_handler(StarletteHTTPException, _http_handler)
    app.add_exception_handler(ClientGone, _client_gone_handler)
    app.add_exception_handler(Exception, _unexpected_handler)
