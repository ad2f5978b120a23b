"""One generation turn: per-key slot -> replica stream -> items, with the turn recorded in the session
registry whatever happens (finished, failed, or the client gone).

Admission errors become HTTP errors before any byte is sent (400 / 429 + Retry-After / 503); the queue timeout
covers the wait for a replica to accept the request, never the prefill; a replica
that fails before its first item is retried (a request that produced nothing is safe to resend); a
failure after tokens were sent ends the stream with an error event.
"""
from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any, AsyncIterator

from orchestrator.api.errors import APIError, too_many
from orchestrator.api.state import ServerState
from orchestrator.api.tool_parser import parse_tool_calls
from orchestrator.replica import ErrorKind
from orchestrator.routing.decisions import DISPATCHES, RouteDecision, route_hints
from workers.engine.params import SpecParams

log = logging.getLogger("specfleet.api")
ATTEMPTS = 3
DISPATCH_POLL_S = 0.25  # how often a request waiting for a replica looks whether one accepted it


@dataclass
class TurnRequest:
    owner: str
    endpoint: str
    prompt_token_ids: list[int]
    sampling: dict
    spec: dict | None
    session: dict | None  # registry row (without history) or None
    tags: dict[str, str]
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    constrained: str | None = None  # grammar kind of a structured-output / tool turn
    tool_names: frozenset[str] = frozenset()  # tools whose calls are parsed from the output (counted)
    client_request_id: str | None = None  # the client's x-request-id (echoed); request_id stays ours (unique)


@dataclass
class TurnResult:
    replica: str | None = None
    route: str | None = None
    spec: dict | None = None
    text: list[str] = field(default_factory=list)
    completion_tokens: int = 0
    target_passes: int = 0
    finish_reason: str | None = None
    error: str | None = None
    tool_calls: int = 0  # complete tool calls in the output (counted when the turn closes)


class Turn:
    def __init__(self, state: ServerState, req: TurnRequest):
        self.state, self.req = state, req
        self.result = TurnResult()
        self._gen: Any = None
        self._first: dict | None = None
        self._t0 = time.monotonic()
        self._t_first: float | None = None
        self._slot = False
        self._closed = False

    @property
    def session_id(self) -> str | None:
        return self.req.session["id"] if self.req.session else None

    async def start(self) -> None:
        """Acquire a per-key slot, reach a replica, wait for admission. Raises APIError."""
        st = self.state
        if st.draining:
            raise APIError(503, "server is shutting down", code="shutting_down",
                           headers={"Retry-After": str(st.cfg.limits.retry_after_s)})
        st.metrics.queue_depth.set(st.gate.waiting + 1)
        try:
            await st.gate.acquire(self.req.owner)
        finally:
            st.metrics.queue_depth.set(st.gate.waiting)
        try:
            self._check_fleet()  # no await between this check and the in_flight increment
        except APIError:
            st.gate.release(self.req.owner)
            raise
        self._slot = True
        st.in_flight += 1
        st.metrics.in_flight.set(st.in_flight)
        try:
            await self._admit()
        except BaseException:
            await self.close()
            raise

    def _check_fleet(self) -> None:
        """Refuse (429 + Retry-After) when the live replicas are full rather than pile requests onto them:
        after a node is lost the survivors keep their own capacity, not the fleet's."""
        st = self.state
        limit = st.fleet.admission_limit()
        if limit is None or st.in_flight < limit:
            return
        v = st.fleet.view()
        retry = str(st.cfg.limits.retry_after_s)
        lost = f", {len(v.lost_nodes)} node(s) lost" if v.lost_nodes else ""
        if not v.live:
            st.metrics.refused.labels("no_replica").inc()
            raise APIError(503, f"no replica available: 0 of {v.expected_replicas} replicas live{lost}",
                           code="replica_unavailable", headers={"Retry-After": retry})
        st.metrics.refused.labels("fleet_capacity").inc()
        raise too_many(f"the fleet is at capacity: {st.in_flight} requests in flight, {limit} slots on "
                       f"{len(v.live)} of {v.expected_replicas} live replicas{lost}; retry later",
                       st.cfg.limits.retry_after_s, code="fleet_at_capacity")

    async def _admit(self) -> None:
        st, lim = self.state, self.state.cfg.limits
        n_prompt = len(self.req.prompt_token_ids)
        spec = SpecParams(**self.req.spec) if self.req.spec else None
        if spec is not None and not spec.block_size:
            spec.block_size = st.cfg.model.block_size
        route = route_hints(
            self.req.request_id, session_id=self.session_id, role=self.req.tags.get("role"),
            team=self.req.tags.get("team"), prompt_tokens=n_prompt, max_tokens=self.req.sampling["max_tokens"],
            prefix_tokens=min(st.context_len.get(self.session_id or "", 0), n_prompt), spec=spec,
            spec_off_turns=st.spec_off_turns.get(self.session_id or "", 0))
        kwargs = dict(request_id=self.req.request_id, prompt_token_ids=self.req.prompt_token_ids,
                      sampling=self.req.sampling, tags=self.req.tags)
        last_exc: BaseException | None = None
        for attempt in range(ATTEMPTS):
            route["avoid"] = st.fleet.avoid()  # replicas that just failed (a lost node): routed around
            gen = st.backend.stream(self.session_id, dict(kwargs, route=dict(route)))
            try:
                first = await self._first_item(gen, lim.queue_timeout_s)
            except asyncio.TimeoutError:
                await _cancel(gen)
                raise too_many(f"no replica accepted this request within {lim.queue_timeout_s:g} s (all busy)",
                               lim.retry_after_s, code="no_capacity") from None
            except StopAsyncIteration:
                last_exc = RuntimeError("replica ended the stream without a result")
                continue
            except Exception as exc:  # replica died / unreachable before producing anything: retry
                last_exc = exc
                st.fleet.mark_failed(DISPATCHES.pop(self.req.request_id))
                log.warning("replica failed before admission (attempt %d): %s", attempt + 1, type(exc).__name__)
                await asyncio.sleep(0.2 * (attempt + 1))
                continue
            if first.get("type") == "error":
                await _cancel(gen)
                kind, msg = first.get("kind"), first.get("message", "")
                if kind == ErrorKind.INVALID:
                    raise APIError(400, msg, code="invalid_request", param=first.get("param"))
                if kind == ErrorKind.NO_CAPACITY:
                    raise too_many(msg, lim.retry_after_s, code="no_capacity")
                raise APIError(503, f"replica error: {msg}", code="engine_error",
                               headers={"Retry-After": str(lim.retry_after_s)})
            DISPATCHES.pop(self.req.request_id)  # answered: the replica says where it runs
            self._gen, self._first = gen, first
            res = self.result
            decision = RouteDecision.from_dict(first.get("decision") or {})  # as it landed on the replica
            res.replica, res.route = first.get("replica"), decision.reason
            res.spec = asdict(decision.spec) if decision.spec is not None else None
            st.metrics.route(res.replica or "?", res.route or "?", res.spec)
            return
        raise APIError(503, f"no replica available: {type(last_exc).__name__}: {last_exc}", code="replica_unavailable",
                       headers={"Retry-After": str(lim.retry_after_s)})

    async def _first_item(self, gen: Any, timeout_s: float) -> dict:
        """The replica's first item. `timeout_s` (limits.queue_timeout_s) bounds the wait for admission only:
        until a replica accepts the call (Serve queues it while every replica is at max_ongoing_requests; the
        router notes the dispatch). From then on the engine admits or refuses at once, and the prefill of a long
        prompt (seconds to minutes on a CPU) runs as long as it takes: a retry could not make it shorter."""
        loop = asyncio.get_running_loop()
        task = asyncio.ensure_future(gen.__anext__())
        deadline = loop.time() + timeout_s
        try:
            while True:
                if _dispatched(self.req.request_id):
                    return await task
                left = deadline - loop.time()
                if left <= 0:
                    raise asyncio.TimeoutError
                done, _ = await asyncio.wait({task}, timeout=min(DISPATCH_POLL_S, left))
                if done:
                    return task.result()
        except BaseException:
            task.cancel()
            raise

    async def items(self) -> AsyncIterator[dict]:
        """Delta items until the end; a mid-stream failure yields {"type": "error", "kind", "message"} last."""
        st, res = self.state, self.result
        try:
            while True:
                try:
                    item = await self._gen.__anext__()
                except StopAsyncIteration:
                    if res.finish_reason is None:
                        yield self._failed(ErrorKind.STREAM_ENDED, "replica ended the stream early")
                    return
                except Exception as exc:
                    st.fleet.mark_failed(res.replica)  # its node may be gone: route around it at once
                    item = self._failed(ErrorKind.REPLICA_FAILED, f"replica failed mid-stream: {type(exc).__name__}")
                    log.warning("%s (request %s)", res.error, self.req.request_id)
                    yield item
                    return
                kind = item.get("type")
                if kind == "delta":
                    if self._t_first is None:
                        self._t_first = time.monotonic()
                        st.metrics.ttft.labels(self.req.endpoint).observe(self._t_first - self._t0)
                    n = len(item.get("token_ids") or [])
                    res.completion_tokens += n
                    res.target_passes += len(item.get("committed") or []) or (1 if n else 0)  # counted here, once
                    res.text.append(item.get("text") or "")
                    st.metrics.delta(res.replica or "?", n, item.get("committed") or [])
                    if self.req.constrained:
                        for a in item.get("committed") or []:
                            st.metrics.constrained_accepted_length.labels(self.req.constrained).observe(a)
                    yield item
                elif kind == "end":
                    res.finish_reason = item.get("finish_reason") or "stop"
                    st.metrics.headroom(item.get("stats"))
                    if self._t_first is not None:
                        st.metrics.finished(res.replica or "?", res.completion_tokens,
                                            time.monotonic() - self._t_first)
                    return
                elif kind == "error":
                    yield self._failed(ErrorKind(item.get("kind") or ErrorKind.ENGINE), item.get("message") or "engine error")
                    return
        finally:
            await self.close()

    def _failed(self, kind: ErrorKind, message: str) -> dict:
        self.result.error = message
        return {"type": "error", "kind": kind.value, "message": message}

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        st, res = self.state, self.result
        if self._gen is not None and res.finish_reason is None:
            await _cancel(self._gen)
        if self._slot:
            st.gate.release(self.req.owner)
            st.in_flight -= 1
            st.metrics.in_flight.set(st.in_flight)
        if res.finish_reason and self.req.tool_names:
            res.tool_calls = len(parse_tool_calls("".join(res.text), set(self.req.tool_names))[1])
            st.metrics.tool_calls.inc(res.tool_calls)
        if res.finish_reason and self.req.constrained:
            st.metrics.constrained_turns.labels(self.req.constrained).inc()
        outcome = "ok" if res.finish_reason else ("error" if res.error else "aborted")
        st.metrics.latency.labels(self.req.endpoint).observe(time.monotonic() - self._t0)
        st.metrics.turns.labels(self.req.endpoint, outcome).inc()
        sid = self.session_id
        if sid and res.replica is not None:
            st.context_len[sid] = len(self.req.prompt_token_ids) + res.completion_tokens
            steered_off = self.req.spec is None and not (res.spec or {}).get("enabled", True)
            st.spec_off_turns[sid] = st.spec_off_turns.get(sid, 0) + 1 if steered_off else 0
            try:
                st.registry.record_turn(
                    sid, replica=res.replica, route=res.route, spec=res.spec,
                    prompt_tokens=len(self.req.prompt_token_ids), completion_tokens=res.completion_tokens,
                    target_passes=res.target_passes, finish_reason=res.finish_reason or ("error" if res.error else "abort"),
                    constrained=self.req.constrained, tool_calls=res.tool_calls)
            except Exception:
                log.exception("could not record a turn of session %s", sid)


def _dispatched(request_id: str) -> bool:
    """Whether a replica accepted the call (the router's dispatch note is read, and left for the ingress)."""
    replica = DISPATCHES.pop(request_id)
    if replica is not None:
        DISPATCHES.record(request_id, replica)
    return replica is not None


async def _cancel(gen: Any) -> None:
    try:
        if hasattr(gen, "cancel"):
            gen.cancel()  # Serve DeploymentResponseGenerator
        elif hasattr(gen, "aclose"):
            await gen.aclose()
    except Exception:
        pass
