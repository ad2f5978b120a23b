"""Baseline routers for comparisons: Serve's power-of-two choices and session-hash affinity.

Both exist twice: as Ray Serve request routers (recording their decision in the same registry as
SpecfleetRouter, so the ingress headers work under every policy) and as pure functions the
goodput simulator (benchmarks/simulator.py) uses.
"""
from __future__ import annotations

import hashlib
import random
from typing import Any

from orchestrator import fleet as _fleet
from orchestrator.routing import decisions as _dec
from orchestrator.routing.stats import RoutingStats

try:
    from ray.serve._private.request_router.pow_2_router import PowerOfTwoChoicesRequestRouter
    from ray.serve.request_router import RequestRouter
except ImportError:  # pragma: no cover
    PowerOfTwoChoicesRequestRouter = RequestRouter = object  # type: ignore[misc,assignment]


# ------------------------------------------------------------------ pure versions
def hash_order(key: str, replica_ids: list[str]) -> list[str]:
    """Rendezvous (highest-random-weight) hashing: a stable preference order per key.

    Removing a replica only moves the keys that lived on it, as with a consistent-hash ring."""
    def weight(rid: str) -> int:
        return int.from_bytes(hashlib.blake2b(f"{key}|{rid}".encode(), digest_size=8).digest(), "big")

    return sorted(replica_ids, key=weight, reverse=True)


def pow2_choose(replicas: list[RoutingStats], rng: random.Random, max_ongoing: int) -> RoutingStats | None:
    """Two random replicas, the one with the shorter queue (running + waiting); None if both full."""
    open_ = [r for r in replicas if r.num_running + r.num_waiting < max_ongoing]
    if not open_:
        return None
    pick = rng.sample(open_, k=min(2, len(open_)))
    return min(pick, key=lambda r: r.num_running + r.num_waiting)


def hash_choose(session_id: str | None, replicas: list[RoutingStats], rng: random.Random,
                max_ongoing: int) -> RoutingStats | None:
    """The session's home replica; the next one in its hash order when the home is full."""
    if not session_id:
        return pow2_choose(replicas, rng, max_ongoing)
    by_id = {r.replica_id: r for r in replicas}
    for rid in hash_order(session_id, list(by_id)):
        r = by_id[rid]
        if r.num_running + r.num_waiting < max_ongoing:
            return r
    return None


# ------------------------------------------------------------------ Serve routers
def _record(pending_request: Any, reason: str, uid: str | None = None) -> None:
    route = pending_request.kwargs.get(_dec.ROUTE_KWARG) if pending_request is not None else None
    if isinstance(route, dict) and route.get("request_id"):
        if uid is None:
            _dec.DECISIONS.put(route["request_id"], {"replica": None, "reason": reason, "spec": None,
                                                "score": 0.0, "tau_hat": 0.0, "by_replica": {}})
        else:
            _dec.DECISIONS.update(route["request_id"], replica=uid)


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
        _record(pending_request, "pow2", replica_id.unique_id)


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
        _record(pending_request, "session-hash", replica_id.unique_id)


ROUTER_CLASSES = {
    "specfleet": "orchestrator.routing.router.SpecfleetRouter",
    "pow2": "orchestrator.routing.baselines.Pow2Router",
    "consistent_hash": "orchestrator.routing.baselines.SessionHashRouter",
}
