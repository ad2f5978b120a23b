"""The graph runner's static-buffer / bucket-padding path (eager replay on CPU) == the engine's eager path.

Checked two ways on a tiny random Qwen3 + random DFlash drafter:
  * one forward: logits, captured features and every real KV slot equal the eager runner's, for flat
    batches that need batch, query-run and context padding (the scratch block takes the padding writes);
  * whole generations: greedy AR and greedy speculative decoding through the engine with the graph runner
    give the same tokens as the eager engine and the full-recompute oracle, across batch buckets, and the
    bucketed path really ran (per-bucket hit counters).
"""
from __future__ import annotations

import pytest
import torch

from tests.helpers.tiny import greedy_outputs, reference_greedy, tiny_engine
from workers.engine.graph_runner import GraphRunner, bucket, pow2_buckets, reserve_scratch_block
from workers.engine.params import SpecParams
from workers.engine.runner import ModelRunner, SeqSlice, build_draft_inputs, build_step_inputs


def test_buckets():
    assert pow2_buckets(16) == (1, 2, 4, 8, 16)
    assert pow2_buckets(12, (5,)) == (1, 2, 4, 5, 8, 12)
    assert bucket(3, (1, 2, 4, 8)) == 4 and bucket(8, (1, 2, 4, 8)) == 8 and bucket(9, (1, 2, 4, 8)) is None


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from a thread pool, and a spinning one costs a lot on a loaded 2-core box."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def eng(tmp_path_factory):
    e, lm = tiny_engine(tmp_path_factory.mktemp("graph"), "qwen3", drafter_block=8, max_num_batched_tokens=64,
                        max_num_seqs=6)
    e.lm, e.dir = lm, e.config.model
    return e


def graph_runner(e, fuse: bool = True, compile: bool = False) -> GraphRunner:
    scratch = getattr(e, "_scratch", None)
    if scratch is None:
        scratch = e._scratch = reserve_scratch_block(e.blocks)
    return GraphRunner(e.model, e.drafter, e.pool, e.blocks.block_size, e.device, scratch_block=scratch,
                       max_num_seqs=e.config.max_num_seqs, max_model_len=e.max_model_len, mode="eager",
                       fuse=fuse, compile=compile)


def _snapshot(pool):
    return [t.clone() for kv in pool.target + pool.drafter for t in kv]


def _restore(pool, snap):
    for t, s in zip([t for kv in pool.target + pool.drafter for t in kv], snap):
        t.copy_(s)


@pytest.mark.parametrize("shape", [
    [(1, 9)],  # batch 1 decode, context 9
    [(1, 5), (1, 20), (1, 3)],  # 3 decodes -> batch bucket 4, ragged contexts
    [(8, 6), (8, 30)],  # 2 verify blocks of 8
    [(5, 12), (8, 3), (1, 40), (2, 7), (3, 0)],  # ragged runs (shrunk blocks, a decode, a short prefill)
])
@pytest.mark.parametrize("fuse", [False, True], ids=["model-forward", "fused"])
def test_forward_matches_eager(eng, shape, fuse):
    e, g = eng, graph_runner(eng, fuse)
    assert g.fused == fuse
    eager = ModelRunner(e.model, e.drafter, e.pool, e.blocks.block_size, e.device)
    bs = e.blocks.block_size
    torch.manual_seed(len(shape))
    slices, rids = [], []
    for i, (q, start) in enumerate(shape):
        rid = f"f{i}"
        e.blocks.reserve(rid, start + q + bs)
        table = e.blocks.ensure(rid, start + q)
        slices.append(SeqSlice(torch.randint(4, 120, (q,)).tolist(), start, list(table), list(range(q))))
        rids.append(rid)
    for kv in e.pool.target + e.pool.drafter:  # random history in the cache
        for t in kv:
            t.normal_()
    try:
        inp = build_step_inputs(slices, bs, e.device, capture=True)
        snap = _snapshot(e.pool)
        le, fe = eager.run_target(inp)
        after_eager = _snapshot(e.pool)
        _restore(e.pool, snap)
        lg, fg = g.run_target(inp)
        assert g.hits and g.fallbacks == 0
        torch.testing.assert_close(lg, le, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(fg, fe, rtol=1e-5, atol=1e-5)
        for a, b in zip(_snapshot(e.pool), after_eager):  # every slot but the scratch block: identical writes
            keep = torch.ones(a.shape[0], dtype=torch.bool)
            keep[g.scratch_block] = False
            torch.testing.assert_close(a[keep], b[keep], rtol=1e-5, atol=1e-5)
        # the drafter: one block proposal per sequence, ragged block lengths, context = start
        d = build_draft_inputs([s.token_ids[0] for s in slices], [s.start_pos for s in slices],
                               [max(2, len(s.token_ids)) for s in slices], [s.block_table for s in slices],
                               e.drafter.config.mask_token_id, bs, e.device)
        torch.testing.assert_close(g.propose_logits(d), eager.propose_logits(d), rtol=1e-5, atol=1e-5)
        # drafter context write of a few committed rows
        rows = list(range(min(5, fe.shape[0])))
        pos = [int(inp.positions[r]) for r in rows]
        slots = [int(inp.attn.slot_mapping[r]) for r in rows]
        _restore(e.pool, snap)
        eager.write_context(fe, rows, pos, slots)
        ref = _snapshot(e.pool)
        _restore(e.pool, snap)
        g.write_context(fe, rows, pos, slots)
        for a, b in zip(_snapshot(e.pool), ref):
            keep = torch.ones(a.shape[0], dtype=torch.bool)
            keep[g.scratch_block] = False
            torch.testing.assert_close(a[keep], b[keep], rtol=1e-5, atol=1e-5)
        assert {k[0] for k in g.hits} == {"target", "draft", "ctx"}
    finally:
        for rid in rids:
            e.blocks.free(rid)


REQS = [(list(range(5, 12)), 14), (list(range(20, 45)), 11), ([9, 4, 33], 16), (list(range(70, 79)), 12),
        ([100, 101], 9)]


@pytest.mark.parametrize("spec,nreq", [(SpecParams(enabled=False), 3), (SpecParams(True, 8), 1),
                                       (SpecParams(True, 8), 5)], ids=["ar-3", "spec-1", "spec-5"])
def test_generation_matches_eager(eng, nreq, spec):
    e = eng
    reqs = REQS[:nreq]
    oracle = [reference_greedy(e.lm.model, p, n) for p, n in reqs]
    eager_runner = e.runner
    assert greedy_outputs(e, reqs, spec) == oracle
    g = graph_runner(e)
    e.set_runner(g)
    try:
        assert greedy_outputs(e, reqs, spec) == oracle
    finally:
        e.set_runner(eager_runner)
    q = 8 if spec.enabled else 1
    used = {k for k, n in g.hits.items() if n and k[0] == "target" and k[2] == q}
    assert used and max(k[1] for k in used) == bucket(nreq, g.batch_buckets)
    if spec.enabled:
        assert any(k[0] == "draft" for k in g.hits) and any(k[0] == "ctx" for k in g.hits)


def test_engine_config_flag(eng):
    """EngineConfig(cuda_graphs=True) puts the graph runner in the engine (eager replay on CPU)."""
    e, _ = tiny_engine(eng.dir, "qwen3", drafter_block=8, max_num_batched_tokens=64, max_num_seqs=6, cuda_graphs=True)
    assert isinstance(e.runner, GraphRunner) and e.runner.mode == "eager"
    reqs = REQS[:2]
    assert greedy_outputs(e, reqs, SpecParams(True, 8)) == [reference_greedy(eng.lm.model, p, n) for p, n in reqs]
    assert any(k[0] == "target" and k[2] == 8 for k in e.runner.hits)
