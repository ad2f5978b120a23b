"""ASGI middleware at the HTTP edge, before any route runs:

- `HeaderGuard`: the headers specfleet and Ray Serve's proxy read as text (x-session-id, x-request-id, ...) must be
  UTF-8: anything else is a 400 naming the header. Ray Serve 2.60's HTTP proxy decodes x-request-id and
  x-session-id with `bytes.decode()` before any application code runs and answers a 500 on a byte such as 0xff;
  the same class runs inside that proxy (`proxy_middlewares`, loaded through Serve's
  RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH hook, set by `specfleet serve`), so the 400 comes first there too.
  docs/reliability.md has the details and the upstream bug report.
- `CountResponses`: specfleet_requests_total{endpoint, status} for every response, whatever answered it (a 413
  from the body limit, a 400 from validation, a 429 from admission, a 500), by HTTP status code.
"""
from __future__ import annotations

import json
from typing import Any

from orchestrator.api.errors import error_body

# request headers read as text: ours, and the ones Ray Serve's proxy decodes (its names normalise - and _)
TEXT_HEADERS = (b"x-session-id", b"x-request-id", b"x-agent-role", b"x-team-id", b"authorization",
                b"serve_multiplexed_model_id", b"serve-multiplexed-model-id")


def bad_header(headers: list[tuple[bytes, bytes]]) -> str | None:
    """The name of the first text header whose value is not valid UTF-8, or None."""
    for name, value in headers:
        if name.lower() in TEXT_HEADERS:
            try:
                value.decode("utf-8")
            except UnicodeDecodeError:
                return name.decode("latin-1").lower()
    return None


async def reply_error(send, status: int, message: str, param: str | None = None, code: str | None = None,
                      type: str = "invalid_request_error") -> None:
    data = json.dumps(error_body(message, type, param, code)).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]})
    await send({"type": "http.response.body", "body": data})


class HeaderGuard:
    """400 for a request whose text headers are not UTF-8 (see the module docstring)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            name = bad_header(scope.get("headers") or [])
            if name is not None:
                return await reply_error(send, 400, f"the {name} header is not valid UTF-8", param=name,
                                         code="invalid_header")
        return await self.app(scope, receive, send)


def proxy_middlewares() -> list[Any]:
    """Ray Serve's HTTP proxy callback (RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=
    orchestrator.api.middleware:proxy_middlewares): the header check runs before the proxy decodes headers."""
    from starlette.middleware import Middleware

    return [Middleware(HeaderGuard)]


def endpoint_of(path: str) -> str:
    """A bounded label for a request path (no ids: session and team ids stay out of the metrics)."""
    for prefix, name in (("/v1/chat/completions", "chat"), ("/v1/completions", "completions"),
                         ("/v1/models", "models"), ("/v1/sessions", "sessions"), ("/v1/teams", "teams"),
                         ("/health", "health"), ("/metrics", "metrics")):
        if path == prefix or path.startswith(prefix + "/"):
            return name
    return "other"


class CountResponses:
    """specfleet_requests_total{endpoint, status}: one count per response, by HTTP status code."""

    def __init__(self, app, counter):
        self.app, self.counter = app, counter

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status: list[int] = []

        async def counted(message):
            if message["type"] == "http.response.start":
                status.append(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, counted)
        except BaseException:
            if not status:  # Starlette's outer ServerErrorMiddleware turns it into a 500
                status.append(500)
            raise
        finally:
            if status:
                self.counter.labels(endpoint_of(scope.get("path", "")), str(status[0])).inc()
