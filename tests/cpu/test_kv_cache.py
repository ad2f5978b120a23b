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
