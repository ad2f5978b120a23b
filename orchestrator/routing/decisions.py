"""The route contract between the ingress, the Serve router and the replica (torch-free, JSON-safe).

  ingress  -> ``route_hints(...)``: the ``route=`` kwarg of every call (request id, session, role, team,
              token counts, the client's explicit SpecParams if any);
  router   -> ``RouteDecision``: created once, by the router (``from_choices`` for the specfleet policy,
              a bare reason for the baselines), written into ``route["decision"]`` before Serve sends the
              call (Serve sends ``pending_request.kwargs`` after ``choose_replicas`` returns);
  replica  -> ``land(route, my_id)``: the decision as it lands on this replica (``spill`` when Serve used a
              replica other than the router's best: the best was at max_ongoing_requests), with the
              speculation the replica then runs (``choose_spec``); it travels back in the stream's first
              item and from there to the response headers, the session registry and the metrics.
One thing the replica cannot tell when it fails before answering: where the call went. Routers note it
(``DISPATCHES``, in the ingress process; Serve pickles router classes by value, so it lives here) for the
ingress to blame the right replica.
"""
from __future__ import annotations

import random
import threading
from collections import OrderedDict
from dataclasses import dataclass, field, fields, replace
from typing import Any, Callable

from orchestrator.routing.score import Choice, RouteRequest, RouterWeights, rank
from orchestrator.routing.stats import ReportCache, RoutingStats
from workers.engine.params import SpecParams

ROUTE_KWARG = "route"
_UNKNOWN_KV = 1 << 40  # a replica that has not reported yet: assume room, let its engine decide


@dataclass
class RouteDecision:
    replica: str | None  # the replica the router chose; None where the policy names none (pow2, hashing)
    reason: str  # why (docs/routing.md): only | headroom | affinity | explore | acceptance | load [+spec-off |
    #              +spec-probe] | spill | no-headroom | pow2 | session-hash | random | direct
    spec: SpecParams | None = None  # speculation on that replica; None = the replica decides
    detail: dict[str, float] = field(default_factory=dict)  # the router's prediction: score, tau_hat
    alternatives: dict[str, tuple[SpecParams, str]] = field(default_factory=dict)  # every ranked replica:
    #              (spec, reason) it gets when Serve spills the request there

    @classmethod
    def from_choices(cls, choices: list[Choice], fallback_ids: list[str] | None = None) -> "RouteDecision":
        """The specfleet router's decision from ``rank()``; with no eligible replica: ``no-headroom`` on the
        first fallback (most free KV), where the engine's admission answers 429."""
        if not choices:
            return cls((fallback_ids or [None])[0], "no-headroom")
        best = choices[0]
        return cls(best.replica_id, best.reason, best.spec,
                   {"score": round(best.score, 3), "tau_hat": round(best.tau_hat, 3)},
                   {c.replica_id: (c.spec, c.reason) for c in choices})

    def landed_on(self, replica_id: str) -> "RouteDecision":
        """This decision as seen by the replica that serves the request."""
        if self.replica is None or replica_id == self.replica:
            return replace(self, replica=replica_id, alternatives={})
        if replica_id in self.alternatives:
            spec, reason = self.alternatives[replica_id]
            return RouteDecision(replica_id, reason, spec, {})
        return RouteDecision(replica_id, "spill")

    def to_dict(self) -> dict[str, Any]:
        return {"replica": self.replica, "reason": self.reason, "spec": _spec_dict(self.spec),
                "detail": dict(self.detail),
                "alternatives": {r: [_spec_dict(s), why] for r, (s, why) in self.alternatives.items()}}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RouteDecision":
        return cls(d.get("replica"), str(d.get("reason") or "direct"), _spec(d.get("spec")),
                   {str(k): float(v) for k, v in (d.get("detail") or {}).items()},
                   {str(r): (SpecParams(**s), str(why)) for r, (s, why) in (d.get("alternatives") or {}).items()})


_SPEC_FIELDS = tuple(f.name for f in fields(SpecParams))


def _spec_dict(spec: SpecParams | None) -> dict[str, Any] | None:
    """asdict(spec) for this flat dataclass, without asdict's recursive deep copy (one per ranked replica
    per decision)."""
    if spec is None:
        return None
    d = spec.__dict__  # the fields in their order, as __init__ set them (a copy of it, where it holds no more)
    return d.copy() if len(d) == len(_SPEC_FIELDS) else {f: getattr(spec, f) for f in _SPEC_FIELDS}


def _spec(d: dict[str, Any] | None) -> SpecParams | None:
    return SpecParams(**d) if d else None


class DispatchLog:
    """request id -> the replica Serve sent it to (bounded; written by routers' ``on_request_routed``)."""

    def __init__(self, capacity: int = 20000):
        self._d: OrderedDict[str, str] = OrderedDict()
        self._lock = threading.Lock()
        self._cap = capacity

    def record(self, request_id: str, replica_id: str) -> None:
        with self._lock:
            self._d[request_id] = replica_id
            self._d.move_to_end(request_id)
            while len(self._d) > self._cap:
                self._d.popitem(last=False)

    def pop(self, request_id: str) -> str | None:
        with self._lock:
            return self._d.pop(request_id, None)


DISPATCHES = DispatchLog()


def record_dispatch(pending_request: Any, replica_id: Any) -> None:
    """A router's ``on_request_routed``: note where the call went (calls without route hints are not noted)."""
    route = pending_request.kwargs.get(ROUTE_KWARG) if pending_request is not None else None
    if isinstance(route, dict) and route.get("request_id"):
        DISPATCHES.record(route["request_id"], getattr(replica_id, "unique_id", replica_id))


# ------------------------------------------------------------------ ingress side
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
        "spec": _spec_dict(spec),
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
    return RouteRequest(
        session_id=h.get("session_id"),
        role=h.get("role"),
        team=h.get("team"),
        prompt_tokens=int(h.get("prompt_tokens") or 0),
        max_tokens=int(h.get("max_tokens") or 128),
        spec_requested=_spec(h.get("spec")),
        prefix_tokens=int(h.get("prefix_tokens") or 0),
        spec_off_turns=int(h.get("spec_off_turns") or 0),
    )


# ------------------------------------------------------------------ router side
def with_decision(hints: dict[str, Any], decision: RouteDecision) -> dict[str, Any]:
    """The ``route=`` kwarg carrying the router's decision to the replica."""
    return {**hints, "decision": decision.to_dict()}


def stats_of(replica: Any, reports: ReportCache | None = None) -> RoutingStats:
    """RoutingStats of a RunningReplica, keyed by its Serve unique id; neutral when not reported (or not
    parseable). With ``reports``, each report is parsed once (``ReportCache``); the result is shared
    between decisions: read it, never change it."""
    rid = replica.replica_id.unique_id
    d = getattr(replica, "routing_stats", None) or {}
    if reports is not None:
        s = reports.parsed(rid, d)
    else:
        try:
            s = RoutingStats.from_dict({**d, "replica_id": rid}) if d else None
        except (TypeError, ValueError):
            s = None
    return s or RoutingStats(rid, kv_free_tokens=_UNKNOWN_KV, kv_total_tokens=_UNKNOWN_KV)


def order_with_shuffled_ties(choices: list[Choice], rng: random.Random, rel: float = 1e-6) -> list[Choice]:
    """Best first; choices whose scores are equal (within rel) are shuffled among themselves."""
    a = None
    for c in choices:  # a plain loop: any() over a generator costs ~2x for 64 choices
        b = c.score
        if a is not None and abs(b - a) <= rel * max(1.0, abs(a)):
            break
        a = b
    else:
        return list(choices)  # no ties (the common case): nothing to shuffle, nothing drawn from rng
    out: list[Choice] = []
    i = 0
    while i < len(choices):
        j = i + 1
        while j < len(choices) and abs(choices[j].score - choices[i].score) <= rel * max(1.0, abs(choices[i].score)):
            j += 1
        if j - i == 1:  # no tie (shuffling one element draws nothing from rng either)
            out.append(choices[i])
        else:
            group = choices[i:j]
            rng.shuffle(group)
            out += group
        i = j
    return out


# ------------------------------------------------------------------ replica side
def land(route: dict[str, Any] | None, replica_id: str, default_reason: str = "direct") -> RouteDecision:
    """The router's decision as it lands on ``replica_id``; ``default_reason`` for a call without one."""
    d = (route or {}).get("decision")
    if not d:
        return RouteDecision(replica_id, default_reason)
    return RouteDecision.from_dict(d).landed_on(replica_id)


def choose_spec(
    route: dict[str, Any] | None,
    landed: RouteDecision,
    own_stats: RoutingStats | Callable[[], RoutingStats] | None = None,
    weights: RouterWeights | None = None,
) -> SpecParams | None:
    """The SpecParams this replica runs: the router's for it; without one (a baseline policy, a direct
    call) the client's explicit choice, else the same pure scoring on this replica's own stats (given, or
    a callable that builds them, called only then). None = the engine's default."""
    if landed.spec is not None:
        return landed.spec
    if not route:
        return None
    if route.get("spec"):
        return SpecParams(**route["spec"])
    if callable(own_stats):
        own_stats = own_stats()
    if own_stats is not None:
        cfg = (weights or RouterWeights()).model_copy(update={"kv_safety": 1.0})
        out = rank(route_request_from_hints(route), [own_stats], cfg)
        return out[0].spec if out else None
    return None
