"""Model replica: the Ray Serve deployment that owns one engine (an EngineClient: a ReplicaGroup, or the
mock) and streams a request's tokens back to the ingress as plain dicts.

Call contract (the ingress and the router rely on it): ``generate(request_id, prompt_token_ids,
sampling: dict, tags: dict, route: dict)`` where ``route`` is ``orchestrator.routing.decisions.route_hints``
(the router adds ``route["decision"]``, a RouteDecision, before the call is sent). It yields, in order:
  {"type": "start", "replica", "rank", "decision"}              once admitted by the engine; ``decision`` is
                                                                the RouteDecision as it landed here, with the
                                                                SpecParams this replica runs
  {"type": "delta", "token_ids", "text", "committed"}           per engine step with new tokens (committed
                                                                tokens per target pass)
  {"type": "end", "finish_reason", "stats"}
or a single {"type": "error", "kind": ErrorKind, "message"} (also possible after "start": then it ends
the stream).
Heterogeneous fleets: replica rank r takes ``cfg.fleet()[r]``.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from dataclasses import replace
from collections.abc import AsyncIterator
from enum import Enum
from typing import Any, Callable

from orchestrator.config import ReplicaSpec, ServeConfig
from orchestrator.kernel_status import REPORT_KEY as KERNELS_KEY, CpuKernelStatus
from orchestrator.routing.decisions import RouteDecision, choose_spec, land
from orchestrator.routing.stats import RoutingStats
from workers.engine.client import EngineClient
from workers.engine.params import EngineError, InvalidRequest, NoCapacity, SamplingParams, SpecParams

log = logging.getLogger("specfleet.replica")
RECENT_SESSIONS = 1024
OWN_STATS_TTL_S = 1.0  # _decide reuses this replica's routing stats for this long (Serve's stats period)


class ErrorKind(str, Enum):
    """Why a stream ended in an error item (the ingress maps each to an HTTP status or a retry)."""

    INVALID = "invalid"  # the request can never be served as given: 400
    NO_CAPACITY = "no_capacity"  # valid, but no KV room now: 429 + Retry-After
    ENGINE = "engine"  # the engine failed this request: 503 before any token, an error event after
    REPLICA_FAILED = "replica_failed"  # (ingress) the replica died mid-stream: a non-streamed request is retried
    STREAM_ENDED = "stream_ended"  # (ingress) the replica ended the stream without an end item


def no_gpus() -> dict:
    return {"gpus": []}


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


async def build_engine(cfg: ServeConfig, spec: ReplicaSpec, name: str = "specfleet") -> tuple[EngineClient, bool]:
    """(the engine of this replica spec, whether it has a drafter): the mock (in this process, or on rank 0
    of real rank actors when tp > 1), or a ReplicaGroup (TP ranks as Ray actors; tp == 1 runs the engine in
    this process). `name` prefixes its rank actors' names (f"{name}-{uid}-g{restarts}-rank{r}")."""
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

    target, drafter = await asyncio.to_thread(resolve_paths, cfg, spec)
    ecfg = cfg.engine_config(spec, target, drafter)
    from cluster.runtime.replica_group import ReplicaGroup

    tp = spec.tp if isinstance(spec.tp, int) else 1
    gpus = spec.num_gpus or 0.0
    bundle = {"CPU": 1.0, "GPU": gpus} if gpus else {"CPU": 1.0}
    group = ReplicaGroup(ecfg, tp=tp, bundle=bundle, progress=False, name=name)
    await group.start()
    return group, drafter is not None


class ReplicaCore:
    """Serve-independent replica logic (tests drive it directly)."""

    def __init__(self, engine: EngineClient, spec: ReplicaSpec, *, replica_id: str, rank: int, block_size: int,
                 spec_available: bool, telemetry: Callable[[], dict] = no_gpus, default_reason: str = "direct",
                 weights: Any = None):
        self.engine = engine
        self.telemetry = telemetry  # {"gpus": [...]} of the GPUs the engine uses
        self.spec = spec
        self.replica_id = replica_id
        self.rank = rank
        self.block_size = block_size
        self.spec_available = spec_available
        self.default_reason = default_reason
        self.weights = weights
        self.recent: OrderedDict[str, float] = OrderedDict()
        self.in_flight = 0
        self._own: tuple[float, RoutingStats] | None = None  # (monotonic time built, this replica's stats)
        self.cpu_kernels = CpuKernelStatus("not_run", None)  # the engine's start-up kernel check, as last seen

    def _decide(self, route: dict | None) -> RouteDecision:
        """The router's decision as it lands here, with the SpecParams this replica runs: the router's for
        it, else the client's explicit choice, else recomputed from this replica's own stats (decisions.
        choose_spec); AR where there is no drafter. The own stats are built only when they are needed and at
        most once per OWN_STATS_TTL_S (``own_stats``), not per request: building them is O(sessions)."""
        try:
            landed = land(route, self.replica_id, self.default_reason)
        except Exception:  # a malformed decision must not fail the request
            log.warning("bad route decision ignored", exc_info=True)
            landed = RouteDecision(self.replica_id, self.default_reason)
        if not self.spec_available:
            return replace(landed, spec=SpecParams(enabled=False, block_size=self.block_size))
        try:
            sp = choose_spec(route, landed, self.own_stats, self.weights)
        except Exception:  # a malformed hint must not fail the request
            log.warning("bad route hint ignored", exc_info=True)
            sp = None
        if sp is None:
            return replace(landed, spec=SpecParams(enabled=True, block_size=self.block_size))
        return replace(landed, spec=SpecParams(enabled=sp.enabled, block_size=min(int(sp.block_size), self.block_size)))

    async def generate(self, request_id: str, prompt_token_ids: list[int], sampling: dict,
                       tags: dict | None = None, route: dict | None = None) -> AsyncIterator[dict]:
        tags = {k: str(v) for k, v in (tags or {}).items() if v}
        decision = self._decide(route)
        sp = decision.spec
        try:
            params = SamplingParams(**{**sampling, "stop": tuple(sampling.get("stop") or ())})
        except TypeError as exc:
            yield _error(ErrorKind.INVALID, f"bad sampling parameters: {exc}")
            return
        self.in_flight += 1
        gen = self.engine.generate(request_id, list(prompt_token_ids), params, sp, tags)
        try:
            try:
                first = await gen.__anext__()
            except InvalidRequest as exc:
                yield {**_error(ErrorKind.INVALID, str(exc)), "param": getattr(exc, "param", None)}
                return
            except NoCapacity as exc:
                yield _error(ErrorKind.NO_CAPACITY, str(exc))
                return
            except (EngineError, StopAsyncIteration) as exc:
                yield _error(ErrorKind.ENGINE, str(exc) or "engine produced nothing")
                return
            if tags.get("session"):
                self.recent[tags["session"]] = time.time()
                self.recent.move_to_end(tags["session"])
                while len(self.recent) > RECENT_SESSIONS:
                    self.recent.popitem(last=False)
            yield {"type": "start", "replica": self.replica_id, "rank": self.rank, "decision": decision.to_dict()}
            out = first
            while True:
                if out.finish_reason == "error" or out.error:
                    yield _error(ErrorKind.ENGINE, out.error or "engine error")
                    return
                if out.new_token_ids or out.text:
                    yield {"type": "delta", "token_ids": list(out.new_token_ids), "text": out.text,
                           "committed": list(out.committed)}
                if out.finished:
                    yield {"type": "end", "finish_reason": out.finish_reason or "stop", "stats": self.headroom()}
                    return
                try:
                    out = await gen.__anext__()
                except StopAsyncIteration:
                    yield {"type": "end", "finish_reason": "stop", "stats": self.headroom()}
                    return
        except asyncio.CancelledError:  # the client went away: free the engine's slot
            await self.engine.abort(request_id)
            raise
        except Exception as exc:  # one request's failure must not take the replica down
            log.exception("request %s failed", request_id)
            await self.engine.abort(request_id)
            yield _error(ErrorKind.ENGINE, f"engine error: {type(exc).__name__}: {exc}")
        finally:
            self.in_flight -= 1
            await gen.aclose()

    def headroom(self) -> dict:
        st = self.engine.stats()
        gpus = self.telemetry().get("gpus") or []
        return {
            "replica": self.replica_id, "kv_free_tokens": st.kv_free_tokens, "kv_total_tokens": st.kv_total_tokens,
            "vram_free_bytes": sum(g.get("free_bytes", 0) for g in gpus) if gpus else None,
            "num_running": st.num_running, "num_waiting": st.num_waiting,
        }

    def routing_stats(self) -> dict:
        """What this replica reports to the router (``record_routing_stats``); kept for ``own_stats`` too. Adds
        the CPU-kernel check under ``cpu_kernels`` (orchestrator/kernel_status.py; RoutingStats ignores it)."""
        stats = self._build_stats().to_dict()
        stats[KERNELS_KEY] = self.cpu_kernels.to_dict()
        return stats

    def own_stats(self) -> RoutingStats:
        """This replica's routing stats as a RoutingStats, at most OWN_STATS_TTL_S old (the last report's, or
        built now): what ``_decide`` scores on when no decision names this replica's speculation."""
        own = self._own
        if own is not None and time.monotonic() - own[0] < OWN_STATS_TTL_S:
            return own[1]
        return self._build_stats()

    def note_kernels(self, kernel_check: dict | None) -> CpuKernelStatus:
        """Take in the engine's kernel check (``EngineStats.kernel_check``); warn in the server log when it
        turned the CPU kernels off (once per change: a restarted engine checks again)."""
        status = CpuKernelStatus.from_engine(kernel_check)
        if status != self.cpu_kernels and status.turned_off:
            log.warning("replica %s: CPU kernels OFF, the start-up self-check failed (the torch path serves, slower "
                        "and correct): %s", self.replica_id, status.reason)
        self.cpu_kernels = status
        return status

    def _build_stats(self) -> RoutingStats:
        est = self.engine.stats()
        self.note_kernels(est.kernel_check)
        st = RoutingStats.from_engine(
            self.replica_id, est, self.telemetry(), list(self.recent),
            max_num_seqs=self.spec.max_num_seqs, block_size_default=self.block_size,
            spec_available=self.spec_available, now=time.time(),
        )
        self._own = (time.monotonic(), st)
        return st

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
        self.core = ReplicaCore(
            engine, spec, replica_id=ctx.replica_id.unique_id, rank=rank,
            block_size=spec.block_size or cfg.model.block_size,
            spec_available=has_drafter, telemetry=engine.telemetry, weights=cfg.router.weights,
        )
        kernels = self.core.note_kernels(engine.stats().kernel_check)
        log.info("replica %s rank %d ready (speculative=%s, CPU kernel check %s)", self.core.replica_id, rank,
                 has_drafter, kernels.check)

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
        if hasattr(self, "core"):
            await self.core.engine.shutdown()


def _error(kind: ErrorKind, message: str) -> dict:
    return {"type": "error", "kind": kind.value, "message": message}
