"""Drafter acceptance per category / agent role through our engine, T=0 and T=1, on held-out prompts.

Prompts: the held-out records of a token corpus (specfleet make-corpus): their prompt ids are exactly what an
agent sends, multi-turn conversations included (the target's own earlier answers). Without a corpus, the
first turns of the held-out conversations of the prompt builder. Never trained on.

tau = mean committed tokens per speculative target pass (accepted drafts + the bonus token; the prefill pass is
not counted); accept_by_position[k-1] = P(draft position k accepted) over those passes.

    python -m benchmarks.acceptance --drafter models/smollm2-135m-dflash-b16 --per-category 10 \
        --temperatures 0,1 --json acc.json --markdown
    python -m workers.training.card models/smollm2-135m-dflash-b16 --acceptance acc.json   # into the model card
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

DEFAULT_CORPUS = Path(__file__).resolve().parent.parent / "data" / "corpus" / "smollm2-135m-instruct"


def heldout_items(tokenizer, categories: list[str], per_category: int, corpus: str | None):
    """(items, source) of held-out prompts, ``per_category`` per category, in a fixed order."""
    from workers.training.acceptance import Item

    if corpus and (Path(corpus) / "manifest.json").is_file():
        from workers.training.corpus import read_records

        recs = sorted((r for r in read_records(corpus) if r.split == "heldout" and r.category in categories),
                      key=lambda r: (r.conversation, r.turn))
        items = [Item(c, r.prompt_ids) for c in categories for r in [x for x in recs if x.category == c][:per_category]]
        return items, f"corpus {corpus} (held-out split)"
    from workers.training.prompts import build_conversations, chat_ids

    convs = [c for c in build_conversations({c: 41 + per_category for c in categories}, max(40, per_category))
             if c.split == "heldout"]
    items = [Item(c, chat_ids(tokenizer, conv.messages([]))) for c in categories
             for conv in [x for x in convs if x.category == c][:per_category]]
    return items, "prompt builder held-out conversations, first turns"


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
    from workers.training.prompts import CATEGORIES

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2", help="target HF dir or known model name")
    ap.add_argument("--drafter", help="DFlash checkpoint dir (default: the committed demo drafter)")
    ap.add_argument("--corpus", default=str(DEFAULT_CORPUS), help="token corpus whose held-out prompts to use")
    ap.add_argument("--per-category", type=int, default=10, help="held-out prompts per category")
    ap.add_argument("--categories", default=",".join(CATEGORIES))
    ap.add_argument("--temperatures", default="0,1")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--max-num-seqs", type=int, default=16)
    ap.add_argument("--max-model-len", type=int, default=2304, help="prompt + max tokens (corpus prompts < 2048)")
    ap.add_argument("--kv-cache-gib", type=int, default=2, help="KV pool (requests wait for room)")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, help="torch intra-op threads")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--markdown", action="store_true", help="print a markdown table")
    args = ap.parse_args(argv)

    import torch

    from workers import hub
    from workers.engine.config import EngineConfig
    from workers.engine.llm_engine import LLMEngine
    from workers.training.acceptance import measure

    if args.threads:
        torch.set_num_threads(args.threads)
    model = args.model if args.model not in hub.ALIASES and args.model not in hub.MODELS else str(hub.ensure_model(args.model))
    drafter = args.drafter or str(hub.default_drafter_path())
    cats = [c.strip() for c in args.categories.split(",") if c.strip()]
    bad = sorted(set(cats) - set(CATEGORIES))
    if bad:
        ap.error(f"unknown categories {bad}; known: {', '.join(CATEGORIES)}")
    engine = LLMEngine(EngineConfig(model=model, drafter=drafter, device=args.device, dtype=args.dtype,
                                    max_num_seqs=args.max_num_seqs, max_model_len=args.max_model_len,
                                    kv_cache_bytes=args.kv_cache_gib << 30))
    items, source = heldout_items(engine.tokenizer, cats, args.per_category, args.corpus)
    results = []
    for t in args.temperatures.split(","):
        r = measure(engine, items, float(t), args.max_tokens, args.block_size)
        r.pop("passes")
        r.pop("outputs")
        results.append(r)
    machine = (f"{platform.machine()}, {torch.get_num_threads()} torch threads, dtype {str(engine.dtype)[6:]}, "
               f"{torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU'}, load average "
               f"{' '.join(Path('/proc/loadavg').read_text().split()[:3]) if Path('/proc/loadavg').exists() else '?'}")
    cmd = "python -m benchmarks.acceptance " + " ".join(argv if argv is not None else sys.argv[1:])
    payload = {"model": model, "drafter": drafter, "prompts": source, "per_category": args.per_category,
               "max_tokens": args.max_tokens, "block_size": args.block_size, "machine": machine, "command": cmd,
               "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "results": results}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(payload, f, indent=1)
    print(json.dumps(payload, indent=1))
    if args.markdown:
        print(markdown(results, cmd, machine))
    return 0


if __name__ == "__main__":
    sys.exit(main())
