"""What grammar-constrained decoding costs per engine step, at batch 1 and 16, AR and speculative.

    python -m benchmarks.grammar_cost [--batches 1,16] [--max-tokens 48] [--modes ar,spec]
        [--kinds json_schema,tool_auto] [--dtype float32] [--threads 2] [--out runs/grammar_cost.json]

The demo target (SmolLM2-135M-Instruct) and its DFlash drafter, greedy, B identical-length chat prompts.
For every decode step (no prefill in it) two figures: the step's wall time, and the time spent in the
grammar's code on the step's critical path (workers/structured/step.py: the start of the masks' worker
thread, masked drafting, the wait for the AR masks + applying masks to the target rows, the matchers'
commit). grammar share = grammar ms / step ms, the goal is <= 10 % at batch 1 and 16. Beside it, the same
prompts unconstrained (EOS ignored, same max_tokens): the step time without any grammar.
Kinds: json_schema (a nested schema, restrictive masks), tool_auto (free text with triggered tool-call tags,
permissive masks). Prompts ask for output that fits the kind.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import statistics
import time
from pathlib import Path

NESTED = {"type": "object", "properties": {
    "title": {"type": "string", "maxLength": 80}, "year": {"type": "integer", "minimum": 1900, "maximum": 2030},
    "tags": {"type": "array", "items": {"type": "string", "maxLength": 20}, "maxItems": 5},
    "author": {"type": "object", "properties": {"name": {"type": "string"}, "country": {"type": "string"}},
               "required": ["name", "country"], "additionalProperties": False},
    "rating": {"enum": ["low", "mid", "high"]}},
    "required": ["title", "year", "tags", "author", "rating"], "additionalProperties": False}
TOOL_AUTO = {"type": "structural_tag", "format": {"type": "triggered_tags", "triggers": ["<tool_call>"], "tags": [
    {"type": "tag", "begin": '<tool_call>\n{"name": "get_weather", "arguments": ', "content": {
        "type": "json_schema", "json_schema": {"type": "object", "properties": {"city": {"type": "string"}},
                                               "required": ["city"], "additionalProperties": False}},
     "end": "}\n</tool_call>"}]}}
PROMPTS = {"json_schema": "Describe a famous novel as JSON with title, year, tags, author and rating.",
           "tool_auto": "Tell me about the weather and the sights of Paris."}


class Clock:
    """Accumulates the time spent in GrammarStep methods (wrapped) and the decode steps' wall time."""

    def __init__(self):
        self.grammar = 0.0
        self.steps: list[tuple[float, float]] = []  # (step s, grammar s)

    def wrap_grammar(self):
        from workers.structured import step as gs

        for name in ("__init__", "draw", "walk_unguided", "mask_target", "commit_all", "rollback"):
            fn = getattr(gs.GrammarStep, name)

            def timed(*a, _fn=fn, **k):
                t0 = time.perf_counter()
                try:
                    return _fn(*a, **k)
                finally:
                    self.grammar += time.perf_counter() - t0

            setattr(gs.GrammarStep, name, timed)

    def wrap_executor(self, eng):
        run = eng.executor.run

        def timed(items):
            g0, t0 = self.grammar, time.perf_counter()
            out = run(items)
            if items and all(it.kind in ("ar", "spec") for it in items):
                self.steps.append((time.perf_counter() - t0, self.grammar - g0))
            return out

        eng.executor.run = timed


def bench(eng, clock: Clock, batch: int, kind: str | None, prompt_kind: str, spec: bool, max_tokens: int) -> dict:
    from workers.engine.params import SamplingParams, SpecParams, StructuredSpec

    tok = eng.tokenizer
    text = tok.apply_chat_template([{"role": "user", "content": PROMPTS[prompt_kind]}], add_generation_prompt=True,
                                   tokenize=False)
    ids = tok.encode(text, add_special_tokens=False)
    st = None
    if kind == "json_schema":
        st = StructuredSpec("json_schema", json.dumps(NESTED))
    elif kind == "tool_auto":
        st = StructuredSpec("structural_tag", json.dumps(TOOL_AUTO))
    sp = SpecParams(enabled=spec, block_size=eng.max_block) if spec else SpecParams(enabled=False)
    clock.wrap_executor(eng)
    clock.steps.clear()
    for i in range(batch):
        eng.add_request(f"r{i}", ids, SamplingParams(max_tokens=max_tokens, structured=st, ignore_eos=st is None), sp)
    tokens = 0
    t0 = time.perf_counter()
    while eng.has_unfinished():
        for o in eng.step():
            tokens += len(o.new_token_ids)
    wall = time.perf_counter() - t0
    steps = clock.steps
    step_ms = [1e3 * s for s, _ in steps]
    g_ms = [1e3 * g for _, g in steps]
    return {"batch": batch, "kind": kind or "none", "mode": "spec" if spec else "ar", "decode_steps": len(steps),
            "tokens": tokens, "wall_s": wall, "step_ms_mean": statistics.fmean(step_ms) if steps else None,
            "grammar_ms_mean": statistics.fmean(g_ms) if steps else None,
            "grammar_share": (sum(g_ms) / sum(step_ms)) if steps else None,
            "tau": eng.stats().tau_mean}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--modes", default="ar,spec")
    ap.add_argument("--kinds", default="json_schema,tool_auto")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    import torch

    from benchmarks.structured_harness import demo_engine

    torch.set_num_threads(a.threads)
    batches = [int(b) for b in a.batches.split(",")]
    clock = Clock()
    clock.wrap_grammar()
    res = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "machine": platform.machine(),
           "loadavg_start": Path("/proc/loadavg").read_text().split()[:3], "args": vars(a), "results": []}
    for mode in a.modes.split(","):
        eng, load_s = demo_engine(spec=mode == "spec", dtype=a.dtype, max_num_seqs=max(batches))
        base = eng.executor.run
        bench(eng, clock, 1, "json_schema", "json_schema", mode == "spec", 4)  # warm-up (compiles, caches)
        for batch in batches:
            for kind in a.kinds.split(","):
                for k in (kind, None):  # constrained, then the same prompts unconstrained
                    eng.executor.run = base
                    r = bench(eng, clock, batch, k, kind, mode == "spec", a.max_tokens)
                    r["prompt"] = kind
                    res["results"].append(r)
                    print(json.dumps(r), flush=True)
    res["loadavg_end"] = Path("/proc/loadavg").read_text().split()[:3]
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
