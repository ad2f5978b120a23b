"""Scheduler (torch-free): budgets, chunked prefill, continuous batching, spec block clipping."""
from __future__ import annotations

from workers.engine.kv_cache import BlockManager
from workers.engine.params import SamplingParams
from workers.engine.scheduler import Scheduler, Sequence


def seq(rid, n_prompt, max_tokens=8, block=1):
    return Sequence(rid, list(range(n_prompt)), SamplingParams(max_tokens=max_tokens), block)


def fake_execute(s: Scheduler, out, tokens_per_spec=2):
    for it in out.items:
        if it.kind == "prefill":
            s.commit(it.seq, it.num_query, [7] if it.sample else [])
        elif it.kind == "ar":
            s.commit(it.seq, 1, [7])
        else:
            s.commit(it.seq, tokens_per_spec, [7] * tokens_per_spec)
        if it.seq.num_output >= it.seq.sampling.max_tokens:
            s.finish(it.seq)


def test_chunked_prefill_and_token_budget():
    s = Scheduler(BlockManager(100, 4), max_num_seqs=4, max_num_batched_tokens=10)
    s.add(seq("long", 25))
    s.add(seq("short", 3))
    out = s.schedule()
    assert [(i.seq.request_id, i.kind, i.num_query, i.sample) for i in out.items] == [("long", "prefill", 10, False)]
    fake_execute(s, out)
    out = s.schedule()
    assert [(i.seq.request_id, i.num_query) for i in out.items] == [("long", 10)]
    fake_execute(s, out)
    out = s.schedule()  # last 5 of the long prompt, then the short prompt joins within the budget
    assert [(i.seq.request_id, i.num_query, i.sample) for i in out.items] == [("long", 5, True), ("short", 3, True)]
    fake_execute(s, out)
    out = s.schedule()
    assert [(i.seq.request_id, i.kind) for i in out.items] == [("long", "ar"), ("short", "ar")]


def test_max_num_seqs_and_joining_mid_run():
    s = Scheduler(BlockManager(100, 4), max_num_seqs=2, max_num_batched_tokens=64)
    for r in "abc":
        s.add(seq(r, 4, max_tokens=2))
    out = s.schedule()
    assert [i.seq.request_id for i in out.items] == ["a", "b"] and len(s.waiting) == 1
    fake_execute(s, out)
    out = s.schedule()
    fake_execute(s, out)  # a and b finish (2 tokens each)
    assert not s.running
    out = s.schedule()
    assert [i.seq.request_id for i in out.items] == ["c"]
    fake_execute(s, out)
    s.add(seq("d", 4))  # joins while c decodes
    out = s.schedule()
    assert [(i.seq.request_id, i.kind) for i in out.items] == [("c", "ar"), ("d", "prefill")]


def test_spec_block_clipped_to_remaining_tokens_and_reservation():
    bm = BlockManager(100, 4)
    s = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=64, draft_slack=4)
    s.add(seq("x", 5, max_tokens=6, block=8))
    assert bm.num_free_blocks == 100 - 4  # ceil((5 + 6 + 4) / 4)
    fake_execute(s, s.schedule())  # prefill -> 1 output token
    out = s.schedule()
    assert out.items[0].kind == "spec" and out.items[0].num_query == 5  # 5 tokens left, not 8
    fake_execute(s, out, tokens_per_spec=4)
    out = s.schedule()
    assert out.items[0].kind == "ar" and out.items[0].num_query == 1  # 1 left: plain AR
    fake_execute(s, out)
    assert not s.has_unfinished() and bm.num_free_blocks == 100
