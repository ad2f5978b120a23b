"""The router's step-cost model: a replica's measured step-cost table (start-up calibration) decides where
speculation pays; interpolated over batch and block, corrected by the live EWMAs; replicas without a table are
scored exactly as before."""
from __future__ import annotations

import json
import random

import pytest

from orchestrator.mock_engine import MockEngine
from orchestrator.routing.score import RouteRequest, RouterWeights, live_factors, rank, step_times, tau_at_block
from orchestrator.routing.stats import ReportCache, RoutingStats
from orchestrator.routing.step_costs import StepCostTable, interpolate
from workers.engine.params import EngineStats, SpecParams

W = RouterWeights(explore=0.0)
# shaped like this CPU's calibration (SmolLM2-135M bf16, 2 threads): a block-16 step ~2.4x an AR step at batch 1,
# ~5x at batch 16; costs far from linear in tokens
CPU = {"ar_ms": {"1": 9.3, "4": 14.0, "16": 40.0},
       "spec_ms": {"4": {"1": 18.0, "4": 40.0, "16": 120.0}, "8": {"1": 20.0, "4": 50.0, "16": 150.0},
                   "16": {"1": 22.3, "4": 62.0, "16": 200.0}},
       "draft_ms": {"16": {"1": 3.1}}}


def rep(tau: float, costs: dict | None = CPU, **kw) -> RoutingStats:
    base = dict(kv_free_tokens=50_000, kv_total_tokens=60_000, tau_by_session={"s": (tau, 1000)},
                tau_by_role={"coder": (tau, 1000)}, tau_mean=tau, step_costs=costs)
    base.update(kw)
    return RoutingStats("a", **base)


REQ = RouteRequest("s", "coder", None, prompt_tokens=200, max_tokens=128)


def best_spec(r: RoutingStats, w: RouterWeights = W) -> SpecParams:
    return rank(REQ, [r], w)[0].spec


# ------------------------------------------------------------------ the table decides
def test_a_costly_speculative_step_is_steered_off_at_low_acceptance_and_on_at_high():
    assert best_spec(rep(1.3)) == SpecParams(enabled=False, block_size=16)
    assert rank(REQ, [rep(1.3)], W)[0].reason.endswith("+spec-off")
    assert best_spec(rep(4.0)).enabled


def test_the_measured_table_overrides_the_guessed_cost_ratio():
    # tau 2.2: the guess (block 16 = 1.5x AR) says speculate, the measured 2.4x says it loses at every block
    assert best_spec(rep(2.2, None)).enabled
    assert not best_spec(rep(2.2)).enabled
    # a cheap measured speculative step (1.2x): tau 1.5 pays, which the guess would have turned off
    cheap = {"ar_ms": {"1": 10.0}, "spec_ms": {"16": {"1": 12.0}}}
    assert not best_spec(rep(1.5, None)).enabled
    assert best_spec(rep(1.5, cheap)) == SpecParams(True, 16)
    # the guess stays out once anything is measured: a wildly different spec_cost_ratio changes nothing
    for tau in (1.3, 2.2, 4.0):
        assert best_spec(rep(tau), RouterWeights(explore=0.0, spec_cost_ratio=10.0)) == best_spec(rep(tau))
        assert best_spec(rep(tau), RouterWeights(explore=0.0, spec_cost_ratio=1.0)) == best_spec(rep(tau))


def test_the_block_with_the_best_measured_rate_is_chosen():
    costs = {"ar_ms": {"1": 10.0}, "spec_ms": {"4": {"1": 14.0}, "8": {"1": 16.0}, "16": {"1": 40.0}}}
    r = rep(6.0, costs)
    rates = {b: tau_at_block(6.0, 16, b) / ms for b, ms in ((4, 14.0), (8, 16.0), (16, 40.0))}
    assert max(rates, key=rates.get) == 8  # the case is what it claims
    assert best_spec(r) == SpecParams(True, 8)
    # the same tau with costs that grow slowly with the block: the full block
    flat = {"ar_ms": {"1": 10.0}, "spec_ms": {"4": {"1": 14.0}, "8": {"1": 15.0}, "16": {"1": 16.0}}}
    assert best_spec(rep(6.0, flat)) == SpecParams(True, 16)


def test_the_batch_changes_the_decision_where_the_measured_costs_say_so():
    # at batch 1 block 16 costs 2.4x AR and tau 4 pays; at batch 16 it costs 5x AR and the same tau does not
    assert best_spec(rep(4.0, num_running=0)).enabled
    assert not best_spec(rep(4.0, num_running=15)).enabled


# ------------------------------------------------------------------ interpolation
def test_interpolation_over_batch():
    t = StepCostTable.parse({"ar_ms": {"1": 10.0, "4": 16.0, "16": 40.0}})
    assert [t.ar_at(b) for b in (1, 2, 4, 10, 16)] == pytest.approx([10.0, 12.0, 16.0, 28.0, 40.0])
    assert t.ar_at(20) == pytest.approx(48.0)  # beyond the last batch: the last segment's slope (2 ms/seq)
    assert t.ar_at(0) == 10.0  # below the smallest measured batch: its cost
    noisy = StepCostTable.parse({"ar_ms": {"1": 10.0, "4": 9.0}})
    assert noisy.ar_at(64) == 9.0  # a falling last segment is not extrapolated downwards
    one = StepCostTable.parse({"ar_ms": {"1": 10.0}})
    assert one.ar_at(5) == 10.0 and one.ar_at(5, slope_one=0.03) == pytest.approx(11.2)
    assert step_times(RoutingStats("x", step_costs={"ar_ms": {"1": 10.0}}), RouterWeights(), 5, [])[0] == \
        pytest.approx(11.2)  # a one-batch row grows by batch_slope


def test_interpolation_over_block_with_block_one_the_ar_step():
    t = StepCostTable.parse({"ar_ms": {"1": 10.0, "16": 40.0},
                             "spec_ms": {"4": {"1": 16.0, "16": 70.0}, "16": {"1": 28.0, "16": 160.0}}})
    assert t.spec_at(1, 4) == 16.0 and t.spec_at(1, 16) == 28.0
    assert t.spec_at(1, 2) == pytest.approx(12.0)  # between the AR step (block 1) and block 4
    assert t.spec_at(1, 8) == pytest.approx(20.0)  # between blocks 4 and 16
    assert t.spec_at(1, 20) == pytest.approx(32.0)  # beyond: the last segment's slope (1 ms/block)
    assert t.spec_at(16, 10) == pytest.approx(115.0)
    assert t.spec_at(8, 16) == pytest.approx(28.0 + (160.0 - 28.0) * 7 / 15)  # batch, then block
    assert interpolate((1, 4), (10.0, 16.0), 4) == 16.0  # measured points are returned as measured


def test_parse_checks_entries_and_round_trips():
    assert StepCostTable.parse(None) is None and StepCostTable.parse({}) is None
    assert StepCostTable.parse({"spec_ms": {"16": {"1": 20.0}}}) is None  # nothing to anchor on: no AR step
    with pytest.raises(ValueError):
        StepCostTable.parse([["1", 9.0]])
    t = StepCostTable.parse({"ar_ms": {"1": 9.0, "x": 3.0, "4": float("nan"), "8": -1.0, "16": "12"},
                             "spec_ms": {"1": {"1": 5.0}, "8": {"1": 20.0, "2": None}, "b": {"1": 1.0}, "16": {}},
                             "draft_ms": "junk"})
    assert t.to_dict() == {"ar_ms": {"1": 9.0, "16": 12.0}, "spec_ms": {"8": {"1": 20.0}}, "draft_ms": {}}
    assert t.blocks == (8,)
    assert StepCostTable.parse(json.loads(json.dumps(t.to_dict()))) is t  # equal tables: one shared object
    assert StepCostTable.parse(CPU).to_dict() == {k: {b: ({x: float(v) for x, v in r.items()} if isinstance(r, dict)
                                                          else float(r)) for b, r in v.items()} for k, v in CPU.items()}


def test_the_table_travels_in_the_report_and_is_parsed_once_per_report():
    s = rep(3.0, num_running=3)
    d = json.loads(json.dumps(s.to_dict()))
    assert d["step_costs"]["spec_ms"]["16"]["16"] == 200.0
    assert RoutingStats.from_dict(d) == s == RoutingStats.from_report(d)
    assert RoutingStats.from_report(d).step_costs is s.step_costs
    cache = ReportCache()
    assert cache.parsed("a", {**d, "updated_at": 5.0}).step_costs is s.step_costs
    assert RoutingStats.from_dict({**d, "step_costs": None}).step_costs is None
    assert cache.parsed("b", {**d, "step_costs": "bad", "updated_at": 6.0}) is None  # refused like a bad tau table
    es = EngineStats(kv_free_tokens=10, kv_total_tokens=20, num_running=2, step_ms_ar=9.0, step_costs=CPU)
    built = RoutingStats.from_engine("r", es)
    assert built.step_costs == StepCostTable.parse(CPU) and built.step_batch == 2
    assert RoutingStats.from_engine("r", EngineStats()).step_costs is None


# ------------------------------------------------------------------ the live correction
def test_the_live_ewmas_scale_the_table_at_the_batch_they_describe():
    table = StepCostTable.parse(CPU)
    calm = rep(3.0, num_running=4)
    assert live_factors(calm, W) == (1.0, 1.0)  # no EWMA yet: the table as measured
    loaded = rep(3.0, num_running=4, step_ms_ar=28.0, step_ms_by_block={16: 124.0, 8: 100.0})
    f_ar, f_spec = live_factors(loaded, W)
    assert f_ar == pytest.approx(28.0 / table.ar_at(4)) == pytest.approx(2.0)
    assert f_spec == pytest.approx((124.0 / 62.0 + 100.0 / 50.0) / 2)
    t_ar, t_spec = step_times(loaded, W, 5, [4, 16])
    base_ar, base_spec = step_times(calm, W, 5, [4, 16])
    assert t_ar == pytest.approx(2.0 * base_ar) and t_spec[16] == pytest.approx(f_spec * base_spec[16])
    # only the AR EWMA: it stands for both; only speculative ones: likewise
    assert live_factors(rep(3.0, num_running=4, step_ms_ar=21.0), W) == pytest.approx((1.5, 1.5))
    assert live_factors(rep(3.0, num_running=4, step_ms_by_block={16: 31.0}), W) == pytest.approx((0.5, 0.5))
    # idle: the EWMAs are from an earlier batch; bounded
    assert live_factors(rep(3.0, num_running=0, step_ms_ar=90.0), W) == (1.0, 1.0)
    assert live_factors(rep(3.0, num_running=1, step_ms_ar=9.3 * 100), W) == (4.0, 4.0)


def test_requests_counted_in_after_a_report_do_not_move_the_correction_batch():
    s = rep(3.0, num_running=4, step_ms_ar=28.0)
    later = s.with_inflight(6, 600)
    assert later.num_running == 10 and later.step_batch == 4
    assert live_factors(later, W) == live_factors(s, W)
    copy = rep(3.0, num_running=4, step_ms_ar=28.0)
    copy.add_inflight([100] * 6)
    assert rank(REQ, [later], W) == rank(REQ, [copy], W)


def test_a_slower_live_speculative_step_turns_speculation_off():
    cheap = {"ar_ms": {"1": 10.0, "4": 12.0}, "spec_ms": {"16": {"1": 12.0, "4": 15.0}}}
    assert best_spec(rep(1.6, cheap, num_running=1)).enabled
    # the verify now costs twice what it did at start-up while AR steps cost what they did
    drifted = rep(1.6, cheap, num_running=1, step_ms_ar=10.0, step_ms_by_block={16: 24.0})
    assert not best_spec(drifted).enabled


# ------------------------------------------------------------------ without a table: as before
def _before(r: RoutingStats, cfg: RouterWeights, batch: int, blocks: list[int]):
    """score._step_times as it was before step-cost tables (commit 4f275c8), verbatim."""
    if r.step_base_ms is not None and r.step_per_token_ms is not None:
        base, per = r.step_base_ms, r.step_per_token_ms
        draft = r.draft_ms or 0.0
        return base + per * batch, {b: base + per * batch * b + draft for b in blocks}
    b0 = max(r.num_running, 1)
    scale = max(0.1, 1.0 + cfg.batch_slope * (batch - b0))
    t_ar = (r.step_ms_ar if r.step_ms_ar else cfg.default_step_ms) * scale
    measured = {b: t * scale for b, t in r.step_ms_by_block.items() if t > 0}
    out = {}
    for b in blocks:
        if b in measured:
            out[b] = measured[b]
        elif measured:
            bm = min(measured, key=lambda m: abs(m - b))
            out[b] = t_ar + (measured[bm] - t_ar) * b / bm
        else:
            out[b] = t_ar * (1.0 + (cfg.spec_cost_ratio - 1.0) * b / 16.0)
    return t_ar, out


def test_a_replica_without_a_table_is_scored_exactly_as_before():
    rng = random.Random(4)
    for _ in range(500):
        ar = rng.choice([None, 0.0, rng.uniform(2.0, 60.0)])
        blocks = rng.choice([{}, {16: 1.5}, {4: 1.1, 8: 1.3, 16: 1.6}, {8: 1.2}])
        r = RoutingStats("x", num_running=rng.randint(0, 20), step_ms_ar=ar,
                         step_ms_by_block={b: (ar or 20.0) * f for b, f in blocks.items()},
                         step_base_ms=rng.choice([None, 5.0]), step_per_token_ms=rng.choice([None, 0.3]),
                         draft_ms=rng.choice([None, 2.0]), step_costs=rng.choice([None, {}, {"ar_ms": {}}]))
        assert r.step_costs is None
        cfg = RouterWeights(batch_slope=rng.choice([0.0, 0.03, 0.2]), spec_cost_ratio=rng.choice([1.0, 1.5, 3.0]))
        batch, bl = rng.randint(1, 24), sorted(rng.sample([2, 3, 4, 6, 8, 12, 16], rng.randint(1, 4)))
        assert step_times(r, cfg, batch, bl) == _before(r, cfg, batch, bl)


# ------------------------------------------------------------------ the mock engine and the simulator
def test_the_mock_engine_reports_its_own_step_model_as_a_table():
    eng = MockEngine(block_size=16, max_num_seqs=8)
    st = RoutingStats.from_engine("m", eng.stats(), max_num_seqs=8)
    table = st.step_costs
    assert table is not None and table.blocks == (2, 4, 8, 16) and table.ar[0] == (1, 4)  # batch 16 > max_num_seqs
    for batch in (1, 3, 8):
        t_ar, t_spec = step_times(st, RouterWeights(), batch, [4, 8, 12, 16])
        assert t_ar == eng.step_ms(None)
        assert t_spec == pytest.approx({b: eng.step_ms(b) for b in (4, 8, 12, 16)})
    assert MockEngine(speculative=False).stats().step_costs["spec_ms"] == {}
    assert StepCostTable.parse(MockEngine(block_size=12).stats().step_costs).blocks == (2, 4, 8, 12)


def test_the_simulator_reports_the_table_a_calibrating_engine_would_measure():
    from benchmarks.simulator import ReplicaSpecSim, calibrated_costs
    from benchmarks.stepmodel import LinearStepModel

    step = LinearStepModel(a0=0.010, a1=0.001, s0=0.015, s1=0.0002, p1=0.0001)
    t = StepCostTable.parse(calibrated_costs(ReplicaSpecSim("r", step, 1000, max_num_seqs=8)))
    assert t.ar == ((1, 4), (pytest.approx(11.0), pytest.approx(14.0)))
    assert t.spec_at(4, 16) == pytest.approx(1000 * step.spec_s(4, 16))
    assert StepCostTable.parse(calibrated_costs(ReplicaSpecSim("n", step, 1000, spec_available=False))).blocks == ()
