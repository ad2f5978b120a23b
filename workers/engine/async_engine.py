"""AsyncLLMEngine: the step loop in a background thread; the event loop never blocks on the engine.

Requests and aborts go to the engine thread through an inbox; validation errors come back on a future,
so ``generate`` raises InvalidRequest / NoCapacity on its first ``__anext__``, before any token.
Outputs are pushed to per-request asyncio queues with ``call_soon_threadsafe``.
"""
from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from typing import Any, AsyncIterator

from workers.engine.params import EngineStats, RequestOutput, SamplingParams, SpecParams


class AsyncLLMEngine:
    def __init__(self, cfg_or_engine: Any, wedge_timeout_s: float = 120.0):
        from workers.engine.config import EngineConfig
        from workers.engine.llm_engine import LLMEngine

        self.engine = LLMEngine(cfg_or_engine) if isinstance(cfg_or_engine, EngineConfig) else cfg_or_engine
        self.tokenizer = self.engine.tokenizer
        self.max_model_len = self.engine.max_model_len
        self.eos_token_ids = self.engine.eos_token_ids
        self.wedge_timeout_s = wedge_timeout_s
        self._inbox: deque[tuple[str, tuple, Any]] = deque()
        self._queues: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._wake = threading.Event()
        self._stop = False
        self._error: BaseException | None = None
        self._last_progress = time.monotonic()
        self._busy_since: float | None = None
        self._stats: EngineStats = self.engine.stats()
        self._thread = threading.Thread(target=self._loop, name="specfleet-engine", daemon=True)
        self._thread.start()

    # ---- engine thread ----
    def _drain_inbox(self) -> None:
        while self._inbox:
            kind, args, fut = self._inbox.popleft()
            try:
                if kind == "add":
                    self.engine.add_request(*args)
                else:
                    self.engine.abort(*args)
                res, exc = True, None
            except Exception as e:  # typed validation errors go back to the caller
                res, exc = None, e
            if fut is not None:
                loop, f = fut
                loop.call_soon_threadsafe(_settle, f, res, exc)

    def _loop(self) -> None:
        try:
            while not self._stop:
                self._drain_inbox()
                if not self.engine.has_unfinished():
                    self._busy_since = None
                    self._wake.wait(0.5)
                    self._wake.clear()
                    continue
                if self._busy_since is None:
                    self._busy_since = self._last_progress = time.monotonic()
                outs = self.engine.step()
                self._last_progress = time.monotonic()
                self._stats = self.engine.stats()
                for o in outs:
                    self._deliver(o)
        except BaseException as exc:  # the loop is dead: fail every open stream
            self._error = exc
            for rid in list(self._queues):
                self._deliver(RequestOutput(rid, [], finished=True, finish_reason="error",
                                            error=f"engine loop died: {type(exc).__name__}: {exc}"))

    def _deliver(self, out: RequestOutput) -> None:
        entry = self._queues.get(out.request_id)
        if entry is not None:
            loop, q = entry
            try:
                loop.call_soon_threadsafe(q.put_nowait, out)
            except RuntimeError:  # the caller's loop is closed
                self._queues.pop(out.request_id, None)

    def _submit(self, kind: str, args: tuple, loop: asyncio.AbstractEventLoop) -> asyncio.Future:
        fut = loop.create_future()
        self._inbox.append((kind, args, (loop, fut)))
        self._wake.set()
        return fut

    # ---- public API ----
    async def generate(self, request_id: str, prompt_token_ids: list[int], sampling: SamplingParams,
                       spec: SpecParams | None = None, tags: dict[str, Any] | None = None
                       ) -> AsyncIterator[RequestOutput]:
        if self._error is not None or not self._thread.is_alive():
            raise RuntimeError(f"engine loop is not running: {self._error!r}")
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        if request_id in self._queues:
            from workers.engine.params import InvalidRequest

            raise InvalidRequest(f"request id {request_id!r} is already running")
        self._queues[request_id] = (loop, q)
        finished = False
        try:
            if getattr(sampling, "structured", None) is not None:  # compile off the engine thread (cached)
                await asyncio.to_thread(self._compile, sampling.structured)
            await self._submit("add", (request_id, prompt_token_ids, sampling, spec, tags), loop)
            while True:
                out: RequestOutput = await q.get()
                finished = out.finished
                yield out
                if finished:
                    return
        finally:
            self._queues.pop(request_id, None)
            if not finished:  # consumer went away (disconnect / cancel) or validation failed
                self._inbox.append(("abort", (request_id,), None))
                self._wake.set()

    def _compile(self, spec) -> None:
        from workers.engine.params import StructuredSpec

        if not isinstance(spec, StructuredSpec):
            return  # validation on the engine thread reports it
        self.engine.structured_for(spec).compiler.compile(spec)

    async def abort(self, request_id: str) -> None:
        await self._submit("abort", (request_id,), asyncio.get_running_loop())

    def stats(self) -> EngineStats:
        return self._stats

    def check_health(self) -> None:
        if self._error is not None:
            raise RuntimeError(f"engine loop died: {type(self._error).__name__}: {self._error}")
        if not self._thread.is_alive():
            raise RuntimeError("engine loop thread is not running")
        busy = self._busy_since is not None
        if busy and time.monotonic() - self._last_progress > self.wedge_timeout_s:
            raise RuntimeError(f"engine wedged: no step finished in {self.wedge_timeout_s:.0f} s with work pending")

    async def shutdown(self) -> None:
        self._stop = True
        self._wake.set()
        await asyncio.to_thread(self._thread.join, 30)


def _settle(fut: asyncio.Future, res: Any, exc: BaseException | None) -> None:
    if fut.done():
        return
    if exc is not None:
        fut.set_exception(exc)
    else:
        fut.set_result(res)
