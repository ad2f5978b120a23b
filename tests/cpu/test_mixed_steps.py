"""Steps priced by rows (score.py, "Mixed steps"): a request's block is the rows it adds to the replica's shared
step, chosen on the replica's goodput change (its own rate less what the running sequences lose), not on its own
rate alone. The table below is the CPU's measured one (docs/engine_bench_cpu.json, 2026-12-03)."""
from __future__ import annotations

import pytest

from orchestrator.routing.score import RouteRequest, RouterWeights, mixed_step_times, rank, tau_at_block
from orchestrator.routing.stats import RoutingStats
from orchestrator.routing.step_costs import StepCostTable
from workers.engine.params import EngineStats
from workers.engine.stats import StatsTracker

CPU_TABLE = {"ar_ms": {"1": 12.25, "4": 14.03, "16": 21.09},
             "spec_ms": {"4": {"1": 15.52, "4": 22.14, "16": 52.84},
                         "8": {"1": 18.07, "4": 30.74, "16": 81.71},
                         "16": {"1": 20.80, "4": 49.47, "16": 146.66}}}


def test_at_rows_reads_every_entry_by_its_rows():
    tab = StepCostTable.parse(CPU_TABLE)
    assert tab.at_rows(1) == pytest.approx(12.25)
    assert tab.at_rows(16) == pytest.approx((21.09 + 22.14 + 20.80) / 3)  # 16 AR, 4 x block 4, 1 x block 16
    assert tab.at_rows(256) == pytest.approx(146.66)
    assert tab.at_rows(10) == pytest.approx(18.07 + (tab.at_rows(16) - 18.07) * 2 / 8)  # between 8 and 16 rows
    assert tab.at_rows(512) > tab.at_rows(256)  # the last segment's slope beyond


def _replica(running: int, rows: float, tokens: float, ms: float, tau: float) -> RoutingStats:
    return RoutingStats("r0", kv_free_tokens=20_000, kv_total_tokens=21_840, num_running=running, step_batch=running,
                        step_costs=CPU_TABLE, decode_ms=ms, decode_rows=rows, decode_tokens=tokens,
                        tau_by_role={"coder": (tau, 500)}, tau_mean=tau, block_size_default=16)


def _spec(stats: RoutingStats, **kw):
    cfg = RouterWeights(explore=0.0, **kw)
    return rank(RouteRequest(role="coder", max_tokens=128), [stats], cfg)[0].spec


def test_block_2_is_not_chosen_into_a_batch_of_15_ar_sequences():
    """never_slower c16, 2026-12-03: block 2 on 76 of 96 turns gave 0.76x static AR. By its own rate block 2 wins
    (tau(2) ~1.33 for 1 + 1/16 more rows); net of the 15 others' loss it does not."""
    stats = _replica(15, 15.0, 15.0, 21.0, 1.5)
    assert not _spec(stats).enabled
    # by its own rate, block 2 beats AR by more than the margin: the others' loss is what decides
    t_now, s_now, t_ar, t_spec = mixed_step_times(stats, [2])
    tau2 = tau_at_block(1.5, 16, 2)  # ~1.33
    assert 1.3 < tau2 < 1.4 and tau2 / t_spec[2] > 1.05 / t_ar
    assert s_now == 15.0 and t_spec[2] > t_ar > t_now
    # with one running sequence (little to lose) the same acceptance speculates
    assert _spec(_replica(1, 1.0, 1.0, 12.3, 1.5)).enabled


def test_an_idle_replica_still_speculates_where_it_pays():
    stats = _replica(0, 1.0, 1.0, 12.0, 4.0)
    spec = _spec(stats)
    assert spec.enabled and spec.block_size >= 4


def test_a_lone_request_beside_one_other_keeps_its_block_when_acceptance_is_high():
    stats = _replica(1, 16.0, 5.0, 21.0, 6.0)  # one sequence at block 16 committing ~5 tokens per step
    assert _spec(stats).enabled


def test_mixed_step_times_counts_requests_in_flight_as_ar_rows():
    stats = _replica(4, 4.0, 4.0, 14.0, 1.5)
    t_now, s_now, t_ar, t_spec = mixed_step_times(stats, [2, 16])
    stats.add_inflight([100, 100])  # two more routed since the report
    t_now2, s_now2, t_ar2, _ = mixed_step_times(stats, [2, 16])
    assert s_now2 == pytest.approx(s_now + 2) and t_now2 > t_now and t_ar2 > t_ar
    assert t_spec[16] > t_spec[2] > t_ar


def test_no_decode_ewmas_or_no_table_means_the_old_model():
    stats = _replica(4, 4.0, 4.0, 14.0, 1.5)
    stats.decode_ms = None
    assert mixed_step_times(stats, [2]) is None
    stats = _replica(4, 4.0, 4.0, 14.0, 1.5)
    stats.step_costs = None
    assert mixed_step_times(stats, [2]) is None


def test_the_engine_tracker_reports_every_decode_step():
    t = StatsTracker(alpha=0.5)
    t.record_decode_step(20.0, 16, 16)  # 16 AR rows
    t.record_decode_step(30.0, 20, 18)  # mixed: 14 AR + one block-6... any mix
    st = t.snapshot(100, 200, 15, 0)
    assert st.decode_ms == pytest.approx(25.0) and st.decode_rows == pytest.approx(18.0)
    assert st.decode_tokens == pytest.approx(17.0)
    rs = RoutingStats.from_engine("r", st)
    assert (rs.decode_ms, rs.decode_rows, rs.decode_tokens) == (st.decode_ms, st.decode_rows, st.decode_tokens)
    assert RoutingStats.from_dict(rs.to_dict()).decode_rows == pytest.approx(18.0)
    assert RoutingStats.from_engine("r", EngineStats()).decode_ms is None
