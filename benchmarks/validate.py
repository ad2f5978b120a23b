"""Validate the simulator against measured router_compare runs: same trace, same fleet, same policy.

The fleet comes from the run's ServeConfig: KV capacity per replica from the run's /metrics
samples (replicas matched to fleet entries by KV size order), per-position acceptance per
(replica, role) — exact for mock engines (their profile), else measured on the `--fit-on` run
(every replica sees every role under pow2) — and the step-cost model: the mock's own timing, or
a fitted LinearStepModel (benchmarks/calibrate.py) times one contention factor fitted on the
`--fit-on` run together with the per-request client/ingress overhead. The other policies' runs
are held out: their measured goodput is compared with the simulated one.

    python -m benchmarks.validate --run runs/compare_mock --trace runs/trace.jsonl --concurrency 6
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import yaml

from benchmarks.simulator import ReplicaSpecSim, Simulator, sessions_from_trace, summarize
from benchmarks.stepmodel import LinearStepModel
from benchmarks.workload import load
from orchestrator.config import ServeConfig
from orchestrator.routing.score import alpha_from_tau


class _Rec:
    def __init__(self, d: dict):
        self.__dict__.update(d)


def load_run(run: Path, policy: str) -> tuple[ServeConfig, list[_Rec], list[dict]]:
    cfg = ServeConfig.model_validate(yaml.safe_load((run / f"{policy}.yaml").read_text()))
    recs = [_Rec(json.loads(ln)) for ln in (run / f"{policy}.requests.jsonl").read_text().splitlines() if ln]
    metrics = [json.loads(ln) for ln in (run / f"{policy}.metrics.jsonl").read_text().splitlines() if ln]
    return cfg, recs, metrics


def replica_order(metrics: list[dict]) -> list[str]:
    """Replica ids sorted by KV capacity, largest first (fleet entries are matched the same way)."""
    kv: dict[str, float] = {}
    for row in metrics:
        for k, v in row.items():
            if isinstance(v, dict) and v.get("kv_total_tokens"):
                kv[k] = v["kv_total_tokens"]
    return sorted(kv, key=lambda k: -kv[k]), kv


def measured_alpha(recs: list[_Rec], order: list[str], block: int) -> dict[int, dict[str, float]]:
    """{fleet index: {role: alpha}} from speculative turns' tau (tokens / target passes)."""
    out: dict[int, dict[str, float]] = {}
    for i, rid in enumerate(order):
        by_role: dict[str, list[float]] = {}
        for r in recs:
            if r.replica == rid and r.status == 200 and r.spec_passes:
                by_role.setdefault(r.role, []).append(r.spec_tokens / r.spec_passes)
        out[i] = {role: alpha_from_tau(statistics.mean(v), block) for role, v in by_role.items()}
    return out


def build_fleet(cfg: ServeConfig, kv_sorted: list[float], alphas: dict[int, dict[str, float]] | None,
                step: LinearStepModel | None) -> list[ReplicaSpecSim]:
    fleet = cfg.fleet()
    # fleet entries sorted by their KV size (mock: profile; real: kv_cache_bytes), largest first
    key = (lambda s: s.mock.kv_total_tokens) if cfg.engine == "mock" else (lambda s: s.kv_cache_bytes or 0)
    entries = sorted(range(len(fleet)), key=lambda i: -key(fleet[i]))
    reps = []
    for pos, idx in enumerate(entries):
        spec = fleet[idx]
        block = spec.block_size or cfg.model.block_size
        no_drafter = (spec.drafter if spec.drafter is not None else cfg.model.drafter) in (None, "none", "")
        if cfg.engine == "mock":
            m = spec.mock
            sm = LinearStepModel(m.step_ms / 1e3, 0.0, m.step_ms * (1 + block / 32) / 1e3, 0.0, 0.0, "mock profile")
            alpha, alpha_default = dict(m.acceptance_by_role), m.acceptance
        else:
            sm = step
            alpha = dict((alphas or {}).get(pos, {}))
            alpha_default = statistics.mean(alpha.values()) if alpha else 0.0
        reps.append(ReplicaSpecSim(f"r{pos}", sm, int(kv_sorted[pos]), alpha, alpha_default, block,
                                   not no_drafter, spec.max_num_seqs, spec.max_ongoing_requests))
    return reps


def simulate(cfg, policy, sessions, kv_sorted, alphas, step, concurrency, overhead_s, seed=0):
    reps = build_fleet(cfg, kv_sorted, alphas, step)
    sim = Simulator(reps, policy, cfg.router.weights, cfg.router.stats_period_s, seed=seed, overhead_s=overhead_s)
    return summarize(sim.run(sessions, concurrency=concurrency).requests)


def sessions_for(trace, recs: list[_Rec]) -> list[dict]:
    measured = {(r.session, r.turn): (r.prompt_tokens or None, r.generated) for r in recs if r.status == 200}
    last = {}
    for r in recs:
        last[r.session] = max(last.get(r.session, -1), r.turn)
    picked = []
    for s in trace:
        if s.session_id in last:
            s2 = type(s)(s.session_id, s.team, s.role, s.start_s, s.system, s.turns[: last[s.session_id] + 1])
            picked.append(s2)
    return sessions_from_trace(picked, measured=measured)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", required=True)
    ap.add_argument("--trace", required=True)
    ap.add_argument("--concurrency", type=int, required=True)
    ap.add_argument("--policies", default="specfleet,pow2,consistent_hash")
    ap.add_argument("--fit-on", default="pow2", help="run used to fit contention/overhead (and real acceptance)")
    ap.add_argument("--step-model", help="LinearStepModel JSON (real engines)")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--out", help="write the table as JSON here")
    a = ap.parse_args(argv)
    run = Path(a.run)
    _, trace = load(a.trace)
    cfg, fit_recs, fit_metrics = load_run(run, a.fit_on)
    order, kv = replica_order(fit_metrics)
    kv_sorted = [kv[r] for r in order]
    block = cfg.model.block_size
    alphas = measured_alpha(fit_recs, order, block) if cfg.engine != "mock" else None
    base_step = LinearStepModel.load(a.step_model) if a.step_model else None
    measured_fit = summarize(fit_recs)
    sess_fit = sessions_for(trace, fit_recs)

    def sim_mean(policy, sessions, factor, overhead):
        step = base_step.scaled(factor) if base_step else None
        runs = [simulate(cfg, policy, sessions, kv_sorted, alphas, step, a.concurrency, overhead, seed=s)
                for s in range(a.seeds)]
        return {k: statistics.mean(r[k] for r in runs) for k in ("goodput_tps", "ttft_p50_s", "tpot_p50_ms")}

    # fit: overhead from TTFT, contention factor from TPOT (real engines), on the fit-on run only
    factor, overhead = 1.0, 0.0
    for _ in range(3):
        sim0 = sim_mean(a.fit_on, sess_fit, factor, overhead)
        overhead = max(0.0, overhead + measured_fit["ttft_p50_s"] - sim0["ttft_p50_s"])
        if base_step:
            factor *= measured_fit["tpot_p50_ms"] / max(1e-9, sim0["tpot_p50_ms"])
    rows = []
    for policy in a.policies.split(","):
        if not (run / f"{policy}.requests.jsonl").exists():
            continue
        _, recs, _ = load_run(run, policy)
        meas = summarize(recs)
        sim = sim_mean(policy, sessions_for(trace, recs), factor, overhead)
        err = (sim["goodput_tps"] - meas["goodput_tps"]) / meas["goodput_tps"]
        rows.append({"policy": policy, "measured_goodput_tps": meas["goodput_tps"],
                     "simulated_goodput_tps": round(sim["goodput_tps"], 2), "error_pct": round(100 * err, 1),
                     "held_out": policy != a.fit_on})
        print(f"{policy:16s} measured {meas['goodput_tps']:8.2f} tok/s  simulated {sim['goodput_tps']:8.2f}  "
              f"error {100 * err:+.1f}%{'' if policy != a.fit_on else '  (fit-on run)'}")
    print(f"fitted: contention factor {factor:.3f}, overhead {overhead * 1e3:.0f} ms per turn")
    if a.out:
        Path(a.out).write_text(json.dumps({"rows": rows, "contention_factor": factor, "overhead_s": overhead,
                                           "alphas": alphas, "kv_tokens": kv_sorted}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
