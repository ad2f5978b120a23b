"""Acceptance measured at whatever block a pass ran is reported, and read by the router, as tau at the drafter's
block (workers/engine/acceptance.py, StatsTracker, RoutingStats, score.estimate_tau / tau_at_block)."""
import random

import pytest

from orchestrator.routing.score import RouteRequest, RouterWeights, _Taus, estimate_tau, rank, tau_at_block
from orchestrator.routing.stats import RoutingStats
from workers.engine.acceptance import alpha_of, observe, pass_counts, tau_at_ref, tau_from_alpha
from workers.engine.params import EngineStats, SpecParams
from workers.engine.stats import StatsTracker


def _routing(tracker: StatsTracker, block: int = 16) -> RoutingStats:
    st = tracker.snapshot(kv_free_tokens=50_000, kv_total_tokens=60_000, num_running=0, num_waiting=0)
    st.step_ms_ar, st.step_ms_by_block = 10.0, {4: 12.0, 16: 16.0}
    return RoutingStats.from_report(RoutingStats.from_engine("r", st, block_size_default=block).to_dict())


def test_pass_counts_count_a_rejection_only_where_one_happened():
    assert pass_counts(3, 3) == (3, 0)  # block 4, all accepted: the 4th draft position was never tried
    assert pass_counts(15, 1) == (1, 1)
    assert pass_counts(15, 0) == (0, 1)
    assert pass_counts(1, 1) == (1, 0)  # a block cut to 2 near max_tokens
    e = observe(None, 3, 3, 0.1)
    assert e == (3.0, 0.0, 1) and alpha_of(e[0], e[1]) == 1.0 and tau_at_ref(e, 16) == 16.0
    e = observe(e, 15, 1, 0.1)  # EWMA per pass on both counts
    assert e[0] == pytest.approx(0.9 * 3 + 0.1 * 1) and e[1] == pytest.approx(0.1) and e[2] == 2


def test_block_4_full_acceptance_reads_as_full_acceptance_at_block_16():
    """The bug: a session that ran block 4 and accepted every draft reported tau 4 (= 3 drafts + bonus), which the
    router read as tau 4 at block 16 and shrank again at block 4 (tau_at_block(4, 16, 4) ~ 2.6)."""
    tr = StatsTracker(max_block=16, ref_block=16)
    for _ in range(40):
        tr.record_spec(3, 3, {"session": "s", "role": "coder"})
    st = tr.snapshot(0, 0, 0, 0)
    assert st.tau_block == 16
    assert st.tau_by_tag["session"]["s"] == (16.0, 40) and st.tau_mean == 16.0
    r = _routing(tr)
    cfg = RouterWeights(explore=0.0)
    req = RouteRequest(session_id="s", role="coder", max_tokens=64)
    tau16, n = estimate_tau(req, r, cfg)
    assert n == 40 and tau16 == pytest.approx(16.0)
    assert tau_at_block(tau16, r.block_size_default, 4) == pytest.approx(4.0)
    # the router's prediction for this session at block 4: every draft accepted
    (choice,) = rank(RouteRequest(session_id="s", role="coder", max_tokens=64,
                                  spec_requested=SpecParams(enabled=True, block_size=4)), [r], cfg)
    assert choice.spec.block_size == 4 and choice.tau_hat == pytest.approx(4.0)
    assert tau_at_block(4.0, 16, 4) < 3.0  # what reading tau 4 as tau at block 16 predicted (the old report)


def test_mixed_blocks_combine_into_one_per_position_acceptance():
    """Passes at blocks 2, 4 and 16 (and blocks cut short) of one drafter with per-position acceptance 0.8 give
    tau(16) of alpha 0.8, where the old EWMA of committed tokens gave a mixed-block mean far below it."""
    rng = random.Random(7)
    alpha = 0.8
    tr = StatsTracker(alpha=0.0005, max_block=16, ref_block=16)  # a long window: the estimate's noise is small
    committed = []
    for _ in range(20_000):
        block = rng.choice([2, 3, 4, 16])
        k = 0
        while k < block - 1 and rng.random() < alpha:
            k += 1
        tr.record_spec(block - 1, k, {"role": "coder"})
        committed.append(k + 1)
    hits, misses, n = tr.accept_by_tag["role"]["coder"]
    assert n == 20_000 and alpha_of(hits, misses) == pytest.approx(alpha, abs=0.01)
    tau16 = tr.snapshot(0, 0, 0, 0).tau_by_tag["role"]["coder"][0]
    assert tau16 == pytest.approx(tau_from_alpha(alpha, 16), rel=0.05)  # tau(16) moves ~5x alpha's error
    assert sum(committed) / len(committed) < 0.7 * tau16  # the mixed-block mean the old tracker reported
    # and the router recovers alpha: tau at block 4 as a block-4 pass commits on average
    assert _Taus(tau16, 16).at(4) == pytest.approx(tau_from_alpha(alpha, 4), rel=0.02)


def test_passes_at_the_reference_block_report_their_mean_as_before():
    """Every pass at block 16 ends in a rejection after 2 accepted drafts (3 tokens): tau(16) = 3 up to the
    (16-token) truncation of the geometric model, as the old mean of committed tokens."""
    tr = StatsTracker(max_block=16, ref_block=16)
    for _ in range(50):
        tr.record_spec(15, 2, {"session": "s"})
    tau, n = tr.snapshot(0, 0, 0, 0).tau_by_tag["session"]["s"]
    assert n == 50 and tau == pytest.approx(3.0 * (1 - (2 / 3) ** 16)) and tau == pytest.approx(3.0, rel=2e-3)
    assert tr.snapshot(0, 0, 0, 0).tau_mean == pytest.approx(tau)


def test_reference_block_is_the_engines_default_block():
    tr = StatsTracker(max_block=16, ref_block=8)
    tr.record_spec(3, 3, {"session": "s"})
    st = tr.snapshot(0, 0, 0, 0)
    assert st.tau_block == 8 and st.tau_by_tag["session"]["s"] == (8.0, 1)


def test_old_reports_without_the_new_fields_parse_and_score_as_before():
    old = {"replica_id": "r", "kv_free_tokens": 50_000, "kv_total_tokens": 60_000, "step_ms_ar": 10.0,
           "step_ms_by_block": {"16": 16.0}, "tau_by_session": {"s": [5.0, 12]}, "tau_by_role": {"coder": [3.0, 40]},
           "tau_mean": 2.5, "block_size_default": 16}
    cfg = RouterWeights(explore=0.0)
    req = RouteRequest(session_id="s", role="coder", max_tokens=64)
    k = cfg.prior_strength
    est = (40 * 3.0 + k * 2.5) / (40 + k)
    est = (12 * 5.0 + k * est) / (12 + k)
    for r in (RoutingStats.from_dict(old), RoutingStats.from_report(old)):
        tau, n = estimate_tau(req, r, cfg)
        assert n == 12 and tau == pytest.approx(est)
    # an engine that does not say its tau block (EngineStats default) still builds a report
    eng = EngineStats(tau_by_tag={"session": {"s": (5.0, 12)}}, tau_mean=2.5)
    assert eng.tau_block is None
    assert RoutingStats.from_engine("r", eng).tau_by_session == {"s": (5.0, 12)}


async def test_mock_engine_reports_block_4_acceptance_at_its_block():
    """The mock engine (the demo's and the Serve tests' engine) keeps the same form: acceptance 1 at block 4 is
    tau 16 at its block 16, not 4."""
    from orchestrator.config import MockProfile
    from orchestrator.mock_engine import MockEngine
    from workers.engine.params import SamplingParams

    eng = MockEngine(MockProfile(step_ms=0, acceptance=1.0), block_size=16)
    outs = [o async for o in eng.generate("a", [9, 9], SamplingParams(max_tokens=40), SpecParams(True, 4),
                                          {"session": "s", "role": "coder"})]
    assert outs[-1].finish_reason == "length"
    st = eng.stats()
    assert st.tau_block == 16 and st.tau_by_tag["session"]["s"][0] == 16.0 and st.tau_mean == 16.0
