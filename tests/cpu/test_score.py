"""Router scoring: acceptance, headroom, affinity, exploration and spec steering each change the choice."""
from __future__ import annotations

import time

import pytest

from orchestrator.routing.score import RouteRequest, RouterWeights, alpha_from_tau, rank, tau_at_block
from orchestrator.routing.stats import RoutingStats
from workers.engine.params import SpecParams


def replica(rid, **kw):
    base = dict(kv_free_tokens=20000, kv_total_tokens=40000, num_running=2, step_ms_ar=20.0,
                step_ms_by_block={16: 30.0}, tau_mean=3.0)
    base.update(kw)
    return RoutingStats(rid, **base)


REQ = RouteRequest(session_id="s1", role="coder", team="t1", prompt_tokens=300, max_tokens=128)


def test_acceptance_picks_the_replica_whose_drafter_accepts_this_role():
    a = replica("a", tau_by_role={"coder": (2.0, 500), "chat": (5.0, 500)})
    b = replica("b", tau_by_role={"coder": (5.0, 500), "chat": (2.0, 500)})
    assert rank(REQ, [a, b])[0].replica_id == "b"
    assert rank(RouteRequest("s2", "chat", None, 300, 128), [a, b])[0].replica_id == "a"
    best = rank(REQ, [a, b])[0]
    assert best.reason == "acceptance" and best.spec.enabled


def test_headroom_excludes_a_replica_without_kv_for_the_request():
    a = replica("a", tau_by_role={"coder": (6.0, 500)}, kv_free_tokens=400)  # best drafter, full
    b = replica("b", tau_by_role={"coder": (2.5, 500)})
    out = rank(REQ, [a, b])
    assert [c.replica_id for c in out] == ["b"]
    assert out[0].reason == "headroom"
    assert rank(REQ, [a]) == []  # nowhere to go: the ingress answers 429
    # with enough room the better drafter wins again
    assert rank(REQ, [replica("a", tau_by_role={"coder": (6.0, 500)}), b])[0].replica_id == "a"


def test_near_full_kv_is_damped_below_an_equal_replica():
    a = replica("a", kv_free_tokens=700)
    b = replica("b", kv_free_tokens=30000)
    assert rank(REQ, [a, b])[0].replica_id == "b"


def test_affinity_keeps_a_session_where_its_prefix_is_cached():
    req = RouteRequest("s1", "coder", None, prompt_tokens=3000, max_tokens=64, prefix_tokens=2900)
    a = replica("a", cached_sessions=["s1"])
    b = replica("b")
    out = rank(req, [a, b])
    assert out[0].replica_id == "a" and out[0].reason == "affinity"
    assert rank(req, [b, replica("a")])[0].reason != "affinity"
    # a much better drafter elsewhere can still outweigh a small cached prefix
    small = RouteRequest("s1", "coder", None, prompt_tokens=120, max_tokens=256, prefix_tokens=100)
    c = replica("c", tau_by_role={"coder": (7.0, 800)})
    assert rank(small, [a, c])[0].replica_id == "c"


def test_exploration_tries_an_unmeasured_replica_and_fades_with_samples():
    known = replica("a", tau_by_role={"coder": (3.05, 40)}, tau_mean=3.0)
    fresh = replica("b", tau_mean=3.0)
    first = rank(REQ, [known, fresh])[0]
    assert first.replica_id == "b" and first.reason == "explore"
    assert rank(REQ, [known, fresh], RouterWeights(explore=0.0))[0].replica_id == "a"
    measured = replica("b", tau_by_role={"coder": (2.9, 400)}, tau_mean=3.0)
    assert rank(REQ, [known, measured])[0].replica_id == "a"


def test_session_measurement_overrides_role_prior():
    a = replica("a", tau_by_role={"coder": (4.0, 500)}, tau_by_session={"s1": (1.2, 200)})
    b = replica("b", tau_by_role={"coder": (3.5, 500)})
    assert rank(REQ, [a, b], RouterWeights(explore=0.0))[0].replica_id == "b"


def test_queueing_sends_work_to_the_idle_replica():
    busy = replica("a", num_running=16, num_waiting=12, max_num_seqs=16)
    idle = replica("b", num_running=0)
    best = rank(REQ, [busy, idle])[0]
    assert best.replica_id == "b" and best.reason == "load"


def test_speculation_is_steered_off_when_acceptance_is_too_low():
    low = replica("a", tau_by_session={"s1": (1.1, 1000)}, tau_by_role={"coder": (1.1, 1000)}, tau_mean=1.1)
    out = rank(REQ, [low], RouterWeights(explore=0.0))[0]
    assert out.spec == SpecParams(enabled=False, block_size=16) and out.reason.endswith("+spec-off")
    high = replica("a", tau_by_role={"coder": (6.0, 1000)})
    assert rank(REQ, [high])[0].spec.enabled
    # a client's explicit choice is respected
    forced = RouteRequest("s1", "coder", None, 300, 128, spec_requested=SpecParams(True, 8))
    assert rank(forced, [low])[0].spec == SpecParams(True, 8)
    # replicas without a drafter run AR
    assert not rank(REQ, [replica("n", spec_available=False)])[0].spec.enabled


def test_block_size_is_chosen_per_session():
    # verify cost grows steeply with the block; a mediocre session is better off with a short block
    costly = dict(step_ms_ar=10.0, step_ms_by_block={4: 12.0, 8: 16.0, 16: 24.0})
    mid = replica("a", tau_by_session={"s1": (2.2, 1000)}, tau_by_role={"coder": (2.2, 1000)}, **costly)
    good = replica("a", tau_by_session={"s1": (12.0, 1000)}, tau_by_role={"coder": (12.0, 1000)}, **costly)
    w = RouterWeights(explore=0.0)
    assert rank(REQ, [mid], w)[0].spec.block_size < 16
    assert rank(REQ, [good], w)[0].spec.block_size == 16
    assert rank(REQ, [mid], RouterWeights(explore=0.0, steer_block=False))[0].spec.block_size == 16


def test_acceptance_model_is_consistent():
    for tau, b in [(1.0, 16), (3.0, 16), (7.5, 16), (2.0, 4)]:
        a = alpha_from_tau(tau, b)
        assert tau_at_block(tau, b, b) == pytest.approx(tau)
        assert (1 - a**b) / (1 - a) == pytest.approx(tau, rel=1e-6) if a < 1 else tau == b
        assert tau_at_block(tau, b, 4) <= min(tau, 4.0) + 1e-9


def test_weights_reject_unknown_keys_and_rank_is_fast():
    with pytest.raises(Exception):
        RouterWeights(bogus=1)
    reps = [replica(f"r{i}", tau_by_role={"coder": (2 + i * 0.3, 100)}) for i in range(8)]
    t0 = time.perf_counter()
    for _ in range(200):
        rank(REQ, reps)
    assert (time.perf_counter() - t0) / 200 < 0.005  # well under 5 ms for 8 replicas on a slow core


def test_a_steered_off_session_is_probed_again_after_spec_probe_every_turns():
    # with speculation off no acceptance is measured, so "off" must be re-tested now and then
    weak = replica("a", tau_by_session={"s1": (1.05, 50)}, tau_by_role={"coder": (1.05, 500)}, tau_mean=1.05)
    cfg = RouterWeights(explore=0.0, spec_probe_every=4)
    for turns in (0, 3):
        off = rank(RouteRequest("s1", "coder", None, 300, 128, spec_off_turns=turns), [weak], cfg)[0]
        assert not off.spec.enabled and off.reason.endswith("+spec-off")
    probe = rank(RouteRequest("s1", "coder", None, 300, 128, spec_off_turns=4), [weak], cfg)[0]
    assert probe.spec.enabled and probe.reason.endswith("+spec-probe")
    never = RouterWeights(explore=0.0, spec_probe_every=0)
    assert not rank(RouteRequest("s1", "coder", None, 300, 128, spec_off_turns=99), [weak], never)[0].spec.enabled


def test_alpha_fast_path_returns_exactly_what_the_bisection_returns(monkeypatch):
    """Newton + the certificate must give the bisection's float bit for bit, also where tau is exactly the sum
    at a grid point (the bisection's comparisons are tight there), and must be the path actually taken."""
    import math
    import random

    from orchestrator.routing import score

    rng = random.Random(0)
    fallbacks = []
    bisect = score._bisect_alpha
    monkeypatch.setattr(score, "_bisect_alpha", lambda t, b: fallbacks.append(t) or bisect(t, b))
    n = 0
    for b in (2, 3, 4, 8, 16, 32, 64, 100):
        taus = [rng.uniform(1.0, b) for _ in range(600)] + [1.0, 1.0 + 1e-15, b - 2e-9, rng.uniform(1.0, 1.0001)]
        for _ in range(200):  # the sum at a point of the 2^-40 grid, and its float neighbours
            v = score._geo(rng.randrange(1, 2**40) * 2.0**-40, b)
            taus += [v, math.nextafter(v, 0.0), math.nextafter(v, 99.0)]
        for tau in taus:
            t = max(1.0, min(tau, float(b)))
            if t < b - 1e-9:
                assert score._solve_alpha(t, b) == bisect(t, b), (tau, b)
                n += 1
        assert score.alpha_from_tau(taus[0], b) == score.alpha_from_tau(taus[0], b)  # memoised: same value
    # Newton + certificate carried most of them (the rest: alpha > 0.99, b > 64, or a failed certificate)
    assert len(fallbacks) < 0.2 * n, (len(fallbacks), n)
