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
