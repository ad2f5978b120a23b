"""Acceptance per role of a drafter, read from the JSON the acceptance benchmarks write, as the simulator wants it
(per-position acceptance alpha per role, i.i.d. positions: tau(B) = (1 - alpha^B) / (1 - alpha), the router's
model, orchestrator.routing.score.alpha_from_tau).

Formats read:
* benchmarks/acceptance.py `--json`: {"drafter", "block_size", "results": [{"temperature", "by_category":
  {category: {"tau", ...}}}]}; the categories include the workload's agent roles (planner, coder, reviewer,
  tool_caller). The result at `temperature` (default 0: the workload runs greedy) is taken.
* benchmarks/measure_acceptance.py `--out`: {label: {role: alpha}, "_meta": {"tau_<label>": {role: tau},
  "drafter_<label>": path, "block_<label>": B}}; one label is picked with PATH#LABEL (or the only one).

A spec on the command line is LABEL=PATH[#KEY].
"""
from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from pathlib import Path

from orchestrator.routing.score import alpha_from_tau

AGENT_ROLES = ("planner", "coder", "reviewer", "tool_caller")


@dataclass
class Acceptance:
    label: str
    drafter: str | None  # the drafter's path as the benchmark recorded it
    block: int
    tau_by_role: dict[str, float]
    alpha_by_role: dict[str, float]
    source: str  # file (and key / temperature) it was read from

    def for_roles(self, roles=AGENT_ROLES) -> tuple[dict[str, float], list[str]]:
        """(alpha for every role in ``roles``, the roles filled in with the mean alpha of the measured ones)."""
        measured = {r: a for r, a in self.alpha_by_role.items() if r in roles}
        if not measured:
            raise ValueError(f"{self.source}: no acceptance measured for any of the roles {', '.join(roles)}")
        mean = statistics.mean(measured.values())
        missing = [r for r in roles if r not in measured]
        return {r: measured.get(r, mean) for r in roles}, missing


def from_acceptance_json(d: dict, label: str, source: str, temperature: float = 0.0) -> Acceptance:
    block = int(d.get("block_size") or 16)
    res = [r for r in d.get("results", []) if abs(float(r.get("temperature", -1)) - temperature) < 1e-9]
    if not res:
        temps = [r.get("temperature") for r in d.get("results", [])]
        raise ValueError(f"{source}: no result at temperature {temperature:g} (has {temps})")
    taus = {cat: float(c["tau"]) for cat, c in res[0]["by_category"].items()}
    return Acceptance(label, d.get("drafter"), block, taus, {k: alpha_from_tau(t, block) for k, t in taus.items()},
                      f"{source} (T={temperature:g})")


def from_measure_json(d: dict, label: str, source: str, key: str | None) -> Acceptance:
    keys = [k for k in d if not k.startswith("_") and isinstance(d[k], dict)]
    if key is None:
        if len(keys) != 1:
            raise ValueError(f"{source} holds drafters {keys}: pick one with {source}#KEY")
        key = keys[0]
    if key not in keys:
        raise ValueError(f"{source} has no drafter {key!r}; it has {keys}")
    meta = d.get("_meta", {})
    block = int(meta.get(f"block_{key}", 16))
    taus = {r: float(t) for r, t in (meta.get(f"tau_{key}") or {}).items()}
    alphas = {r: float(a) for r, a in d[key].items()}
    return Acceptance(label, meta.get(f"drafter_{key}"), block, taus, alphas, f"{source}#{key}")


def read(path: str | Path, label: str | None = None, key: str | None = None, temperature: float = 0.0) -> Acceptance:
    p = Path(path)
    d = json.loads(p.read_text())
    label = label or key or p.stem
    if "results" in d:
        return from_acceptance_json(d, label, str(p), temperature)
    return from_measure_json(d, label, str(p), key)


def parse_spec(spec: str, temperature: float = 0.0) -> Acceptance:
    """LABEL=PATH[#KEY] -> Acceptance (ValueError with a message on a bad spec or file)."""
    if "=" not in spec:
        raise ValueError(f"acceptance spec must be LABEL=PATH[#KEY], got {spec!r}")
    label, rest = spec.split("=", 1)
    path, _, key = rest.partition("#")
    if not label or not path:
        raise ValueError(f"acceptance spec must be LABEL=PATH[#KEY], got {spec!r}")
    try:
        return read(path, label, key or None, temperature)
    except (OSError, KeyError, TypeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: cannot read acceptance ({type(exc).__name__}: {exc})") from None
