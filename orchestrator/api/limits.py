"""Request limits: a body-size cap (413) enforced before the body is parsed, and per-key concurrency with a
bounded wait queue (429 + Retry-After)."""
from __future__ import annotations

import asyncio
from collections import defaultdict

from orchestrator.api.errors import too_many
from orchestrator.api.middleware import reply_error


class BodySizeLimit:
    """ASGI middleware: reject bodies over `max_bytes` (by Content-Length or while streaming in) with 413."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("method") in ("GET", "HEAD", "OPTIONS", "DELETE"):
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None:
            try:
                too_big = int(declared) > self.max_bytes
            except ValueError:
                return await reply_error(send, 400, "invalid Content-Length header", param="content-length",
                                         code="invalid_header")
            if too_big:
                return await self._reject(send)
        chunks, total, more = [], 0, True
        while more:  # read the whole (bounded) body first, then replay it to the app
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            total += len(chunk)
            if total > self.max_bytes:
                return await self._reject(send)
            chunks.append(chunk)
            more = message.get("more_body", False)
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)

    async def _reject(self, send):
        await reply_error(send, 413, f"request body exceeds the limit of {self.max_bytes} bytes",
                          code="request_too_large")


class KeyGate:
    """Per-key concurrency: up to `concurrency` requests run, up to `queue` wait (each at most `timeout_s`)."""

    def __init__(self, concurrency: int, queue: int, timeout_s: float, retry_after_s: int):
        self.concurrency, self.queue, self.timeout_s, self.retry_after_s = concurrency, queue, timeout_s, retry_after_s
        self._sems: dict[str, asyncio.Semaphore] = defaultdict(lambda: asyncio.Semaphore(self.concurrency))
        self._waiting: dict[str, int] = defaultdict(int)

    @property
    def waiting(self) -> int:
        return sum(self._waiting.values())

    async def acquire(self, owner: str) -> None:
        sem = self._sems[owner]
        if sem.locked():
            if self._waiting[owner] >= self.queue:
                raise too_many(f"too many concurrent requests for this API key ({self.concurrency} running, "
                               f"{self.queue} queued)", self.retry_after_s)
            self._waiting[owner] += 1
            try:
                await asyncio.wait_for(sem.acquire(), self.timeout_s)
            except asyncio.TimeoutError:
                raise too_many(f"request waited {self.timeout_s:g} s for a slot of this API key",
                               self.retry_after_s) from None
            finally:
                self._waiting[owner] -= 1
        else:
            await sem.acquire()

    def release(self, owner: str) -> None:
        self._sems[owner].release()
