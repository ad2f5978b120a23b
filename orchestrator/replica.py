"""Model replica: the Ray Serve deployment that owns one engine (a ReplicaGroup, an AsyncLLMEngine or
the mock) and streams a request's tokens back to the ingress as plain dicts.

Call contract (the ingress and the router rely on it): ``generate(request_id, prompt_token_ids,
sampling: dict, tags: dict, route: dict)`` where ``route`` is ``orchestrator.routing.decisions.route_hints``
(the router adds ``route["decision"]`` in place before the call is sent). It yields, in order:
  {"type": "start", "replica", "rank", "route", "spec"}        once admitted by the engine
  {"type": "delta", "token_ids", "text", "accepted"}           per engine step with new tokens
  {"type": "end", "finish_reason", "completion_tokens", "target_passes", "stats"}
or a single {"type": "error", "kind": "invalid"|"no_capacity"|"engine", "message"} (also possible
after "start": then it ends the stream).
Heterogeneous fleets: replica rank r takes ``cfg.fleet()[r]``.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from typing import Any

from orchestrator.config import ReplicaSpec, ServeConfig
from workers.engine.params import EngineError, InvalidRequest, NoCapacity, SamplingParams, SpecParams

log = logging.getLogger("specfleet.replica")
RECENT_SESSIONS = 1024


def resolve_paths(cfg: ServeConfig, spec: ReplicaSpec) -> tuple[str, str | None]:
    """(target path, drafter path or None) for a replica; pulls the demo pair on first use."""
    target = cfg.model.target
    if target == "smollm2":
        from workers import hub

        target = str(hub.ensure_model("smollm2"))
    drafter = spec.drafter if spec.drafter is not None else cfg.model.drafter
    if drafter in (None, "none", ""):
        return target, None
    if drafter == "default":
        from workers import hub

        path = hub.default_drafter_path()
        if not (path / "config.json").is_file():
            log.warning("the default drafter %s is missing: serving without speculation", path)
            return target, None
        drafter = str(path)
    return target, drafter


async def build_engine(cfg: ServeConfig, spec: ReplicaSpec, name: str = "specfleet") -> tuple[Any, bool]:
    """(an object with the AsyncLLMEngine surface for this replica spec, whether it has a drafter).
    `name` prefixes its rank actors' names (f"{name}-{uid}-g{restarts}-rank{r}") when it has any."""
    block = spec.block_size or cfg.model.block_size
    if cfg.engine == "mock":
        from orchestrator.mock_engine import MockEngine, MockEngineRecipe

        no_drafter = (spec.drafter if spec.drafter is not None else cfg.model.drafter) in (None, "none", "")
        tp = spec.tp if isinstance(spec.tp, int) else 1
        if tp > 1:  # real rank actors in the replica's bundles (placement, node loss), mock engine on rank 0
            from cluster.runtime.replica_group import ReplicaGroup

            recipe = MockEngineRecipe(spec.mock, block, spec.max_num_seqs, not no_drafter)
            gpus = spec.num_gpus or 0.0
            group = ReplicaGroup(recipe, tp=tp, bundle={"CPU": 1.0, "GPU": gpus} if gpus else {"CPU": 1.0},
                                 progress=False, name=name)
            await group.start()
            return group, not no_drafter
        engine = MockEngine(spec.mock, block_size=block, max_num_seqs=spec.max_num_seqs, speculative=not no_drafter)
        return engine, not no_drafter
    from workers.engine.config import EngineConfig

    target, drafter = await asyncio.to_thread(resolve_paths, cfg, spec)
    ecfg = EngineConfig(
        model=target, drafter=drafter, dtype=cfg.model.dtype, device=cfg.model.device,
        max_num_seqs=spec.max_num_seqs, max_num_batched_tokens=spec.max_num_batched_tokens,
        max_model_len=cfg.model.max_model_len, kv_cache_bytes=spec.kv_cache_bytes,
        gpu_memory_utilization=spec.gpu_memory_utilization, num_spec_tokens_default=block,
    )
    tp = spec.tp if isinstance(spec.tp, int) else 1
    try:
        from cluster.runtime.replica_group import ReplicaGroup
    except ImportError:
        ReplicaGroup = None
    if ReplicaGroup is not None:
        gpus = spec.num_gpus or 0.0
        bundle = {"CPU": 1.0, "GPU": gpus} if gpus else {"CPU": 1.0}
        group = ReplicaGroup(ecfg, tp=tp, bundle=bundle, progress=False, name=name)
        await group.start()
        return group, drafter is not None
    if tp != 1:
        raise ValueError(f"tp={tp} needs cluster.runtime.replica_group.ReplicaGroup, which is not available")
    from workers.engine.async_engine import AsyncLLMEngine

    return await asyncio.to_thread(AsyncLLMEngine, ecfg), drafter is not None


class ReplicaCore:
    """Serve-independent replica logic (tests drive it directly)."""

    def __init__(self, engine: Any, spec: ReplicaSpec, *, replica_id: str, rank: int, block_size: int,
                 spec_available: bool, default_reason: str = "direct", weights: Any = None):
        self.engine = engine
        self.spec = spec
        self.replica_id = replica_id
        self.rank = rank
        self.block_size = block_size
        self.spec_available = spec_available
        self.default_reason = default_reason
        self.weights = weights
        self.recent: OrderedDict[str, float] = OrderedDict()
        self.in_flight = 0

    def _decide(self, route: dict | None) -> tuple[SpecParams, str]:
        """The router's SpecParams for this replica (orchestrator.routing.decisions), else the client's
        explicit choice, else recomputed from this replica's own stats; AR where there is no drafter."""
        from orchestrator.routing.decisions import spec_for_replica
        from orchestrator.routing.stats import RoutingStats

        mine = (((route or {}).get("decision") or {}).get("by_replica") or {}).get(self.replica_id) or {}
        reason = str(mine.get("reason") or self.default_reason)
        if not self.spec_available:
            return SpecParams(enabled=False, block_size=self.block_size), reason
        try:
            sp = spec_for_replica(route, self.replica_id, RoutingStats.from_dict(self.routing_stats()), self.weights)
        except Exception:  # a malformed hint must not fail the request
            log.warning("bad route hint ignored", exc_info=True)
            sp = None
        if sp is None:
            return SpecParams(enabled=True, block_size=self.block_size), reason
        return SpecParams(enabled=sp.enabled, block_size=min(int(sp.block_size), self.block_size)), reason

    async def generate(self, request_id: str, prompt_token_ids: list[int], sampling: dict,
                       tags: dict | None = None, route: dict | None = None) -> AsyncIterator[dict]:
        tags = {k: str(v) for k, v in (tags or {}).items() if v}
        sp, reason = self._decide(route)
        try:
            params = SamplingParams(**{**sampling, "stop": tuple(sampling.get("stop") or ())})
        except TypeError as exc:
            yield {"type": "error", "kind": "invalid", "message": f"bad sampling parameters: {exc}"}
            return
        self.in_flight += 1
        gen = self.engine.generate(request_id, list(prompt_token_ids), params, sp, tags)
        completion = passes = 0
        try:
            try:
                first = await gen.__anext__()
            except InvalidRequest as exc:
                yield {"type": "error", "kind": "invalid", "message": str(exc)}
                return
            except NoCapacity as exc:
                yield {"type": "error", "kind": "no_capacity", "message": str(exc)}
                return
            except (EngineError, StopAsyncIteration) as exc:
                yield {"type": "error", "kind": "engine", "message": str(exc) or "engine produced nothing"}
                return
            if tags.get("session"):
                self.recent[tags["session"]] = time.time()
                self.recent.move_to_end(tags["session"])
                while len(self.recent) > RECENT_SESSIONS:
                    self.recent.popitem(last=False)
            yield {"type": "start", "replica": self.replica_id, "rank": self.rank, "route": reason,
                   "spec": {"enabled": sp.enabled, "block_size": sp.block_size}}
            out = first
            while True:
                completion += len(out.new_token_ids)
                passes += len(out.accepted) if out.accepted else (1 if out.new_token_ids else 0)
                if out.finish_reason == "error" or out.error:
                    yield {"type": "error", "kind": "engine", "message": out.error or "engine error"}
                    return
                if out.new_token_ids or out.text:
                    yield {"type": "delta", "token_ids": list(out.new_token_ids), "text": out.text,
                           "accepted": list(out.accepted)}
                if out.finished:
                    yield {"type": "end", "finish_reason": out.finish_reason or "stop",
                           "completion_tokens": completion, "target_passes": passes,
                           "stats": self.headroom()}
                    return
                try:
                    out = await gen.__anext__()
                except StopAsyncIteration:
                    yield {"type": "end", "finish_reason": "stop", "completion_tokens": completion,
                           "target_passes": passes, "stats": self.headroom()}
                    return
        except asyncio.CancelledError:  # the client went away: free the engine's slot
            await self.engine.abort(request_id)
            raise
        except Exception as exc:  # one request's failure must not take the replica down
            log.exception("request %s failed", request_id)
            await self.engine.abort(request_id)
            yield {"type": "error", "kind": "engine", "message": f"engine error: {type(exc).__name__}: {exc}"}
        finally:
            self.in_flight -= 1
            await gen.aclose()

    def telemetry(self) -> dict:
        fn = getattr(self.engine, "telemetry", None)
        if fn is not None:
            return fn()
        try:
            from workers.telemetry import gpu_telemetry  # engine-side NVML reader, when present

            return gpu_telemetry()
        except Exception:
            return {"gpus": []}

    def headroom(self) -> dict:
        st = self.engine.stats()
        gpus = self.telemetry().get("gpus") or []
        return {
            "replica": self.replica_id, "kv_free_tokens": st.kv_free_tokens, "kv_total_tokens": st.kv_total_tokens,
            "vram_free_bytes": sum(g.get("free_bytes", 0) for g in gpus) if gpus else None,
            "num_running": st.num_running, "num_waiting": st.num_waiting,
        }

    def routing_stats(self) -> dict:
        from orchestrator.routing.stats import RoutingStats

        return RoutingStats.from_engine(
            self.replica_id, self.engine.stats(), self.telemetry(), list(self.recent),
            max_num_seqs=self.spec.max_num_seqs, block_size_default=self.block_size,
            spec_available=self.spec_available, now=time.time(),
        ).to_dict()

    def check_health(self) -> None:
        self.engine.check_health()


class ModelReplica:
    """The Serve deployment class (decorated in orchestrator.app)."""

    async def __init__(self, args: dict):
        from ray import serve

        cfg = ServeConfig.model_validate(args)
        ctx = serve.get_replica_context()
        rank = int(getattr(ctx.rank, "rank", ctx.rank) or 0)
        fleet = cfg.fleet()
        spec = fleet[rank % len(fleet)]
        engine, has_drafter = await build_engine(cfg, spec, name=f"specfleet-{ctx.replica_id.unique_id}")
        default_reason = "direct"
        self.core = ReplicaCore(
            engine, spec, replica_id=ctx.replica_id.unique_id, rank=rank,
            block_size=spec.block_size or cfg.model.block_size,
            spec_available=has_drafter, default_reason=default_reason, weights=cfg.router.weights,
        )
        log.info("replica %s rank %d ready (speculative=%s)", self.core.replica_id, rank, has_drafter)

    async def generate(self, **kwargs) -> AsyncIterator[dict]:
        async for item in self.core.generate(**kwargs):
            yield item

    def record_routing_stats(self) -> dict:
        stats = self.core.routing_stats()
        self._export(stats)
        return stats

    def _export(self, stats: dict) -> None:
        """Headroom gauges through Ray's metrics export (per replica, refreshed every stats period)."""
        try:
            if not hasattr(self, "_gauges"):
                from ray.serve.metrics import Gauge

                self._gauges = {k: Gauge(f"specfleet_replica_{k}", description=f"replica {k} (routing stats)")
                                for k in ("kv_free_tokens", "kv_total_tokens", "vram_free_bytes", "num_running",
                                          "num_waiting", "tau_mean")}
            for k, g in self._gauges.items():
                if stats.get(k) is not None:
                    g.set(float(stats[k]))
        except Exception:  # metrics must never break routing stats
            log.debug("metrics export failed", exc_info=True)

    def check_health(self) -> None:
        self.core.check_health()

    async def info(self) -> dict:
        import ray
        from ray.util import get_current_placement_group

        pg = get_current_placement_group()
        placement = getattr(self.core.engine, "placement", None)
        return {"replica": self.core.replica_id, "rank": self.core.rank, "in_flight": self.core.in_flight,
                "spec": self.core.spec.model_dump(mode="json"), **self.core.headroom(),
                "node_id": ray.get_runtime_context().get_node_id(),
                "placement_group_id": pg.id.hex() if pg is not None else None,
                "ranks": placement() if placement is not None else []}

    async def __del__(self):
        shutdown = getattr(self.core.engine, "shutdown", None) if hasattr(self, "core") else None
        if shutdown is not None:
            await shutdown()
