"""The engine's start-up CPU-kernel self-check (workers/engine/kernel_check.py) as the serving layer reports it.

    EngineStats.kernel_check (KernelCheck.to_dict(), or None)  ->  CpuKernelStatus.from_engine  (the replica)
      -> its routing-stats report under REPORT_KEY  ->  CpuKernelStatus.from_report  (the ingress, fleet.py)
      -> /health ``cpu_kernels`` per replica and the ``specfleet_cpu_kernel*`` gauges of /metrics

``check`` is what the self-check found: ``passed``, ``failed`` (the engine turned its CPU kernels off: the torch
path serves, slower and correct), ``skipped`` (it could not run: not a CPU engine, kernels unavailable or off
already, tensor parallel, ...) or ``not_run`` (no check: ``check_cpu_kernels`` off, or an engine without one such
as the mock). ``not_run`` is not a pass: ``enabled`` is then None (not known). Torch-free.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

REPORT_KEY = "cpu_kernels"  # the key of a replica's routing-stats report (RoutingStats ignores unknown keys)
CHECKS = ("passed", "failed", "skipped", "not_run")


@dataclass(frozen=True)
class CpuKernelStatus:
    check: str  # one of CHECKS
    enabled: bool | None  # the CPU kernels serve after the check; None = not known (not run)
    rel_err: float | None = None  # worst relative logits error, kernels vs torch, over the parts; None = none finite
    reason: str | None = None  # failed: what diverged; skipped: why

    @classmethod
    def from_engine(cls, kernel_check: dict[str, Any] | None) -> CpuKernelStatus:
        """From ``EngineStats.kernel_check`` (None: the check did not run)."""
        if not kernel_check:
            return cls("not_run", None)
        enabled = kernel_check.get("kernels_on")
        enabled = bool(enabled) if enabled is not None else None
        if kernel_check.get("skipped"):
            return cls("skipped", enabled, reason=str(kernel_check["skipped"]))
        errs = [p.get("rel_err") for p in kernel_check.get("parts") or ()]
        finite = [float(e) for e in errs if isinstance(e, (int, float)) and math.isfinite(e)]
        rel_err = max(finite) if finite and len(finite) == len(errs) else None
        if kernel_check.get("ok"):
            return cls("passed", enabled, rel_err)
        failures = kernel_check.get("failures") or ["the check failed"]
        return cls("failed", enabled, rel_err, "; ".join(map(str, failures)))

    @classmethod
    def from_report(cls, report: dict[str, Any] | None) -> CpuKernelStatus | None:
        """From a routing-stats report; None when it carries none (not reported yet, an older replica) or a
        malformed one."""
        d = (report or {}).get(REPORT_KEY)
        if not isinstance(d, dict) or d.get("check") not in CHECKS:
            return None
        enabled, rel_err, reason = d.get("enabled"), d.get("rel_err"), d.get("reason")
        if enabled is not None and not isinstance(enabled, bool):
            return None
        if rel_err is not None and not (isinstance(rel_err, (int, float)) and math.isfinite(rel_err)):
            return None
        return cls(d["check"], enabled, float(rel_err) if rel_err is not None else None,
                   str(reason) if reason is not None else None)

    @property
    def turned_off(self) -> bool:
        """The check failed and the kernels are off: an operator should know (the server log warns)."""
        return self.check == "failed" and self.enabled is False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
