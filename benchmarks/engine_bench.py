"""Engine throughput: HF ``generate`` vs our AR vs our DFlash, batch 1 / 4 / 16, same prompts, greedy.

    python benchmarks/engine_bench.py [--model smollm2] [--drafter models/smollm2-135m-dflash-b16]
        [--batches 1,4,16] [--max-tokens 64] [--threads 2] [--dtype float32] [--out bench.json]

Every system decodes exactly --max-tokens new tokens per prompt (EOS ignored) from the same chat prompts;
tokens/s = generated tokens / wall time of the whole batch (prefill included, model load and one warm-up
batch excluded). Prints tau (tokens per target pass) for DFlash and the speedups.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

PROMPTS = [
    "Write a Python function that checks whether a string is a palindrome.",
    "Explain what a hash map is in two sentences.",
    "List three tips for writing clean code.",
    "What is the capital of France, and why is it famous?",
    "Write a short poem about the sea.",
    "How do I reverse a list in Python?",
    "Summarize the plot of Romeo and Juliet.",
    "What is the difference between TCP and UDP?",
    "Give me a recipe for pancakes.",
    "Explain recursion to a beginner.",
    "Write a SQL query that counts users per country.",
    "What are the benefits of regular exercise?",
    "Describe the water cycle.",
    "Write a JavaScript function that sums an array.",
    "What is machine learning?",
    "How does a bicycle stay upright?",
]


def chat_ids(tok, text: str) -> list[int]:
    out = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def bench_hf(model_dir: str, prompts: list[list[int]], batch: int, max_tokens: int, dtype) -> dict:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    model.generation_config.eos_token_id = None  # decode exactly max_tokens, like the engine runs
    pad = 2

    def run(group):
        width = max(len(p) for p in group)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in group])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in group])
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_tokens,
                                 min_new_tokens=max_tokens, do_sample=False, pad_token_id=pad)
        return (out.shape[1] - width) * len(group)

    run(prompts[:batch])  # warm-up
    t0, c0, n = time.perf_counter(), time.process_time(), 0
    for i in range(0, len(prompts), batch):
        n += run(prompts[i: i + batch])
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"tokens": n, "seconds": dt, "cpu_seconds": cpu, "tok_s": n / dt, "tok_per_cpu_s": n / cpu}


def bench_engine(eng, prompts: list[list[int]], batch: int, max_tokens: int, spec) -> dict:
    from workers.engine.params import SamplingParams

    sp = SamplingParams(max_tokens=max_tokens, ignore_eos=True)

    def run(group, tag):
        for j, p in enumerate(group):
            eng.add_request(f"{tag}-{j}", p, sp, spec)
        n = 0
        while eng.has_unfinished():
            n += sum(len(o.new_token_ids) for o in eng.step())
        return n

    run(prompts[:batch], "warm")
    tr = eng.tracker
    p0, k0 = tr.spec_passes, tr.spec_tokens
    t0, c0, n = time.perf_counter(), time.process_time(), 0
    for i in range(0, len(prompts), batch):
        n += run(prompts[i: i + batch], f"b{i}")
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    tau = (tr.spec_tokens - k0) / (tr.spec_passes - p0) if tr.spec_passes > p0 else None
    return {"tokens": n, "seconds": dt, "cpu_seconds": cpu, "tok_s": n / dt, "tok_per_cpu_s": n / cpu, "tau": tau}


def profile_ar(eng, prompt: list[int], steps: int) -> int:
    """Where an AR decode step's CPU time goes (batch 1)."""
    from torch.profiler import ProfilerActivity, profile

    from workers.engine.params import SamplingParams, SpecParams

    eng.add_request("prof", prompt, SamplingParams(max_tokens=steps + 6, ignore_eos=True), SpecParams(enabled=False))
    for _ in range(5):
        eng.step()
    c0 = time.process_time()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            eng.step()
    print(f"{(time.process_time() - c0) / steps * 1e3:.1f} CPU ms per AR step (profiler on)")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))
    while eng.has_unfinished():
        eng.step()
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--drafter", default=str(Path(__file__).resolve().parents[1] / "models" / "smollm2-135m-dflash-b16"))
    ap.add_argument("--batches", default="1,4,16")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--prompts", type=int, default=16, help="prompts per measurement (cycled)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--systems", default="hf,ar,dflash")
    ap.add_argument("--block-size", type=int, default=None)
    ap.add_argument("--out", default=None, help="write results as JSON here")
    ap.add_argument("--profile", type=int, default=0, help="instead: torch-profile N AR decode steps at batch 1")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from orchestrator.commands.generate import resolve_model_path
    from workers.engine.config import EngineConfig
    from workers.engine.llm_engine import LLMEngine
    from workers.engine.params import SpecParams

    model_dir = resolve_model_path(args.model)
    batches = [int(b) for b in args.batches.split(",")]
    systems = args.systems.split(",")
    drafter = args.drafter if Path(args.drafter).is_dir() else None
    if "dflash" in systems and drafter is None:
        print(f"no drafter at {args.drafter}: skipping DFlash")
        systems.remove("dflash")
    eng = LLMEngine(EngineConfig(model=model_dir, drafter=drafter, device="cpu", dtype=args.dtype,
                                 max_model_len=2048, max_num_seqs=max(batches)))
    tok = eng.tokenizer
    base = [chat_ids(tok, p) for p in PROMPTS]
    prompts = [base[i % len(base)] for i in range(max(args.prompts, max(batches)))]
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    if args.profile:
        return profile_ar(eng, prompts[0], args.profile)
    results = []
    for b in batches:
        row = {"batch": b}
        if "hf" in systems:
            row["hf"] = bench_hf(model_dir, prompts, b, args.max_tokens, dtype)
        if "ar" in systems:
            row["ar"] = bench_engine(eng, prompts, b, args.max_tokens, SpecParams(enabled=False))
        if "dflash" in systems:
            spec = SpecParams(True, args.block_size or eng.max_block)
            row["dflash"] = bench_engine(eng, prompts, b, args.max_tokens, spec)
        results.append(row)
        line = f"batch {b:>2}:"
        for name in ("hf", "ar", "dflash"):
            if name in row:
                line += f"  {name} {row[name]['tok_s']:6.1f} tok/s ({row[name]['tok_per_cpu_s']:6.1f}/cpu-s)"
        if "hf" in row and "ar" in row:
            line += f"  | AR/HF {row['ar']['tok_s'] / row['hf']['tok_s']:.2f}x"
        if "dflash" in row and "ar" in row:
            line += f"  DFlash/AR {row['dflash']['tok_s'] / row['ar']['tok_s']:.2f}x (tau {row['dflash']['tau']:.2f})"
        print(line, flush=True)
    meta = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": platform.processor() or
            platform.machine(), "threads": torch.get_num_threads(), "dtype": args.dtype, "model": model_dir,
            "drafter": drafter, "max_tokens": args.max_tokens, "prompts": len(prompts)}
    try:
        meta["loadavg_end"] = Path("/proc/loadavg").read_text().split()[:3]
    except OSError:
        pass
    if args.out:
        Path(args.out).write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    print(json.dumps(meta))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
