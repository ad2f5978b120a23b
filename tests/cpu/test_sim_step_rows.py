"""The simulator times a decode step as the engine runs it (workers/engine/step.py: one target forward over the
flat batch of every sequence's rows): ``decode_s(blocks, ctx)`` on each step model (benchmarks/stepmodel.py).
Pure steps cost what ar_s / spec_s said before; a mixed step costs its rows, not every AR row verifying the
block, and several blocks in one step add their rows instead of taking the largest block's cost. A block is cut
at the tokens left before max_tokens (workers/engine/scheduler.py, decode_block)."""
from __future__ import annotations

import pytest

from benchmarks.simulator import Req, ReplicaSpecSim, Simulator
from benchmarks.stepmodel import LinearStepModel, RooflineStepModel, TableStepModel
from orchestrator.routing.step_costs import StepCostTable
from workers.engine.params import SpecParams

LINEAR = LinearStepModel(a0=0.010, a1=0.001, s0=0.015, s1=0.0002, p1=0.0001)
# the CPU's measured table (docs/engine_bench_cpu.json, 2026-12-03), rounded; and a slower one at a longer context
CPU = {"ar_ms": {"1": 12.3, "4": 14.0, "16": 21.1},
       "spec_ms": {"4": {"1": 15.5, "4": 22.1, "16": 52.8}, "8": {"1": 18.1, "4": 30.7, "16": 81.7},
                   "16": {"1": 20.8, "4": 49.5, "16": 146.7}}}
LONG = {"ar_ms": {"1": 15.0, "4": 18.0, "16": 30.0}, "spec_ms": {"16": {"1": 26.0, "4": 60.0, "16": 180.0}}}
TABLE = TableStepModel({64: CPU, 1024: LONG}, prefill_ms_per_token=0.5)

PURE = [[1], [1] * 4, [1] * 16, [1] * 23, [4], [4] * 4, [16] * 4, [8] * 16, [16] * 20, [2] * 3, [12] * 5]
MIXED = [[1] * 15 + [16], [1] * 12 + [4] * 4, [16, 16, 4, 4], [1] * 8 + [8] * 8, [1, 4, 8, 16]]


def _old(model, blocks: list[int], ctx: int) -> float:
    """The simulator's step before: every block's spec_s over all its sequences plus the AR ones, the largest."""
    ar = sum(1 for b in blocks if b == 1)
    spec = [b for b in blocks if b > 1]
    if not spec:
        return model.ar_s(ar, ctx)
    return max(model.spec_s(spec.count(b) + ar, b, ctx) for b in set(spec))


@pytest.mark.parametrize("ctx", [0, 64, 500, 1024, 3000])
def test_table_pure_steps_keep_their_measured_cost_and_mixed_ones_cost_their_rows(ctx):
    for blocks in PURE:
        assert TABLE.decode_s(blocks, ctx) == _old(TABLE, blocks, ctx)
    for blocks in MIXED:
        assert TABLE.decode_s(blocks, ctx) == pytest.approx(TABLE.rows_s(sum(blocks), ctx))
    # 15 AR + 1 x block 16 = 31 rows: about a 16-row step, not 16 sequences each verifying a block of 16
    mixed = TABLE.decode_s([1] * 15 + [16], 64)
    assert mixed == pytest.approx((21.1 + 20.8 + 22.1) / 3 / 1000 + (30.7 - (21.1 + 20.8 + 22.1) / 3) / 1000 * 15 / 16)
    assert _old(TABLE, [1] * 15 + [16], 64) == pytest.approx(0.1467)


def test_table_rows_read_as_the_router_reads_them():
    """At a measured context rows_s is StepCostTable.at_rows of the same table (every entry at its rows, equal rows
    averaged, piecewise linear, the last slope beyond); between contexts it interpolates as ar_s / spec_s do."""
    at = StepCostTable.parse(CPU)
    for rows in (1, 2, 3, 4, 7, 16, 17, 31, 32, 33, 64, 100, 128, 200, 256, 300):
        assert TABLE.rows_s(rows, 64) * 1000 == pytest.approx(at.at_rows(rows))
    long = StepCostTable.parse(LONG)
    assert TABLE.rows_s(40, 544) * 1000 == pytest.approx((at.at_rows(40) + long.at_rows(40)) / 2)
    assert TABLE.scaled(2.0).rows_s(40, 64) == pytest.approx(2 * TABLE.rows_s(40, 64))
    ar_only = TableStepModel({64: {"ar_ms": CPU["ar_ms"]}}, 0.0)  # no speculative entry: rows on the AR row
    assert ar_only.decode_s([1, 1, 4], 64) == pytest.approx(ar_only.ar_s(6, 64))


def test_linear_costs_its_rows_on_the_line_of_the_step_kind():
    for blocks in PURE:
        assert LINEAR.decode_s(blocks) == pytest.approx(_old(LINEAR, blocks, 0))
    assert LINEAR.decode_s([1] * 15 + [16]) == pytest.approx(LINEAR.s0 + LINEAR.s1 * 31)
    assert LINEAR.decode_s([16, 16, 4, 4]) == pytest.approx(LINEAR.s0 + LINEAR.s1 * 40)
    assert _old(LINEAR, [1] * 15 + [16], 0) == pytest.approx(LINEAR.s0 + LINEAR.s1 * 16 * 16)
    assert LINEAR.decode_s([]) == 0.0


def test_roofline_prices_the_flat_forward_and_one_padded_drafter_pass():
    from cluster.planning.roofline import drafter_step, target_rows_step, target_step

    roof = RooflineStepModel("gpt-oss-120b", tp=8)
    for ctx in (64, 1024, 8000):
        for blocks in PURE:
            assert roof.decode_s(blocks, ctx) == pytest.approx(_old(roof, blocks, ctx), rel=1e-12)
        for b, k in ((1, 1), (4, 4), (16, 16), (3, 8)):  # target_step is target_rows_step at batch x block rows
            assert target_step(roof.model, roof.node, 8, b, k, ctx) == target_rows_step(roof.model, roof.node, 8,
                                                                                        b * k, b, ctx)
    blocks = [1] * 15 + [16]
    want = (target_rows_step(roof.model, roof.node, 8, 31, 16, 1024).total_s
            + drafter_step(roof.drafter, roof.model, roof.node, 8, 1, 16, 1024).total_s)
    assert roof.decode_s(blocks, 1024) == pytest.approx(want)
    assert roof.decode_s(blocks, 1024) < _old(roof, blocks, 1024)  # 31 rows, not 16 x 16
    assert RooflineStepModel("gpt-oss-120b", tp=8, drafter=False).decode_s(blocks, 1024) == pytest.approx(
        target_rows_step(roof.model, roof.node, 8, 31, 16, 1024).total_s)


def _req(rid: int, block: int | None, generated: int = 1, max_tokens: int = 100_000) -> Req:
    r = Req(rid, f"s{rid}", "t", "coder", 0, 100, max_tokens, max_tokens, 0.0)
    r.spec = SpecParams(enabled=block is not None, block_size=block or 16)
    r.generated = generated
    return r


def _step(sim: Simulator, running: list[Req]) -> tuple[float, float | None, dict[int, float]]:
    """One step of replica 0 over ``running``, to completion: its ms, and the pure-step EWMAs (AR, by block)
    right after it (the replica starts its next step as this one completes)."""
    rep = sim.reps[0]
    rep.running = running
    sim._step(rep, 0.0)
    pure = (rep.step_ms_ar, dict(rep.step_ms_by_block))
    t, _, kind, (rep_, new, decode, ms) = sim.events.pop()
    sim.pending, sim.active, sim.done = [], 1, []
    rep.busy_until = None
    # a request that finishes ends its one-turn session
    sim.sessions = {x.session: {"context": 0, "turns": [{}]} for x in running}
    sim._step_done(rep_, new, decode, ms, t)
    sim.events.clear()
    return (ms, *pure)


@pytest.mark.parametrize("model", [LINEAR, TABLE], ids=["linear", "table"])
def test_the_simulator_times_a_step_by_the_models_decode_s(model):
    sim = Simulator([ReplicaSpecSim("r", model, 10_000_000, alpha_default=1.0, max_num_seqs=64)], "specfleet")
    reqs = [_req(i, None) for i in range(15)] + [_req(99, 16)]
    ctx = 101  # every sequence: 100 prompt tokens + 1 generated
    ms, ar_ms, by_block = _step(sim, reqs)
    assert ms == pytest.approx(model.decode_s([1] * 15 + [16], ctx) * 1000)
    assert ar_ms is None and not by_block  # a mixed step is no step kind
    ms, ar_ms, by_block = _step(sim, [_req(i, 4) for i in range(4)])
    assert ms == pytest.approx(model.spec_s(4, 4, ctx) * 1000) and by_block == {4: pytest.approx(ms)}  # as before


def test_a_block_is_cut_at_the_tokens_left_before_max_tokens():
    sim = Simulator([ReplicaSpecSim("r", LINEAR, 10_000_000, alpha_default=1.0, max_num_seqs=64)], "specfleet")
    rep = sim.reps[0]
    near = _req(1, 16, generated=5, max_tokens=8)  # 3 tokens left: block 3
    ms, _, by_block = _step(sim, [near, _req(2, 16)])
    assert ms == pytest.approx(LINEAR.decode_s([3, 16], 103) * 1000) and ms < LINEAR.decode_s([16, 16]) * 1000
    assert near.generated == 8 and near.status == 200  # all 3 accepted: done at max_tokens, not past it
    assert rep.decode.decode_rows == pytest.approx(3 + 16)  # the rows the engine feeds, as it reports them
    assert not by_block  # blocks 3 and 16 in one step: no step kind
    last = _req(3, 16, generated=7, max_tokens=8)  # 1 token left: an AR step, no draft
    ms, ar_ms, _ = _step(sim, [last])
    assert ms == pytest.approx(LINEAR.ar_s(1, 107) * 1000) and last.spec_passes == 0 and last.generated == 8
    assert ar_ms == pytest.approx(ms)
