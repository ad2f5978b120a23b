"""Never slower, in the simulator: one replica priced by this CPU's measured step table (docs/engine_bench_cpu.json,
2026-12-03; block 2 read by rows), specfleet's steering against static AR and static DFlash block 16 at concurrency
1, 4 and 16, for a weak and a medium drafter. The real-engine check is benchmarks/never_slower.py (docs/evidence.md);
this one guards the policy: choosing blocks by the request's own rate put block 2 into batches of 16 and lost 24 %
to static AR on the real engine (never_slower c16, 2026-12-03)."""
from __future__ import annotations

import random

import pytest

from benchmarks.simulator import ReplicaSpecSim, Simulator, summarize
from benchmarks.stepmodel import TableStepModel
from orchestrator.routing.score import RouterWeights
from orchestrator.routing.step_costs import StepCostTable

ROLES = ("planner", "coder", "reviewer", "tool_caller")
CPU_TABLE = {"ar_ms": {"1": 12.25, "4": 14.03, "16": 21.09},
             "spec_ms": {"4": {"1": 15.52, "4": 22.14, "16": 52.84},
                         "8": {"1": 18.07, "4": 30.74, "16": 81.71},
                         "16": {"1": 20.80, "4": 49.47, "16": 146.66}}}


def _step_model() -> TableStepModel:
    rows = StepCostTable.parse(CPU_TABLE)
    table = {**CPU_TABLE, "spec_ms": {**CPU_TABLE["spec_ms"], "2": {b: rows.at_rows(2 * int(b)) for b in ("1", "4", "16")}}}
    return TableStepModel({"64": table}, prefill_ms_per_token=0.6)


def _sessions(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [{"session_id": f"s{i}", "team": f"t{i // 4}", "role": ROLES[i % 4], "start_s": 0.0, "system_tokens": 60,
             "turns": [{"user_tokens": rng.randint(20, 80), "max_tokens": 96, "answer_tokens": rng.randint(30, 96),
                        "think_s": 0.0} for _ in range(4)]} for i in range(n)]


def _goodput(router: str, spec_default: bool, alpha: float, c: int) -> float:
    rep = ReplicaSpecSim("r0", _step_model(), 21840, {r: alpha for r in ROLES}, alpha, 16, True, 16, 32)
    sim = Simulator([rep], router, RouterWeights(), 1.0, seed=1, spec_default=spec_default)
    return summarize(sim.run(_sessions(2 * c, c), concurrency=c).requests)["goodput_tps"]


@pytest.mark.parametrize("alpha", [0.2, 0.5])  # tau at block 16: 1.25 (weaker than ours), 2.0
@pytest.mark.parametrize("c", [1, 4, 16])
def test_specfleet_is_never_below_095_of_the_best_static_policy(alpha, c):
    ar = _goodput("pow2", False, alpha, c)
    b16 = _goodput("pow2", True, alpha, c)
    ours = _goodput("specfleet", True, alpha, c)
    assert ours >= 0.95 * max(ar, b16), (ours, ar, b16)
