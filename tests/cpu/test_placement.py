"""Ray placement on a simulated 8-GPU node (logical GPUs, gloo): plans placed as placement groups,
TP=2 replica greedy output == TP=1 with the drafter on, and a killed rank actor -> re-created replica."""
from __future__ import annotations

import asyncio
import time

import pytest

from cluster.planning.planner import plan
from cluster.planning.presets import PRESETS, default_drafter
from cluster.planning.topology import get_node
from cluster.runtime.replica_group import ReplicaGroup, place_plan

pytestmark = [pytest.mark.ray, pytest.mark.slow]


@pytest.fixture(scope="module")
def ray8():
    import os

    import ray

    # A busy 2-core machine starts Ray slowly: Ray 2.60 gives the raylet a hard-coded 30 s to register
    # (ray/_private/node.py) and the raylet waits for its agents; retry instead of failing on a slow start.
    os.environ.setdefault("RAY_agent_register_timeout_ms", "180000")
    for attempt in range(3):
        if ray.is_initialized():
            ray.shutdown()
        try:
            ray.init(num_cpus=8, num_gpus=8, include_dashboard=False, log_to_driver=False)
            break
        except Exception:
            ray.shutdown()  # reap what the failed start left behind
            if attempt == 2:
                raise
    yield ray
    ray.shutdown()


def _check_placed(groups, planned):
    """Every rank sits in bundle == rank, holds exactly one logical GPU, no GPU is shared, a replica's
    ranks share a node (STRICT_PACK), and the planned budget of each GPU fits in its memory."""
    seen = {}
    for g, rp in zip(groups, planned):
        assert [r.rank for r in g.ranks] == list(range(rp.tp))
        assert [r.bundle_index for r in g.ranks] == list(range(rp.tp))
        assert len({r.node_ip for r in g.ranks}) == 1
        for r, budget in zip(g.ranks, rp.memory):
            assert len(r.gpu_ids) == 1
            gpu = r.gpu_ids[0]
            assert gpu not in seen, f"GPU {gpu} given to {seen[gpu]} and to {g.name} rank {r.rank}"
            seen[gpu] = f"{g.name} rank {r.rank}"
            assert budget.allocated + budget.headroom <= budget.total
            assert budget.free >= 0
    return seen


async def test_plans_are_placed_on_logical_gpus(ray8):
    node = get_node("dgx-b300")
    from workers.engine.config import EngineConfig

    cfg = EngineConfig(model="unused-for-placement")
    for name in ("qwen3-8b", "gpt-oss-120b"):
        m = PRESETS[name]
        p = plan(node, m, default_drafter(m))
        groups = place_plan(p, cfg, progress=False)
        try:
            await asyncio.gather(*[g.place() for g in groups])
            seen = _check_placed(groups, p.replicas)
            assert len(seen) == sum(r.tp for r in p.replicas) == 8
        finally:
            await asyncio.gather(*[g.shutdown() for g in groups])
    # a mixed layout at once (1 x TP4 + 2 x TP2): groups never share a GPU
    p4 = plan(node, PRESETS["qwen3-32b"], None).alternatives
    tp4 = next(a for a in p4 if a.layout == "1xTP4").replicas
    tp2 = next(a for a in p4 if a.layout == "2xTP2").replicas
    groups = [ReplicaGroup(cfg, tp=r.tp, in_process=False, name=f"mixed-{i}", progress=False)
              for i, r in enumerate(tp4 + tp2)]
    try:
        await asyncio.gather(*[g.place() for g in groups])
        assert len(_check_placed(groups, tp4 + tp2)) == 8
        # the node is full: one more GPU group cannot be placed, and says so
        extra = ReplicaGroup(cfg, tp=1, in_process=False, place_timeout_s=2, progress=False)
        from workers.engine.params import NoCapacity

        with pytest.raises(NoCapacity, match="cannot place"):
            await extra.place()
    finally:
        await asyncio.gather(*[g.shutdown() for g in groups])


async def _greedy(group, rid, prompt, n=20):
    from workers.engine.params import SamplingParams

    toks, accepted = [], []
    async for out in group.generate(rid, prompt, SamplingParams(max_tokens=n, ignore_eos=True)):
        assert out.error is None, out.error
        toks += out.new_token_ids
        accepted += out.committed
    return toks, accepted


async def test_tp2_equals_tp1_and_survives_a_killed_rank(ray8, tmp_path):
    from tests.helpers.tiny import make_tiny_hf_dir, tiny_drafter
    from workers.engine.config import EngineConfig
    from workers.engine.params import InvalidRequest, SamplingParams
    from workers.models.dflash import save_drafter
    from workers.models.loader import load_model

    path = make_tiny_hf_dir(tmp_path / "target", "llama")
    d = tiny_drafter(load_model(path, "float32", "cpu").config, num_layers=1, block_size=8)
    save_drafter(d, tmp_path / "drafter")
    cfg = EngineConfig(model=str(path), drafter=str(tmp_path / "drafter"), device="cpu", dtype="float32",
                       kv_cache_bytes=8 << 20, max_num_seqs=4)  # fp32: TP=2 == TP=1 exactly
    prompts = [[5, 9, 17, 33], [7, 7, 100, 12, 40, 41]]

    ref_group = await ReplicaGroup(cfg, tp=1).start()  # in-process TP=1 reference
    try:
        ref = [await _greedy(ref_group, f"r{i}", p) for i, p in enumerate(prompts)]
        assert ref_group.stats().step_ms_by_block, "the drafter must be on (speculative steps ran)"
    finally:
        await ref_group.shutdown()

    g = ReplicaGroup(cfg, tp=2, torch_threads=1, monitor_interval_s=0.5, progress=False)
    await g.start()
    try:
        assert [(r["rank"], r["bundle_index"]) for r in g.placement()] == [(0, 0), (1, 1)]
        assert g.max_model_len == 512 and g.tokenizer is not None
        out = [await _greedy(g, f"a{i}", p) for i, p in enumerate(prompts)]
        assert out == ref  # same tokens and the same accepted-per-pass pattern
        with pytest.raises(InvalidRequest):  # typed validation errors cross the actor boundary
            async for _ in g.generate("bad", [], SamplingParams()):
                pass
        await g.refresh_stats()
        assert g.stats().tokens_generated >= 40 and g.telemetry() == {"gpus": []}  # no NVML on CPU

        import ray

        old_pids = {r.pid for r in g.ranks}
        old_gpus = [r.gpu_ids for r in g.ranks]
        # a follower rank dies while a request is streaming: the stream ends with an error, no hang
        stream = g.generate("long", prompts[0], SamplingParams(max_tokens=400, ignore_eos=True))
        first = await asyncio.wait_for(stream.__anext__(), 60)
        assert first.error is None
        ray.kill(g.actors[1])
        last = first
        async def drain():
            nonlocal last
            async for o in stream:
                last = o
        await asyncio.wait_for(drain(), 60)
        assert last.finished and last.finish_reason == "error" and last.error
        deadline = time.monotonic() + 180
        while not (g.state.restarts >= 1 and g._ready.is_set()):
            assert time.monotonic() < deadline, f"no restart: {g.state.last_error}"
            await asyncio.sleep(0.5)
        assert "died" in (g.state.last_error or "").lower() or "actor" in (g.state.last_error or "").lower()
        assert {r.pid for r in g.ranks}.isdisjoint(old_pids)
        assert [r.gpu_ids for r in g.ranks] == old_gpus  # re-created on the same bundles / GPUs
        again = [await _greedy(g, f"b{i}", p) for i, p in enumerate(prompts)]
        assert again == ref
        g.check_health()
    finally:
        await g.shutdown()
