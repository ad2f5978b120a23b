"""ReplicaGroup: one model replica = one placement group, one Ray actor per TP rank, rank 0 runs the engine.

    group = ReplicaGroup(EngineConfig(model=..., drafter=...), tp=2)
    await group.start()                      # placement group (STRICT_PACK, one {"GPU":1,"CPU":1} per rank)
    async for out in group.generate(rid, ids, SamplingParams()): ...
    group.stats(); group.telemetry(); group.check_health(); await group.shutdown()

tp == 1 runs the engine in-process (AsyncLLMEngine) unless in_process=False. tp > 1 (or in_process=False)
creates the rank actors in the current placement group when there is one (a Serve replica started with
`placement_group_bundles=[{"CPU":1,"GPU":1}]*tp` sits in bundle 0 with no resources of its own), else in a
placement group of its own. A monitor task pings every rank; when a rank dies (or the engine / a follower
loop breaks) the replica is torn down and re-created on the same bundles; open streams end with
finish_reason "error", and new requests wait for the new ranks (NoCapacity after `ready_timeout_s`).
"""
from __future__ import annotations

import asyncio
import logging
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

from cluster.runtime.rank_actors import (
    RankInfo,
    bundle_nodes,
    gpu_nodes,
    kill_ranks,
    remove_group,
    reserve_bundles,
    spawn_ranks,
    wait_with_progress,
)
from workers.engine.params import EngineStats, NoCapacity, RequestOutput

log = logging.getLogger("specfleet.placement")
DEFAULT_BUNDLE = {"GPU": 1, "CPU": 1}


@dataclass
class GroupState:
    generation: int = 0  # bumped on every (re)start
    restarts: int = 0
    last_error: str | None = None
    load_s: list[float] = field(default_factory=list)


def _unwrap(exc: BaseException) -> BaseException:
    """Ray wraps remote exceptions; hand back the engine's typed error (InvalidRequest, NoCapacity, ...)."""
    cause = getattr(exc, "cause", None)
    return cause if isinstance(cause, BaseException) else exc


class ReplicaGroup:
    def __init__(self, engine_cfg, tp: int = 1, *, in_process: bool | None = None, placement_group=None,
                 bundle_indices: list[int] | None = None, bundle: dict[str, float] | None = None,
                 torch_threads: int | None = None, restart_on_failure: bool = True,
                 monitor_interval_s: float = 1.0, ready_timeout_s: float = 60.0,
                 place_timeout_s: float = 60.0, probe_timeout_s: float = 30.0, progress: bool = True,
                 name: str = "replica", node_id: str | None = None):
        if tp < 1:
            raise ValueError(f"tp must be >= 1, got {tp}")
        self.engine_cfg, self.tp, self.name = engine_cfg, tp, name
        self.node_id = node_id  # pin a group of its own to this Ray node (multi-node plans)
        self._uid = uuid.uuid4().hex[:6]  # rank actors are named f"{name}-{uid}-g{restarts}-rank{r}"
        self.in_process = (tp == 1) if in_process is None else in_process
        if self.in_process and tp > 1:
            raise ValueError("tensor parallelism needs rank actors (in_process=False)")
        self.bundle = {k: v for k, v in (bundle or DEFAULT_BUNDLE).items() if v}  # Ray rejects 0-valued entries
        if not self.bundle:
            raise ValueError(f"a rank bundle needs some resources, got {bundle}")
        self.torch_threads = torch_threads
        self.restart_on_failure = restart_on_failure
        self.monitor_interval_s, self.ready_timeout_s, self.place_timeout_s = (
            monitor_interval_s, ready_timeout_s, place_timeout_s)
        self.show_progress = progress
        self.probe_timeout_s = probe_timeout_s  # a dead rank fails the probe at once; this bounds a wedged one
        self._pg, self._own_pg = placement_group, False
        self._bundle_indices = bundle_indices
        self.engine = None  # in-process AsyncLLMEngine
        self.actors: list[Any] = []
        self.ranks: list[RankInfo] = []
        self.state = GroupState()
        self._ready: asyncio.Event | None = None  # created in start() on the running loop
        self._monitor: asyncio.Task | None = None
        self._restart_lock: asyncio.Lock | None = None
        self._stats = EngineStats()
        self._telemetry: list[dict[str, Any]] = []
        self._closed = False
        self.tokenizer = None
        self.max_model_len: int | None = None
        self.eos_token_ids: list[int] = []

    # ------------------------------------------------------------------ start-up
    async def start(self) -> "ReplicaGroup":
        if self._ready is None:
            self._ready, self._restart_lock = asyncio.Event(), asyncio.Lock()
        if self.in_process:
            from workers.engine.async_engine import AsyncLLMEngine

            self.engine = await asyncio.to_thread(AsyncLLMEngine, self.engine_cfg)
            self._adopt_info(self.engine.tokenizer, self.engine.max_model_len, self.engine.eos_token_ids)
            self.state.generation = 1
            self._ready.set()
            return self
        if not self.actors:
            await self.place()
        await self._setup()
        self._monitor = asyncio.get_running_loop().create_task(self._monitor_loop())
        return self

    def _adopt_info(self, tokenizer, max_model_len, eos) -> None:
        self.tokenizer, self.max_model_len, self.eos_token_ids = tokenizer, max_model_len, list(eos)

    async def _place(self) -> None:
        self._pg, self._own_pg = await reserve_bundles(
            self._pg, self.tp, self.bundle, f"{self.name}-tp{self.tp}-{id(self):x}", self.place_timeout_s,
            self.node_id)
        if self._bundle_indices is None:
            self._bundle_indices = list(range(self.tp))
        if len(self._bundle_indices) != self.tp:
            raise ValueError(f"need {self.tp} bundle indices, got {self._bundle_indices}")

    async def place(self) -> list[RankInfo]:
        """Reserve the bundles and start one (still empty) actor per rank; cheap (no torch import).
        `start()` calls it; tests call it alone to check placement."""
        if self._ready is None:
            self._ready, self._restart_lock = asyncio.Event(), asyncio.Lock()
        if self.in_process:
            raise ValueError("an in-process replica has no rank actors to place")
        await self._place()
        await self._spawn()
        return self.ranks

    async def _spawn(self) -> None:
        threads = self.torch_threads or int(self.bundle.get("CPU", 1)) or 1
        self.actors, self.ranks = await spawn_ranks(self._pg, self._bundle_indices, self.bundle, threads,
                                                    name=f"{self.name}-{self._uid}-g{self.state.restarts}")

    async def _setup(self) -> None:
        addr, port = await self.actors[0].address.remote()
        setups = [a.setup.remote(self.engine_cfg, addr, port) for a in self.actors]
        try:
            results = await wait_with_progress(setups, self.actors, self.name, self.show_progress)
        except BaseException as exc:
            await self._kill_actors()
            raise _unwrap(exc) from None
        self.state.load_s = [r["load_s"] for r in results]
        info = await self.actors[0].engine_info.remote()
        self._adopt_info(info["tokenizer"], info["max_model_len"], info["eos_token_ids"])
        self.state.generation += 1
        await self._refresh()
        self._ready.set()

    # ------------------------------------------------------------------ serving surface
    async def generate(self, request_id: str, prompt_token_ids: list[int], sampling, spec=None,
                       tags: dict[str, Any] | None = None) -> AsyncIterator[RequestOutput]:
        if self.in_process:
            async for out in self.engine.generate(request_id, prompt_token_ids, sampling, spec, tags):
                yield out
            return
        await self._wait_ready()
        gen = self.actors[0].generate.options(num_returns="streaming").remote(
            request_id, prompt_token_ids, sampling, spec, tags)
        finished = False
        try:
            async for ref in gen:
                out = await ref
                finished = out.finished
                yield out
                if finished:
                    return
        except Exception as exc:
            err = _unwrap(exc)
            if _is_typed(err):  # validation (InvalidRequest / NoCapacity): raised before any token
                finished = True
                raise err from None
            finished = True  # a rank died mid-stream: end the stream with an error, never hang
            yield RequestOutput(request_id, [], finished=True, finish_reason="error",
                                error=f"replica failed: {type(err).__name__}: {err}")
        finally:
            if not finished and not self._closed and self.actors:
                try:  # the consumer went away: free the request's KV on rank 0
                    self.actors[0].abort.remote(request_id)
                except Exception:
                    pass

    async def abort(self, request_id: str) -> None:
        if self.in_process:
            await self.engine.abort(request_id)
            return
        try:
            await self.actors[0].abort.remote(request_id)
        except Exception as exc:
            log.warning("abort %s: %s", request_id, exc)

    def stats(self) -> EngineStats:
        return self.engine.stats() if self.in_process else self._stats

    async def refresh_stats(self) -> EngineStats:
        if not self.in_process:
            await self._refresh()
        return self.stats()

    def check_health(self) -> None:
        if self._closed:
            raise RuntimeError("replica group is shut down")
        if self.in_process:
            self.engine.check_health()
            return
        if self.state.last_error and not (self._ready and self._ready.is_set()):
            raise RuntimeError(f"replica restarting after: {self.state.last_error}")

    def telemetry(self) -> dict[str, Any]:
        if self.in_process:
            from cluster.planning.nvml import gpu_telemetry, visible_gpu_indices

            return {"gpus": gpu_telemetry(indices=visible_gpu_indices())}
        return {"gpus": list(self._telemetry)}

    def placement(self) -> list[dict[str, Any]]:
        return [r.__dict__.copy() for r in self.ranks]

    def bundle_nodes(self) -> list[str]:
        """Node id of each of the group's bundles according to Ray's GCS (not the ranks' own report)."""
        return bundle_nodes(self._pg) if self._pg is not None else []

    # ------------------------------------------------------------------ lifecycle
    async def _wait_ready(self) -> None:
        if self._closed:
            raise RuntimeError("replica group is shut down")
        if not self._ready.is_set():
            try:
                await asyncio.wait_for(self._ready.wait(), self.ready_timeout_s)
            except asyncio.TimeoutError:
                raise NoCapacity(f"replica is restarting after a rank failure "
                                 f"({self.state.last_error}); retry later") from None

    async def _refresh(self) -> None:
        self._stats = await self.actors[0].stats.remote()
        tel = await asyncio.gather(*[a.telemetry.remote() for a in self.actors])
        self._telemetry = [g for t in tel for g in t]

    async def _probe(self) -> str | None:
        """None when every rank answers and is healthy, else what is wrong."""
        try:
            await asyncio.wait_for(asyncio.gather(*[a.check.remote() for a in self.actors]),
                                   timeout=self.probe_timeout_s)
            return None
        except Exception as exc:
            err = _unwrap(exc)
            return f"{type(err).__name__}: {err}"

    async def _monitor_loop(self) -> None:
        while not self._closed:
            await asyncio.sleep(self.monitor_interval_s)
            if self._closed:
                return
            problem = await self._probe()
            if problem is None:
                try:
                    await self._refresh()
                except Exception as exc:  # raced with a failure; the next probe sees it
                    log.debug("refresh failed: %s", exc)
                continue
            log.warning("%s: rank failure (%s); re-creating the replica", self.name, problem)
            self.state.last_error = problem
            if not self.restart_on_failure:
                self._ready.clear()
                return
            try:
                await self.restart()
            except Exception as exc:  # keep trying on the next tick
                self.state.last_error = f"restart failed: {type(exc).__name__}: {exc}"
                log.error("%s: %s", self.name, self.state.last_error)

    async def restart(self) -> None:
        """Tear every rank down and re-create them on the same bundles."""
        async with self._restart_lock:
            self._ready.clear()
            await self._kill_actors()
            self.state.restarts += 1
            await self._spawn()
            await self._setup()

    async def _kill_actors(self) -> None:
        actors, self.actors = self.actors, []
        await kill_ranks(actors)

    async def _remove_pg(self) -> None:
        if self._own_pg and self._pg is not None:
            remove_group(self._pg)
            self._pg = None

    async def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._monitor is not None:
            self._monitor.cancel()
        if self.in_process:
            if self.engine is not None:
                await self.engine.shutdown()
            return
        if self.actors and self._ready is not None and self._ready.is_set():
            try:
                await asyncio.wait_for(self.actors[0].shutdown.remote(), 30)
                await asyncio.wait_for(asyncio.gather(*[a.shutdown.remote() for a in self.actors[1:]]), 30)
            except Exception as exc:
                log.warning("%s: unclean shutdown: %s", self.name, exc)
        await self._kill_actors()
        await self._remove_pg()


def _is_typed(err: BaseException) -> bool:
    from workers.engine.params import EngineError

    return isinstance(err, EngineError)


def place_plan(plan, engine_cfg, nodes: list[str] | None = None, **kwargs) -> list[ReplicaGroup]:
    """One ReplicaGroup per ReplicaPlan of a cluster.planning.planner.Plan (tp from the plan); call `place()` or
    `start()` on each. Ray picks the physical GPUs inside each STRICT_PACK group; `placement()` tells
    which bundle / GPU every rank got.

    Several nodes: plan node k is Ray node `nodes[k]` (default: the alive nodes with the plan's GPUs per
    node, by node id); each group is pinned there, so the replicas spread as planned and no group spans
    two nodes."""
    if plan.num_nodes > 1 and nodes is None:
        nodes = gpu_nodes(plan.node.num_gpus)
        if len(nodes) < plan.num_nodes:
            raise NoCapacity(f"the plan needs {plan.num_nodes} nodes with {plan.node.num_gpus} GPUs, "
                             f"the Ray cluster has {len(nodes)}")
    return [ReplicaGroup(engine_cfg, tp=r.tp, in_process=False, name=f"replica-{r.index}",
                         node_id=nodes[r.node] if nodes else None, **kwargs)
            for r in plan.replicas]
