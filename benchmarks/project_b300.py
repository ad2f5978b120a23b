"""Project router goodput to the 8-GPU DGX B300 with the validated simulator.

Cases: Qwen3-8B 8xTP1, gpt-oss-120b 2xTP4 and 1xTP8, each with DFlash drafters, for 8..256
concurrent agent sessions, routers specfleet / pow2 / consistent_hash. Step costs from the
roofline (cluster.planning.roofline: B300 HBM3e 8 TB/s, NVLink 5, 288 GB). KV capacity per replica =
(HBM x gpu_memory_utilization x tp - weights - drafter) / KV bytes per token. Agent contexts are scaled by
--prompt-scale (agent prompts carry tool outputs and files: the trace's chat-sized prompts x scale).

Acceptance per (drafter, role), one of:
* `--acceptance LABEL=PATH[#KEY]` (repeat; benchmarks/acceptance.py or measure_acceptance.py JSON, read by
  benchmarks/acceptance_tables.py): the drafters measured on the CPU demo pair; the replicas are split into
  equal groups in the order given (two drafters: half "code", half "chat");
* `--alphas` (JSON {"a": {role: alpha}, "b": ...}, or benchmarks.validate's output of a measured run);
* neither: DEFAULT_ALPHAS, an illustrative shape, not a measurement.
The output says which (`acceptance`, `statement`): these are PROJECTIONS (roofline step costs, acceptance of a
135M CPU demo pair carried over to other models), not measurements on a B300.

    python -m benchmarks.project_b300 --acceptance code=runs/acc_code.json --acceptance chat=runs/acc_chat.json \
        --think 0,0 --out runs/b300_specialised.json
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from benchmarks import run_meta
from benchmarks.acceptance_tables import AGENT_ROLES, parse_spec
from benchmarks.simulator import ReplicaSpecSim, Simulator, sessions_from_trace, summarize
from benchmarks.stepmodel import RooflineStepModel
from benchmarks.workload import WorkloadConfig, generate
from orchestrator.routing.score import RouterWeights

CASES = {
    "qwen3-8b-8xTP1": ("qwen3-8b", 1, 8),
    "gpt-oss-120b-2xTP4": ("gpt-oss-120b", 4, 2),
    "gpt-oss-120b-1xTP8": ("gpt-oss-120b", 8, 1),
}
ROUTERS = ("specfleet", "pow2", "consistent_hash")
DEFAULT_ALPHAS = {  # placeholder shape only; the report uses measured values via --alphas
    "a": {"coder": 0.85, "tool_caller": 0.85, "planner": 0.55, "reviewer": 0.55},
    "b": {"coder": 0.55, "tool_caller": 0.55, "planner": 0.85, "reviewer": 0.85},
}


def kv_tokens(step: RooflineStepModel, util: float = 0.85) -> int:
    m, node, tp = step.model, step.node, step.tp
    weights = m.weight_total_bytes + (step.drafter.weight_total_bytes if step.drafter else 0.0)
    free = node.gpu.memory_bytes * util * tp - weights
    per_token = m.kv_bytes_per_token_layer(1) * m.num_layers
    if step.drafter:
        per_token += step.drafter.kv_bytes_per_token
    return int(max(0.0, free) / per_token)


def drafter_of(i: int, n: int, labels: list[str]) -> str:
    """Replica i of n runs drafter labels[k] for equal groups in order (2 labels: the first half, then the
    second; n not divisible: earlier labels get the extra replica)."""
    k = len(labels)
    sizes = [n // k + (1 if j < n % k else 0) for j in range(k)]
    edge = 0
    for j, size in enumerate(sizes):
        edge += size
        if i < edge:
            return labels[j]
    return labels[-1]


def fleet(case: str, alphas: dict, max_num_seqs: int, kv_scale: float) -> list[ReplicaSpecSim]:
    model, tp, n = CASES[case]
    step = RooflineStepModel(model, tp=tp)
    kv = int(kv_tokens(step) * kv_scale)
    reps = []
    labels = list(alphas)
    for i in range(n):
        kind = drafter_of(i, n, labels)
        al = alphas[kind]
        reps.append(ReplicaSpecSim(f"{case}-{i}{kind}", step, kv, dict(al), statistics.mean(al.values()),
                                   16, True, max_num_seqs, max_num_seqs * 2))
    return reps


def level_sessions(conc: int, sessions_per_level: float = 3.0, think: tuple[float, float] = (0.5, 2.0), seed: int = 0,
                   answer_scale: float = 4.0, prompt_scale: float = 16.0) -> list[dict]:
    """The agent sessions one concurrency level runs: the workload's teams (sessions_per_level x conc sessions),
    answers x answer_scale, prompts x prompt_scale."""
    teams = max(2, int(conc * sessions_per_level / 3))
    trace = generate(WorkloadConfig(teams=teams, rate=0.0, seed=seed, think_s=think, turns=(3, 6)))
    for s in trace:
        for t in s.turns:
            t.max_tokens = int(t.max_tokens * answer_scale)
    return sessions_from_trace(trace, chars_per_token=4.0 / prompt_scale)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--alphas", help='JSON {"a": {role: alpha}, "b": {role: alpha}}')
    ap.add_argument("--acceptance", action="append", default=[], metavar="LABEL=PATH[#KEY]",
                    help="measured acceptance of one drafter (benchmarks/acceptance.py JSON); repeat per drafter")
    ap.add_argument("--temperature", type=float, default=0.0, help="which result of an acceptance.py JSON")
    ap.add_argument("--concurrency", default="8,16,32,64,128,256")
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--prompt-scale", type=float, default=16.0)
    ap.add_argument("--answer-scale", type=float, default=4.0, help="max_tokens x this (agents write more)")
    ap.add_argument("--kv-scale", type=float, default=1.0, help="fraction of the computed KV pool available")
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--sessions-per-level", type=float, default=3.0, help="sessions run = this x concurrency")
    ap.add_argument("--think", default="0.5,2.0", help="agent think/tool time between turns, min,max seconds")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    if a.acceptance and a.alphas:
        ap.error("give --acceptance or --alphas, not both")
    filled: dict[str, list[str]] = {}
    if a.acceptance:
        alphas = {}
        try:
            accs = [parse_spec(x, a.temperature) for x in a.acceptance]
            for x in accs:
                alphas[x.label], filled[x.label] = x.for_roles(AGENT_ROLES)
        except ValueError as exc:
            ap.error(str(exc))
        if len(alphas) != len(accs):
            ap.error("--acceptance labels must differ")
        source = {x.label: {"file": x.source, "drafter": x.drafter, "block": x.block, "tau_by_role": x.tau_by_role}
                  for x in accs}
        kind = "measured (on the CPU demo pair: SmolLM2-135M + DFlash drafters)"
    elif a.alphas:
        alphas = json.loads(Path(a.alphas).read_text())
        source, kind = a.alphas, "given (--alphas)"
    else:
        alphas, source, kind = DEFAULT_ALPHAS, "DEFAULT_ALPHAS", "illustrative (not measured)"
    if "alphas" in alphas:  # a benchmarks.validate output: fleet positions 0 and 1 of a measured run
        measured = alphas["alphas"]
        alphas = {"a": measured["0"], "b": measured["1"]}
        roles = set(alphas["a"]) | set(alphas["b"])
        for k in ("a", "b"):  # a role one drafter never served in the run: that drafter's mean
            mean = statistics.mean(alphas[k].values())
            alphas[k] = {r: alphas[k].get(r, mean) for r in roles}
    think = tuple(float(x) for x in a.think.split(","))
    m = run_meta.meta("benchmarks.project_b300", argv)
    statement = (f"PROJECTION, not a measurement: DGX B300 roofline step costs (no B300 was used) with {kind} "
                 f"acceptance per role")
    print(statement, flush=True)
    results: dict = {"kind": "projection", "statement": statement, "acceptance": {"kind": kind, "source": source,
                     "roles_filled_with_mean": filled}, "alphas": alphas, "prompt_scale": a.prompt_scale,
                     "answer_scale": a.answer_scale, "think_s": think, "cases": {}}
    for case in a.cases.split(","):
        results["cases"][case] = {"kv_tokens_per_replica": int(kv_tokens(RooflineStepModel(
            CASES[case][0], tp=CASES[case][1])) * a.kv_scale), "levels": {}}
        for conc in [int(c) for c in a.concurrency.split(",")]:
            sess = level_sessions(conc, a.sessions_per_level, think, a.seed, a.answer_scale, a.prompt_scale)
            row = {}
            for router in ROUTERS:
                sim = Simulator(fleet(case, alphas, a.max_num_seqs, a.kv_scale), router, RouterWeights(),
                                stats_period_s=1.0, seed=a.seed)
                res = sim.run(sess, concurrency=conc)
                row[router] = summarize(res.requests)
            ratio = {b: round(row["specfleet"]["goodput_tps"] / row[b]["goodput_tps"], 3) for b in ROUTERS[1:]}
            results["cases"][case]["levels"][conc] = {"routers": row, "ratio": ratio}
            print(f"{case:20s} c={conc:4d}  " + "  ".join(f"{r} {row[r]['goodput_tps']:9.0f} tok/s" for r in ROUTERS)
                  + f"  ratio {ratio}", flush=True)
    results["meta"] = run_meta.finish(m)
    Path(a.out).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
