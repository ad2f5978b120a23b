"""Ray Serve request router that places each request by predicted goodput (orchestrator.routing.score).

Contract with the ingress and the replica deployment (orchestrator/routing/decisions.py, docs/routing.md):

* The ingress calls the replica deployment with a ``route=`` keyword argument built by
  ``route_hints(...)`` through ``handle.options(session_id=sid)``.
* ``SpecfleetRouter`` (one instance per caller process, i.e. in the ingress) ranks the replicas
  with ``score.rank`` on the routing stats each replica reports (``record_routing_stats`` returns
  ``RoutingStats.to_dict()``), corrected for requests it sent since those stats were measured.
  It returns singleton ranks, best first, so Serve spills to the next replica only when the best
  one is at ``max_ongoing_requests``.
* Its ``RouteDecision`` (best replica, reason, SpecParams, prediction, and the SpecParams chosen for
  every other ranked replica) travels in the call's kwargs as ``route["decision"]`` (Serve sends
  ``pending_request.kwargs`` after ``choose_replicas`` returns; verified by tests/cpu/test_router.py);
  the replica lands it (``decisions.land``) and reports it back in its first stream item.
* When no replica has KV headroom the request goes to the replica with the most free KV with
  reason ``no-headroom``; the engine's admission then raises NoCapacity (HTTP 429), never OOM.
"""
from __future__ import annotations

import random
import time
from typing import Any

from orchestrator import fleet as _fleet
from orchestrator.routing import decisions as _dec
from orchestrator.routing.score import RouterWeights, rank
from orchestrator.routing.stats import RoutingStats

try:  # keep the module importable where Serve is absent
    from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica
except ImportError:  # pragma: no cover
    RequestRouter = object  # type: ignore[misc,assignment]
    PendingRequest = RunningReplica = Any  # type: ignore[misc,assignment]


class SpecfleetRouter(RequestRouter):
    """Goodput router: measured acceptance per session/role/team, KV headroom, affinity, exploration."""

    def initialize_state(
        self, weights: dict[str, Any] | None = None, seed: int | None = None, stats_grace_s: float = 0.5, **_: Any
    ):
        self._weights = RouterWeights(**(weights or {}))
        self._rng = random.Random(seed)
        # requests sent since the replica's last stats: uid -> {internal id: (t_sent, kv_tokens)}
        self._inflight: dict[str, dict[str, tuple[float, int]]] = {}
        self._grace_s = float(stats_grace_s)  # a request sent this long before a stats sample may
        # not be admitted yet when the replica measured: keep counting it (conservative)
        _fleet.ROUTERS.attach(self)  # the ingress reads the replica set (node, capacity) from here

    def _corrected(self, replica: Any) -> RoutingStats:
        s = _dec.stats_of(replica)
        mine = self._inflight.get(s.replica_id, {})
        for iid in [i for i, (t, _) in mine.items() if t < time.time() - 600.0]:
            mine.pop(iid, None)  # completion lost: stop counting it after 10 minutes
        s.add_inflight([need for t, need in mine.values() if t >= s.updated_at - self._grace_s])
        return s

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        if pending_request is not None:
            pending_request.routing_context.should_backoff = True  # never spin the caller's loop
        if not candidate_replicas:
            return []
        if not hasattr(self, "_weights"):
            self.initialize_state()
        hints = (pending_request.kwargs.get(_dec.ROUTE_KWARG) if pending_request is not None else None) or {}
        if pending_request is not None and not hints and pending_request.metadata.session_id:
            hints = {"session_id": pending_request.metadata.session_id}
        candidate_replicas = _dec.without_avoided(candidate_replicas, hints)
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        req = _dec.route_request_from_hints(hints)
        stats = [self._corrected(r) for r in candidate_replicas]
        choices = _dec.order_with_shuffled_ties(rank(req, stats, self._weights), self._rng)
        if choices:
            ordered = [c.replica_id for c in choices]
        else:  # nobody has headroom: most free KV first, the engine's admission answers 429
            ordered = [s.replica_id for s in sorted(stats, key=lambda s: -s.kv_free_tokens)]
        decision = _dec.RouteDecision.from_choices(choices, ordered)
        if pending_request is not None:
            # count it on the best replica now: concurrent requests routed before this one is sent
            # must see it (on_request_routed moves it to the replica Serve actually used)
            need = req.prompt_tokens + req.max_tokens
            iid = pending_request.metadata.internal_request_id
            for mine in self._inflight.values():
                mine.pop(iid, None)
            if choices:
                self._inflight.setdefault(ordered[0], {})[iid] = (time.time(), need)
            if _dec.ROUTE_KWARG in pending_request.kwargs:
                pending_request.kwargs[_dec.ROUTE_KWARG] = _dec.with_decision(hints, decision)
        return [[by_id[rid]] for rid in ordered]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: Any, result: Any) -> None:
        uid = replica_id.unique_id
        iid = pending_request.metadata.internal_request_id
        need = 0
        for mine in self._inflight.values():
            prev = mine.pop(iid, None)
            need = prev[1] if prev else need
        if not need:
            route0 = pending_request.kwargs.get(_dec.ROUTE_KWARG) or {}
            need = int(route0.get("prompt_tokens") or 0) + int(route0.get("max_tokens") or 0)
        self._inflight.setdefault(uid, {})[iid] = (time.time(), need)
        _dec.record_dispatch(pending_request, replica_id)

    def on_request_completed(self, replica_id: Any, internal_request_id: str) -> None:
        self._inflight.get(replica_id.unique_id, {}).pop(internal_request_id, None)
