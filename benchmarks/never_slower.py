"""Never slower than the best static choice: ONE replica, three speculation policies, several concurrencies.

Policies, all on the same replica config and the same trace (the seeded multi-agent workload, closed loop:
`concurrency` clients, each running one agent session at a time):

* `ar`: speculation off for every request (static AR);
* `dflash_b16`: speculation on at block 16 for every request (static DFlash);
* `specfleet`: the router decides per request (on / off, block size) from the replica's measured acceptance and
  step costs.

How the statics are forced (`--static-via`): `config` (default; the requests are byte-identical across policies):
`ar` serves the replica without its drafter (`drafter: none`), `dflash_b16` turns the router's steering off
(`router.weights.steer_spec: false, steer_block: false`: the drafter's block 16 on every request); `request`:
the replica config is the same for all three and the statics send the API's `spec` extension on every request
(`{"enabled": false}` / `{"enabled": true, "block_size": 16}`).

A fresh `specfleet serve` per (concurrency, seed, policy); the policy order rotates from run to run. Output:
goodput (and TTFT / TPOT / 429s) per (policy, concurrency) as median [min-max] over seeds, and per concurrency
specfleet / max(ar, dflash_b16), taken per seed (same trace) then summarised; the goal is >= 0.95 (issue 15),
judged on the median and shown with its minimum. `python -m benchmarks.report OUT/summary.json` prints it.

    python -m benchmarks.never_slower --config benchmarks/configs/cpu_single_general.yaml \
        --concurrency 1,4,16 --seeds 21,22,23 --duration-s 90 --out runs/never_slower
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml

from benchmarks import run_meta
from benchmarks.router_compare import RUN_ERRORS, failed_run, load_config, new_trial, serve_and_replay
from benchmarks.trials import aggregate, spread
from benchmarks.workload import add_workload_args, config_from_args, teams_for
from orchestrator.config import ServeConfig

POLICIES = ("ar", "dflash_b16", "specfleet")
STATIC = ("ar", "dflash_b16")
GOAL = 0.95


def check_base(cfg: dict, block: int) -> ServeConfig:
    """The base config must be one replica with a drafter whose block is ``block``; ValueError otherwise."""
    sc = ServeConfig.model_validate(cfg)
    if sc.num_replicas != 1:
        raise ValueError(f"never_slower needs exactly one replica, the config has {sc.num_replicas}")
    spec = sc.fleet()[0]
    drafter = spec.drafter if spec.drafter is not None else sc.model.drafter
    if drafter in (None, "none", ""):
        raise ValueError("the replica has no drafter: nothing to compare (set model.drafter)")
    b = spec.block_size or sc.model.block_size
    if b != block:
        raise ValueError(f"the replica's block size is {b}, the static DFlash policy runs block {block}: set "
                         f"model.block_size to {block}")
    return sc


def policy_run(cfg: dict, policy: str, static_via: str, block: int = 16) -> tuple[dict, dict | None]:
    """(config, extra request body) of one policy's run. Every run uses router.policy specfleet (one replica:
    placement is moot; the router only decides speculation)."""
    if policy not in POLICIES:
        raise ValueError(f"unknown policy {policy!r}; known: {', '.join(POLICIES)}")
    if static_via not in ("config", "request"):
        raise ValueError(f"static_via must be config or request, got {static_via!r}")
    cfg = json.loads(json.dumps(cfg))
    router = cfg.setdefault("router", {})
    router["policy"] = "specfleet"
    if policy == "specfleet":
        return cfg, None
    if static_via == "request":
        spec = {"enabled": False} if policy == "ar" else {"enabled": True, "block_size": block}
        return cfg, {"spec": spec}
    if policy == "ar":
        cfg.setdefault("model", {})["drafter"] = "none"
        for rep in cfg.get("replicas") or []:
            rep["drafter"] = "none"
    else:
        router.setdefault("weights", {}).update(steer_spec=False, steer_block=False)
    return cfg, None


def level_summary(trials: list[dict], goal: float = GOAL) -> dict:
    """trials: [{"seed", "policies": {policy: summary or {"failed"}}}] of one concurrency ->
    {"policies": spreads per policy (trials.aggregate), "ratio": spread of specfleet / max(static) per seed,
     "goal_met": median ratio >= goal (None without a ratio)}."""
    agg = aggregate(trials)
    ratios = []
    for t in trials:
        pols = t["policies"]
        sf = pols.get("specfleet", {})
        statics = [pols.get(p, {}) for p in STATIC]
        if "failed" in sf or not sf or any("failed" in s or not s for s in statics):
            continue
        best = max(s.get("goodput_tps") or 0.0 for s in statics)
        ratios.append(sf.get("goodput_tps", 0.0) / best if best > 0 else None)
    r = spread(ratios)
    return {"policies": agg["policies"], "ratio": r,
            "goal_met": None if r["median"] is None else r["median"] >= goal}


def run(cfg: dict, levels: list[int], seeds: list[int], policies: list[str], a, out: Path, replay=None) -> dict:
    """Every (concurrency, seed): one trace, every policy on it; out/c{C}/seed{S}/{policy}.*; the summary in
    out/summary.json, rewritten after every run."""
    replay = replay or serve_and_replay
    m = run_meta.meta("benchmarks.never_slower", getattr(a, "argv", None))
    summary: dict = {}
    by_level: dict[int, list[dict]] = {}
    k = 0
    for c in levels:
        for seed in seeds:
            wcfg = config_from_args(a, seed=seed, teams=teams_for(c * a.sessions_per_client, a.agents_per_team))
            tdir = out / f"c{c}" / f"seed{seed}"
            trace, trial = new_trial(wcfg, seed, tdir, policies, k)
            k += 1
            by_level.setdefault(c, []).append(trial)
            for p in trial["order"]:
                pcfg, extra = policy_run(cfg, p, a.static_via, a.block)
                try:
                    s = replay(p, pcfg, trace, c, a.duration_s, tdir, port=a.port,
                               startup_timeout_s=a.startup_timeout_s, omp_threads=a.omp_threads, extra_body=extra)
                    s["policy"] = p
                except RUN_ERRORS as exc:
                    s = failed_run(exc, f"[{p}] c={c} seed {seed}")
                trial["policies"][p] = s
                (tdir / "summary.json").write_text(json.dumps(trial["policies"], indent=2))
                summary = {"kind": "never_slower", "meta": run_meta.finish(m), "config": cfg,
                           "substituted_drafters": getattr(a, "substituted", {}), "static_via": a.static_via,
                           "block": a.block, "goal": GOAL, "seeds": seeds, "concurrency": levels,
                           "sessions_per_client": a.sessions_per_client, "duration_s": a.duration_s,
                           "omp_threads": a.omp_threads, "policies": policies,
                           "levels": {str(lc): {**level_summary(ts), "trials": ts} for lc, ts in by_level.items()}}
                (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _ints(text: str, what: str) -> list[int]:
    try:
        xs = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{what} must be integers separated by commas, got {text!r}") from None
    if not xs or len(set(xs)) != len(xs):
        raise ValueError(f"{what} must name distinct values, got {text!r}")
    if what == "--concurrency" and min(xs) < 1:
        raise ValueError(f"--concurrency levels must be >= 1, got {text!r}")
    return xs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", required=True, help="ServeConfig YAML with ONE replica (with a drafter)")
    ap.add_argument("--concurrency", default="1,4,16", help="closed-loop clients, one level per value")
    ap.add_argument("--seeds", default="0", help="workload seeds: one trace per (seed, concurrency)")
    ap.add_argument("--policies", default=",".join(POLICIES))
    ap.add_argument("--static-via", choices=("config", "request"), default="config")
    ap.add_argument("--block", type=int, default=16, help="block of the static DFlash policy (= the drafter's)")
    ap.add_argument("--sessions-per-client", type=int, default=3, help="trace size: sessions = this x concurrency")
    add_workload_args(ap, seed=False)
    ap.add_argument("--duration-s", type=float, default=90.0, help="per run: start no session after this")
    ap.add_argument("--startup-timeout-s", type=float, default=300.0)
    ap.add_argument("--port", type=int, default=8766)
    ap.add_argument("--omp-threads", type=int, default=1, help="torch threads of the replica (OMP_NUM_THREADS)")
    ap.add_argument("--drafter-fallback", help="stand-in for a drafter that does not exist yet (smoke runs only)")
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    a.argv = argv
    try:
        levels = _ints(a.concurrency, "--concurrency")
        seeds = _ints(a.seeds, "--seeds")
        policies = [p for p in a.policies.split(",") if p]
        bad = [p for p in policies if p not in POLICIES]
        if bad or not policies:
            raise ValueError(f"unknown policies {bad}; known: {', '.join(POLICIES)}")
        if a.sessions_per_client < 1:
            raise ValueError("--sessions-per-client must be >= 1")
        config_from_args(a, seed=0)
        cfg, a.substituted = load_config(a.config, a.drafter_fallback, check=lambda c: check_base(c, a.block))
    except (ValueError, OSError, yaml.YAMLError) as exc:
        ap.error(str(exc))
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    summary = run(cfg, levels, seeds, policies, a, out)
    from benchmarks.report import never_slower_tables

    print(never_slower_tables(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
