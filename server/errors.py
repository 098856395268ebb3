"""Errors in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

from __future__ import annotations

import json
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("dovetail.server")

_TYPE_BY_STATUS = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    429: "rate_limit_exceeded",
    503: "service_unavailable_error",
}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers


def error_body(status: int, message: str, param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": _TYPE_BY_STATUS.get(status, "server_error"),
                      "param": param, "code": code}}


class ErrorResponse(JSONResponse):
    """JSON with every non-ASCII character escaped: a message quoting the request (a lone
    UTF-16 surrogate in a logit_bias key, say) can always be written."""

    def render(self, content) -> bytes:
        return json.dumps(content, separators=(",", ":")).encode("ascii")


def error_response(error: APIError) -> JSONResponse:
    return ErrorResponse(error_body(error.status, error.message, error.param, error.code),
                         status_code=error.status, headers=error.headers)


def _describe_validation(exc: RequestValidationError) -> tuple[str, str | None]:
    """The first validation problem as (message, param)."""
    errors = exc.errors()
    if not errors:
        return "invalid request", None
    first = errors[0]
    location = [str(part) for part in first.get("loc", ()) if part != "body"]
    if first.get("type") == "json_invalid":
        return "the request body is not valid JSON", None
    if not location and first.get("type") in ("missing", "model_attributes_type", "dict_type"):
        return "the request body must be a JSON object", None
    param = ".".join(location) if location else None
    message = first.get("msg", "invalid value")
    return (f"{param}: {message}" if param else message), (location[0] if location else None)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _describe_validation(exc)
        return ErrorResponse(error_body(400, message, param), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return ErrorResponse(error_body(exc.status_code, str(exc.detail)),
                             status_code=exc.status_code, headers=exc.headers)


class CatchUnexpected:
    """ASGI middleware: an unhandled exception becomes a 500 in OpenAI's shape, and is logged
    here rather than raised on (Starlette's own handler re-raises it after answering, and
    uvicorn then closes the connection: the client's next request on it is reset). After a
    response has started nothing can be sent; the response just ends."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message) -> None:
            nonlocal started
            started |= message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception:
            log.exception("unhandled error on %s", scope.get("path"))
            if not started:
                response = ErrorResponse(error_body(500, "internal server error"),
                                         status_code=500)
                await response(scope, receive, send)
