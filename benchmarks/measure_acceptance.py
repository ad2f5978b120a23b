"""Measure a drafter's acceptance per agent role in-process (no serving stack): the workload's
first-turn prompts of each role through workers.engine.LLMEngine, greedy, speculative at the
drafter's block size; tau = committed tokens per target pass (EngineStats.tau_by_tag["role"]), an EWMA over
the passes (benchmarks/acceptance.py gives the plain mean over held-out prompts of every category).
Writes {drafter_label: {role: alpha}} for benchmarks/project_b300.py --alphas, and in "_meta" per label the tau
by role, the drafter's path and block (benchmarks/acceptance_tables.py reads a label as FILE#LABEL).

    python -m benchmarks.measure_acceptance --drafter a=~/.cache/specfleet/bench/drafter-late \
        --drafter b=~/.cache/specfleet/bench/drafter-early --out runs/alphas_measured.json
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--drafter", action="append", required=True, help="label=path (repeat)")
    ap.add_argument("--target", default=None)
    ap.add_argument("--per-role", type=int, default=2, help="prompts per role")
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dtype", default="auto", help="auto = bf16 on this CPU, as the served replicas run")
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    import torch

    from benchmarks.run_meta import loadavg
    from benchmarks.workload import ROLES, WorkloadConfig, generate
    from orchestrator.routing.score import alpha_from_tau
    from workers.engine.config import EngineConfig
    from workers.engine.llm_engine import LLMEngine
    from workers.engine.params import SamplingParams
    from workers.hub import model_dir

    torch.set_num_threads(a.threads)
    target = a.target or str(model_dir("smollm2"))
    sessions = generate(WorkloadConfig(teams=40, seed=123, agents_per_team=4))
    prompts = {r: [s for s in sessions if s.role == r][: a.per_role] for r in ROLES}
    out: dict = {"_meta": {"measured_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                           "max_tokens": a.max_tokens, "per_role": a.per_role, "dtype": a.dtype,
                           "loadavg_start": loadavg()}}
    for spec in a.drafter:
        label, path = spec.split("=", 1)
        eng = LLMEngine(EngineConfig(model=target, drafter=str(Path(path).expanduser()), device="cpu",
                                     dtype=a.dtype, max_num_seqs=8, max_model_len=1024))
        block = eng.max_block
        for role, ss in prompts.items():
            for i, s in enumerate(ss):
                msgs = [{"role": "system", "content": s.system}, {"role": "user", "content": s.turns[0].user}]
                text = eng.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
                ids = [int(t) for t in eng.tokenizer.encode(text, add_special_tokens=False)]
                eng.add_request(f"{label}-{role}-{i}", ids, SamplingParams(max_tokens=a.max_tokens),
                                tags={"role": role})
        while eng.has_unfinished():
            eng.step()
        taus = {r: v[0] for r, v in eng.stats().tau_by_tag.get("role", {}).items()}
        out[label] = {r: round(alpha_from_tau(t, block), 4) for r, t in taus.items()}
        out["_meta"][f"tau_{label}"] = {r: round(t, 3) for r, t in taus.items()}
        out["_meta"][f"drafter_{label}"] = str(Path(path).expanduser())
        out["_meta"][f"block_{label}"] = block
        print(f"{label}: tau by role {out['_meta'][f'tau_{label}']} -> alpha {out[label]}", flush=True)
        del eng
    out["_meta"]["loadavg_end"] = loadavg()
    Path(a.out).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
