"""Baseline routers for comparisons: Serve's power-of-two choices and session-hash affinity.

As Ray Serve request routers they write a ``RouteDecision`` with their reason into the call's ``route=``
kwarg, as SpecfleetRouter does, so the response headers and metrics work under every policy.
``hash_order`` is also what the goodput simulator (benchmarks/simulator.py) uses for its hash baseline.
"""
from __future__ import annotations

import hashlib
import random
from typing import Any

from orchestrator import fleet as _fleet
from orchestrator.routing import decisions as _dec

try:
    from ray.serve._private.request_router.pow_2_router import PowerOfTwoChoicesRequestRouter
    from ray.serve.request_router import RequestRouter
except ImportError:  # pragma: no cover
    PowerOfTwoChoicesRequestRouter = RequestRouter = object  # type: ignore[misc,assignment]


def hash_order(key: str, replica_ids: list[str]) -> list[str]:
    """Rendezvous (highest-random-weight) hashing: a stable preference order per key.

    Removing a replica only moves the keys that lived on it, as with a consistent-hash ring."""
    def weight(rid: str) -> int:
        return int.from_bytes(hashlib.blake2b(f"{key}|{rid}".encode(), digest_size=8).digest(), "big")

    return sorted(replica_ids, key=weight, reverse=True)


def _record(pending_request: Any, reason: str) -> None:
    """The policy's decision (no replica named: the one Serve picks is where it lands) into the kwargs."""
    if pending_request is not None and _dec.ROUTE_KWARG in pending_request.kwargs:
        hints = pending_request.kwargs[_dec.ROUTE_KWARG] or {}
        pending_request.kwargs[_dec.ROUTE_KWARG] = _dec.with_decision(hints, _dec.RouteDecision(None, reason))


def _hints(pending_request: Any) -> dict:
    return (pending_request.kwargs.get(_dec.ROUTE_KWARG) if pending_request is not None else None) or {}


class Pow2Router(PowerOfTwoChoicesRequestRouter):
    """Serve's default router, unchanged, plus the decision record for the response headers (and the
    replicas the ingress asks to avoid left out)."""

    def initialize_state(self, **kwargs):
        super().initialize_state(**kwargs)
        _fleet.ROUTERS.attach(self)

    async def choose_replicas(self, candidate_replicas, pending_request=None):
        _record(pending_request, "pow2")
        candidate_replicas = _dec.without_avoided(candidate_replicas, _hints(pending_request))
        return await super().choose_replicas(candidate_replicas, pending_request)

    def on_request_routed(self, pending_request, replica_id, result) -> None:
        _dec.record_dispatch(pending_request, replica_id)


class SessionHashRouter(RequestRouter):
    """Session affinity by rendezvous hashing on the session id (x-session-id); the hash order is
    the rank order, so a full home replica spills to the session's next replica."""

    def initialize_state(self, **kwargs):
        super().initialize_state(**kwargs)
        _fleet.ROUTERS.attach(self)

    async def choose_replicas(self, candidate_replicas, pending_request=None):
        if pending_request is not None:
            pending_request.routing_context.should_backoff = True
        if not candidate_replicas:
            return []
        route = _hints(pending_request)
        candidate_replicas = _dec.without_avoided(candidate_replicas, route)
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        sid = route.get("session_id") or (pending_request.metadata.session_id if pending_request else None)
        if not sid:  # no session: plain random order
            ids = list(by_id)
            random.shuffle(ids)
            _record(pending_request, "random")
            return [[by_id[i]] for i in ids]
        _record(pending_request, "session-hash")
        return [[by_id[i]] for i in hash_order(sid, list(by_id))]

    def on_request_routed(self, pending_request, replica_id, result) -> None:
        _dec.record_dispatch(pending_request, replica_id)


ROUTER_CLASSES = {
    "specfleet": "orchestrator.routing.router.SpecfleetRouter",
    "pow2": "orchestrator.routing.baselines.Pow2Router",
    "consistent_hash": "orchestrator.routing.baselines.SessionHashRouter",
}
