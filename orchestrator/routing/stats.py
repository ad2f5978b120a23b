"""Routing stats: what a replica reports through Ray Serve's routing-stats hook and the router reads.

Torch-free and JSON-safe: a replica's ``record_routing_stats()`` returns ``RoutingStats.to_dict()``;
the router turns the dict it sees (``{}`` right after deploy) back with ``RoutingStats.from_dict``.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

TauTable = dict[str, tuple[float, int]]  # key -> (tau EWMA, number of speculative steps behind it)
TAU_TABLES = ("tau_by_session", "tau_by_role", "tau_by_team", "tau_by_constraint", "tau_by_constrained_session")


@dataclass
class RoutingStats:
    replica_id: str
    kv_free_tokens: int = 0
    kv_total_tokens: int = 0
    vram_free_bytes: int | None = None  # None on CPU (no NVML)
    vram_total_bytes: int | None = None  # of its GPUs (every TP rank's), None on CPU
    gpu_count: int = 0  # GPUs its TP ranks report through NVML
    num_running: int = 0
    num_waiting: int = 0
    max_num_seqs: int = 16
    step_ms_ar: float | None = None  # EWMA of one AR decode step at the current batch
    step_ms_by_block: dict[int, float] = field(default_factory=dict)  # block -> EWMA of draft+verify step
    tau_by_session: TauTable = field(default_factory=dict)
    tau_by_role: TauTable = field(default_factory=dict)
    tau_by_team: TauTable = field(default_factory=dict)
    # grammar-constrained turns (structured outputs, tool calls): per grammar kind, and per session
    tau_by_constraint: TauTable = field(default_factory=dict)
    tau_by_constrained_session: TauTable = field(default_factory=dict)
    tau_mean: float | None = None
    cached_sessions: list[str] = field(default_factory=list)  # sessions whose KV prefix is resident
    block_size_default: int = 16  # block at which tau_* were measured (the drafter's block)
    spec_available: bool = True  # False: this replica has no drafter (AR only)
    # optional step-cost model t(batch, tokens/seq) = base + per_token * batch * tokens/seq (ms);
    # filled by replicas/simulators that fit it, else the scorer scales the measured EWMAs
    step_base_ms: float | None = None
    step_per_token_ms: float | None = None
    draft_ms: float | None = None  # drafter forward per step at the current batch (part of a spec step)
    prefill_ms_per_token: float | None = None
    updated_at: float = 0.0  # wall-clock seconds when measured (time.time())

    # ---------------------------------------------------------------- derived
    @property
    def kv_used_frac(self) -> float:
        if self.kv_total_tokens <= 0:
            return 1.0
        return 1.0 - self.kv_free_tokens / self.kv_total_tokens

    # ---------------------------------------------------------------- (de)serialisation
    def add_inflight(self, needs: list[int]) -> None:
        """Count requests routed here since this report (each needing ``needs[i]`` KV tokens): they take
        KV and running slots now, the rest queue. The router and the simulator both apply this."""
        if not needs:
            return
        self.kv_free_tokens = max(0, self.kv_free_tokens - sum(needs))
        slots = max(0, self.max_num_seqs - self.num_running)
        self.num_running += min(len(needs), slots)
        self.num_waiting += max(0, len(needs) - slots)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["step_ms_by_block"] = {str(k): float(v) for k, v in self.step_ms_by_block.items()}
        for key in TAU_TABLES:
            d[key] = {str(k): [float(v[0]), int(v[1])] for k, v in getattr(self, key).items()}
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RoutingStats:
        """Inverse of to_dict; unknown keys are ignored (a newer replica may report more)."""
        if not isinstance(d, dict) or "replica_id" not in d:
            raise ValueError("routing stats need at least a replica_id")
        known = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in known}
        kw["step_ms_by_block"] = {
            int(k): float(v) for k, v in (d.get("step_ms_by_block") or {}).items() if _finite(v)
        }
        for key in TAU_TABLES:
            kw[key] = {
                str(k): (float(v[0]), int(v[1]))
                for k, v in (d.get(key) or {}).items()
                if isinstance(v, (list, tuple)) and len(v) == 2 and _finite(v[0])
            }
        kw["cached_sessions"] = [str(s) for s in (d.get("cached_sessions") or [])]
        return cls(**kw)

    @classmethod
    def from_engine(
        cls,
        replica_id: str,
        stats: Any,  # workers.engine.params.EngineStats
        telemetry: dict[str, Any] | None = None,
        cached_sessions: list[str] | None = None,
        *,
        max_num_seqs: int = 16,
        block_size_default: int = 16,
        spec_available: bool = True,
        max_sessions: int = 4096,
        now: float = 0.0,
    ) -> RoutingStats:
        """Build from an engine's EngineStats and a ReplicaGroup's telemetry() dict."""
        tags = getattr(stats, "tau_by_tag", None) or {}
        def bounded(table: dict) -> dict:  # keep the best-measured ones; bounded message size
            table = dict(table)
            if len(table) > max_sessions:
                table = dict(sorted(table.items(), key=lambda kv: -kv[1][1])[:max_sessions])
            return table

        sessions = bounded(tags.get("session", {}))
        gpus = (telemetry or {}).get("gpus") or []
        vram_free = sum(int(g.get("free_bytes", 0)) for g in gpus) if gpus else None
        vram_total = sum(int(g.get("total_bytes", 0)) for g in gpus) if gpus else None
        return cls(
            replica_id=str(replica_id),
            kv_free_tokens=int(stats.kv_free_tokens),
            kv_total_tokens=int(stats.kv_total_tokens),
            vram_free_bytes=vram_free,
            vram_total_bytes=vram_total,
            gpu_count=len(gpus),
            num_running=int(stats.num_running),
            num_waiting=int(stats.num_waiting),
            max_num_seqs=int(max_num_seqs),
            step_ms_ar=stats.step_ms_ar,
            step_ms_by_block={int(k): float(v) for k, v in (stats.step_ms_by_block or {}).items()},
            tau_by_session={str(k): (float(v[0]), int(v[1])) for k, v in sessions.items()},
            tau_by_role={str(k): (float(v[0]), int(v[1])) for k, v in tags.get("role", {}).items()},
            tau_by_team={str(k): (float(v[0]), int(v[1])) for k, v in tags.get("team", {}).items()},
            tau_by_constraint={str(k): (float(v[0]), int(v[1])) for k, v in tags.get("constrained", {}).items()},
            tau_by_constrained_session={str(k): (float(v[0]), int(v[1]))
                                        for k, v in bounded(tags.get("constrained_session", {})).items()},
            tau_mean=stats.tau_mean,
            cached_sessions=list(cached_sessions or []),
            block_size_default=int(block_size_default),
            spec_available=bool(spec_available),
            updated_at=float(now),
        )


def _finite(x: Any) -> bool:
    try:
        return math.isfinite(float(x))
    except (TypeError, ValueError):
        return False
