"""One tensor-parallel rank of a replica, run as a Ray actor pinned to one placement-group bundle.

Rank 0 loads its shard, the drafter (from EngineConfig.drafter, co-located on its GPU) and runs the
engine (AsyncLLMEngine); its model broadcasts every collective call (workers/parallel/tp.py `drive`). Followers
load their shards and run `follow` in a background thread. With tp == 1 the single rank simply runs the
engine (a "TP=1 replica in a Ray actor").

The module imports no torch at import time: placing actors and pinging them stays cheap.

An engine *recipe* instead of an EngineConfig (an object with `build()` and `gpu_telemetry(index,
engine)`, e.g. orchestrator.mock_engine.MockEngineRecipe) is built on rank 0 without torch or a
process group; the other ranks just hold their bundle: the placement and lifecycle paths stay the
real ones where the engine's speed does not matter (multi-node tests).
"""
from __future__ import annotations

import asyncio
import os
import sys
import threading
import time
import traceback
from typing import Any, AsyncIterator


class RankWorker:
    def __init__(self, rank: int, world: int, bundle_index: int, torch_threads: int | None = None):
        self.rank, self.world, self.bundle_index = rank, world, bundle_index
        self.torch_threads = torch_threads
        self.progress = {"stage": "created", "done": 0, "total": 0, "rank": rank}
        self.engine = None  # AsyncLLMEngine on rank 0
        self.driver = None
        self.follower: threading.Thread | None = None
        self.follower_error: str | None = None
        self.follower_ops = 0
        self.device_type = "cpu"
        self.gpu_index: int | None = None
        self.recipe = None  # an engine recipe (no torch), see the module doc

    # ---- identity / placement ----
    async def ping(self) -> dict[str, Any]:
        import ray

        ctx = ray.get_runtime_context()
        gpu_ids = [str(g) for g in ray.get_gpu_ids()]
        return {"rank": self.rank, "bundle_index": self.bundle_index, "pid": os.getpid(),
                "node_ip": ray.util.get_node_ip_address(), "node_id": ctx.get_node_id(), "gpu_ids": gpu_ids,
                "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
                "actor_id": ctx.get_actor_id(), "stage": self.progress["stage"]}

    async def address(self) -> tuple[str, int]:
        from cluster.runtime.process_group import rendezvous_address

        return rendezvous_address()

    async def get_progress(self) -> dict[str, Any]:
        return dict(self.progress)

    # ---- start-up ----
    async def setup(self, engine_cfg, addr: str, port: int) -> dict[str, Any]:
        if hasattr(engine_cfg, "build"):  # an engine recipe: nothing to load, no process group
            return self._setup_recipe(engine_cfg)
        return await asyncio.to_thread(self._setup, engine_cfg, addr, port)

    def _setup_recipe(self, recipe) -> dict[str, Any]:
        vis = os.environ.get("CUDA_VISIBLE_DEVICES", "")
        self.gpu_index = int(vis.split(",")[0]) if vis and vis.split(",")[0].isdigit() else None
        self.recipe = recipe
        if self.rank == 0:
            self.engine = recipe.build()
        self.progress.update(stage="ready")
        return {"rank": self.rank, "load_s": 0.0, "device": "recipe"}

    def _setup(self, engine_cfg, addr: str, port: int) -> dict[str, Any]:
        import torch

        from cluster.runtime.process_group import init_group
        from workers.models.loader import load_model, resolve_device, resolve_dtype

        if self.torch_threads:
            torch.set_num_threads(self.torch_threads)
        dev = resolve_device(engine_cfg.device)
        self.device_type = dev.type
        vis = os.environ.get("CUDA_VISIBLE_DEVICES", "")
        self.gpu_index = int(vis.split(",")[0]) if vis and vis.split(",")[0].isdigit() else None
        self.progress.update(stage="rendezvous")
        device = init_group(addr, port, self.rank, self.world, dev.type)
        self.progress.update(stage="reading weights")
        t0 = time.perf_counter()
        host = "cpu" if self.world > 1 else str(device)  # TP: read on the host, move shard by shard
        loaded = load_model(engine_cfg.model, resolve_dtype(engine_cfg.dtype, dev), host)
        model = loaded.model
        if self.world > 1:
            from workers.parallel.tp import TPContext, shard_causal_lm

            ctx = TPContext(self.rank, self.world, device)
            self.progress.update(stage="sharding", done=0, total=len(model.model.layers))
            shard_causal_lm(model, ctx, progress=lambda i, n: self.progress.update(done=i, total=n))
        load_s = time.perf_counter() - t0
        if self.rank == 0:
            from workers.engine.async_engine import AsyncLLMEngine
            from workers.engine.llm_engine import LLMEngine

            if self.world > 1:
                from workers.parallel.tp import drive

                self.driver = drive(model, model.tp)
            self.progress.update(stage="engine")
            cfg = _with_device(engine_cfg, str(device))
            self.engine = AsyncLLMEngine(LLMEngine(cfg, model=model, tokenizer=loaded.tokenizer))
        else:
            from workers.models.packed import can_pack, pack_for_cpu
            from workers.parallel.tp import follow

            if engine_cfg.cpu_packed_weights and can_pack(next(model.parameters()).dtype, device):
                pack_for_cpu(model)  # rank 0's LLMEngine packs its shard the same way

            def run():
                try:
                    follow(model, model.tp, on_step=self._count)
                except BaseException as exc:  # peer died / group broken
                    self.follower_error = f"{type(exc).__name__}: {exc}"
                    traceback.print_exc()

            self.follower = threading.Thread(target=run, name=f"tp-follower-{self.rank}", daemon=True)
            self.follower.start()
        self.progress.update(stage="ready")
        return {"rank": self.rank, "load_s": load_s, "device": str(device)}

    def _count(self, op: str) -> None:
        self.follower_ops += 1

    # ---- rank 0: the engine surface ----
    async def engine_info(self) -> dict[str, Any]:
        e = self._engine()
        return {"tokenizer": e.tokenizer, "max_model_len": e.max_model_len, "eos_token_ids": e.eos_token_ids}

    async def generate(self, request_id, prompt_token_ids, sampling, spec=None, tags=None) -> AsyncIterator:
        async for out in self._engine().generate(request_id, prompt_token_ids, sampling, spec, tags):
            yield out

    async def abort(self, request_id: str) -> None:
        await self._engine().abort(request_id)

    async def stats(self):
        return self._engine().stats()

    async def check(self) -> dict[str, Any]:
        """Raises if this rank is broken (engine loop dead / follower loop dead)."""
        if self.rank == 0 and self.engine is not None:
            self.engine.check_health()
        if self.follower is not None and not self.follower.is_alive():
            raise RuntimeError(f"rank {self.rank} follower loop ended: {self.follower_error or 'stopped'}")
        return {"rank": self.rank, "follower_ops": self.follower_ops}

    async def telemetry(self) -> list[dict[str, Any]]:
        from cluster.planning.nvml import gpu_telemetry

        if self.recipe is not None:
            return self.recipe.gpu_telemetry(self.gpu_index, self.engine)
        if self.gpu_index is None:
            return []
        return await asyncio.to_thread(gpu_telemetry, None, [self.gpu_index])

    async def cuda_mem_info(self) -> tuple[int, int] | None:
        """torch.cuda.mem_get_info() of this rank's GPU (free, total), None on CPU: checks NVML telemetry."""
        if self.device_type != "cuda":
            return None
        import torch

        free, total = torch.cuda.mem_get_info()
        return int(free), int(total)

    async def shutdown(self) -> None:
        from cluster.runtime.process_group import destroy_group

        if self.engine is not None:
            await self.engine.shutdown()
            if self.driver is not None:
                try:
                    await asyncio.to_thread(self.driver.stop)
                except Exception:  # followers already gone
                    pass
        if self.follower is not None:
            await asyncio.to_thread(self.follower.join, 10)
        if "torch" in sys.modules:  # never set up: nothing to tear down (and no torch import now)
            destroy_group()

    def _engine(self):
        if self.engine is None:
            raise RuntimeError(f"rank {self.rank} runs no engine (only rank 0 does, after setup)")
        return self.engine


def _with_device(cfg, device: str):
    import dataclasses

    return dataclasses.replace(cfg, device=device)
