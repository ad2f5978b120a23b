"""Evidence tooling: the workload generator is seeded/replayable; the simulator conserves tokens and KV,
matches a hand-computed case, answers 429 instead of overcommitting, and routes by the same scoring."""
from __future__ import annotations

import pytest

from benchmarks.simulator import ReplicaSpecSim, Simulator, sessions_from_trace, summarize
from benchmarks.stepmodel import LinearStepModel, RooflineStepModel, fit_line
from benchmarks.workload import WorkloadConfig, generate, load, save

STEP = LinearStepModel(a0=0.010, a1=0.001, s0=0.015, s1=0.0002, p1=0.0001)


def test_workload_is_seeded_and_round_trips(tmp_path):
    cfg = WorkloadConfig(teams=5, seed=7)
    a, b = generate(cfg), generate(cfg)
    assert a == b and a != generate(WorkloadConfig(teams=5, seed=8))
    save(tmp_path / "t.jsonl", cfg, a)
    header, back = load(tmp_path / "t.jsonl")
    assert back == sorted(a, key=lambda s: s.start_s) and header["seed"] == 7
    assert {s.role for s in a} <= {"planner", "coder", "reviewer", "tool_caller"}
    starts = [s.start_s for s in a]
    assert starts == sorted(starts)


def _one_session(answer=33, prompt=100):
    return [{"session_id": "s", "team": "t", "role": "coder", "start_s": 0.0, "system_tokens": prompt - 10,
             "turns": [{"user_tokens": 10, "max_tokens": answer, "answer_tokens": answer, "think_s": 0.0}]}]


def test_single_request_matches_hand_computation():
    # alpha = 1: every pass commits a full block of 16 -> 1 prefill step + 2 passes (16 + 16) for 33 tokens
    rep = ReplicaSpecSim("r", STEP, 10000, alpha_default=1.0)
    res = Simulator([rep], "pow2").run(_one_session())
    (r,) = res.requests
    expected = STEP.prefill_s(100) + 2 * STEP.spec_s(1, 16)
    assert r.status == 200 and r.generated == 33
    assert r.t_done - r.t_arrive == pytest.approx(expected)
    # alpha = 0 under the specfleet router: speculation is a loss, so it is steered off (AR steps)
    rep0 = ReplicaSpecSim("r", STEP, 10000, alpha_default=0.0)
    sim = Simulator([rep0], "specfleet")
    # 500 passes, each its first draft rejected (accepted, rejected positions per pass: 0, 1): tau 1 at any block
    sim.reps[0].accept = {"session": {}, "role": {"coder": (0.0, 1.0, 500)}, "team": {}}
    sim.reps[0].accept_all = (0.0, 1.0, 500)
    (r0,) = sim.run(_one_session()).requests
    assert not r0.spec.enabled
    assert r0.t_done - r0.t_arrive == pytest.approx(STEP.prefill_s(100) + 32 * STEP.ar_s(1))


def test_kv_is_never_overcommitted_and_no_room_means_429():
    trace = generate(WorkloadConfig(teams=6, rate=100.0, seed=1))
    sess = sessions_from_trace(trace)
    for router in ("specfleet", "pow2", "consistent_hash"):
        reps = [ReplicaSpecSim("big", STEP, 4000), ReplicaSpecSim("tiny", STEP, 300)]
        res = Simulator(reps, router).run(sess, concurrency=18)
        assert all(0.0 <= u <= 1.0 for trace_ in res.kv_trace.values() for _, u in trace_)
        s = summarize(res.requests)
        assert s["completed"] + s["rejected_429"] == s["requests"]
        done = [r for r in res.requests if r.status == 200]
        assert all(r.generated == r.answer_tokens for r in done)
    # a request no replica can hold is refused, never admitted
    res = Simulator([ReplicaSpecSim("tiny", STEP, 50)], "specfleet").run(_one_session())
    assert [r.status for r in res.requests] == [429]


def test_specfleet_beats_baselines_on_a_heterogeneous_fleet():
    trace = generate(WorkloadConfig(teams=24, rate=50.0, seed=2, think_s=(0.0, 0.0)))
    sess = sessions_from_trace(trace)

    def fleet():
        code = {"coder": 0.9, "tool_caller": 0.9, "planner": 0.3, "reviewer": 0.3}
        chat = {"coder": 0.3, "tool_caller": 0.3, "planner": 0.9, "reviewer": 0.9}
        return [ReplicaSpecSim("code", STEP, 50000, code, max_num_seqs=8),
                ReplicaSpecSim("chat", STEP, 50000, chat, max_num_seqs=8)]

    good = {r: summarize(Simulator(fleet(), r, seed=0).run(sess, concurrency=16).requests)["goodput_tps"]
            for r in ("specfleet", "pow2", "consistent_hash")}
    assert good["specfleet"] > 1.15 * good["pow2"] and good["specfleet"] > 1.15 * good["consistent_hash"], good


def test_step_models():
    assert fit_line([1, 2, 4], [3.0, 5.0, 9.0]) == pytest.approx((1.0, 2.0))
    roof = RooflineStepModel("qwen3-8b", tp=1)
    assert roof.ar_s(1) < roof.ar_s(64) and roof.spec_s(8, 16) > roof.ar_s(8)
    assert RooflineStepModel("gpt-oss-120b", tp=8).ar_s(8) < RooflineStepModel("gpt-oss-120b", tp=4).ar_s(8)
