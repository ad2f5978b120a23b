"""GPU: a TP=1 replica in a Ray actor on CUDA serving the demo pair; NVML telemetry vs torch.cuda.mem_get_info.

Skipped without CUDA (tests/conftest.py). Uses the SmolLM2 demo pair when it is cached (`specfleet models
pull smollm2` + the committed drafter), else a tiny random pair, so the CUDA actor path is always exercised.
"""
from __future__ import annotations

import asyncio

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.ray]


def _pair(tmp_path):
    from workers import hub

    target, drafter = hub.model_dir("smollm2"), hub.default_drafter_path()
    if hub.is_complete(target) and (drafter / "config.json").is_file():
        return str(target), str(drafter), "demo"
    from tests.helpers.tiny import make_tiny_hf_dir, tiny_drafter
    from workers.models.dflash import save_drafter
    from workers.models.loader import load_model

    path = make_tiny_hf_dir(tmp_path / "target", "llama")
    save_drafter(tiny_drafter(load_model(path, "float32", "cpu").config, block_size=8), tmp_path / "drafter")
    return str(path), str(tmp_path / "drafter"), "tiny"


async def _run(group, prompt, n=24):
    from workers.engine.params import SamplingParams

    toks = []
    async for out in group.generate("g", prompt, SamplingParams(max_tokens=n)):
        assert out.error is None, out.error
        toks += out.new_token_ids
    return toks


def test_tp1_replica_in_ray_actor_on_cuda(tmp_path):
    import ray

    from cluster.planning.nvml import discover
    from cluster.runtime.replica_group import ReplicaGroup
    from workers.engine.config import EngineConfig

    target, drafter, kind = _pair(tmp_path)
    cfg = EngineConfig(model=target, drafter=drafter, device="cuda", gpu_memory_utilization=0.5)
    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=4, num_gpus=1, include_dashboard=False)

    async def main():
        g = ReplicaGroup(cfg, tp=1, in_process=False, progress=False, monitor_interval_s=0.5)
        await g.start()
        try:
            (rank,) = g.ranks
            assert rank.gpu_ids == ["0"] or len(rank.gpu_ids) == 1
            prompt = g.tokenizer.encode("What is 2+2?") if g.tokenizer is not None else [5, 9, 17]
            toks = await _run(g, prompt)
            assert toks
            await g.refresh_stats()
            st = g.stats()
            assert st.tokens_generated >= len(toks) and st.step_ms_by_block  # speculative steps ran
            # NVML (via the replica's telemetry) against torch.cuda.mem_get_info inside the rank actor
            free_t, total_t = await g.actors[0].cuda_mem_info.remote()
            (gpu,) = g.telemetry()["gpus"]
            assert abs(gpu["total_bytes"] - total_t) <= 0.01 * total_t
            assert abs(gpu["free_bytes"] - free_t) <= 0.01 * total_t
            assert gpu["used_bytes"] > 0
            return toks, prompt
        finally:
            await g.shutdown()

    try:
        toks, prompt = asyncio.run(main())
    finally:
        ray.shutdown()
    # the same engine in-process on the same GPU gives the same greedy tokens
    from workers.engine.async_engine import AsyncLLMEngine

    async def ref():
        e = AsyncLLMEngine(cfg)
        try:
            return await _run(e, prompt)
        finally:
            await e.shutdown()

    assert asyncio.run(ref()) == toks
    # NVML in this process agrees with torch for the device this process sees
    free, total = torch.cuda.mem_get_info()
    inv = discover()
    assert inv.gpus, inv.error
    idx = torch.cuda.current_device()
    from cluster.planning.nvml import visible_gpu_indices

    phys = (visible_gpu_indices() or list(range(len(inv.gpus))))[idx]
    g = next(x for x in inv.gpus if x.index == phys)
    assert abs(g.total_bytes - total) <= 0.01 * total and abs(g.free_bytes - free) <= 0.01 * total


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="TP=2 over NCCL needs 2 GPUs")
def test_tp2_nccl_matches_tp1(tmp_path):
    import ray

    from cluster.runtime.replica_group import ReplicaGroup
    from workers.engine.config import EngineConfig

    target, drafter, _ = _pair(tmp_path)
    cfg = EngineConfig(model=target, drafter=drafter, device="cuda", dtype="float32", gpu_memory_utilization=0.5)
    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=4, num_gpus=2, include_dashboard=False)

    async def main():
        out = {}
        for tp in (1, 2):
            g = ReplicaGroup(cfg, tp=tp, in_process=False, progress=False)
            await g.start()
            try:
                out[tp] = await _run(g, [5, 9, 17, 33])
            finally:
                await g.shutdown()
        return out

    try:
        out = asyncio.run(main())
    finally:
        ray.shutdown()
    assert out[1] == out[2]
