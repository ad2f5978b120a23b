"""Issue 15, never_slower at concurrency 16 (runs/evidence/never_slower_short2, 2026-12-03): the router ran block 2
on 58 of 83 turns where AR was faster (specfleet 0.856x static AR). The decision rebuilt offline from the run: the
table alone says AR at batch 13-16; the live correction turned it round, because the speculative EWMAs (read on
steps that mix AR rows with one speculative row, or with a block cut short at max_tokens) scaled the table by less
than the AR EWMA did. The engine now records pure steps only (tests/cpu/test_engine.py
::test_step_times_are_recorded_for_pure_steps_only), so those mixed steps leave no speculative EWMA; and with a table,
blocks seen only in EWMAs (blocks cut short at max_tokens) are no candidates. A floor of the speculative factor at the
AR factor, tried first, also hid real readings at concurrency 1 (never_slower 15:28 UTC: 0.68x) and was removed."""
from __future__ import annotations

import random

import pytest

from orchestrator.routing.decisions import RouteDecision, choose_spec, route_hints
from orchestrator.routing.score import RouteRequest, RouterWeights, live_factors, rank, step_times
from orchestrator.routing.stats import RoutingStats
from workers.engine.params import SpecParams

# The step-cost table the engine's calibration (workers/engine/calibrate.py) measured on this machine on 2026-12-03
# 11:24 UTC, SmolLM2-135M bf16 with the general drafter (docs/engine_bench_cpu.json "step_costs", docs/benchmarks.md).
# That run used 2 torch threads; the never_slower replica (1 thread) reported its own table only to the router, which
# no log keeps. Its decisions at t=0 (block 4 at batches 1-3, AR from batch 4 on, with the tau prior 2.0) say its
# speculative steps cost relatively more than these, so a replica with this table speculates at least as readily.
MEASURED = {
    "ar_ms": {"1": 12.2515, "4": 14.0303, "16": 21.0883},
    "spec_ms": {"4": {"1": 15.5217, "4": 22.1352, "16": 52.8353},
                "8": {"1": 18.0723, "4": 30.7436, "16": 81.7140},
                "16": {"1": 20.8019, "4": 49.4688, "16": 146.6648}},
    "draft_ms": {"4": {"1": 1.5268, "4": 2.0033, "16": 3.9752}, "8": {"1": 1.6739, "4": 2.5728, "16": 5.8636},
                 "16": {"1": 1.9088, "4": 3.9152, "16": 10.5191}},
}
W = RouterWeights()  # the served defaults (never_slower's specfleet run sets no weights)


def c16_report(step_ms_ar: float | None = 150.0, step_ms_by_block: dict[int, float] | None = None,
               running: int = 13) -> RoutingStats:
    """The replica's report as the router read it at t ~ 11.9 s of the c16 run, when the first block-2 turns were
    chosen: 13 running (/metrics: 11-15 all run long); the three block-4 first turns of team 0 (tau 1.48-1.50,
    ~65 passes each) had ended at t ~ 8.3, so pure AR steps had just set the AR EWMA (AR turns' TPOT then 150-204
    ms), while the block EWMAs kept what the steps with those three block-4 rows among 13 AR rows cost (their
    TPOT x tau ~ 110 ms), and blocks 3 and 2 the last steps of those turns, cut short at max_tokens (~ an AR step)."""
    blocks = {4: 110.0, 3: 99.0, 2: 99.0} if step_ms_by_block is None else step_ms_by_block
    return RoutingStats(
        "1t5xwbps", kv_free_tokens=19_300, kv_total_tokens=21_840, num_running=running, step_batch=running,
        max_num_seqs=16, step_ms_ar=step_ms_ar, step_ms_by_block=blocks, step_costs=MEASURED,
        tau_by_session={"team-21-0-a0-reviewer": (1.48, 65), "team-21-0-a1-planner": (1.50, 64),
                        "team-21-0-a2-planner": (1.50, 64)},
        tau_by_role={"reviewer": (1.48, 65), "planner": (1.50, 128)}, tau_by_team={"team-21-0": (1.49, 193)},
        tau_mean=1.49, cached_sessions={"team-21-1-a0-coder"})


# team-21-1-a0-coder's second turn (its first ran AR): the first turn the run sent to block 2
C16_TURN = RouteRequest("team-21-1-a0-coder", "coder", "team-21-1", prompt_tokens=260, max_tokens=128,
                        prefix_tokens=180, spec_off_turns=1)


def test_the_table_alone_says_ar_at_the_c16_batch():
    idle = c16_report(step_ms_ar=None, step_ms_by_block={})
    assert live_factors(idle, W) == (1.0, 1.0)
    for running in range(11, 17):
        assert not rank(C16_TURN, [c16_report(None, {}, running)], W)[0].spec.enabled


def test_the_c16_turn_runs_ar_with_the_live_ewmas_the_engine_now_records():
    """The run's AR EWMA (150 ms at batch 13) and no speculative EWMA: the steps with three block-4 rows among 13 AR
    rows, and the blocks cut to 3 and 2 at max_tokens, were mixed steps, which the engine no longer records.
    Before: block 2 (tau_hat 1.33), as in the run."""
    r = c16_report(step_ms_by_block={})
    best = rank(C16_TURN, [r], W)[0]
    assert best.spec == SpecParams(enabled=False, block_size=16) and best.reason == "only+spec-off"
    f_ar, f_spec = live_factors(r, W)
    assert f_ar == 4.0 and f_spec == f_ar  # no speculative reading: the table's ratio, scaled by the AR reading
    # the replica-side path (a call without the router's decision) decides the same
    hints = route_hints("r", session_id=C16_TURN.session_id, role="coder", team="team-21-1", prompt_tokens=260,
                        max_tokens=128, prefix_tokens=180, spec_off_turns=1)
    assert choose_spec(hints, RouteDecision("1t5xwbps", "direct"), r, W) == SpecParams(enabled=False, block_size=16)


def test_blocks_cut_short_are_no_candidates_with_a_table():
    """EWMA keys 2 and 3 (blocks cut at max_tokens) do not become candidate blocks where the table measured 4/8/16."""
    r = c16_report(step_ms_ar=None, step_ms_by_block={2: 5.0, 3: 5.0}, running=1)
    for tau in (1.5, 3.0, 6.0):
        req = RouteRequest("s", "coder", "t", prompt_tokens=200, max_tokens=128)
        rr = RoutingStats(**{**r.__dict__, "tau_by_session": {"s": (tau, 200)}})
        spec = rank(req, [rr], W)[0].spec
        assert not spec.enabled or spec.block_size in (4, 8, 16), (tau, spec)


def test_at_batch_12_to_16_an_ar_reading_alone_keeps_speculation_off():
    """Every AR EWMA the run could have shown at its batch, no speculative reading (mixed steps are not recorded),
    the taus it measured: AR, as the table says."""
    for running in (11, 13, 15, 16):
        for ar in (None, 15.0, 21.0, 60.0, 150.0):
            r = c16_report(ar, {}, running)
            for tau in (1.2, 1.35, 1.5, 1.6):
                req = RouteRequest("s", "coder", "t", prompt_tokens=200, max_tokens=128)
                rr = RoutingStats(**{**r.__dict__, "tau_by_session": {"s": (tau, 200)}})
                assert not rank(req, [rr], W)[0].spec.enabled, (running, ar, tau)


def test_a_live_reading_of_one_kind_scales_both_kinds():
    """Random reports with an AR EWMA and no speculative one: the live correction scales AR and speculative steps
    alike, so it never turns the table's decision round; the AR step is scaled by its own EWMA."""
    rng = random.Random(15)
    for _ in range(400):
        running = rng.randint(1, 16)
        ar = rng.uniform(5.0, 200.0)
        tau = rng.uniform(1.0, 8.0)
        live = RoutingStats("x", kv_free_tokens=19_300, kv_total_tokens=21_840, num_running=running,
                            step_ms_ar=ar, step_ms_by_block={}, step_costs=MEASURED,
                            tau_by_session={"s": (tau, 500)}, tau_mean=tau)
        table_only = RoutingStats(**{**live.__dict__, "step_ms_ar": None})
        req = RouteRequest("s", None, None, prompt_tokens=100, max_tokens=128)
        f_ar, f_spec = live_factors(live, W)
        assert f_spec == f_ar
        assert rank(req, [table_only], W)[0].spec.enabled == rank(req, [live], W)[0].spec.enabled
        t_ar = step_times(live, W, running + 1, [4])[0]
        assert t_ar == pytest.approx(step_times(table_only, W, running + 1, [4])[0] * f_ar)


def test_speculation_that_paid_at_concurrency_1_still_runs():
    """c1 (specfleet 1.077x the best static): planner sessions at tau 6-7 ran block 8, alone on the replica; their
    steps are pure, so the live EWMAs (the run's AR TPOT 23.7 ms, 2x the table here) leave the choice to tau."""
    for ar, b8 in ((None, None), (23.7, 36.0), (23.7, 30.0), (12.0, 40.0)):
        r = RoutingStats("1t5xwbps", kv_free_tokens=21_000, kv_total_tokens=21_840, num_running=1, step_batch=1,
                         step_ms_ar=ar, step_ms_by_block={8: b8} if b8 else {}, step_costs=MEASURED,
                         tau_by_session={"team-21-0-a1-planner": (6.0, 40)}, tau_by_role={"planner": (6.5, 80)},
                         tau_mean=4.0)
        req = RouteRequest("team-21-0-a1-planner", "planner", "team-21-0", prompt_tokens=300, max_tokens=96)
        # the request joins a batch of 1 (its own previous turn's slot is free: num_running 0 at c1)
        for running in (0, 1):
            spec = rank(req, [RoutingStats(**{**r.__dict__, "num_running": running})], W)[0].spec
            assert spec.enabled and spec.block_size >= 4, (ar, b8, running, spec)

