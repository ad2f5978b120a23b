"""DFlash vs our AR per prompt category at batch 1, stopping at EOS as a user would (issue 13: DFlash >= 1.3x AR
at batch 1 with the committed drafter on code and math prompts).

Prompts: ``--prompts`` held-out prompts per category, chosen exactly as benchmarks/acceptance.py chooses them
(``heldout_items``: the token corpus's held-out split, else the prompt builder's held-out first turns); never
trained on. Each prompt runs alone (batch 1), greedy, up to ``--max-tokens``, stopping at EOS (the drafter was
trained on responses that end), first through our AR, then through our DFlash at the drafter's block (or
``--block``); one short warm-up of each system runs before any timing.

Per category: generated tokens, wall seconds (prefill included, from admission to the last token), tok/s of AR and
of DFlash, DFlash/AR (the ratio of the tok/s), tau (committed tokens per speculative target pass, the prefill
pass not counted: benchmarks/acceptance.py's definition, from ``RequestOutput.committed``), and how many prompts
DFlash answered with exactly AR's tokens, with the first divergence of the others (bf16 numerics may differ
between the two paths; fp32 is exact).

    python -m benchmarks.category_speed --categories math,code,chat --prompts 6 --max-tokens 128 --json cat.json
    python benchmarks/engine_bench.py --sections categories --categories math,code,chat --category-prompts 6 \
        --category-max-tokens 128
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # run as a script: python benchmarks/category_speed.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DEFAULT_CATEGORIES = "math,code,chat"


@dataclass
class Run:
    """One prompt through one system: its tokens, its wall / CPU seconds and the tokens each target pass committed
    (``passes[0]`` is the prefill pass)."""

    category: str
    tokens: list[int] = field(default_factory=list)
    seconds: float = 0.0
    cpu_seconds: float = 0.0
    passes: list[int] = field(default_factory=list)
    finish_reason: str | None = None


def first_divergence(a: list[int], b: list[int]) -> int | None:
    """Index of the first token where ``a`` and ``b`` differ (the shorter's length when one is a strict prefix of
    the other); None when they are equal."""
    k = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
    if k is None and len(a) != len(b):
        return min(len(a), len(b))
    return k


def compare(ar: list[list[int]], dflash: list[list[int]]) -> dict:
    """Prompts whose DFlash tokens equal AR's, and each prompt's first divergence (None = identical)."""
    if len(ar) != len(dflash):
        raise ValueError(f"{len(ar)} AR outputs vs {len(dflash)} DFlash outputs")
    firsts = [first_divergence(a, d) for a, d in zip(ar, dflash)]
    return {"identical_prompts": sum(k is None for k in firsts), "prompts": len(firsts), "first_divergence": firsts}


def system_summary(runs: list[Run]) -> dict:
    """Tokens, seconds, tok/s over ``runs`` (tokens / summed wall time), target passes, and tau over the passes
    after each prompt's prefill pass (None when there are none)."""
    tokens = sum(len(r.tokens) for r in runs)
    seconds = sum(r.seconds for r in runs)
    decode = [p for r in runs for p in r.passes[1:]]
    return {"tokens": tokens, "seconds": seconds, "cpu_seconds": sum(r.cpu_seconds for r in runs),
            "tok_s": tokens / seconds if seconds > 0 else None, "target_passes": sum(len(r.passes) for r in runs),
            "tau": sum(decode) / len(decode) if decode else None,
            "stopped_at_eos": sum(r.finish_reason == "stop" for r in runs)}


def summarize(ar: list[Run], dflash: list[Run], categories: list[str]) -> dict:
    """Per category (in the given order) and over all: AR, DFlash, DFlash/AR and identical-output accounting.
    ``ar[i]`` and ``dflash[i]`` are the same prompt."""
    out = {}
    for cat in [*categories, "all"]:
        idx = [i for i, r in enumerate(ar) if cat == "all" or r.category == cat]
        a, d = system_summary([ar[i] for i in idx]), system_summary([dflash[i] for i in idx])
        out[cat] = {"prompts": len(idx), "ar": a, "dflash": d,
                    "dflash_over_ar": d["tok_s"] / a["tok_s"] if a["tok_s"] and d["tok_s"] else None,
                    "agreement": compare([ar[i].tokens for i in idx], [dflash[i].tokens for i in idx])}
    return out


def run_one(engine, request_id: str, category: str, prompt_ids: list[int], max_tokens: int, spec) -> Run:
    """``prompt_ids`` alone through ``engine`` (nothing else may be running), greedy, stopping at EOS."""
    from workers.engine.params import SamplingParams

    if engine.has_unfinished():
        raise RuntimeError("category_speed measures at batch 1: the engine has other requests running")
    run = Run(category)
    t0, c0 = time.perf_counter(), time.process_time()
    engine.add_request(request_id, prompt_ids, SamplingParams(temperature=0.0, max_tokens=max_tokens), spec)
    while engine.has_unfinished():
        for out in engine.step():
            if out.error:
                raise RuntimeError(f"request {out.request_id} failed: {out.error}")
            run.tokens += out.new_token_ids
            run.passes += out.committed
            if out.finished:
                run.finish_reason = out.finish_reason
    run.seconds, run.cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
    return run


def measure_categories(engine, items, categories: list[str], max_tokens: int, block: int | None = None,
                       warmup_tokens: int = 8, progress: bool = True) -> dict:
    """``items`` (workers.training.acceptance.Item, as ``heldout_items`` gives them) one at a time through our AR
    then our DFlash at ``block`` (default: the drafter's); -> summary per category plus the raw outputs."""
    from workers.engine.params import SpecParams

    if engine.proposer is None:
        raise ValueError("the engine has no drafter: DFlash cannot run")
    if not items:
        raise ValueError("no prompts to measure")
    block = block or engine.max_block
    ar_spec, df_spec = SpecParams(enabled=False), SpecParams(enabled=True, block_size=block)
    for tag, spec in (("ar", ar_spec), ("dflash", df_spec)):  # warm-up, not timed
        run_one(engine, f"warm-{tag}", items[0].category, items[0].prompt_ids, warmup_tokens, spec)
    ar, dflash = [], []
    for i, it in enumerate(items):
        ar.append(run_one(engine, f"{it.category}-{i}-ar", it.category, it.prompt_ids, max_tokens, ar_spec))
        dflash.append(run_one(engine, f"{it.category}-{i}-dflash", it.category, it.prompt_ids, max_tokens, df_spec))
        if progress:
            a, d = ar[-1], dflash[-1]
            print(f"  {it.category:<11} prompt {i:>3} ({len(it.prompt_ids)} tokens): AR {len(a.tokens)} tok "
                  f"{a.seconds:.2f} s | DFlash {len(d.tokens)} tok {d.seconds:.2f} s"
                  f"{'' if a.tokens == d.tokens else ' (differs)'}", file=sys.stderr, flush=True)
    return {"block": block, "max_tokens": max_tokens, "batch": 1, "stop_at_eos": True,
            "by_category": summarize(ar, dflash, categories),
            "outputs": [{"category": a.category, "prompt_tokens": len(it.prompt_ids), "ar": a.tokens,
                         "dflash": d.tokens, "dflash_passes": d.passes}
                        for it, a, d in zip(items, ar, dflash)]}


def format_table(result: dict) -> str:
    """One line per category: AR and DFlash tok/s, DFlash/AR, tau, prompts identical to AR."""
    lines = [f"batch 1, block {result['block']}, up to {result['max_tokens']} tokens, stop at EOS",
             f"{'category':<11} {'prompts':>7} {'AR tok':>7} {'AR s':>7} {'AR tok/s':>8} {'DF tok':>7} {'DF s':>7} "
             f"{'DF tok/s':>8} {'DF/AR':>6} {'tau':>5}  identical"]
    for cat, c in result["by_category"].items():
        a, d, g = c["ar"], c["dflash"], c["agreement"]
        ratio = f"{c['dflash_over_ar']:.2f}x" if c["dflash_over_ar"] else "-"
        tau = f"{d['tau']:.2f}" if d["tau"] is not None else "-"
        diverged = [k for k in g["first_divergence"] if k is not None]
        lines.append(f"{cat:<11} {c['prompts']:>7} {a['tokens']:>7} {a['seconds']:>7.2f} {a['tok_s'] or 0:>8.1f} "
                     f"{d['tokens']:>7} {d['seconds']:>7.2f} {d['tok_s'] or 0:>8.1f} {ratio:>6} {tau:>5}  "
                     f"{g['identical_prompts']}/{g['prompts']}"
                     + (f" (first divergence at {diverged})" if diverged else ""))
    return "\n".join(lines)


def parse_categories(text: str) -> list[str]:
    """Comma-separated categories of the prompt builder; ValueError naming the unknown ones."""
    from workers.training.prompts import CATEGORIES

    cats = [c.strip() for c in text.split(",") if c.strip()]
    bad = sorted(set(cats) - set(CATEGORIES))
    if bad or not cats:
        raise ValueError(f"unknown categories {bad or text!r}; known: {', '.join(CATEGORIES)}")
    return cats


def section(engine, categories: list[str], per_category: int, max_tokens: int, block: int | None,
            corpus: str | None) -> dict:
    """The whole measurement on a built engine: held-out prompts, AR and DFlash, the table printed."""
    from benchmarks.acceptance import heldout_items

    items, source = heldout_items(engine.tokenizer, categories, per_category, corpus)
    print(f"categories: {len(items)} prompts from {source}", flush=True)
    result = {"prompts_source": source, "per_category": per_category,
              **measure_categories(engine, items, categories, max_tokens, block)}
    print(format_table(result), flush=True)
    return result


def main(argv: list[str] | None = None) -> int:
    from benchmarks.acceptance import DEFAULT_CORPUS

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2", help="target HF dir or known model name")
    ap.add_argument("--drafter", help="DFlash checkpoint dir (default: the committed demo drafter)")
    ap.add_argument("--corpus", default=str(DEFAULT_CORPUS), help="token corpus whose held-out prompts to use")
    ap.add_argument("--categories", default=DEFAULT_CATEGORIES)
    ap.add_argument("--prompts", type=int, default=6, help="held-out prompts per category")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--block", type=int, default=None, help="DFlash block size (default: the drafter's)")
    ap.add_argument("--max-model-len", type=int, default=2304, help="prompt + max tokens (corpus prompts < 2048)")
    ap.add_argument("--dtype", default="auto", help="auto = bf16 where the CPU has native bf16, else fp32")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    try:
        cats = parse_categories(args.categories)
    except ValueError as e:
        ap.error(str(e))
    if args.prompts < 1 or args.max_tokens < 1:
        ap.error("--prompts and --max-tokens must be >= 1")

    import torch

    from benchmarks import run_meta
    from workers import hub
    from workers.engine.config import EngineConfig
    from workers.engine.llm_engine import LLMEngine

    if args.threads:
        torch.set_num_threads(args.threads)
    drafter = args.drafter or str(hub.default_drafter_path())
    if not Path(drafter).is_dir():
        ap.error(f"no drafter directory at {drafter}")
    model = args.model if args.model not in hub.ALIASES and args.model not in hub.MODELS \
        else str(hub.ensure_model(args.model))
    meta = run_meta.meta("benchmarks.category_speed", argv)
    engine = LLMEngine(EngineConfig(model=model, drafter=drafter, device=args.device, dtype=args.dtype,
                                    max_num_seqs=1, max_model_len=args.max_model_len))
    result = section(engine, cats, args.prompts, args.max_tokens, args.block, args.corpus)
    meta = {**run_meta.finish(meta), "threads": torch.get_num_threads(),
            "dtype": str(engine.dtype).removeprefix("torch."), "model": model, "drafter": drafter}
    payload = {"meta": meta, **result}
    if args.json:
        Path(args.json).write_text(json.dumps(payload, indent=1))
    print(json.dumps(meta))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
