"""Run folders for the validation tests: the simulator's runs of a fleet written as router_compare writes a measured
run (one folder per policy run: config, requests, metrics, summary), with Serve-like replica ids and server session
ids. Shared by test_evidence_models.py and test_replica_stats.py."""
from __future__ import annotations

import json
from pathlib import Path

import yaml

from benchmarks import validate
from benchmarks.simulator import Simulator
from orchestrator.config import ServeConfig

POLICIES = ("specfleet", "pow2", "consistent_hash")


def record(r) -> dict:
    """A simulated request as router_compare records a measured one (trace session id, the server's session id)."""
    return {"session": r.session.removeprefix("srv-"), "server_session": r.session, "team": r.team, "role": r.role,
            "turn": r.turn, "t_arrive": r.t_arrive, "t_first": r.t_first, "t_done": r.t_done, "generated": r.generated,
            "prompt_tokens": r.prompt_tokens, "status": r.status, "replica": r.replica or "",
            "spec_passes": r.spec_passes, "spec_tokens": r.spec_tokens, "error": ""}


def write_policy_runs(d: Path, cfg: dict, kv: dict[str, float], step, alphas, sessions: list[dict]) -> None:
    """Simulate each policy on the fleet of ``cfg`` (replicas named by ``kv``'s ids, largest KV first) and write its
    files into ``d`` as a measured run's."""
    names = sorted(kv, key=lambda r: -kv[r])
    for policy in POLICIES:
        sc = ServeConfig.model_validate(cfg)
        reps = validate.build_fleet(sc, [kv[n] for n in names], alphas, step, names)
        res = Simulator(reps, policy, sc.router.weights, sc.router.stats_period_s, seed=0).run(sessions, concurrency=4)
        (d / f"{policy}.yaml").write_text(yaml.safe_dump({**cfg, "router": {"policy": policy}}))
        (d / f"{policy}.requests.jsonl").write_text("".join(json.dumps(record(r)) + "\n" for r in res.requests))
        (d / f"{policy}.metrics.jsonl").write_text(json.dumps({"t": 0.0, **{rid: {"kv_total_tokens": v}
                                                                               for rid, v in kv.items()}}) + "\n")
        (d / f"{policy}.summary.json").write_text(json.dumps({"concurrency": 4}))
