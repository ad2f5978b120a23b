"""Stable names for a run's replicas.

Serve gives every replica a new random id at each start, and no endpoint says which drafter a replica loaded, so
a run's replicas are matched to the fleet entries of its ServeConfig by KV capacity: the replica ids sorted by
the `specfleet_kv_total_tokens` that /metrics reported, largest first, against the fleet entries sorted by
their KV setting (real: `kv_cache_bytes`; mock: `mock.kv_total_tokens`), largest first. A fleet whose entries
have equal KV settings cannot be told apart this way: its labels are then positional and `ambiguous` is set
(give heterogeneous entries different KV pools, as benchmarks/configs/*.yaml do).

A label is the position and the entry's drafter: `r0:smollm2-135m-dflash-b16-code`, `r1:ar` (no drafter),
`r0:mock-kv20000` (mock engines: their KV pool).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from orchestrator.config import ReplicaSpec, ServeConfig


@dataclass
class FleetEntry:
    position: int  # index in KV order (largest first): the simulator's r{position}
    label: str
    drafter: str | None  # the drafter path ("default" resolved by the caller's config), None = AR only
    kv_key: float  # what KV order sorts on


def _drafter(cfg: ServeConfig, spec: ReplicaSpec) -> str | None:
    d = spec.drafter if spec.drafter is not None else cfg.model.drafter
    return None if d in (None, "none", "") else d


def entries(cfg: ServeConfig) -> list[FleetEntry]:
    """The fleet's replicas (one per copy), largest KV first; ties keep config order."""
    fleet = cfg.fleet()
    if cfg.engine == "mock":
        def key(s: ReplicaSpec) -> float:
            return float(s.mock.kv_total_tokens)
    else:
        def key(s: ReplicaSpec) -> float:
            return float(s.kv_cache_bytes or 0)
    order = sorted(range(len(fleet)), key=lambda i: -key(fleet[i]))
    out = []
    for pos, i in enumerate(order):
        d = _drafter(cfg, fleet[i])
        if cfg.engine == "mock":
            name = f"mock-kv{fleet[i].mock.kv_total_tokens}"
        else:
            name = "ar" if d is None else Path(d).name or d
        out.append(FleetEntry(pos, f"r{pos}:{name}", d, key(fleet[i])))
    return out


def kv_by_replica(metrics_rows: list[dict]) -> dict[str, float]:
    """replica id -> the largest kv_total_tokens /metrics reported for it (router_compare's metrics log)."""
    kv: dict[str, float] = {}
    for row in metrics_rows:
        for k, v in row.items():
            if isinstance(v, dict) and v.get("kv_total_tokens"):
                kv[k] = max(kv.get(k, 0.0), float(v["kv_total_tokens"]))
    return kv


def label_replicas(cfg: ServeConfig, metrics_rows: list[dict]) -> tuple[dict[str, str], bool]:
    """({replica id: label}, ambiguous). Ambiguous when two entries share a KV setting, two replicas report the
    same KV total, or the run saw a different number of replicas than the fleet has; labels are positional then
    (still unique: "r{i}:...")."""
    ents = entries(cfg)
    kv = kv_by_replica(metrics_rows)
    ids = sorted(kv, key=lambda r: (-kv[r], r))
    keys = [e.kv_key for e in ents]
    ambiguous = (len(set(keys)) != len(keys) or len(set(kv.values())) != len(kv) or len(ids) != len(ents))
    labels = {rid: (ents[i].label if i < len(ents) else f"r{i}:unknown") for i, rid in enumerate(ids)}
    return labels, ambiguous
