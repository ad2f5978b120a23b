"""Invariants of a simulated run that any step model, router or bookkeeping change must keep: time runs forward
(arrival <= first token <= done, each replica's steps in order), no request decodes faster than its replica's
cheapest forward allows, and goodput moves smoothly with concurrency on the B300 projection's fleet.

Regression: the B300 projection of 2026-12-03 16:44 UTC (runs/evidence/b300_specialised.json at a0d0eec+dirty)
ran a simulator whose step_done payload had gained the step's ms while the handler still read that slot as the
clock, so the event clock jumped to step durations in ms: TPOT p50 -62 ms, TTFT 21 s over a 3.4 s run, pow2
12,390 -> 23,321 tok/s and specfleet 11,484 -> 1,569 tok/s from 8 to 16 sessions. The checks below fail on that
simulator (reproduced by passing the ms in the clock's slot)."""
from __future__ import annotations

import pytest

from benchmarks.project_b300 import DEFAULT_ALPHAS, fleet, level_sessions
from benchmarks.simulator import ReplicaSpecSim, Simulator, summarize
from benchmarks.stepmodel import LinearStepModel
from orchestrator.routing.score import RouterWeights

CASE = "qwen3-8b-8xTP1"
LEVELS = (8, 16)
ROUTERS = ("specfleet", "pow2", "consistent_hash")


def _run(router: str, conc: int):
    reps = fleet(CASE, DEFAULT_ALPHAS, 64, 1.0)
    sim = Simulator(reps, router, RouterWeights(), stats_period_s=1.0, seed=0)
    res = sim.run(level_sessions(conc, think=(0.0, 0.0)), concurrency=conc)
    return reps, res, summarize(res.requests)


@pytest.fixture(scope="module")
def runs():
    return {(r, c): _run(r, c) for r in ROUTERS for c in LEVELS}


@pytest.mark.parametrize("router", ROUTERS)
@pytest.mark.parametrize("conc", LEVELS)
def test_time_runs_forward(runs, router, conc):
    _, res, summ = runs[(router, conc)]
    ok = [r for r in res.requests if r.status == 200]
    assert ok and summ["completed"] == summ["requests"]
    for r in ok:
        assert r.t_arrive <= r.t_first <= r.t_done <= res.duration_s, (r.rid, r.t_arrive, r.t_first, r.t_done)
    for name, trace in res.kv_trace.items():  # one entry per finished step of that replica, in its order
        times = [t for t, _ in trace]
        assert times == sorted(times), name
        assert all(0.0 <= t <= res.duration_s for t in times), name
    assert summ["tpot_p50_ms"] >= 0 and summ["ttft_p99_s"] <= summ["duration_s"]


@pytest.mark.parametrize("router", ROUTERS)
@pytest.mark.parametrize("conc", LEVELS)
def test_no_request_decodes_faster_than_its_replicas_cheapest_forward(runs, router, conc):
    """A decode step commits at most the block per sequence and takes at least the cheapest forward (batch 1,
    context 1), so a request's tokens after the first are bounded by its decode time."""
    reps, res, _ = runs[(router, conc)]
    by_name = {s.name: s for s in reps}
    for r in res.requests:
        if r.status != 200 or r.generated <= 1:
            continue
        s = by_name[r.replica]
        fastest = s.block_size / s.step.ar_s(1, 1)  # tokens/s of one sequence at its best
        assert r.generated - 1 <= fastest * (r.t_done - r.t_first) * (1 + 1e-9), (r.rid, r.generated)


def test_goodput_moves_smoothly_with_concurrency(runs):
    """Eight replicas, 8 -> 16 closed-loop agent sessions with no think time: more sessions batch more, so goodput
    rises, and at most doubles (the 16:44 run: specfleet 0.14x, pow2 1.9x, hash 1.2x, and 8x apart at c=8)."""
    for router in ROUTERS:
        g8, g16 = (runs[(router, c)][2]["goodput_tps"] for c in LEVELS)
        assert 0.9 <= g16 / g8 <= 2.2, (router, g8, g16)
    for conc in LEVELS:
        g = {r: runs[(r, conc)][2]["goodput_tps"] for r in ROUTERS}
        assert max(g.values()) <= 2.0 * min(g.values()), (conc, g)


def test_an_event_before_the_clock_is_refused():
    """A step model that returns a negative time (or a bookkeeping slip) cannot run the clock backwards."""
    bad = LinearStepModel(a0=-0.05, a1=0.0, s0=-0.05, s1=0.0, p1=0.0001)
    sim = Simulator([ReplicaSpecSim("r0", bad, 100_000, {"coder": 0.5}, 0.5, 4, True, 4, 8, calibrated=False)],
                    "pow2", seed=0)
    sessions = [{"session_id": "s0", "team": "t", "role": "coder", "start_s": 0.0, "system_tokens": 10,
                 "turns": [{"user_tokens": 10, "max_tokens": 20, "answer_tokens": 20, "think_s": 0.0,
                            "prompt_tokens": None}]}]
    with pytest.raises(RuntimeError, match="before the clock"):
        sim.run(sessions, concurrency=1)
