"""Everything one ingress holds: config, keys, per-key gate, session registry, metrics, tokenizer, and the
backend that reaches the model replicas (a Serve DeploymentHandle, or in-process ReplicaCores in tests)."""
from __future__ import annotations

import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator

from orchestrator.api.auth import KeyRing
from orchestrator.api.limits import KeyGate
from orchestrator.config import ServeConfig
from orchestrator.fleet import Fleet, ReplicaSeen, RouterDirectory
from orchestrator.metrics import Metrics
from orchestrator.sessions import SessionRegistry


class ServeBackend:
    """Streams from the replica deployment; the session id goes to the request router."""

    def __init__(self, handle: Any):
        self.handle = handle
        # the replica set as Serve's request router in this process sees it (node, capacity, stats)
        self.directory = RouterDirectory(handle.app_name, handle.deployment_name, own_node=_own_node())
        try:  # initialise the handle now, so its router (and the fleet view) exists before the first request
            handle.options(stream=True)
        except Exception:  # a handle that cannot be initialised here still works on first use
            pass

    def stream(self, session_id: str | None, kwargs: dict) -> AsyncIterator[dict]:
        opts: dict[str, Any] = {"stream": True}
        if session_id:
            opts["session_id"] = session_id
        return self.handle.options(**opts).generate.remote(**kwargs)


def _own_node() -> str | None:
    try:
        import ray

        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
    except Exception:
        return None


class LocalBackend:
    """In-process replicas (orchestrator.replica.ReplicaCore), round-robin: for tests without Ray."""

    def __init__(self, cores: list[Any], nodes: list[str] | None = None):
        self.cores = cores
        self.nodes = nodes or ["local"] * len(cores)  # node of each core (fleet view tests)
        self._next = itertools.cycle(range(len(cores)))
        self.directory = self
        self.own_node = None  # in-process "nodes" are labels: a failure casts doubt on its node-mates

    def stream(self, session_id: str | None, kwargs: dict) -> AsyncIterator[dict]:
        from orchestrator.routing.decisions import DISPATCHES

        route = kwargs.get("route") or {}
        avoid = set(route.get("avoid") or ())
        start = next(self._next)
        order = [(start + k) % len(self.cores) for k in range(len(self.cores))]
        core = self.cores[next((i for i in order if self.cores[i].replica_id not in avoid), start)]
        if route.get("request_id"):  # what a Serve router records: the replica the call went to
            DISPATCHES.record(route["request_id"], core.replica_id)
        return core.generate(**kwargs)

    def replicas(self) -> list[ReplicaSeen]:
        from orchestrator.kernel_status import CpuKernelStatus
        from orchestrator.routing.stats import RoutingStats

        reports = [c.routing_stats() for c in self.cores]
        return [ReplicaSeen(c.replica_id, node, c.spec.max_ongoing_requests, RoutingStats.from_dict(d),
                            CpuKernelStatus.from_report(d)) for c, node, d in zip(self.cores, self.nodes, reports)]


def load_tokenizer(cfg: ServeConfig) -> tuple[Any, int]:
    """(tokenizer, max_model_len) the ingress uses to apply chat templates and check lengths."""
    if cfg.engine == "mock":
        from orchestrator.mock_engine import ByteTokenizer

        ctx = min(s.mock.max_model_len for s in cfg.replicas)
        return ByteTokenizer(), min(ctx, cfg.model.max_model_len or ctx)
    from transformers import AutoTokenizer

    target = cfg.model.target
    if target == "smollm2":
        from workers import hub

        target = str(hub.ensure_model("smollm2"))
    path = Path(target)
    if path.suffix == ".gguf":
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        ctx = cfg.model.max_model_len or int(getattr(tok, "model_max_length", 0) or 2048)
        return tok, min(ctx, 1 << 20)
    tok = AutoTokenizer.from_pretrained(str(path))
    ctx = cfg.model.max_model_len
    if ctx is None:
        conf = json.loads((path / "config.json").read_text())
        ctx = int(conf.get("max_position_embeddings") or 2048)
    return tok, ctx


@dataclass
class ServerState:
    cfg: ServeConfig
    backend: Any
    tokenizer: Any
    max_model_len: int
    keys: KeyRing
    gate: KeyGate
    registry: SessionRegistry
    metrics: Metrics = field(default_factory=Metrics)
    fleet: Fleet = field(default_factory=lambda: Fleet(None, 0))
    context_len: dict[str, int] = field(default_factory=dict)  # session -> tokens of its last turn
    spec_off_turns: dict[str, int] = field(default_factory=dict)  # session -> consecutive steered-off turns
    in_flight: int = 0
    draining: bool = False
    behind_proxy: bool = False  # served through Ray Serve's HTTP proxy, which sets x-request-id on every response

    @classmethod
    def create(cls, cfg: ServeConfig, backend: Any, tokenizer: Any = None, max_model_len: int | None = None):
        if tokenizer is None:
            tokenizer, max_model_len = load_tokenizer(cfg)
        lim = cfg.limits
        return cls(
            cfg=cfg, backend=backend, tokenizer=tokenizer, max_model_len=int(max_model_len or 2048),
            keys=KeyRing(cfg.auth.resolve_keys()),
            gate=KeyGate(lim.per_key_concurrency, lim.per_key_queue, lim.queue_timeout_s, lim.retry_after_s),
            registry=SessionRegistry(cfg.persistence.resolved_path()),
            fleet=Fleet(getattr(backend, "directory", None), cfg.num_replicas),
        )

    @property
    def vocab_size(self) -> int:
        try:
            return len(self.tokenizer)
        except TypeError:
            return int(self.tokenizer.vocab_size)
