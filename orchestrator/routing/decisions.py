"""Route decisions shared between the Serve router, the ingress and the replica (torch-free).

Ray Serve pickles the request-router class *by value* (its module is registered with
cloudpickle.register_pickle_by_value), so module globals of router.py would be copied into
the caller process, not shared. Everything stateful therefore lives here, and router.py reaches
it through the module object (pickled by reference: the same registry the ingress reads).
"""
from __future__ import annotations

import random
import threading
from collections import OrderedDict
from dataclasses import asdict
from typing import Any

from orchestrator.routing.score import Choice, RouteRequest, RouterWeights, rank
from orchestrator.routing.stats import RoutingStats
from workers.engine.params import SpecParams

ROUTE_KWARG = "route"
_UNKNOWN_KV = 1 << 40  # a replica that has not reported yet: assume room, let its engine decide


class DecisionRegistry:
    """request id -> decision dict; written by the router thread, read by the ingress. Bounded."""

    def __init__(self, capacity: int = 20000):
        self._d: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._lock = threading.Lock()
        self._cap = capacity

    def put(self, request_id: str, decision: dict[str, Any]) -> None:
        with self._lock:
            self._d[request_id] = decision
            self._d.move_to_end(request_id)
            while len(self._d) > self._cap:
                self._d.popitem(last=False)

    def update(self, request_id: str, **fields: Any) -> None:
        with self._lock:
            if request_id in self._d:
                self._d[request_id].update(fields)

    def get(self, request_id: str) -> dict[str, Any] | None:
        with self._lock:
            d = self._d.get(request_id)
            return dict(d) if d else None

    def pop(self, request_id: str) -> dict[str, Any] | None:
        with self._lock:
            return self._d.pop(request_id, None)


DECISIONS = DecisionRegistry()


def pop_decision(request_id: str) -> dict[str, Any] | None:
    return DECISIONS.pop(request_id)


def get_decision(request_id: str) -> dict[str, Any] | None:
    return DECISIONS.get(request_id)


# ------------------------------------------------------------------ call-site helpers
def route_hints(
    request_id: str,
    *,
    session_id: str | None = None,
    role: str | None = None,
    team: str | None = None,
    prompt_tokens: int = 0,
    max_tokens: int = 128,
    prefix_tokens: int = 0,
    spec: SpecParams | None = None,
    spec_off_turns: int = 0,
    avoid: list[str] | None = None,
) -> dict[str, Any]:
    """The JSON-safe ``route=`` kwarg the ingress passes on each call to the replica deployment.
    ``avoid``: replicas the ingress saw fail just now (a lost node); routers leave them out."""
    return {
        "request_id": str(request_id),
        "session_id": session_id,
        "role": role,
        "team": team,
        "prompt_tokens": int(prompt_tokens),
        "max_tokens": int(max_tokens),
        "prefix_tokens": int(prefix_tokens),
        "spec": asdict(spec) if spec is not None else None,
        "spec_off_turns": int(spec_off_turns),
        "avoid": [str(r) for r in (avoid or [])],
    }


def without_avoided(candidates: list[Any], hints: dict[str, Any] | None) -> list[Any]:
    """The candidates (RunningReplica) minus those the ingress asked to avoid; all of them when that
    would leave none (a suspect may still be better than nothing)."""
    avoid = set((hints or {}).get("avoid") or ())
    if not avoid:
        return candidates
    kept = [c for c in candidates if c.replica_id.unique_id not in avoid]
    return kept or candidates


def route_request_from_hints(h: dict[str, Any]) -> RouteRequest:
    spec = h.get("spec")
    return RouteRequest(
        session_id=h.get("session_id"),
        role=h.get("role"),
        team=h.get("team"),
        prompt_tokens=int(h.get("prompt_tokens") or 0),
        max_tokens=int(h.get("max_tokens") or 128),
        spec_requested=SpecParams(**spec) if spec else None,
        prefix_tokens=int(h.get("prefix_tokens") or 0),
        spec_off_turns=int(h.get("spec_off_turns") or 0),
    )


def spec_for_replica(
    route: dict[str, Any] | None,
    replica_id: str,
    own_stats: RoutingStats | None = None,
    weights: RouterWeights | None = None,
) -> SpecParams | None:
    """Replica side: the SpecParams the router chose for this replica; if the call carries no
    decision for it (another router, or a direct call), recompute it with the same pure scoring
    on this replica's own stats. None = the engine's default."""
    if not route:
        return None
    chosen = ((route.get("decision") or {}).get("by_replica") or {}).get(replica_id)
    if chosen:
        return SpecParams(**chosen["spec"])
    if route.get("spec"):
        return SpecParams(**route["spec"])
    if own_stats is not None:
        cfg = (weights or RouterWeights()).model_copy(update={"kv_safety": 1.0})
        out = rank(route_request_from_hints(route), [own_stats], cfg)
        return out[0].spec if out else None
    return None


def stats_of(replica: Any) -> RoutingStats:
    """RoutingStats of a RunningReplica, keyed by its Serve unique id; neutral when not reported."""
    rid = replica.replica_id.unique_id
    d = getattr(replica, "routing_stats", None) or {}
    try:
        s = RoutingStats.from_dict({**d, "replica_id": rid}) if d else None
    except (TypeError, ValueError):
        s = None
    return s or RoutingStats(rid, kv_free_tokens=_UNKNOWN_KV, kv_total_tokens=_UNKNOWN_KV)


def order_with_shuffled_ties(choices: list[Choice], rng: random.Random, rel: float = 1e-6) -> list[Choice]:
    """Best first; choices whose scores are equal (within rel) are shuffled among themselves."""
    out: list[Choice] = []
    i = 0
    while i < len(choices):
        j = i + 1
        while j < len(choices) and abs(choices[j].score - choices[i].score) <= rel * max(1.0, abs(choices[i].score)):
            j += 1
        group = choices[i:j]
        rng.shuffle(group)
        out += group
        i = j
    return out


def decision_dict(choices: list[Choice], fallback_ids: list[str] | None = None) -> dict[str, Any]:
    if choices:
        best = choices[0]
        return {
            "replica": best.replica_id,
            "reason": best.reason,
            "spec": asdict(best.spec),
            "score": round(best.score, 3),
            "tau_hat": round(best.tau_hat, 3),
            "by_replica": {c.replica_id: {"spec": asdict(c.spec), "reason": c.reason} for c in choices},
        }
    return {"replica": (fallback_ids or [None])[0], "reason": "no-headroom", "spec": None,
            "score": 0.0, "tau_hat": 0.0, "by_replica": {}}


