"""The simulated replica reports the decode-step EWMAs the engine reports (workers/engine/stats.py,
record_decode_step: every decode step, mixed or pure, no prefill in it; ms, target rows = 1 per AR sequence + the
block per speculative one, committed tokens; alpha 0.1), so the simulated router prices blocks by rows as the
real one does (orchestrator/routing/score.py, "Mixed steps")."""
from __future__ import annotations

import pytest

from benchmarks.simulator import Req, ReplicaSpecSim, Simulator
from benchmarks.stepmodel import LinearStepModel
from orchestrator.routing.score import mixed_step_times
from workers.engine.params import SpecParams

STEP = LinearStepModel(a0=0.010, a1=0.001, s0=0.015, s1=0.0002, p1=0.0001)


def _req(rid: int, block: int | None, answer: int = 100_000) -> Req:
    r = Req(rid, f"s{rid}", "t", "coder", 0, 100, answer, answer, 0.0)
    r.spec = SpecParams(enabled=block is not None, block_size=block or 16)
    r.generated = 1  # past its prefill
    return r


def _one_step(sim: Simulator, now: float = 0.0) -> float:
    """Run one step of replica 0 to completion; its ms as the simulator timed it."""
    rep = sim.reps[0]
    sim._step(rep, now)
    t, _, kind, (rep_, new, decode, ms) = sim.events.pop()
    assert kind == "step_done" and ms == pytest.approx((t - now) * 1000)
    sim.active, sim.done = 0, []
    sim.pending, sim.sessions = [], {}
    rep.busy_until = None
    sim._step_done(rep_, new, decode, ms, t)
    sim.events.clear()  # the next step is started by the test
    return ms


def _sim(alpha: float = 1.0) -> Simulator:
    rep = ReplicaSpecSim("r", STEP, 1_000_000, alpha_by_role={"coder": alpha}, max_num_seqs=64)
    return Simulator([rep], "specfleet")


def test_a_mixed_step_reports_its_rows_tokens_and_ms():
    sim = _sim(alpha=1.0)  # every draft accepted: a block-4 sequence commits 4 tokens
    rep = sim.reps[0]
    rep.running = [_req(1, None), _req(2, None), _req(3, None), _req(4, 4)]
    assert rep.stats(0.0).decode_ms is None  # nothing measured yet
    ms = _one_step(sim)
    st = rep.stats(1.0)
    assert (st.decode_rows, st.decode_tokens) == (pytest.approx(3 + 4), pytest.approx(3 + 4))
    # one forward over the step's 7 rows on the speculative line (not 4 sequences each verifying a block of 4)
    assert st.decode_ms == pytest.approx(ms) and ms == pytest.approx((STEP.s0 + STEP.s1 * 7) * 1000)
    # with no acceptance the block still costs its rows; it commits one token
    sim0 = _sim(alpha=0.0)
    sim0.reps[0].running = [_req(1, None), _req(2, 8)]
    _one_step(sim0)
    st0 = sim0.reps[0].stats(1.0)
    assert (st0.decode_rows, st0.decode_tokens) == (pytest.approx(1 + 8), pytest.approx(2))


def test_the_ewmas_follow_the_batch_at_the_engines_alpha():
    sim = _sim(alpha=1.0)
    rep = sim.reps[0]
    rep.running = [_req(i, None) for i in range(8)]  # 8 AR rows
    ms8 = _one_step(sim)
    rep.running = [_req(i, 16) for i in range(2)]  # then 2 x block 16: 32 rows, 32 tokens
    ms32 = _one_step(sim, 1.0)
    st = rep.stats(2.0)
    assert st.decode_rows == pytest.approx(0.9 * 8 + 0.1 * 32)
    assert st.decode_tokens == pytest.approx(0.9 * 8 + 0.1 * 32)
    assert st.decode_ms == pytest.approx(0.9 * ms8 + 0.1 * ms32)
    for _ in range(80):  # and converge on the new batch
        _one_step(sim, 2.0)
    st = rep.stats(3.0)
    assert st.decode_rows == pytest.approx(32, rel=1e-3) and st.decode_ms == pytest.approx(ms32, rel=1e-3)


def test_a_step_with_a_prefill_in_it_is_not_a_decode_step():
    sim = _sim()
    rep = sim.reps[0]
    rep.running = [_req(1, None)]
    _one_step(sim)
    before = rep.stats(1.0)
    fresh = _req(9, 4)
    fresh.generated = 0
    rep.waiting.append(fresh)  # admitted this step: its prefill rides in it
    _one_step(sim, 1.0)
    after = rep.stats(2.0)
    assert after.num_running == 2
    assert (after.decode_ms, after.decode_rows, after.decode_tokens) == (
        before.decode_ms, before.decode_rows, before.decode_tokens)


def test_a_simulated_run_reports_them_and_the_router_prices_by_rows():
    from benchmarks.simulator import sessions_from_trace
    from benchmarks.workload import WorkloadConfig, generate

    sess = sessions_from_trace(generate(WorkloadConfig(teams=3, rate=50.0, seed=3)))
    sim = Simulator([ReplicaSpecSim("a", STEP, 50_000), ReplicaSpecSim("b", STEP, 50_000)], "specfleet")
    seen = []
    view = sim._view

    def spy(rep, now):
        s = view(rep, now)
        seen.append(s)
        return s

    sim._view = spy
    res = sim.run(sess, concurrency=6)
    assert res.requests and all(r.status == 200 for r in res.requests)
    reported = [s for s in seen if s.decode_ms is not None]
    assert reported, "no decode EWMAs reached the router"
    assert all(s.decode_rows >= 1.0 and s.decode_tokens >= 1.0 and s.decode_ms > 0 for s in reported)
    assert any(mixed_step_times(s, [4]) is not None for s in reported)
