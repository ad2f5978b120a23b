"""Requests routed since a replica's report count in its shared step at the rows and tokens the router decided for
them (score.step_share: the block and tau_hat at it; 1 and 1 for AR), not as one AR row each (score.py, "Mixed
steps"): in a burst on an idle replica the later requests see the blocks the first ones took. Reports without the
in-flight fields read as before. The table is the CPU's measured one (docs/engine_bench_cpu.json, 2026-12-03)."""
from __future__ import annotations

import random
from types import SimpleNamespace as NS

import pytest

from benchmarks.simulator import Req, ReplicaSpecSim, Simulator
from benchmarks.stepmodel import LinearStepModel
from orchestrator.routing import router as router_mod
from orchestrator.routing import score
from orchestrator.routing.decisions import route_hints
from orchestrator.routing.router import InFlight, SpecfleetRouter
from orchestrator.routing.score import mixed_step_times, step_share, tau_at_block
from orchestrator.routing.stats import ReportCache, RoutingStats
from orchestrator.routing.step_costs import StepCostTable
from workers.engine.params import SpecParams

CPU_TABLE = {"ar_ms": {"1": 12.25, "4": 14.03, "16": 21.09},
             "spec_ms": {"4": {"1": 15.52, "4": 22.14, "16": 52.84},
                         "8": {"1": 18.07, "4": 30.74, "16": 81.71},
                         "16": {"1": 20.80, "4": 49.47, "16": 146.66}}}


def _idle_report(tau: float) -> dict:
    return {"replica_id": "r0", "kv_free_tokens": 200_000, "kv_total_tokens": 200_000, "num_running": 0,
            "step_batch": 0, "max_num_seqs": 16, "step_costs": CPU_TABLE, "decode_ms": 12.0, "decode_rows": 1.0,
            "decode_tokens": 1.0, "tau_by_role": {"coder": [tau, 500]}, "tau_mean": tau, "block_size_default": 16,
            "updated_at": 1000.0}


def _burst(tau: float, n: int, monkeypatch, as_ar_rows: bool = False) -> tuple[list[int], list[float]]:
    """Route n requests to one idle replica through SpecfleetRouter, no report in between (as never_slower's 16
    sessions start): the block each got (1 = AR) and its tau_hat. ``as_ar_rows``: the router before this change
    (every request in flight one AR row committing one token)."""
    with monkeypatch.context() as mp:
        if as_ar_rows:
            mp.setattr(router_mod, "step_share", lambda spec, tau_hat: (1, 1.0))
        router = SpecfleetRouter.__new__(SpecfleetRouter)
        router.initialize_state(weights={"explore": 0.0}, seed=0)
        reps = [NS(replica_id=NS(unique_id="r0"), routing_stats=_idle_report(tau), node_id="n0",
                   max_ongoing_requests=64)]
        blocks, taus = [], []
        for k in range(n):
            hints = route_hints(f"q{k}", session_id=f"s{k}", role="coder", prompt_tokens=100, max_tokens=128)
            pr = NS(kwargs={"route": hints}, routing_context=NS(should_backoff=False),
                    metadata=NS(session_id=f"s{k}", internal_request_id=f"i{k}"))
            with pytest.raises(StopIteration):
                router.choose_replicas(reps, pr).send(None)
            d = pr.kwargs["route"]["decision"]
            blocks.append(d["spec"]["block_size"] if d["spec"]["enabled"] else 1)
            taus.append(d["detail"]["tau_hat"])
    return blocks, taus


def _table_rate(blocks: list[int], tau0: float) -> float:
    """Tokens per ms of one step over these sequences, by the table read by rows."""
    tab = StepCostTable.parse(CPU_TABLE)
    tokens = sum(tau_at_block(tau0, 16, b) if b > 1 else 1.0 for b in blocks)
    return tokens / tab.at_rows(float(sum(blocks)))


@pytest.mark.parametrize("tau", [2.0, 2.5])
def test_a_burst_on_an_idle_replica_sees_the_blocks_of_its_first_requests(tau, monkeypatch):
    new, taus = _burst(tau, 16, monkeypatch)
    old, _ = _burst(tau, 16, monkeypatch, as_ar_rows=True)
    assert new[0] > 1 and old[0] == new[0]  # the first request sees an idle replica either way
    assert new[-4:] == [1, 1, 1, 1]  # the later ones see the earlier ones' rows: a batch of blocks would lose
    assert sum(b > 1 for b in new) < sum(b > 1 for b in old)
    assert old[-4:] != [1, 1, 1, 1]  # counted as AR rows, the burst kept taking blocks
    # the batch the burst ends in commits more per ms, by the same table, than the one counted as AR rows; and a
    # full batch at the first request's block would lose to AR (what the later ones now see)
    assert _table_rate(new, tau) > _table_rate(old, tau)
    assert _table_rate([new[0]] * 16, tau) < _table_rate([1] * 16, tau)
    assert all(t > 1.0 for t, b in zip(taus, new) if b > 1)


def test_mixed_step_times_reads_the_rows_and_tokens_in_flight():
    base = RoutingStats.from_dict(_idle_report(2.0))
    view = base.with_inflight(2, 500, 8 + 1, 1.875 + 1.0)  # one at block 8, one AR
    assert (view.num_running, view.inflight_count, view.inflight_rows, view.inflight_tokens) == (2, 2, 9.0, 2.875)
    t_now, s_now, t_ar, _ = mixed_step_times(view, [4])
    tab = StepCostTable.parse(CPU_TABLE)
    assert s_now == pytest.approx(2.875) and t_now == pytest.approx(tab.at_rows(9.0))
    assert t_ar == pytest.approx(tab.at_rows(10.0))
    # recorded without a decision: AR rows, as before
    t_now1, s_now1, _, _ = mixed_step_times(base.with_inflight(2, 500), [4])
    assert s_now1 == 2.0 and t_now1 == pytest.approx(tab.at_rows(2.0))


def test_reports_without_the_fields_read_as_before():
    """A report carries no in-flight fields: num_running over step_batch is AR rows; entries of (1, 1) shares
    give the same floats as entries recorded without shares."""
    d = dict(_idle_report(2.0), num_running=6, step_batch=4, decode_rows=7.0, decode_tokens=5.0, decode_ms=20.0)
    s = RoutingStats.from_dict(d)
    assert (s.inflight_count, s.inflight_rows, s.inflight_tokens) == (0, 0.0, 0.0)
    assert RoutingStats.from_report(d).inflight_count == 0
    tab = StepCostTable.parse(CPU_TABLE)
    t_now, s_now, _, _ = mixed_step_times(s, [4])
    assert s_now == 5.0 + 2 and t_now == pytest.approx(tab.at_rows(9.0) * 20.0 / tab.at_rows(7.0))
    plain, shared = RoutingStats.from_dict(d), RoutingStats.from_dict(d)
    plain.add_inflight([100, 100, 100])
    shared.add_inflight([100, 100, 100], [(1, 1.0)] * 3)
    assert mixed_step_times(plain, [2, 4, 16]) == mixed_step_times(shared, [2, 4, 16])
    # the extra sequences of the report (2) beyond those with a decision (1 at block 16) are AR rows
    one = RoutingStats.from_dict(d)
    one.add_inflight([100], [(16, 4.0)])
    _, s_one, _, _ = mixed_step_times(one, [4])
    assert s_one == 5.0 + 2 + 4.0
    # malformed in-flight fields in a dict read as none in flight
    for bad in ({"inflight_count": -1, "inflight_rows": 3.0, "inflight_tokens": 1.0},
                {"inflight_count": 2, "inflight_rows": "x", "inflight_tokens": 1.0},
                {"inflight_count": 2.5, "inflight_rows": 3.0, "inflight_tokens": 1.0},
                {"inflight_count": 2, "inflight_rows": float("inf"), "inflight_tokens": 1.0}):
        for parse in (RoutingStats.from_dict, RoutingStats.from_report):
            p = parse({**d, **bad})
            assert (p.inflight_count, p.inflight_rows, p.inflight_tokens) == (0, 0.0, 0.0)
    good = RoutingStats.from_dict(one.to_dict())
    assert (good.inflight_count, good.inflight_rows, good.inflight_tokens) == (1, 16.0, 4.0)


def test_requests_that_queue_carry_their_share_of_the_rows():
    s = RoutingStats("r", kv_free_tokens=10_000, kv_total_tokens=10_000, max_num_seqs=4, num_running=2, step_batch=2)
    s.add_inflight([10] * 4, [(16, 4.0), (1, 1.0), (8, 3.0), (1, 1.0)])  # 2 slots for 4: which ones is not known
    assert (s.num_running, s.num_waiting, s.inflight_count) == (4, 2, 2)
    assert (s.inflight_rows, s.inflight_tokens) == (13.0, 4.5)


def test_step_share():
    assert step_share(SpecParams(enabled=False, block_size=16), 5.0) == (1, 1.0)
    assert step_share(SpecParams(enabled=True, block_size=8), 3.3) == (8, round(3.3 * 1024) / 1024)
    assert step_share(SpecParams(enabled=True, block_size=4), 9.0) == (4, 4.0)  # bounded by the block
    assert step_share(SpecParams(enabled=True, block_size=4), float("nan")) == (4, 1.0)
    assert step_share(SpecParams(enabled=True, block_size=4), 0.5) == (4, 1.0)


def test_inflight_rows_sums_equal_a_rescan():
    """The running sums of rows and tokens equal a fresh sum, float for float (tokens on a 1/1024 grid)."""
    rng = random.Random(3)
    led = InFlight(ttl_s=1e9)
    truth: dict[str, tuple[str, float, int, int, float]] = {}
    now, since = 0.0, {"a": 0.0, "b": 0.0}
    for step in range(3000):
        now += rng.uniform(0.0, 0.5)
        rid = rng.choice(list(since))
        op = rng.random()
        if op < 0.5:
            iid = f"q{rng.randrange(300)}"
            rows, tokens = step_share(SpecParams(enabled=rng.random() < 0.7, block_size=rng.choice([2, 4, 8, 16])),
                                      rng.uniform(0.5, 17.0))
            led.add(rid, iid, now, 100, rows, tokens)
            truth[iid] = (rid, now, 100, rows, tokens)
        elif op < 0.8 and truth:
            iid = rng.choice(list(truth))
            assert led.take(iid) == truth.pop(iid)[1:]
        else:
            since[rid] = now - rng.uniform(0.0, 30.0)
        for r, cut in since.items():
            mine = [e for e in truth.values() if e[0] == r and e[1] >= cut]
            want = (len(mine), sum(e[2] for e in mine), sum(e[3] for e in mine), sum(e[4] for e in mine))
            assert led.unseen_steps(r, cut, now) == want, step
            assert led.unseen(r, cut, now) == want[:2]


def _pending(k: int, hints: dict) -> NS:
    return NS(kwargs={"route": hints}, routing_context=NS(should_backoff=False),
              metadata=NS(session_id=hints.get("session_id"), internal_request_id=f"i{k}"))


def test_a_spilled_request_counts_the_block_decided_for_where_it_went():
    router = SpecfleetRouter.__new__(SpecfleetRouter)
    router.initialize_state(weights={"explore": 0.0}, seed=0)
    rep = dict(_idle_report(6.0), updated_at=0.0)  # reported long ago: every request since is counted
    reps = [NS(replica_id=NS(unique_id=rid), routing_stats=dict(rep, replica_id=rid), node_id="n0",
               max_ongoing_requests=64) for rid in ("r0", "r1")]
    pr = _pending(0, route_hints("q0", session_id="s0", role="coder", prompt_tokens=100, max_tokens=128))
    with pytest.raises(StopIteration):
        router.choose_replicas(reps, pr).send(None)
    d = pr.kwargs["route"]["decision"]
    best, other = d["replica"], ("r1" if d["replica"] == "r0" else "r0")
    assert d["spec"]["enabled"] and router._inflight.unseen_steps(best, 0.0, 1.0)[2] == d["spec"]["block_size"]
    router.on_request_routed(pr, NS(unique_id=other), None)  # Serve spilled it
    spec = d["alternatives"][other][0]
    assert router._inflight.unseen_steps(other, 0.0, 1.0)[1:] == (228, spec["block_size"], 1.0)
    assert router._inflight.unseen_steps(best, 0.0, 1.0)[0] == 0
    router.on_request_routed(pr, NS(unique_id=best), None)  # moved again: its block from the decision
    assert router._inflight.unseen_steps(best, 0.0, 1.0)[2] == spec["block_size"]
    assert router_mod._spilled_rows({"decision": {"alternatives": {"x": [None, "spill"]}}}, "x") == 1
    assert router_mod._spilled_rows("junk", "x") == 1


def test_report_cache_views_are_keyed_by_rows_and_tokens():
    cache = ReportCache()
    st = cache.parsed("r0", _idle_report(2.0))
    a = cache.with_inflight(st, 2, 200, 5, 2.5)
    assert cache.with_inflight(st, 2, 200, 5, 2.5) is a
    b = cache.with_inflight(st, 2, 200, 9, 2.5)
    assert b is not a and b.inflight_rows == 9.0 and a.inflight_rows == 5.0


def test_the_simulator_view_counts_the_rows_decided():
    step = LinearStepModel(a0=0.010, a1=0.001, s0=0.015, s1=0.0002, p1=0.0001)
    sim = Simulator([ReplicaSpecSim("r", step, 1_000_000, alpha_by_role={"coder": 0.9}, max_num_seqs=64)],
                    "specfleet")
    reqs = [Req(k, f"s{k}", "t", "coder", 0, 100, 128, 128, 0.0) for k in range(5)]
    for r in reqs:
        sim._dispatch(r, 0.0)
    view = sim._view(sim.reps[0], 0.0)
    shares = [step_share(r.spec, r.route_tau) for r in reqs]
    assert view.inflight_count == 5
    assert (view.inflight_rows, view.inflight_tokens) == (sum(s[0] for s in shares), sum(s[1] for s in shares))
    assert all(r.route_tau == 1.0 or r.spec.enabled for r in reqs)
    score._STEP_MEMO.clear()
