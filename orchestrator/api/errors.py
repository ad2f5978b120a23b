"""OpenAI-style errors: `{"error": {"message", "type", "param", "code"}}` for every failure, never a bare 500
for bad input (malformed JSON, schema violations, unknown routes and methods included)."""
from __future__ import annotations

import json
import logging
import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

log = logging.getLogger("specfleet.api")

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "not_found_error", 405: "invalid_request_error", 413: "invalid_request_error",
          422: "invalid_request_error", 429: "rate_limit_error", 500: "server_error", 503: "service_unavailable"}


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = Field(None, description="the request field (dotted path) or header at fault")
    code: str | None = None


class ErrorBody(BaseModel):
    """Every error the API returns, whatever its status."""

    error: ErrorDetail


# what each status means on this API (the OpenAPI responses of every operation point here)
_STATUS_DOC = {
    400: "invalid request: malformed JSON, a wrong type, an unknown or unsupported argument, invalid Unicode, a "
         "header that is not UTF-8, a prompt over the context",
    401: "missing or unknown API key (only when keys are configured; WWW-Authenticate: Bearer)",
    404: "unknown model, session (or another key's) or team",
    413: "request body over limits.max_body_bytes",
    429: "per-key concurrency / queue full, fleet or KV capacity exhausted, session quota (Retry-After)",
    503: "draining for shutdown, no replica reachable, engine failure before any token (Retry-After)",
}
_HEADERS_DOC = {
    401: {"WWW-Authenticate": {"schema": {"type": "string"}, "description": "Bearer"}},
    429: {"Retry-After": {"schema": {"type": "integer"}, "description": "seconds"}},
    503: {"Retry-After": {"schema": {"type": "integer"}, "description": "seconds"}},
}


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` for a route: the error statuses it can answer, each with the error body."""
    out: dict[int | str, dict[str, Any]] = {}
    for s in statuses:
        out[s] = {"model": ErrorBody, "description": _STATUS_DOC[s]}
        if s in _HEADERS_DOC:
            out[s]["headers"] = _HEADERS_DOC[s]
    return out


class ErrorJSONResponse(JSONResponse):
    """An error body as ASCII JSON: a message that quotes the client's text can never fail to encode."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, separators=(",", ":")).encode("ascii")


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


_ROLES = ("system", "developer", "user", "assistant", "tool")
_UNION_MEMBER = re.compile(r"^([a-z_-]+\[.*\]|str|int|float|bool|none)$")  # pydantic names union members in loc


def _where(loc: tuple) -> tuple[str | None, str | None]:
    """(dotted parameter path, role of the chat message it is in) from a pydantic error location."""
    parts, role = [], None
    for i, p in enumerate(loc):
        if i == 0 and p in ("body", "header", "query", "path"):
            continue
        if isinstance(p, str) and p in _ROLES and len(parts) >= 2 and parts[-2] == "messages" and \
                isinstance(loc[i - 1], int):
            role = p  # the discriminator tag of a typed message, not a field
            continue
        if isinstance(p, str) and _UNION_MEMBER.match(p):
            continue
        parts.append(str(p))
    return ".".join(parts) or None, role


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None, str]:
    errors = exc.errors()
    if not errors:
        return "invalid request", None, "invalid_request"
    e = errors[0]
    kind, ctx = e.get("type"), e.get("ctx") or {}
    if kind == "json_invalid":
        return f"malformed JSON body: {ctx.get('error', e.get('msg'))}", None, "invalid_json"
    if kind == "invalid_unicode":
        return str(e.get("msg")), ctx.get("where"), "invalid_unicode"
    param, role = _where(tuple(e.get("loc", ())))
    if param is None and tuple(e.get("loc", ())) == ("body",):
        if kind == "missing":
            return "the request body is empty: send a JSON object", None, "missing_body"
        return "the request body must be a JSON object", None, "invalid_body"
    field = param.rsplit(".", 1)[-1] if param else None
    if kind == "extra_forbidden":
        if role:
            return f"{field} is not valid on a {role} message ({param})", param, "unknown_parameter"
        return f"unrecognized request argument supplied: {param}", param, "unknown_parameter"
    if kind == "missing":
        where = f" (required on {role} messages)" if role else ""
        return f"missing required parameter: {param}{where}", param, "missing_parameter"
    msg = str(e.get("msg", "invalid value")).removeprefix("Value error, ")
    return (f"invalid value for {param}: {msg}" if param else msg), param, "invalid_value"


def _leaf_routes(routes: list[Any]) -> list[Any]:
    out = []
    for route in routes:
        inner = getattr(getattr(route, "original_router", None), "routes", None)  # FastAPI's included router
        out += _leaf_routes(inner) if inner is not None else [route]
    return out


def allowed_methods(app: Any, scope: dict) -> list[str]:
    """Every method some route of `app` serves at this path (the Allow header of a 405)."""
    methods: set[str] = set()
    probe = {"type": "http", "path": scope.get("path", ""), "root_path": scope.get("root_path", ""),
             "method": "GET", "headers": []}
    for route in _leaf_routes(app.routes):
        if not hasattr(route, "matches") or not getattr(route, "methods", None):
            continue
        match, _ = route.matches(dict(probe))
        if match != Match.NONE:
            methods |= set(route.methods)
    return sorted(methods)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError):
        return ErrorJSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError):
        message, param, code = _validation_message(exc)
        return ErrorJSONResponse(error_body(message, "invalid_request_error", param, code), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        status = exc.status_code
        message = exc.detail if isinstance(exc.detail, str) else "error"
        headers = dict(getattr(exc, "headers", None) or {})
        if status == 404 and message == "Not Found":
            message = "unknown endpoint"
        if status == 405:  # Starlette names the methods of the first route that matched the path only
            allow = allowed_methods(request.app, request.scope)
            headers["Allow"] = ", ".join(allow)
            message = f"method {request.method} is not allowed here; allowed: {', '.join(allow)}"
        return ErrorJSONResponse(error_body(message, _TYPES.get(status, "invalid_request_error"), None, None),
                                 status_code=status, headers=headers or None)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception):  # a bug, not bad input: logged without request data
        log.exception("unhandled error: %s", type(exc).__name__)
        return ErrorJSONResponse(error_body("internal server error", "server_error", None, "internal_error"),
                                 status_code=500)
