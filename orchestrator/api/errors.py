"""OpenAI-style errors: `{"error": {"message", "type", "param", "code"}}` for every failure, never a bare 500
for bad input (malformed JSON, schema violations, unknown routes and methods included)."""
from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("specfleet.api")

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "not_found_error", 405: "invalid_request_error", 413: "invalid_request_error",
          422: "invalid_request_error", 429: "rate_limit_error", 500: "server_error", 503: "service_unavailable"}


class APIError(Exception):
    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or _TYPES.get(status, "invalid_request_error")
        self.headers = headers or {}

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def too_many(message: str, retry_after_s: int, code: str = "rate_limit_exceeded") -> APIError:
    return APIError(429, message, code=code, headers={"Retry-After": str(retry_after_s)})


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None, str]:
    errors = exc.errors()
    if not errors:
        return "invalid request", None, "invalid_request"
    e = errors[0]
    if e.get("type") == "json_invalid":
        return f"malformed JSON body: {e.get('ctx', {}).get('error', e.get('msg'))}", None, "invalid_json"
    loc = [str(p) for p in e.get("loc", ()) if p not in ("body",)]
    param = ".".join(loc) or None
    if e.get("type") == "extra_forbidden":
        return f"unrecognized request argument supplied: {param}", param, "unknown_parameter"
    if e.get("type") == "missing":
        return f"missing required parameter: {param}", param, "missing_parameter"
    msg = str(e.get("msg", "invalid value"))
    return (f"invalid value for {param}: {msg}" if param else msg), param, "invalid_value"


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError):
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError):
        message, param, code = _validation_message(exc)
        return JSONResponse(error_body(message, "invalid_request_error", param, code), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException):
        status = exc.status_code
        message = exc.detail if isinstance(exc.detail, str) else "error"
        if status == 404 and message == "Not Found":
            message = "unknown endpoint"
        return JSONResponse(error_body(message, _TYPES.get(status, "invalid_request_error"), None, None),
                            status_code=status, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception):  # a bug, not bad input: logged without request data
        log.exception("unhandled error: %s", type(exc).__name__)
        return JSONResponse(error_body("internal server error", "server_error", None, "internal_error"),
                            status_code=500)
