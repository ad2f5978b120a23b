"""Validate the simulator against measured router_compare runs: same trace, same fleet, same policy.

Input: a router_compare output folder (trials mode: each seed{S}/ trial in turn; single run: the folder itself).
Per trial the simulator (benchmarks/simulator.py) is given:

* the fleet of each policy's own ServeConfig (its router weights: the baselines' pinned speculation too), its
  replicas matched to the run's by KV capacity (benchmarks/fleet_labels.py), KV tokens from the run's /metrics;
* step costs: `--step-costs` (benchmarks/calibrate.py's table, measured on a quiet machine: real engines; one
  file for every replica, or one per drafter, matched by the drafter path the file records); without it, each
  replica's own start-up calibration as the `--fit-on` run saved it (`{fit_on}.replica_stats.json`:
  benchmarks/replica_stats.py; decode steps at the calibration's 64-token context, the same at every context;
  prefill as `--prefill-ms-per-token` / `--prefill-ms-fixed` say, 0 by default: the start-up calibration does not
  time it, so the fitted per-turn overhead then carries it); the mock's own step model (mock engines);
* acceptance per (replica, role): `--acceptance LABEL=PATH` (benchmarks/acceptance.py JSONs, matched to the fleet
  entries by drafter path), else measured on the `--fit-on` run (every replica sees every role under pow2);
* the trace with each turn's measured prompt and completion lengths.

Fitted on the `--fit-on` run only: the per-turn client/ingress overhead (from TTFT p50) and, with
`--fit-contention`, one slow-down factor on every step cost (from TPOT p50: replicas sharing the 2 cores with
the harness run slower than the calibration alone). The other policies are held out: simulated vs measured
goodput per trial, then per policy the median and the largest error over trials; the goal is |error| <= 15 %
on every held-out run (issue 15). `python -m benchmarks.report OUT` prints the tables.

    python -m benchmarks.validate --run runs/compare_specialised --step-costs runs/step_costs_general.json \
        --acceptance code=runs/acc_code.json --acceptance chat=runs/acc_chat.json --out runs/validation.json
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import yaml

from benchmarks import replica_stats, run_meta
from benchmarks.acceptance_tables import Acceptance, parse_spec
from benchmarks.fleet_labels import entries, kv_by_replica
from benchmarks.simulator import ReplicaSpecSim, Simulator, sessions_from_trace, summarize
from benchmarks.stepmodel import LinearStepModel, load_step_model
from benchmarks.workload import load
from orchestrator.config import ServeConfig
from orchestrator.routing.score import alpha_from_tau

GOAL_PCT = 15.0


class _Rec:
    def __init__(self, d: dict):
        self.__dict__.update(d)


def load_run(run: Path, policy: str) -> tuple[ServeConfig, list[_Rec], list[dict]]:
    cfg = ServeConfig.model_validate(yaml.safe_load((run / f"{policy}.yaml").read_text()))
    recs = [_Rec(json.loads(ln)) for ln in (run / f"{policy}.requests.jsonl").read_text().splitlines() if ln]
    metrics = [json.loads(ln) for ln in (run / f"{policy}.metrics.jsonl").read_text().splitlines() if ln]
    return cfg, recs, metrics


def trial_dirs(run: Path) -> list[tuple[str, Path]]:
    """[(name, folder)] of a router_compare output: its trials, or the folder itself for a single run."""
    summary = run / "summary.json"
    if summary.is_file():
        d = json.loads(summary.read_text())
        if d.get("kind") == "router_compare_trials":
            return [(f"seed {t['seed']}", run / f"seed{t['seed']}") for t in d["trials"]]
    return [(run.name, run)]


def positions(cfg: ServeConfig, metrics: list[dict]) -> tuple[dict[str, int], list[float]]:
    """({replica id: fleet position (KV order)}, measured KV tokens per position)."""
    kv = kv_by_replica(metrics)
    ids = sorted(kv, key=lambda r: (-kv[r], r))
    n = len(entries(cfg))
    if len(ids) != n:
        raise ValueError(f"the run's /metrics saw {len(ids)} replicas, the fleet has {n}")
    return {rid: i for i, rid in enumerate(ids)}, [kv[r] for r in ids]


def measured_alpha(recs: list, pos_of: dict[str, int], block: int) -> dict[int, dict[str, float]]:
    """{fleet position: {role: alpha}} from a run's speculative turns (tokens / target passes, pooled)."""
    acc: dict[int, dict[str, list[int]]] = {}
    for r in recs:
        if r.status == 200 and r.spec_passes and r.replica in pos_of:
            t = acc.setdefault(pos_of[r.replica], {}).setdefault(r.role, [0, 0])
            t[0] += r.spec_tokens
            t[1] += r.spec_passes
    return {pos: {role: alpha_from_tau(tok / n, block) for role, (tok, n) in roles.items()}
            for pos, roles in acc.items()}


def _same_path(a: str | None, b: str | None) -> bool:
    if not a or not b:
        return False

    def norm(x: str) -> Path:
        if x == "default":
            from workers import hub

            return hub.default_drafter_path().resolve()
        p = Path(x).expanduser()
        return (p if p.is_absolute() else run_meta.REPO_ROOT / p).resolve()

    return norm(a) == norm(b)


def alpha_from_files(cfg: ServeConfig, accs: list[Acceptance]) -> dict[int, dict[str, float]]:
    """{fleet position: {role: alpha}} from acceptance JSONs whose drafter path is the entry's drafter."""
    out = {}
    for e in entries(cfg):
        if e.drafter is None:
            continue
        hit = [x for x in accs if _same_path(x.drafter, e.drafter)]
        if not hit:
            raise ValueError(f"no --acceptance file measured drafter {e.drafter} (fleet entry {e.label}); files "
                             f"measured: {[x.drafter for x in accs]}")
        out[e.position] = dict(hit[0].alpha_by_role)
    return out


def steps_for_fleet(cfg: ServeConfig, steps: list[tuple[str | None, object]]) -> dict[int, object] | None:
    """{fleet position: step model}: one model for every replica, or each entry's drafter's (by path)."""
    if not steps:
        return None
    if len(steps) == 1:
        return {e.position: steps[0][1] for e in entries(cfg)}
    out = {}
    for e in entries(cfg):
        hit = [m for d, m in steps if _same_path(d, e.drafter)]
        if not hit:
            raise ValueError(f"no --step-costs file was measured with drafter {e.drafter} (fleet entry {e.label}); "
                             f"files: {[d for d, _ in steps]}")
        out[e.position] = hit[0]
    return out


def build_fleet(cfg: ServeConfig, kv_tokens: list[float], alphas: dict[int, dict[str, float]] | None,
                step, names: list[str] | None = None) -> list[ReplicaSpecSim]:
    """The simulator's replicas in KV order; ``step``: one step model, or {position: step model}; ``names``: the
    run's replica ids by position (session hashing then places sessions where Serve did), else r0, r1, ..."""
    fleet = cfg.fleet()
    key = (lambda s: s.mock.kv_total_tokens) if cfg.engine == "mock" else (lambda s: s.kv_cache_bytes or 0)
    order = sorted(range(len(fleet)), key=lambda i: -key(fleet[i]))  # the order fleet_labels.entries uses
    reps = []
    for pos, idx in enumerate(order):
        spec = fleet[idx]
        block = spec.block_size or cfg.model.block_size
        no_drafter = (spec.drafter if spec.drafter is not None else cfg.model.drafter) in (None, "none", "")
        if cfg.engine == "mock":
            m = spec.mock
            sm = LinearStepModel(m.step_ms / 1e3, 0.0, m.step_ms * (1 + block / 32) / 1e3, 0.0, 0.0, "mock profile")
            alpha, alpha_default = dict(m.acceptance_by_role), m.acceptance
        else:
            sm = step.get(pos) if isinstance(step, dict) else step
            if sm is None:
                raise ValueError("real engines need --step-costs (benchmarks/calibrate.py)")
            alpha = dict((alphas or {}).get(pos, {}))
            alpha_default = statistics.mean(alpha.values()) if alpha else 0.0
        name = names[pos] if names else f"r{pos}"
        reps.append(ReplicaSpecSim(name, sm, int(kv_tokens[pos]), alpha, alpha_default, block,
                                   not no_drafter, spec.max_num_seqs, spec.max_ongoing_requests))
    return reps


def sessions_for(trace, recs: list) -> list[dict]:
    """The trace's sessions as far as the run got (its turns up to the last one sent), measured token counts, named
    by the server's session ids where the run recorded them (what Serve's session hashing keyed on)."""
    measured = {(r.session, r.turn): (r.prompt_tokens or None, r.generated) for r in recs if r.status == 200}
    last: dict[str, int] = {}
    for r in recs:
        last[r.session] = max(last.get(r.session, -1), r.turn)
    picked = []
    for s in trace:
        if s.session_id in last:
            picked.append(type(s)(s.session_id, s.team, s.role, s.start_s, s.system, s.turns[: last[s.session_id] + 1]))
    server = {r.session: r.server_session for r in recs if getattr(r, "server_session", "")}
    out = sessions_from_trace(picked, measured=measured)
    for sess in out:
        sess["session_id"] = server.get(sess["session_id"], sess["session_id"])
    return out


def simulate(cfg: ServeConfig, policy: str, sessions, kv_tokens, alphas, step, concurrency: int, overhead_s: float,
             seeds: int, names: list[str] | None = None) -> dict:
    """Mean over simulator seeds of goodput, TTFT p50, TPOT p50."""
    runs = []
    for seed in range(seeds):
        sim = Simulator(build_fleet(cfg, kv_tokens, alphas, step, names), policy, cfg.router.weights,
                        cfg.router.stats_period_s, seed=seed, overhead_s=overhead_s)
        runs.append(summarize(sim.run(sessions, concurrency=concurrency).requests))
    return {k: statistics.mean(r[k] for r in runs) for k in ("goodput_tps", "ttft_p50_s", "tpot_p50_ms")}


def run_step_models(d: Path, fit_on: str, pos_of: dict[str, int], prefill: tuple[float, float] = (0.0, 0.0)
                    ) -> dict[int, object]:
    """{fleet position: step model} from the start-up tables the ``fit_on`` run saved (benchmarks/replica_stats.py),
    each replica's own; prefill (ms per token, fixed ms) as given. ValueError when the run saved none."""
    saved = d / f"{fit_on}.replica_stats.json"
    if not saved.is_file():
        raise ValueError(f"real engines need --step-costs (benchmarks/calibrate.py) or the run's saved start-up "
                         f"tables ({saved} not found: router_compare / never_slower runs save them)")
    models = replica_stats.step_models(saved, list(pos_of), *prefill)
    return {pos_of[rid]: m for rid, m in models.items()}


def validate_trial(name: str, d: Path, policies: list[str], fit_on: str, steps: list[tuple[str | None, object]],
                   accs: list[Acceptance], fit_contention: bool, seeds: int, concurrency: int | None,
                   trace_path: str | None = None, prefill: tuple[float, float] = (0.0, 0.0)) -> dict:
    _, trace = load(trace_path or d / "trace.jsonl")
    fit_cfg, fit_recs, fit_metrics = load_run(d, fit_on)
    pos_of, kv_tokens = positions(fit_cfg, fit_metrics)
    names = sorted(pos_of, key=pos_of.get)
    if steps or fit_cfg.engine == "mock":
        base_step = steps_for_fleet(fit_cfg, steps)
    else:
        base_step = run_step_models(d, fit_on, pos_of, prefill)
    if fit_cfg.engine == "mock":
        alphas, alpha_src = None, "the mock profile"
    elif accs:
        alphas, alpha_src = alpha_from_files(fit_cfg, accs), "--acceptance files"
    else:
        alphas, alpha_src = measured_alpha(fit_recs, pos_of, fit_cfg.model.block_size), f"measured on the {fit_on} run"
    conc = concurrency or json.loads((d / f"{fit_on}.summary.json").read_text()).get("concurrency")
    if not conc:
        raise ValueError(f"{d}: the run does not record its concurrency; pass --concurrency")
    measured_fit = summarize(fit_recs)
    sess_fit = sessions_for(trace, fit_recs)
    def scaled(f: float):
        return {pos: m.scaled(f) for pos, m in base_step.items()} if base_step is not None else None

    factor, overhead = 1.0, 0.0
    for _ in range(3):
        step = scaled(factor)
        sim0 = simulate(fit_cfg, fit_on, sess_fit, kv_tokens, alphas, step, conc, overhead, seeds, names)
        overhead = max(0.0, overhead + measured_fit["ttft_p50_s"] - sim0["ttft_p50_s"])
        if fit_contention and base_step is not None and sim0["tpot_p50_ms"] > 0:
            factor *= measured_fit["tpot_p50_ms"] / sim0["tpot_p50_ms"]
    step = scaled(factor)
    rows = []
    for policy in policies:
        if not (d / f"{policy}.requests.jsonl").exists():
            continue
        cfg, recs, _ = load_run(d, policy)
        meas = summarize(recs)
        sim = simulate(cfg, policy, sessions_for(trace, recs), kv_tokens, alphas, step, conc, overhead, seeds, names)
        err = (sim["goodput_tps"] - meas["goodput_tps"]) / meas["goodput_tps"] if meas["goodput_tps"] else float("nan")
        rows.append({"policy": policy, "measured_goodput_tps": meas["goodput_tps"],
                     "simulated_goodput_tps": round(sim["goodput_tps"], 3), "error_pct": round(100 * err, 1),
                     "held_out": policy != fit_on})
        print(f"{name:10s} {policy:16s} measured {meas['goodput_tps']:8.2f} tok/s  simulated {sim['goodput_tps']:8.2f}"
              f"  error {100 * err:+.1f}%{'' if policy != fit_on else '  (fit-on run)'}", flush=True)
    return {"trial": name, "rows": rows, "overhead_s": round(overhead, 4), "contention_factor": round(factor, 4),
            "step_costs_from": (sorted({m.source for m in base_step.values()}) if base_step
                                else ["the mock's own step model"]),
            "alphas": {str(k): v for k, v in (alphas or {}).items()}, "acceptance_from": alpha_src,
            "kv_tokens": kv_tokens, "concurrency": conc}


def by_policy(trials: list[dict]) -> dict:
    out: dict = {}
    for t in trials:
        for r in t["rows"]:
            out.setdefault(r["policy"], {"errors": [], "held_out": r["held_out"]})["errors"].append(r["error_pct"])
    return {p: {"median_error_pct": statistics.median(v["errors"]),
                "max_abs_error_pct": max(abs(e) for e in v["errors"]), "trials": len(v["errors"]),
                "held_out": v["held_out"], "within_goal": max(abs(e) for e in v["errors"]) <= GOAL_PCT}
            for p, v in out.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", required=True, help="router_compare output folder")
    ap.add_argument("--step-costs", action="append", default=[], help="benchmarks/calibrate.py JSON (or a "
                    "LinearStepModel JSON); real engines; one for all replicas, or repeat: one per drafter")
    ap.add_argument("--prefill-ms-per-token", type=float, default=0.0, help="prefill cost where the step costs "
                    "come from the run's saved start-up tables (no --step-costs; they do not time prefill)")
    ap.add_argument("--prefill-ms-fixed", type=float, default=0.0, help="fixed ms per prefill step, likewise")
    ap.add_argument("--acceptance", action="append", default=[], metavar="LABEL=PATH[#KEY]",
                    help="acceptance JSON of one drafter (benchmarks/acceptance.py), matched to the fleet by drafter "
                    "path; default: measured on the --fit-on run")
    ap.add_argument("--policies", default="specfleet,pow2,consistent_hash")
    ap.add_argument("--fit-on", default="pow2", help="the run the overhead (and contention) is fitted on")
    ap.add_argument("--fit-contention", action="store_true", help="also fit one slow-down factor of the step costs")
    ap.add_argument("--concurrency", type=int, help="default: what the run recorded")
    ap.add_argument("--trace", help="the run's trace, for runs older than the copy router_compare keeps in the folder")
    ap.add_argument("--seeds", type=int, default=3, help="simulator seeds averaged per run")
    ap.add_argument("--out", help="write the validation JSON here")
    a = ap.parse_args(argv)
    m = run_meta.meta("benchmarks.validate", argv)
    if not (a.prefill_ms_per_token >= 0 and a.prefill_ms_fixed >= 0):  # NaN too
        ap.error("--prefill-ms-per-token and --prefill-ms-fixed must be >= 0")
    try:
        steps = [(json.loads(Path(f).read_text()).get("drafter"), load_step_model(f)) for f in a.step_costs]
        accs = [parse_spec(x) for x in a.acceptance]
        trials = [validate_trial(name, d, a.policies.split(","), a.fit_on, steps, accs, a.fit_contention,
                                 a.seeds, a.concurrency, a.trace, (a.prefill_ms_per_token, a.prefill_ms_fixed))
                  for name, d in trial_dirs(Path(a.run))]
    except (ValueError, OSError, KeyError) as exc:
        ap.error(str(exc))
    summary = {"kind": "validation", "meta": run_meta.finish(m), "run": a.run, "fit_on": a.fit_on,
               "fit_contention": a.fit_contention, "goal_pct": GOAL_PCT,
               "step_costs_source": [m.source for _, m in steps] or sorted({s for t in trials
                                                                           for s in t["step_costs_from"]}),
               # the prefill line given for the runs' saved start-up tables (None: not used)
               "prefill_ms": ({"per_token": a.prefill_ms_per_token, "fixed": a.prefill_ms_fixed}
                              if not steps and any(s.endswith("start-up calibration") for t in trials
                                                   for s in t["step_costs_from"]) else None),
               "acceptance_source": sorted({t["acceptance_from"] for t in trials}), "trials": trials,
               "by_policy": by_policy(trials)}
    for p, e in summary["by_policy"].items():
        print(f"{p:16s} median error {e['median_error_pct']:+.1f}%  max |error| {e['max_abs_error_pct']:.1f}%  "
              f"{'held out' if e['held_out'] else 'fit-on'}  {'within' if e['within_goal'] else 'OUTSIDE'} "
              f"{GOAL_PCT:.0f} %")
    if a.out:
        Path(a.out).write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
