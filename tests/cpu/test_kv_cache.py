"""Block manager accounting, and KV rollback == a cache built without the rejected tokens."""
from __future__ import annotations

import pytest
import torch

from tests.helpers.tiny import tiny_engine
from workers.engine.kv_cache import BlockManager
from workers.engine.params import SamplingParams, SpecParams
from workers.models.attention import gather_kv


pytestmark = pytest.mark.usefixtures("one_thread")


def test_reserve_ensure_truncate_free():
    bm = BlockManager(10, 4)
    bm.reserve("a", 17)  # 5 blocks promised
    assert bm.num_free_blocks == 5 and bm.free_tokens == 20
    assert bm.can_reserve(20) and not bm.can_reserve(21)
    with pytest.raises(MemoryError):
        bm.reserve("b", 24)
    t = bm.ensure("a", 9)
    assert len(t) == 3 and bm.num_free_blocks == 5  # allocation comes out of the reservation
    assert bm.slot("a", 5) == t[1] * 4 + 1
    bm.ensure("a", 17)
    with pytest.raises(MemoryError):
        bm.ensure("a", 21)  # beyond the reservation
    bm.truncate("a", 6)  # rollback of rejected drafts
    assert len(bm.table("a")) == 2 and bm.num_free_blocks == 5
    bm.reserve("b", 20)
    assert bm.num_free_blocks == 0
    bm.free("a")
    bm.free("b")
    assert bm.num_free_blocks == 10 and "a" not in bm


def test_rollback_equals_cache_without_rejected(tmp_path):
    """A verify step that rejects drafts leaves the target and drafter KV equal to a clean build."""
    eng, lm = tiny_engine(tmp_path, "qwen3", drafter_block=8)
    prompt = list(range(10, 23))  # 13 tokens -> a partly filled block
    run = lambda rid, spec: eng.add_request(rid, prompt, SamplingParams(max_tokens=12, ignore_eos=True), spec)
    run("spec", SpecParams(True, 8))
    run("ar", SpecParams(enabled=False))
    eng.step()  # prefill both
    eng.step()  # spec: one verify pass of 8 (random drafter: mostly rejected); ar: one token
    s, a = eng.scheduler.by_id["spec"], eng.scheduler.by_id["ar"]
    # make the AR sequence catch up to the same committed tokens, one AR step at a time
    while a.num_computed < s.num_computed:
        eng.scheduler.running.remove(s)  # keep the spec sequence out of these steps
        try:
            eng.step()
        finally:
            eng.scheduler.running.insert(0, s)
    assert a.token_ids[: s.num_computed + 1] == s.token_ids[: s.num_computed + 1]
    n = s.num_computed
    bs = eng.blocks.block_size
    assert len(eng.blocks.table("spec")) == -(-n // bs)  # rejected positions' blocks were returned
    ts, ta = torch.tensor([eng.blocks.table("spec")]), torch.tensor([eng.blocks.table("ar")])
    for (kc, vc) in eng.pool.target:
        for c in (kc, vc):
            torch.testing.assert_close(gather_kv(c, ts)[:, :, :n], gather_kv(c, ta)[:, :, :n], atol=1e-5, rtol=1e-5)
    assert eng.tracker.spec_passes >= 1
    while eng.has_unfinished():
        eng.step()
    assert eng.blocks.num_free_blocks == eng.blocks.num_blocks


def test_sequences_get_contiguous_runs_and_fall_back_when_fragmented():
    bm = BlockManager(12, 4)
    for sid, n in (("a", 12), ("b", 8), ("c", 12)):  # 3 + 2 + 3 blocks, one run each
        bm.reserve(sid, n)
        assert bm.contiguous(sid)
    assert bm.ensure("b", 8) == [3, 4] and bm.ensure("c", 5) == [5, 6]
    bm.free("b")  # a hole of 2 blocks between a and c; 4 more free at the end
    bm.reserve("d", 16)  # 4 blocks: the tail run
    assert bm.contiguous("d") and bm.ensure("d", 16) == [8, 9, 10, 11]
    bm.free("a")  # holes: [0, 3) and [3, 5) -> one run of 5
    bm.reserve("e", 20)
    assert bm.contiguous("e")
    bm.free("e")
    bm.reserve("f", 8)  # [0, 2)
    bm.free("c")  # free now: [2, 8) minus nothing -> a run of 6; fragment it
    bm.reserve("g", 4)  # [2, 3)
    bm.reserve("h", 4)  # [3, 4)
    bm.free("g")  # free: 2, 4, 5, 6, 7 -> longest run 4
    bm.reserve("i", 20)  # 5 blocks, no run of 5: scattered, lazily
    assert not bm.contiguous("i") and bm.num_free_blocks == 0
    assert sorted(bm.ensure("i", 20)) == [2, 4, 5, 6, 7]
    bm.truncate("i", 4)
    assert bm.num_free_blocks == 0 and len(bm.table("i")) == 1
    for sid in ("d", "f", "h", "i"):
        bm.free(sid)
    assert bm.num_free_blocks == 12
