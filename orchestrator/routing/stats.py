"""Routing stats: what a replica reports through Ray Serve's routing-stats hook and the router reads.

Torch-free and JSON-safe: a replica's ``record_routing_stats()`` returns ``RoutingStats.to_dict()``;
``RoutingStats.from_dict`` turns such a dict back (every entry checked). The router reads the dict it sees
(``{}`` right after deploy) once per report through ``ReportCache``: ``RoutingStats.from_report`` keeps the
tau tables as reported and checks an entry when it is looked up (``ReportedTaus``), so a report of thousands
of sessions costs the router O(1) to take in and O(1) per lookup. The measured step-cost table
(``step_costs``, orchestrator/routing/step_costs.py) is parsed once per report too.
"""
from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from orchestrator.routing.step_costs import StepCostTable

# key -> (tau at block_size_default, number of speculative steps behind it); the engine reports tau there whatever
# block each step ran at (per-position acceptance counts: workers/engine/acceptance.py)
TauTable = dict[str, tuple[float, int]]
TAU_TABLES = ("tau_by_session", "tau_by_role", "tau_by_team", "tau_by_constraint", "tau_by_constrained_session")
# the decode-step EWMAs (ms, rows, tokens): parsed to a finite float or None (``_opt_float``)
DECODE_EWMAS = ("decode_ms", "decode_rows", "decode_tokens")


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
    # running sequences when the EWMAs above were read (the batch they describe); None = num_running.
    # Requests a router counts in since the report (add_inflight) change num_running, not this
    step_batch: int | None = None
    # EWMAs over every decode step, mixed or pure (the real engine's; None where a replica does not report them):
    # ms, target rows (1 per AR sequence, the block per speculative one) and committed tokens per step, at the
    # batch ``step_batch``. With a step-cost table the scorer then prices a request's block as the rows it adds
    # to this shared step (score.py, "mixed steps")
    decode_ms: float | None = None
    decode_rows: float | None = None
    decode_tokens: float | None = None
    # requests a router counted in since the report (``add_inflight``) that took running slots, and the target rows
    # and committed tokens per step the router decided for them (rows: the block it chose, 1 for AR; tokens: its
    # predicted tau at that block, 1 for AR; 1 and 1 where it recorded no decision). Kept by the router, never
    # reported (0 in a report: read as today). The scorer adds them to the shared step (score.mixed_step_times)
    inflight_count: int = 0
    inflight_rows: float = 0.0
    inflight_tokens: float = 0.0
    # the engine's measured step costs (start-up calibration), parsed; None = not measured. Any JSON-form
    # table given here is parsed (StepCostTable.parse)
    step_costs: StepCostTable | None = None
    tau_by_session: TauTable = field(default_factory=dict)
    tau_by_role: TauTable = field(default_factory=dict)
    tau_by_team: TauTable = field(default_factory=dict)
    # grammar-constrained turns (structured outputs, tool calls): per grammar kind, and per session
    tau_by_constraint: TauTable = field(default_factory=dict)
    tau_by_constrained_session: TauTable = field(default_factory=dict)
    tau_mean: float | None = None
    # sessions whose KV prefix is resident (a set for O(1) lookups; any iterable is accepted and frozen)
    cached_sessions: frozenset[str] = field(default_factory=frozenset)
    block_size_default: int = 16  # block at which tau_* are given (the drafter's block, the engine's tau_block)
    spec_available: bool = True  # False: this replica has no drafter (AR only)
    # optional step-cost model t(batch, tokens/seq) = base + per_token * batch * tokens/seq (ms);
    # filled by replicas/simulators that fit it, else the scorer scales the measured EWMAs
    step_base_ms: float | None = None
    step_per_token_ms: float | None = None
    draft_ms: float | None = None  # drafter forward per step at the current batch (part of a spec step)
    prefill_ms_per_token: float | None = None
    updated_at: float = 0.0  # wall-clock seconds when measured (time.time())

    def __post_init__(self) -> None:
        if type(self.cached_sessions) is not frozenset:
            self.cached_sessions = frozenset(self.cached_sessions)
        if self.step_costs is not None and type(self.step_costs) is not StepCostTable:
            self.step_costs = StepCostTable.parse(self.step_costs)

    # ---------------------------------------------------------------- derived
    @property
    def kv_used_frac(self) -> float:
        if self.kv_total_tokens <= 0:
            return 1.0
        return 1.0 - self.kv_free_tokens / self.kv_total_tokens

    # ---------------------------------------------------------------- (de)serialisation
    def add_inflight(self, needs: list[int], shares: list[tuple[float, float]] | None = None) -> None:
        """Count requests routed here since this report (each needing ``needs[i]`` KV tokens): they take
        KV and running slots now, the rest queue. ``shares[i]``: the (rows, tokens) per step the router decided for
        request i (``score.step_share``); without them each is an AR row committing one token. The router and the
        simulator both apply this."""
        if needs:
            if shares is None:
                self._count_inflight(len(needs), sum(needs))
            else:
                self._count_inflight(len(needs), sum(needs), sum(r for r, _ in shares), sum(t for _, t in shares))

    def with_inflight(self, n: int, kv_tokens: int, rows: float | None = None,
                      tokens: float | None = None) -> RoutingStats:
        """``add_inflight`` of ``n`` requests needing ``kv_tokens`` in all, adding ``rows`` target rows and
        ``tokens`` committed tokens per step (None: n of each, AR rows), on a copy (this one when n == 0).
        The copy shares the tables: what a router corrects per decision without copying a report."""
        if n <= 0:
            return self
        out = object.__new__(type(self))  # copy.copy without its generic protocol (one per replica per decision)
        out.__dict__.update(self.__dict__)
        out._count_inflight(n, kv_tokens, rows, tokens)
        return out

    def _count_inflight(self, n: int, kv_tokens: int, rows: float | None = None,
                        tokens: float | None = None) -> None:
        if self.step_batch is None:  # the EWMAs still describe the reported batch
            self.step_batch = self.num_running
        self.kv_free_tokens = max(0, self.kv_free_tokens - kv_tokens)
        slots = max(0, self.max_num_seqs - self.num_running)
        k = min(n, slots)
        self.num_running += k
        self.num_waiting += max(0, n - slots)
        if k > 0:  # the rows of those that took a slot: all n, else their share (which ones queue is not known)
            share = 1.0 if k == n else k / n
            self.inflight_count += k
            self.inflight_rows += float(k) if rows is None else rows * share
            self.inflight_tokens += float(k) if tokens is None else tokens * share

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe (json writes the tau entries' tuples as arrays). Tau entries are (tau, n) tuples: after a
        garbage collection Python stops tracking tuples and dicts of plain numbers, so the reports a router
        process holds (thousands of entries each) no longer lengthen its full collections (docs/routing.md,
        "Decision cost")."""
        d = {f.name: getattr(self, f.name) for f in fields(self)}  # scalars; the containers are rebuilt below
        d["step_ms_by_block"] = {str(k): float(v) for k, v in self.step_ms_by_block.items()}
        d["step_costs"] = self.step_costs.to_dict() if self.step_costs is not None else None
        for key in TAU_TABLES:
            d[key] = {str(k): (float(v[0]), int(v[1])) for k, v in getattr(self, key).items()}
        d["cached_sessions"] = sorted(self.cached_sessions)
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
        kw["step_costs"] = StepCostTable.parse(d.get("step_costs"))
        for key in DECODE_EWMAS:  # a finite float or None: a malformed value must not reach a decision
            kw[key] = _opt_float(d.get(key))
        kw.update(_inflight_fields(d))
        for key in TAU_TABLES:
            kw[key] = _tau_table(d.get(key) or {})
        kw["cached_sessions"] = frozenset(str(s) for s in (d.get("cached_sessions") or []))
        return cls(**kw)

    @classmethod
    def from_report(cls, d: dict[str, Any]) -> RoutingStats:
        """What ``from_dict`` returns, read in place: tau tables of more than ``LAZY_TABLE`` entries stay the
        reported dicts behind ``ReportedTaus`` views (an entry is checked and converted when looked up; a
        malformed one reads as absent), the rest is converted now. O(cached sessions), not O(sessions): the
        router's parse."""
        if not isinstance(d, dict) or "replica_id" not in d:
            raise ValueError("routing stats need at least a replica_id")
        kw = {k: v for k, v in d.items() if k in _FIELDS and k not in TAU_TABLES}
        kw["step_ms_by_block"] = {
            int(k): float(v) for k, v in (d.get("step_ms_by_block") or {}).items() if _finite(v)
        }
        kw["step_costs"] = StepCostTable.parse(d.get("step_costs"))
        for key in DECODE_EWMAS:
            kw[key] = _opt_float(d.get(key))
        kw.update(_inflight_fields(d))
        for key in TAU_TABLES:
            raw = d.get(key) or {}
            kw[key] = ReportedTaus(raw) if len(raw) > LAZY_TABLE else _tau_table(raw)
        cached = d.get("cached_sessions") or ()
        kw["cached_sessions"] = frozenset(cached) if _all_str(cached) else frozenset(map(str, cached))
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
        costs = getattr(stats, "step_costs", None)
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
            step_batch=int(stats.num_running),
            **{k: _opt_float(getattr(stats, k, None)) for k in DECODE_EWMAS},
            step_costs=StepCostTable.parse(costs) if costs else None,
            tau_by_session={str(k): (float(v[0]), int(v[1])) for k, v in sessions.items()},
            tau_by_role={str(k): (float(v[0]), int(v[1])) for k, v in tags.get("role", {}).items()},
            tau_by_team={str(k): (float(v[0]), int(v[1])) for k, v in tags.get("team", {}).items()},
            tau_by_constraint={str(k): (float(v[0]), int(v[1])) for k, v in tags.get("constrained", {}).items()},
            tau_by_constrained_session={str(k): (float(v[0]), int(v[1]))
                                        for k, v in bounded(tags.get("constrained_session", {})).items()},
            tau_mean=stats.tau_mean,
            cached_sessions=frozenset(cached_sessions or ()),
            block_size_default=int(block_size_default),
            spec_available=bool(spec_available),
            updated_at=float(now),
        )


def _inflight_fields(d: dict) -> dict[str, Any]:
    """The in-flight counts of a dict (``to_dict`` of a view: a replica reports none), each checked: a count below
    0, or rows and tokens that are not finite and >= 0, read as none in flight."""
    n, rows, toks = d.get("inflight_count"), _opt_float(d.get("inflight_rows")), _opt_float(d.get("inflight_tokens"))
    if n is None and rows is None and toks is None:
        return {}
    if type(n) is not int or n < 0 or rows is None or toks is None or rows < 0.0 or toks < 0.0:
        return {"inflight_count": 0, "inflight_rows": 0.0, "inflight_tokens": 0.0}
    return {"inflight_count": n, "inflight_rows": rows, "inflight_tokens": toks}


def _opt_float(x: Any) -> float | None:
    """A finite float, or None (not reported / not a number)."""
    return float(x) if x is not None and _finite(x) else None


def _finite(x: Any) -> bool:
    try:
        return math.isfinite(float(x))
    except (TypeError, ValueError, OverflowError):  # OverflowError: an int beyond a float (JSON allows it)
        return False


_FIELDS = frozenset(f.name for f in fields(RoutingStats))
LAZY_TABLE = 64  # from_report reads tau tables longer than this in place


def _tau_table(raw: dict) -> TauTable:
    """A reported tau table converted whole (entries that are not [finite tau, n] dropped)."""
    if not isinstance(raw, dict):
        raise ValueError(f"a tau table must be a dict, got {type(raw).__name__}")
    return {
        str(k): (float(v[0]), int(v[1]))
        for k, v in raw.items()
        if isinstance(v, (list, tuple)) and len(v) == 2 and _finite(v[0])
    }


def _all_str(items: Any) -> bool:
    """Every item (every key of a dict) is a str: ``str.join`` checks that in C (~5 ns an item, against ~12 for
    ``set(map(type, items))``), raising TypeError at the first that is not. A str subclass passes, and hashes and
    compares as its str value, so a lookup by that value finds it as after ``str(item)``."""
    try:
        "".join(items)
    except TypeError:
        return False
    return True


def _tau_entry(v: Any) -> tuple[float, int] | None:
    """A reported ``[tau, n]`` as from_dict converts it; None where from_dict would drop or refuse it."""
    if not isinstance(v, (list, tuple)) or len(v) != 2 or not _finite(v[0]):
        return None
    try:
        return float(v[0]), int(v[1])
    except (TypeError, ValueError, OverflowError):
        return None


class ReportedTaus(Mapping):
    """A reported tau table (``{key: [tau, n]}``) read in place, as the ``TauTable`` from_dict would build:
    ``get`` checks and converts one entry. Keys are strings (to_dict writes them so); a table with other
    keys is converted whole once, as from_dict does."""

    __slots__ = ("_raw",)

    def __init__(self, raw: dict):
        if not isinstance(raw, dict):
            raise ValueError(f"a tau table must be a dict, got {type(raw).__name__}")
        if not _all_str(raw):
            raw = {str(k): v for k, v in raw.items()}
        self._raw = raw

    def get(self, key: Any, default: Any = None) -> Any:
        v = self._raw.get(key)
        if v is None:
            return default
        if type(v) is tuple and len(v) == 2:  # as to_dict writes it (and pickling keeps it): nothing to convert
            t, n = v
            if type(t) is float and type(n) is int and t - t == 0.0:  # t - t: nan for inf and nan
                return v
        e = _tau_entry(v)
        return default if e is None else e

    def __getitem__(self, key: Any) -> tuple[float, int]:
        e = _tau_entry(self._raw[key])
        if e is None:
            raise KeyError(key)
        return e

    def __contains__(self, key: Any) -> bool:
        return self.get(key) is not None

    def __iter__(self) -> Iterator[str]:
        return (k for k, v in self._raw.items() if _tau_entry(v) is not None)

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def __repr__(self) -> str:
        return f"ReportedTaus({len(self._raw)} reported)"


class ReportCache:
    """replica id -> its latest report, parsed once (``RoutingStats.from_report``). A report is the same
    when it carries the same ``updated_at`` (> 0), or, without one, is the same dict object: Serve hands the
    router new dict objects for every replica whenever any replica reports. A report that does not parse gives
    None (also cached), as does ``{}``."""

    def __init__(self) -> None:
        self._last: dict[str, tuple[dict, float, RoutingStats | None]] = {}
        self._views: dict[str, tuple] = {}  # id -> (report, n, kv, rows, tokens, view)
        self._costs: dict[str, tuple[dict, StepCostTable]] = {}  # id -> its last reported step costs, parsed

    def parsed(self, replica_id: str, d: dict | None) -> RoutingStats | None:
        if not d:
            return None
        hit = self._last.get(replica_id)
        at = d.get("updated_at")
        if hit is not None and ((hit[1] and at == hit[1]) or hit[0] is d):
            return hit[2]
        raw_costs = d.get("step_costs")
        known = self._costs.get(replica_id)
        if known is not None and raw_costs == known[0]:  # the calibration is the same in every report
            raw_costs = known[1]
        try:
            st = RoutingStats.from_report({**d, "replica_id": replica_id, "step_costs": raw_costs})
        except (TypeError, ValueError):
            st = None
        if st is not None and st.step_costs is not None and raw_costs is not st.step_costs:
            self._costs[replica_id] = (raw_costs, st.step_costs)
        at = at if isinstance(at, (int, float)) and at else 0.0
        # a report with a time is known by it: the dict is not kept (Serve's next broadcast replaces it, and the
        # old one is then freed where Serve drops it, not in a decision here); one without, by the dict itself
        self._last[replica_id] = (None if at else d, at, st)
        return st

    def known(self, replica_id: str) -> RoutingStats | None:
        """The replica's report as last parsed (None where none parsed)."""
        hit = self._last.get(replica_id)
        return hit[2] if hit is not None else None

    def with_inflight(self, st: RoutingStats, n: int, kv_tokens: int, rows: float | None = None,
                      tokens: float | None = None) -> RoutingStats:
        """``st.with_inflight(n, kv_tokens, rows, tokens)`` for a report this cache parsed, the copy kept until the
        report or the counts change: between two decisions most replicas' counts do not move, so their copies are
        reused (one object per replica per change, not per decision). Shared like the report: read it, never
        change it."""
        if n <= 0:
            return st
        hit = self._views.get(st.replica_id)
        if (hit is not None and hit[0] is st and hit[1] == n and hit[2] == kv_tokens and hit[3] == rows
                and hit[4] == tokens):
            return hit[5]
        view = st.with_inflight(n, kv_tokens, rows, tokens)
        self._views[st.replica_id] = (st, n, kv_tokens, rows, tokens, view)
        return view

    def keep(self, replica_ids: set[str]) -> None:
        """Forget replicas that left (bounded memory)."""
        for rid in [r for r in self._last if r not in replica_ids]:
            del self._last[rid]
        for rid in [r for r in self._views if r not in replica_ids]:
            del self._views[rid]
        for rid in [r for r in self._costs if r not in replica_ids]:
            del self._costs[rid]

    def __len__(self) -> int:
        return len(self._last)
