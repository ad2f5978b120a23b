"""What the ingress knows about the replica fleet: which replicas are live, on which node, with what
capacity, GPUs and step cost; which were lost. Feeds /health, /metrics and admission.

    directory (RouterDirectory: the replicas the Serve request router routes to, with their node id and
               routing stats)  ->  Fleet.view()  ->  FleetView (pure: fleet_view())

A replica whose stream or call just failed is a *suspect*, and so is every other replica on its node
(unless that is the ingress's own node, which is evidently up): a failed replica on another node most
likely means the node is gone. A suspect counts as lost at once (requests are routed around it, see
`avoid`, and its slots leave the admission limit) until it reports fresh routing stats again (a live
node-mate does within a stats period or two), leaves the router's replica set (Serve's controller saw
it die), or `suspect_ttl_s` passes. That makes a lost node visible within the time its streams take to
fail (about 2 s measured, see docs/placement.md), well before Ray marks the node dead (about 14 s).
When every replica is a suspect, suspicion is ignored (routing and capacity): better a doubtful
replica than none.

Routers (orchestrator.routing.router / baselines) register themselves in `ROUTERS` when Serve creates
them in the ingress process. Serve pickles router classes by value, so the registry lives here and
routers reach it through this module object (pickled by reference), as with routing/decisions.py.
"""
from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from orchestrator.kernel_status import CpuKernelStatus
from orchestrator.routing.stats import DECODE_EWMAS, RoutingStats
from orchestrator.routing.step_costs import StepCostTable


@dataclass
class ReplicaSeen:
    """One replica as the router sees it."""

    replica_id: str
    node_id: str
    max_ongoing_requests: int
    stats: RoutingStats | None = None  # None until its first routing-stats report
    cpu_kernels: CpuKernelStatus | None = None  # its engine's start-up CPU-kernel check; None until reported


@dataclass
class NodeView:
    node_id: str
    replicas: list[str]
    capacity: int  # sum of its live replicas' max_ongoing_requests
    gpus: int
    vram_total_bytes: int | None
    vram_free_bytes: int | None
    num_running: int
    num_waiting: int
    kv_free_tokens: int
    kv_total_tokens: int
    step_ms_ar: float | None  # mean over its replicas that measured it
    step_ms_by_block: dict[int, float]

    def to_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "step_ms_by_block": {str(k): v for k, v in self.step_ms_by_block.items()}}


@dataclass
class FleetView:
    known: bool  # False: no router has reported a replica set yet (start-up); nothing below is meaningful
    expected_replicas: int
    live: list[ReplicaSeen] = field(default_factory=list)
    suspects: list[str] = field(default_factory=list)  # seen by the router, but failed recently
    nodes: list[NodeView] = field(default_factory=list)  # nodes with live replicas
    lost_nodes: list[str] = field(default_factory=list)  # hosted replicas before, none now (while degraded)

    @property
    def capacity(self) -> int:
        return sum(r.max_ongoing_requests for r in self.live)

    @property
    def status(self) -> str:
        if not self.known:
            return "starting"
        if not self.live:
            return "unavailable"
        return "degraded" if len(self.live) < self.expected_replicas else "ok"

    def to_dict(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "replicas": {"expected": self.expected_replicas, "live": len(self.live) if self.known else None,
                         "suspect": len(self.suspects)},
            "capacity": self.capacity if self.known else None,
            "nodes": {"live": len(self.nodes), "lost": len(self.lost_nodes)},
            "cpu_kernels": {r.replica_id: r.cpu_kernels.to_dict() for r in self.live if r.cpu_kernels is not None},
        }


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def node_view(node_id: str, reps: list[ReplicaSeen]) -> NodeView:
    stats = [r.stats for r in reps if r.stats is not None]
    with_gpus = [s for s in stats if s.vram_total_bytes is not None]
    blocks: dict[int, list[float]] = {}
    for s in stats:
        for b, ms in s.step_ms_by_block.items():
            blocks.setdefault(int(b), []).append(float(ms))
    return NodeView(
        node_id=node_id, replicas=sorted(r.replica_id for r in reps),
        capacity=sum(r.max_ongoing_requests for r in reps),
        gpus=sum(s.gpu_count for s in stats),
        vram_total_bytes=sum(int(s.vram_total_bytes or 0) for s in with_gpus) if with_gpus else None,
        vram_free_bytes=sum(int(s.vram_free_bytes or 0) for s in with_gpus) if with_gpus else None,
        num_running=sum(s.num_running for s in stats), num_waiting=sum(s.num_waiting for s in stats),
        kv_free_tokens=sum(s.kv_free_tokens for s in stats), kv_total_tokens=sum(s.kv_total_tokens for s in stats),
        step_ms_ar=_mean([s.step_ms_ar for s in stats if s.step_ms_ar is not None]),
        step_ms_by_block={b: sum(v) / len(v) for b, v in sorted(blocks.items())},
    )


def fleet_view(expected: int, seen: list[ReplicaSeen] | None, suspects: set[str],
               lost_nodes: list[str] | None = None) -> FleetView:
    """Pure: the view from the router's replica set (None = unknown yet) and the current suspects
    (ignored when they are all of it)."""
    if seen is None:
        return FleetView(False, expected)
    if all(r.replica_id in suspects for r in seen):
        suspects = set()
    live = [r for r in seen if r.replica_id not in suspects]
    by_node: dict[str, list[ReplicaSeen]] = {}
    for r in live:
        by_node.setdefault(r.node_id, []).append(r)
    live_nodes = set(by_node)
    return FleetView(
        True, expected, live=live, suspects=sorted(r.replica_id for r in seen if r.replica_id in suspects),
        nodes=[node_view(n, reps) for n, reps in sorted(by_node.items())],
        lost_nodes=[n for n in (lost_nodes or []) if n not in live_nodes],
    )


class ReplicaDirectory(Protocol):
    """Where the ingress learns the replica set: None until it is known."""

    def replicas(self) -> list[ReplicaSeen] | None: ...


FLEET_FIELDS = ("kv_free_tokens", "kv_total_tokens", "vram_free_bytes", "vram_total_bytes", "gpu_count",
                "num_running", "num_waiting", "max_num_seqs", "step_ms_ar", "updated_at")


def fleet_stats(replica_id: str, d: dict[str, Any]) -> RoutingStats | None:
    """The part of a routing-stats report the fleet view needs (not the per-session tau tables, which
    can hold thousands of entries: this runs on the ingress's request path): headroom, step times, the decode-step
    EWMAs and the start-up step-cost table (both shown per replica in /metrics)."""
    if not d:
        return None
    try:
        st = RoutingStats(replica_id, **{k: d[k] for k in FLEET_FIELDS if d.get(k) is not None})
        st.step_ms_by_block = {int(k): float(v) for k, v in (d.get("step_ms_by_block") or {}).items()}
    except (TypeError, ValueError):
        return None
    for k in DECODE_EWMAS:  # a finite number, else left None
        v = d.get(k)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            setattr(st, k, float(v))
    try:  # parsed once per report (the directory's cache), interned; a malformed table reads as not measured
        st.step_costs = StepCostTable.parse(d.get("step_costs"))
    except ValueError:
        st.step_costs = None
    return st


class RouterRegistry:
    """deployment (app, name) -> the request router Serve created for it in this process."""

    def __init__(self) -> None:
        self._routers: dict[tuple[str, str], Any] = {}
        self._lock = threading.Lock()

    def attach(self, router: Any) -> None:
        dep = getattr(router, "_deployment_id", None)
        key = (getattr(dep, "app_name", ""), getattr(dep, "name", ""))
        with self._lock:
            self._routers[key] = router

    def get(self, app_name: str, name: str) -> Any:
        with self._lock:
            return self._routers.get((app_name, name))


ROUTERS = RouterRegistry()


class RouterDirectory:
    """The replicas Serve's request router for one deployment routes to (RunningReplica: replica id,
    node id, max_ongoing_requests, routing stats). Serve's controller updates that set when replicas
    start or die; the router drops a replica at once when a call finds its actor dead."""

    def __init__(self, app_name: str, deployment: str, registry: RouterRegistry = ROUTERS,
                 own_node: str | None = None):
        self.app_name, self.deployment, self.registry = app_name, deployment, registry
        self.own_node = own_node  # the node of the process that reads it (the ingress)
        # replica -> (its stats dict, parsed, its CPU-kernel check)
        self._cache: dict[str, tuple[dict, RoutingStats | None, CpuKernelStatus | None]] = {}

    def replicas(self) -> list[ReplicaSeen] | None:
        router = self.registry.get(self.app_name, self.deployment)
        if router is None:
            return None
        out, cache = [], {}
        for r in list(router.curr_replicas.values()):
            rid = r.replica_id.unique_id
            d = getattr(r, "routing_stats", None) or {}
            hit = self._cache.get(rid)
            if hit is None or hit[0] is not d:  # parse once per report
                hit = (d, fleet_stats(rid, d), CpuKernelStatus.from_report(d))
            cache[rid] = hit
            out.append(ReplicaSeen(rid, str(r.node_id or ""), int(r.max_ongoing_requests), hit[1], hit[2]))
        self._cache = cache
        return out


class Fleet:
    """The ingress's fleet state: directory + suspects + nodes seen. Cheap; called per request."""

    def __init__(self, directory: ReplicaDirectory | None, expected_replicas: int, suspect_ttl_s: float = 60.0,
                 clock=time.time, own_node: str | None = None):
        self.directory, self.expected = directory, expected_replicas
        self.suspect_ttl_s, self.clock = suspect_ttl_s, clock
        self.own_node = own_node if own_node is not None else getattr(directory, "own_node", None)
        self._suspects: dict[str, float] = {}  # replica id -> when it (or a replica on its node) failed
        self._nodes_seen: dict[str, None] = {}  # ordered set of nodes that hosted replicas

    def mark_failed(self, replica_id: str | None) -> None:
        """A call to this replica failed at the transport level (actor unreachable / dead)."""
        if not replica_id:
            return
        now = self.clock()
        self._suspects[replica_id] = now
        seen = (self.directory.replicas() if self.directory is not None else None) or []
        node = next((r.node_id for r in seen if r.replica_id == replica_id), None)
        if node and node != self.own_node:  # its node may be gone: doubt the node-mates too
            for r in seen:
                if r.node_id == node:
                    self._suspects.setdefault(r.replica_id, now)

    def _prune(self, seen: list[ReplicaSeen]) -> set[str]:
        now, ids = self.clock(), {r.replica_id: r for r in seen}
        for rid, t in list(self._suspects.items()):
            r = ids.get(rid)
            fresh = r is not None and r.stats is not None and r.stats.updated_at > t + 0.5
            if r is None or fresh or now - t > self.suspect_ttl_s:
                del self._suspects[rid]
        return set(self._suspects)

    def view(self) -> FleetView:
        seen = self.directory.replicas() if self.directory is not None else None
        if seen is None:
            return fleet_view(self.expected, None, set())
        suspects = self._prune(seen)
        v = fleet_view(self.expected, seen, suspects, list(self._nodes_seen))
        for n in v.nodes:
            self._nodes_seen[n.node_id] = None
        if len(v.live) >= self.expected:  # fully restored: forget the nodes that went away
            self._nodes_seen = {n.node_id: None for n in v.nodes}
        return v

    def avoid(self) -> list[str]:
        seen = self.directory.replicas() if self.directory is not None else None
        if seen is not None:
            self._prune(seen)
        return sorted(self._suspects)

    def admission_limit(self) -> int | None:
        """Requests the live replicas can hold (sum of max_ongoing_requests), None when unknown."""
        v = self.view()
        return v.capacity if v.known else None
