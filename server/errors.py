"""Every error the server answers with, in one JSON shape, and the handlers that produce it.

Shape: `{"error": {"code", "message", "type", "param", "value", "limit"}}`, `type` as OpenAI's
clients read it (`invalid_request_error` for 4xx, `server_error` for 5xx). Route code raises
`ApiError`; FastAPI's request validation errors (normally a 422 with its own shape) are rewritten
here into a 400 naming the first bad parameter, its value and the limit it broke; anything
unexpected becomes a 500 without internals. Streams report errors as `error` events with the same
fields instead.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("irg.server")

MAX_ECHO_CHARS = 200  # a bad base64 image is not echoed back whole


class ApiError(Exception):
    """An error answer: HTTP status, a stable code, and what was wrong with which parameter."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        param: str | None = None,
        value: Any = None,
        limit: Any = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.param = param
        self.value = value
        self.limit = limit
        self.headers = headers or {}

    def body(self) -> dict:
        return error_body(self.code, self.message, self.status, self.param, self.value, self.limit)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


class ClientGone(Exception):
    """The client disconnected before its answer was ready; nobody is left to answer."""


def invalid(param: str, message: str, value: Any = None, limit: Any = None) -> ApiError:
    """A 400 for one bad parameter."""
    return ApiError(400, "invalid_parameter", message, param, value, limit)


def echo(value: Any) -> Any:
    """A JSON-safe, bounded copy of a client value for an error message."""
    if isinstance(value, str | bytes) and len(value) > MAX_ECHO_CHARS:
        return f"<{len(value)} characters>"
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN or Infinity: "nan", "inf"
    if isinstance(value, str):
        return text(value)
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, list | tuple):
        return [echo(v) for v in value[:16]]
    if isinstance(value, dict):
        return {str(k): echo(v) for k, v in list(value.items())[:16]}
    return echo(str(value))


def text(value: str) -> str:
    """`value` with lone surrogates (valid in a JSON string, not in UTF-8) escaped."""
    return value.encode("utf-8", "backslashreplace").decode("utf-8")


def error_body(
    code: str,
    message: str,
    status: int,
    param: str | None = None,
    value: Any = None,
    limit: Any = None,
) -> dict:
    return {
        "error": {
            "code": code,
            "message": text(message),
            "type": error_type(status),
            "param": None if param is None else text(param),
            "value": echo(value),
            "limit": echo(limit),
        }
    }


def error_type(status: int) -> str:
    return "server_error" if status >= 500 else "invalid_request_error"


# pydantic error types -> (our code, the context key that holds the limit)
_LIMIT_KEYS = ("le", "lt", "ge", "gt", "multiple_of", "max_length", "min_length", "expected")


def _from_validation(exc: RequestValidationError) -> ApiError:
    errors = exc.errors()
    if not errors:
        return ApiError(400, "invalid_request", "invalid request")
    err = errors[0]
    loc = [str(p) for p in err.get("loc", ()) if p != "body"]
    kind = err.get("type", "")
    if kind == "json_invalid":
        return ApiError(400, "invalid_json", f"request body is not valid JSON: {err.get('msg')}")
    param = ".".join(loc) or None
    ctx = err.get("ctx") or {}
    limit = next((ctx[k] for k in _LIMIT_KEYS if k in ctx), None)
    if kind == "missing":
        code = "missing_parameter"
        message = f"{param} is required" if param else "a JSON request body is required"
        return ApiError(400, code, message, param)
    if param is None and kind == "model_attributes_type":  # the body is no JSON object
        message = "the request body must be a JSON object, sent as Content-Type: application/json"
        return ApiError(400, "invalid_request", message, "body", err.get("input"))
    if kind == "extra_forbidden":  # where `Strict` names it, the field is in the context
        param = ".".join([*loc, ctx["param"]]) if "param" in ctx else param
        return ApiError(400, "unknown_parameter", f"unknown parameter {param}", param)
    message = f"{param}: {err.get('msg')}" if param else str(err.get("msg"))
    return ApiError(400, "invalid_parameter", message, param, err.get("input"), limit)


async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
    return exc.response()


async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    return _from_validation(exc).response()


# FastAPI's answer to a body its JSON reader raised on with something other than a decode error
# (invalid UTF-8, nesting past the recursion limit, an integer of over 4,300 digits).
_UNPARSED_BODY = "There was an error parsing the body"


async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
    if exc.status_code == 400 and exc.detail == _UNPARSED_BODY:
        why = type(exc.__cause__).__name__ if exc.__cause__ is not None else "unreadable"
        return ApiError(400, "invalid_json", f"request body is not valid JSON: {why}").response()
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    return ApiError(exc.status_code, code, str(exc.detail), headers=exc.headers).response()


async def _client_gone(_: Request, __: ClientGone) -> Response:
    return Response(status_code=499)  # nginx's "client closed request"; never read by anyone


async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error", exc_info=exc)
    # Starlette raises the error again once this answer is out, and the server then drops the
    # connection: the client must not send its next request on it.
    headers = {"Connection": "close"}
    return ApiError(500, "internal_error", "internal server error", headers=headers).response()


def install(app: FastAPI) -> None:
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(ClientGone, _client_gone)
    app.add_exception_handler(Exception, _unexpected)
