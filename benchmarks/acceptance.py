"""Drafter acceptance on the held-out prompts, per category, through our engine with speculation on.

tau = mean committed tokens per speculative target pass (accepted drafts + the bonus token; the prefill pass is
not counted); accept_by_position[k-1] = P(draft position k accepted) over those passes.

    python -m benchmarks.acceptance --per-category 10 --temperatures 0,1 --json out.json --markdown
Defaults: the demo pair (SmolLM2-135M-Instruct from the cache, models/smollm2-135m-dflash-b16).
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections import defaultdict


def measure(engine, prompts, temperature: float, max_tokens: int, block_size: int, seed: int = 0) -> dict:
    """Run every prompt through ``engine`` (all queued at once; the engine batches) and tally acceptance."""
    from tqdm import tqdm

    from workers.engine.params import SamplingParams, SpecParams
    from workers.training.generate import chat_prompt_ids

    tok = engine.tokenizer
    cat_of, passes = {}, defaultdict(list)
    for i, p in enumerate(prompts):
        rid = f"{p.category}-{i}"
        cat_of[rid] = p.category
        engine.add_request(rid, chat_prompt_ids(tok, p.text),
                           SamplingParams(temperature=temperature, max_tokens=max_tokens, seed=seed + i),
                           SpecParams(enabled=True, block_size=block_size), tags={"role": p.category})
    seen_first: set[str] = set()
    n_tokens = 0
    t0 = time.time()
    bar = tqdm(total=len(prompts), desc=f"T={temperature:g}", unit="req", file=sys.stderr)
    while engine.has_unfinished():
        for out in engine.step():
            if out.error:
                raise RuntimeError(f"request {out.request_id} failed: {out.error}")
            n_tokens += len(out.new_token_ids)
            if out.request_id not in seen_first:  # the prefill pass samples one token, no drafts
                seen_first.add(out.request_id)
            else:
                passes[cat_of[out.request_id]].extend(out.accepted)
            if out.finished:
                bar.update(1)
    bar.close()
    wall = time.time() - t0
    result = {"temperature": temperature, "wall_s": round(wall, 1), "tokens": n_tokens,
              "tokens_per_s": round(n_tokens / wall, 2), "by_category": {}}
    for cat, acc in sorted(passes.items()):
        result["by_category"][cat] = {
            "tau": round(sum(acc) / len(acc), 3), "passes": len(acc),
            "accept_by_position": [round(sum(a - 1 >= k for a in acc) / len(acc), 3) for k in range(1, block_size)],
        }
    allp = [a for acc in passes.values() for a in acc]
    result["tau"] = round(sum(allp) / max(1, len(allp)), 3)
    return result


def markdown(results: list[dict], cmd: str, machine: str) -> str:
    lines = [f"Command: `{cmd}`  ", f"Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; machine: {machine}",
             "", "| T | category | tau | passes | P(accept) pos 1..5 |", "|---|---|---|---|---|"]
    for r in results:
        for cat, c in r["by_category"].items():
            pos = ", ".join(f"{x:.2f}" for x in c["accept_by_position"][:5])
            lines.append(f"| {r['temperature']:g} | {cat} | {c['tau']:.2f} | {c['passes']} | {pos} |")
        lines.append(f"| {r['temperature']:g} | all | {r['tau']:.2f} | | |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2", help="target HF dir or known model name")
    ap.add_argument("--drafter", help="DFlash checkpoint dir (default: the committed demo drafter)")
    ap.add_argument("--per-category", type=int, default=30, help="held-out prompts per category (<= 30)")
    ap.add_argument("--categories", default="math,code,chat")
    ap.add_argument("--temperatures", default="0,1")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--max-num-seqs", type=int, default=8)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, help="torch intra-op threads")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--markdown", action="store_true", help="print a markdown table")
    args = ap.parse_args(argv)

    import torch

    from workers import hub
    from workers.engine.config import EngineConfig
    from workers.engine.llm_engine import LLMEngine
    from workers.training.prompts import build_prompts

    if args.threads:
        torch.set_num_threads(args.threads)
    model = args.model if args.model not in hub.ALIASES and args.model not in hub.MODELS else str(hub.ensure_model(args.model))
    drafter = args.drafter or str(hub.default_drafter_path())
    cats = [c.strip() for c in args.categories.split(",") if c.strip()]
    held = [p for p in build_prompts(330, 30, seed=0) if p.split == "heldout" and p.category in cats]
    prompts = [p for c in cats for p in [q for q in held if q.category == c][: args.per_category]]
    engine = LLMEngine(EngineConfig(model=model, drafter=drafter, device=args.device,
                                    max_num_seqs=args.max_num_seqs))
    results = [measure(engine, prompts, float(t), args.max_tokens, args.block_size)
               for t in args.temperatures.split(",")]
    machine = (f"{platform.machine()}, {torch.get_num_threads()} torch threads, "
               f"{torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU'}")
    payload = {"model": model, "drafter": drafter, "per_category": args.per_category, "max_tokens": args.max_tokens,
               "block_size": args.block_size, "machine": machine, "results": results}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(payload, f, indent=1)
    print(json.dumps(payload, indent=1))
    if args.markdown:
        print(markdown(results, "python -m benchmarks." + "acceptance " + " ".join(argv or sys.argv[1:]), machine))
    return 0


if __name__ == "__main__":
    sys.exit(main())
