"""Engine API seam: plain dataclasses shared by the engine, the serving layer and the router.

Kept torch-free so the orchestrator and the router can import it without torch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any


class EngineError(Exception):
    """Base of the engine's typed errors; the message is meant for the user."""


class InvalidRequest(EngineError):
    """The request can never be served as given (maps to HTTP 400; ``param`` names the request field)."""

    def __init__(self, message: str = "", param: str | None = None):
        super().__init__(message)
        self.param = param


class NoCapacity(EngineError):
    """The request is valid but the KV pool cannot hold its worst case now (maps to HTTP 429)."""


class IncompatibleDrafter(EngineError):
    """A drafter whose hidden size / layer ids / vocabulary do not fit the target."""


STRUCTURED_KINDS = ("json_object", "json_schema", "structural_tag", "regex", "ebnf")


@dataclass
class StructuredSpec:
    """A grammar the output must follow (workers/structured/compiler.py): kind + source text."""

    kind: str
    spec: str = ""
    param: str | None = None  # the request field it came from, named in errors

    def validate(self) -> None:
        if self.kind not in STRUCTURED_KINDS:
            raise InvalidRequest(f"structured kind must be one of {', '.join(STRUCTURED_KINDS)}, got {self.kind!r}",
                                 param=self.param)


@dataclass
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    max_tokens: int = 128
    stop: tuple[str, ...] = ()
    seed: int | None = None
    ignore_eos: bool = False
    structured: StructuredSpec | None = None  # grammar-constrained output (a dict is converted)

    def __post_init__(self):
        if isinstance(self.structured, dict):
            self.structured = StructuredSpec(**self.structured)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def validate(self) -> None:
        if not (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature)):
            raise InvalidRequest("temperature must be a finite number")
        if not 0.0 <= self.temperature <= 2.0:
            raise InvalidRequest(f"temperature must be in [0, 2], got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise InvalidRequest(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise InvalidRequest(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if self.max_tokens < 1:
            raise InvalidRequest(f"max_tokens must be >= 1, got {self.max_tokens}")
        if any((not isinstance(s, str)) or s == "" for s in self.stop):
            raise InvalidRequest("stop strings must be non-empty strings")
        if self.structured is not None:
            if not isinstance(self.structured, StructuredSpec):
                raise InvalidRequest("structured must be a StructuredSpec")
            self.structured.validate()
            if self.ignore_eos:
                raise InvalidRequest("ignore_eos cannot be combined with a structured-output grammar",
                                     param="ignore_eos")


@dataclass
class SpecParams:
    enabled: bool = True
    block_size: int = 16  # tokens per drafted block incl. the anchor (DFlash default 16)

    def validate(self, max_block_size: int | None = None) -> None:
        if self.block_size < 2:
            raise InvalidRequest(f"block_size must be >= 2, got {self.block_size}")
        if max_block_size is not None and self.block_size > max_block_size:
            raise InvalidRequest(
                f"block_size {self.block_size} exceeds the drafter's block size {max_block_size}"
            )


@dataclass
class RequestOutput:
    request_id: str
    new_token_ids: list[int]
    text: str = ""  # detokenized text delta for new_token_ids (stop strings already cut)
    finished: bool = False
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    committed: list[int] = field(default_factory=list)  # tokens committed by each target pass in this step
    error: str | None = None


@dataclass
class EngineStats:
    """What an engine reports; the replica turns it into routing stats (orchestrator/routing/stats.py)."""

    kv_free_tokens: int = 0
    kv_total_tokens: int = 0
    num_running: int = 0
    num_waiting: int = 0
    step_ms_ar: float | None = None  # EWMA of one AR decode step
    step_ms_by_block: dict[int, float] = field(default_factory=dict)  # EWMA of a speculative step
    # EWMAs over every decode step, mixed or pure: ms, target rows (1 per AR sequence, the block per speculative
    # one), committed tokens; None before the first
    decode_ms: float | None = None
    decode_rows: float | None = None
    decode_tokens: float | None = None
    # per tag key ("session", "role", "team") -> {value: (tau, n_steps)}: tau at ``tau_block`` from the per-position
    # acceptance of every pass, whatever block it ran at (workers/engine/acceptance.py)
    tau_by_tag: dict[str, dict[str, tuple[float, int]]] = field(default_factory=dict)
    tau_mean: float | None = None  # all passes, at tau_block too
    tau_block: int | None = None  # the block the taus above are given at (the engine's default); None = not said
    accept_by_position: list[float] = field(default_factory=list)  # P(position k accepted)
    tokens_generated: int = 0
    target_passes: int = 0
    # measured at start-up (workers/engine/calibrate.py StepCosts.to_dict()): {"ar_ms": {batch: ms},
    # "spec_ms": {block: {batch: ms}}, "draft_ms": {block: {batch: ms}}}; None = not measured
    step_costs: dict[str, Any] | None = None
    # the start-up CPU-kernel self-check (workers/engine/kernel_check.py KernelCheck.to_dict()): ok, skipped,
    # kernels_on, failures, per part (target / drafter) agree and rel_err; None = not run (check_cpu_kernels off)
    kernel_check: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        d = asdict(self)
        d["step_ms_by_block"] = {str(k): v for k, v in self.step_ms_by_block.items()}
        return d
