"""Repeated trials -> median and spread (pure, no I/O).

A trial = one workload seed, every policy run on the same trace. Each metric is summarised over trials as
{median, min, max, n, values}; ratios (specfleet / a baseline) are taken per trial (same seed, same trace) and
then summarised, so the spread of a ratio is not the ratio of spreads.

tau per (replica, role) of one run is pooled: the committed tokens of its speculative turns over their target
passes (not the mean of per-turn taus), from the records router_compare writes.
"""
from __future__ import annotations

import statistics
from typing import Iterable

METRICS = ("goodput_tps", "ttft_p50_s", "ttft_p99_s", "tpot_p50_ms", "tpot_p99_ms", "rejected_429", "oom_events",
           "errors", "completed", "requests", "tokens")


def spread(values: Iterable[float | None]) -> dict:
    """{median, min, max, n, values} of the finite values; median None when there are none."""
    xs = [float(v) for v in values if v is not None and v == v]  # drop None and NaN
    if not xs:
        return {"median": None, "min": None, "max": None, "n": 0, "values": []}
    return {"median": round(statistics.median(xs), 4), "min": round(min(xs), 4), "max": round(max(xs), 4),
            "n": len(xs), "values": [round(x, 4) for x in xs]}


def tau_by_replica_role(records: Iterable, labels: dict[str, str]) -> dict[str, dict[str, dict]]:
    """{replica label: {role: {"tau", "passes"}}} pooled over the run's completed speculative turns. Records need
    .replica, .role, .status, .spec_passes, .spec_tokens (router_compare.Measured or its JSON)."""
    acc: dict[str, dict[str, list[int]]] = {}
    for r in records:
        get = r.get if isinstance(r, dict) else (lambda k, r=r: getattr(r, k, None))
        if get("status") != 200 or not get("spec_passes"):
            continue
        label = labels.get(get("replica") or "", f"?{get('replica')}")
        t = acc.setdefault(label, {}).setdefault(get("role"), [0, 0])
        t[0] += int(get("spec_tokens") or 0)
        t[1] += int(get("spec_passes"))
    return {lab: {role: {"tau": round(tok / n, 3), "passes": n} for role, (tok, n) in sorted(roles.items())}
            for lab, roles in sorted(acc.items())}


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def aggregate(trials: list[dict], reference: str = "specfleet") -> dict:
    """trials: [{"seed", "policies": {policy: summary or {"failed": msg}}}] ->
    {"policies": {policy: {metric: spread, "tau_by_replica_role": {label: {role: spread of tau}}, "failed": n}},
     "ratios": {f"{reference}/{base}": {"goodput": spread, "tpot_p99": spread}}}. A failed run counts in
    "failed" and is left out of every spread (and of the ratios of its trial)."""
    policies: list[str] = []
    for t in trials:
        policies += [p for p in t["policies"] if p not in policies]
    out: dict = {"policies": {}, "ratios": {}}
    for p in policies:
        runs = [t["policies"][p] for t in trials if p in t["policies"]]
        ok = [s for s in runs if "failed" not in s]
        agg: dict = {m: spread(s.get(m) for s in ok) for m in METRICS}
        taus: dict[str, dict[str, list[float]]] = {}
        for s in ok:
            for lab, roles in (s.get("tau_by_replica_role") or {}).items():
                for role, v in roles.items():
                    taus.setdefault(lab, {}).setdefault(role, []).append(v["tau"])
        agg["tau_by_replica_role"] = {lab: {role: spread(v) for role, v in sorted(roles.items())}
                                      for lab, roles in sorted(taus.items())}
        agg["failed"] = len(runs) - len(ok)
        out["policies"][p] = agg
    if reference in policies:
        for base in (p for p in policies if p != reference):
            good, tpot = [], []
            for t in trials:
                a, b = t["policies"].get(reference, {}), t["policies"].get(base, {})
                if "failed" in a or "failed" in b or not a or not b:
                    continue
                good.append(_ratio(a.get("goodput_tps"), b.get("goodput_tps")))
                tpot.append(_ratio(a.get("tpot_p99_ms"), b.get("tpot_p99_ms")))
            out["ratios"][f"{reference}/{base}"] = {"goodput": spread(good), "tpot_p99": spread(tpot)}
    return out
