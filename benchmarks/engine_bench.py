"""Engine benchmark: HF ``generate`` vs our AR vs our DFlash at the same dtype, against the machine's measured
memory roofline, with a step-cost table, prefill speed, bf16 agreement and (optionally) llama.cpp side by side.

    python benchmarks/engine_bench.py [--model smollm2] [--drafter models/smollm2-135m-dflash-b16]
        [--dtype auto] [--batches 1,4,16] [--max-tokens 64] [--threads 2]
        [--sections throughput,steps,prefill,llamacpp,categories] [--out bench.json]
        [--categories math,code,chat --category-prompts 6 --category-max-tokens 128]

throughput  every system decodes exactly --max-tokens new tokens per prompt (EOS ignored) from the same chat
            prompts; tokens/s = generated tokens / wall time of the whole batch (prefill included, model load
            and one warm-up batch excluded); AR as a fraction of the roofline b * bandwidth / weight bytes;
            DFlash tau (tokens per target pass); agreement of DFlash with AR (identical tokens up to the first
            divergence, per prompt: bf16 numerics may differ with batch composition, fp32 is exact).
steps       benchmarks/step_costs.py: AR step, speculative step and drafter alone at blocks --blocks.
prefill     one prompt of each of --prefill-lengths tokens: our time to first token vs one HF forward.
llamacpp    llama-bench (../shared/anchors/llama.cpp) on the demo's Q4_1 GGUF and the BF16 GGUF.
categories  benchmarks/category_speed.py: at batch 1, --category-prompts held-out prompts per category of
            --categories (benchmarks/acceptance.py's selection: the corpus's held-out split), each alone through
            AR then DFlash (--block or the drafter's), greedy, stopping at EOS (not ignored), up to
            --category-max-tokens; per category tokens, wall time, tok/s, DFlash/AR, tau, prompts identical to AR
            and first divergences. Also on its own: python -m benchmarks.category_speed --categories math,code.
Every run records date, CPU, threads, load average before / after and the CPU time stolen by the hypervisor.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: python benchmarks/engine_bench.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import membw, prefill, step_costs  # noqa: E402

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


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


class CpuAccount:
    """Load average and hypervisor steal over a span (Linux /proc; empty elsewhere)."""

    def __init__(self):
        self.load_start, self._start = self._load(), self._stat()

    @staticmethod
    def _load() -> list[str]:
        try:
            return Path("/proc/loadavg").read_text().split()[:3]
        except OSError:
            return []

    @staticmethod
    def _stat() -> list[int]:
        try:
            return [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]
        except (OSError, ValueError):
            return []

    def finish(self) -> dict:
        end = self._stat()
        out = {"loadavg_start": self.load_start, "loadavg_end": self._load()}
        if self._start and end:
            d = [b - a for a, b in zip(self._start, end)]
            out["steal_pct"] = round(100.0 * d[7] / max(1, sum(d)), 1)
            out["idle_pct"] = round(100.0 * d[3] / max(1, sum(d)), 1)
        return out


def bench_hf(hf_model, prompts: list[list[int]], batch: int, max_tokens: int) -> dict:
    hf_model.generation_config.eos_token_id = None  # decode exactly max_tokens, like the engine runs
    pad = 2

    def run(group):
        width = max(len(p) for p in group)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in group])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in group])
        with torch.inference_mode():
            out = hf_model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_tokens,
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
    outputs: dict[str, list[int]] = {}

    def run(group, tag):
        for j, p in enumerate(group):
            outputs[f"{tag}-{j}"] = []
            eng.add_request(f"{tag}-{j}", p, sp, spec)
        n = 0
        while eng.has_unfinished():
            for o in eng.step():
                outputs[o.request_id] += o.new_token_ids
                n += len(o.new_token_ids)
        return n

    run(prompts[:batch], "warm")
    tr = eng.tracker
    p0, k0 = tr.spec_passes, tr.spec_tokens
    t0, c0, n = time.perf_counter(), time.process_time(), 0
    for i in range(0, len(prompts), batch):
        n += run(prompts[i: i + batch], f"b{i}")
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    tau = (tr.spec_tokens - k0) / (tr.spec_passes - p0) if tr.spec_passes > p0 else None
    toks = [outputs[k] for k in sorted(outputs) if not k.startswith("warm")]
    return {"tokens": n, "seconds": dt, "cpu_seconds": cpu, "tok_s": n / dt, "tok_per_cpu_s": n / cpu,
            "tau": tau, "outputs": toks}


def agreement(a: list[list[int]], b: list[list[int]]) -> dict:
    """Identical tokens up to the first divergence, over all prompts; first divergence per prompt (None = none)."""
    firsts, same, total = [], 0, 0
    for x, y in zip(a, b):
        k = next((i for i, (p, q) in enumerate(zip(x, y)) if p != q), None)
        firsts.append(k)
        same += len(x) if k is None else k
        total += len(x)
    return {"identical_fraction": same / max(1, total), "first_divergence": firsts}


def section_throughput(args, eng, model_dir, prompts, roof) -> list[dict]:
    from transformers import AutoModelForCausalLM

    from workers.engine.params import SpecParams

    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=eng.dtype).eval() if "hf" in args.systems else None
    rows = []
    for b in args.batch_list:
        row = {"batch": b, "roofline_tok_s": membw.roofline_tok_s(b, roof["gbps"], roof["weight_bytes"])}
        if hf is not None:
            row["hf"] = bench_hf(hf, prompts, b, args.max_tokens)
        if "ar" in args.systems:
            row["ar"] = bench_engine(eng, prompts, b, args.max_tokens, SpecParams(enabled=False))
            row["ar_over_roofline"] = row["ar"]["tok_s"] / row["roofline_tok_s"]
        if "dflash" in args.systems and eng.drafter is not None:
            row["dflash"] = bench_engine(eng, prompts, b, args.max_tokens, SpecParams(True, args.block or eng.max_block))
            if "ar" in row:
                row["dflash_vs_ar_agreement"] = agreement(row["dflash"]["outputs"], row["ar"]["outputs"])
        line = f"batch {b:>2}:"
        for name in ("hf", "ar", "dflash"):
            if name in row:
                line += f"  {name} {row[name]['tok_s']:6.1f} tok/s"
        if "ar" in row:
            line += f" | AR {row['ar_over_roofline']:.0%} of roofline {row['roofline_tok_s']:.1f}"
        if "hf" in row and "ar" in row:
            line += f" | AR/HF {row['ar']['tok_s'] / row['hf']['tok_s']:.2f}x"
        if "dflash" in row and "ar" in row:
            ag = row["dflash_vs_ar_agreement"]
            line += (f" | DFlash/AR {row['dflash']['tok_s'] / row['ar']['tok_s']:.2f}x (tau {row['dflash']['tau']:.2f};"
                     f" {ag['identical_fraction']:.0%} identical to AR)")
        print(line, flush=True)
        rows.append(row)
    return rows


def section_prefill(args, eng, model_dir) -> list[dict]:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=eng.dtype).eval()
    rows = []
    for n in args.prefill_list:
        p = prefill.long_prompt(eng.tokenizer, n)
        prefill.ours(eng, p, runs=1)  # warm-up at this shape
        ours, theirs = prefill.ours(eng, p), prefill.hf_forward(hf, p)
        rows.append({"tokens": n, "ours_s": ours, "hf_forward_s": theirs, "ours_tok_s": n / ours,
                     "hf_tok_s": n / theirs})
        print(f"prefill {n:>5} tokens: ours {n / ours:7.1f} tok/s ({ours:.2f} s to the first token) | "
              f"HF forward {n / theirs:7.1f} tok/s | {theirs / ours:.2f}x", flush=True)
    return rows


def section_llamacpp(args) -> list[dict]:
    from benchmarks.llamacpp import llama_bench

    rows = []
    for gguf in args.gguf:
        path = Path(gguf).expanduser()
        if not path.is_file():
            print(f"llama.cpp: no {path}, skipped")
            continue
        r = llama_bench(path, threads=args.threads or 2)
        print(f"llama.cpp {r['model']}: pp512 {r['pp_tok_s']:.1f} ± {r['pp_std']:.1f} tok/s, "
              f"tg64 {r['tg_tok_s']:.1f} ± {r['tg_std']:.1f} tok/s", flush=True)
        rows.append(r)
    return rows


def section_categories(args, eng) -> dict | None:
    from benchmarks import category_speed
    from benchmarks.acceptance import DEFAULT_CORPUS

    if eng.drafter is None:
        print("categories: no drafter, skipped", flush=True)
        return None
    return category_speed.section(eng, category_speed.parse_categories(args.categories), args.category_prompts,
                                  args.category_max_tokens, args.block, args.corpus or str(DEFAULT_CORPUS))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--drafter", default=str(Path(__file__).resolve().parents[1] / "models" / "smollm2-135m-dflash-b16"))
    ap.add_argument("--dtype", default="auto", help="auto = bf16 where the CPU has native bf16, else fp32")
    ap.add_argument("--batches", default="1,4,16")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--prompts", type=int, default=16, help="prompts per measurement (cycled)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--systems", default="hf,ar,dflash")
    ap.add_argument("--block", type=int, default=None, help="DFlash block size (default: the drafter's)")
    ap.add_argument("--sections", default="throughput,steps,prefill")
    ap.add_argument("--blocks", default="4,8,16", help="block sizes of the step-cost table")
    ap.add_argument("--prefill-lengths", default="512,2048,4096")
    ap.add_argument("--gguf", action="append", default=None,
                    help="GGUF files for the llamacpp section (default: the demo's Q4_1 and BF16 in the cache)")
    ap.add_argument("--categories", default="math,code,chat", help="prompt categories of the categories section")
    ap.add_argument("--category-prompts", type=int, default=6, help="held-out prompts per category (categories)")
    ap.add_argument("--category-max-tokens", type=int, default=128, help="token cap per prompt (categories; EOS stops)")
    ap.add_argument("--corpus", default=None, help="token corpus of the categories section's held-out prompts "
                    "(default: benchmarks/acceptance.py's)")
    ap.add_argument("--out", default=None, help="write results as JSON here")
    ap.add_argument("--profile", type=int, default=0, help="instead: torch-profile N AR decode steps at batch 1")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from orchestrator.commands.generate import resolve_model_path
    from workers.engine.config import EngineConfig
    from workers.engine.llm_engine import LLMEngine

    args.batch_list = [int(b) for b in args.batches.split(",")]
    args.prefill_list = [int(n) for n in args.prefill_lengths.split(",")]
    args.systems = args.systems.split(",")
    sections = args.sections.split(",")
    if "categories" in sections:
        from benchmarks.category_speed import parse_categories

        try:
            parse_categories(args.categories)
        except ValueError as e:
            ap.error(str(e))
    cache = Path("~/.cache/specfleet/downloads").expanduser()
    args.gguf = args.gguf or [str(cache / "SmolLM2-135M-Instruct.Q4_1.gguf"), str(cache / "SmolLM2-135M-Instruct.BF16.gguf")]
    account = CpuAccount()
    model_dir = resolve_model_path(args.model)
    drafter = args.drafter if Path(args.drafter).is_dir() else None
    if drafter is None:
        print(f"no drafter at {args.drafter}: AR only")
    max_len = max([2048] + [n + 64 for n in args.prefill_list]
                  + ([2048 + args.category_max_tokens] if "categories" in sections else []))  # corpus prompts < 2048
    eng = LLMEngine(EngineConfig(model=model_dir, drafter=drafter, device="cpu", dtype=args.dtype,
                                 max_model_len=max_len, max_num_seqs=max(args.batch_list)))
    base = [chat_ids(eng.tokenizer, p) for p in PROMPTS]
    prompts = [base[i % len(base)] for i in range(max(args.prompts, max(args.batch_list)))]
    if args.profile:
        return profile_ar(eng, prompts[0], args.profile)
    roof = {"gbps": membw.streaming_read_gbps(), "weight_bytes": membw.weight_bytes(eng.model)}
    print(f"{cpu_name()}, {torch.get_num_threads()} threads, {eng.dtype}; streaming read {roof['gbps']:.1f} GB/s, "
          f"weights {roof['weight_bytes'] / 1e6:.0f} MB -> batch-1 roofline "
          f"{membw.roofline_tok_s(1, roof['gbps'], roof['weight_bytes']):.1f} tok/s", flush=True)
    result: dict = {"roofline": roof}
    if "throughput" in sections:
        result["throughput"] = section_throughput(args, eng, model_dir, prompts, roof)
    if "steps" in sections:
        rows = step_costs.step_cost_table(eng, prompts[0], args.batch_list, [int(k) for k in args.blocks.split(",")])
        print(step_costs.format_table(rows), flush=True)
        result["step_costs"] = rows
    if "prefill" in sections:
        result["prefill"] = section_prefill(args, eng, model_dir)
    if "llamacpp" in sections:
        result["llamacpp"] = section_llamacpp(args)
    if "categories" in sections:
        result["categories"] = section_categories(args, eng)
    meta = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "cpu": cpu_name(),
            "threads": torch.get_num_threads(), "dtype": str(eng.dtype).removeprefix("torch."), "model": model_dir,
            "drafter": drafter, "max_tokens": args.max_tokens, "prompts": len(prompts), **account.finish()}
    result["meta"] = meta
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(meta))
    return 0


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


if __name__ == "__main__":
    raise SystemExit(main())
