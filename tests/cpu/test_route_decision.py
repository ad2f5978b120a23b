"""RouteDecision: made once by the router, landed by the replica that serves, carried back as data."""
from __future__ import annotations

from orchestrator.routing.decisions import RouteDecision, choose_spec, land, route_hints, with_decision
from orchestrator.routing.score import Choice
from orchestrator.routing.stats import RoutingStats
from workers.engine.params import SpecParams

CHOICES = [Choice("a", 90.0, "acceptance", SpecParams(True, 8), 3.2), Choice("b", 50.0, "spill+spec-off",
                                                                            SpecParams(False, 16), 1.0)]


def _route(decision: RouteDecision, **hints) -> dict:
    return with_decision(route_hints("r1", **hints), decision)


def test_landing_on_the_best_a_spilled_and_an_unranked_replica():
    d = RouteDecision.from_choices(CHOICES)
    assert (d.replica, d.reason, d.spec, d.detail) == ("a", "acceptance", SpecParams(True, 8),
                                                      {"score": 90.0, "tau_hat": 3.2})
    route = _route(d)
    best, spilled, other = land(route, "a"), land(route, "b"), land(route, "c")
    assert (best.replica, best.reason, best.spec) == ("a", "acceptance", SpecParams(True, 8))
    assert (spilled.replica, spilled.reason, spilled.spec) == ("b", "spill+spec-off", SpecParams(False, 16))
    assert (other.replica, other.reason, other.spec) == ("c", "spill", None)
    assert RouteDecision.from_dict(best.to_dict()) == best


def test_no_headroom_baselines_and_direct_calls():
    nh = RouteDecision.from_choices([], ["b", "a"])
    assert (land(_route(nh), "b").reason, land(_route(nh), "a").reason) == ("no-headroom", "spill")
    assert land(_route(RouteDecision(None, "pow2")), "x").reason == "pow2"
    assert land(route_hints("r2"), "x") == RouteDecision("x", "direct")


def test_choose_spec_router_then_client_then_own_stats():
    route = _route(RouteDecision.from_choices(CHOICES), spec=SpecParams(True, 4))
    assert choose_spec(route, land(route, "a")) == SpecParams(True, 8)  # the router's choice for this replica
    client = route_hints("r3", spec=SpecParams(True, 4))
    assert choose_spec(client, land(client, "a")) == SpecParams(True, 4)  # no decision: the client's choice
    own = RoutingStats("a", kv_free_tokens=10_000, kv_total_tokens=10_000, block_size_default=16)
    plain = route_hints("r4", max_tokens=16)
    assert choose_spec(plain, land(plain, "a"), own) is not None and choose_spec(plain, land(plain, "a")) is None


def test_the_replica_builds_its_own_stats_only_when_it_scores_and_once_per_period(monkeypatch):
    """A call without a decision for this replica is scored on the replica's own stats; those are O(sessions) to
    build, so the replica builds them only for such a call and reuses them for OWN_STATS_TTL_S (Serve's stats
    period), and a report refreshes them."""
    from orchestrator import replica as rep_mod
    from orchestrator.config import ReplicaSpec
    from orchestrator.mock_engine import MockEngine

    eng = MockEngine()
    calls = []
    real = eng.stats
    monkeypatch.setattr(eng, "stats", lambda: calls.append(1) or real())
    core = rep_mod.ReplicaCore(eng, ReplicaSpec(), replica_id="a", rank=0, block_size=16, spec_available=True)
    routed = _route(RouteDecision.from_choices(CHOICES))
    for _ in range(5):
        assert core._decide(routed).spec == SpecParams(True, 8)  # the router's decision: no stats needed
        assert core._decide(route_hints("r", spec=SpecParams(True, 4))).spec == SpecParams(True, 4)
    assert calls == []
    clock = [100.0]
    monkeypatch.setattr(rep_mod.time, "monotonic", lambda: clock[0])
    for _ in range(5):
        d = core._decide(route_hints("r", max_tokens=16))  # a baseline policy's call: scored here
        assert d.spec.enabled and d.spec.block_size <= 16
    assert len(calls) == 1
    core.routing_stats()  # a report
    clock[0] += 0.5
    core._decide(route_hints("r", max_tokens=16))
    assert len(calls) == 2  # the report's stats reused
    clock[0] += rep_mod.OWN_STATS_TTL_S
    core._decide(route_hints("r", max_tokens=16))
    assert len(calls) == 3
    assert core.own_stats().step_costs is not None  # the mock reports its step model: the table path
