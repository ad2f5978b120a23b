"""Grammar library choice for structured outputs: xgrammar vs llguidance, measured on this CPU.

    python -m benchmarks.grammar_libs [--model smollm2] [--threads 1] [--repeats 5] [--out grammar_libs.json]

For each library that is installed (the one not chosen is not a dependency: `pip install xgrammar` or
`pip install llguidance` to compare), with the demo tokenizer (SmolLM2, vocab 49,152):
- tokenizer setup (one-off per model),
- grammar compile time for a tool-call JSON schema, a nested schema and JSON object mode (`{"type": "object"}`)
  (xgrammar also: a compiler-cache hit; llguidance has no compiled-grammar cache),
- per-token mask time: a valid JSON document is walked token by token (mask, then consume),
- rollback: consume k tokens, roll back k, the mask must equal the one before,
- batched masks: 16 matchers at different positions, one call; speculative verify: 16 matchers x a
  16-token draft each (256 masks: every draft position's mask), one call,
- applying a [16, V] bitmask to fp32 logits (workers/structured/bitmask.py, the engine's path; the clone of
  the logits is inside the timed call and is reported alone).
Times are medians over --repeats.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

TOOL_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"const": "get_weather"},
        "arguments": {
            "type": "object",
            "properties": {
                "location": {"type": "string"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                "days": {"type": "integer", "minimum": 1, "maximum": 14},
            },
            "required": ["location", "unit"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "arguments"],
    "additionalProperties": False,
}
NESTED_SCHEMA = {
    "type": "object",
    "properties": {
        "id": {"type": "integer"},
        "title": {"type": "string", "maxLength": 80},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 8},
        "author": {"type": "object", "properties": {"name": {"type": "string"}, "email": {"type": "string"}},
                   "required": ["name"], "additionalProperties": False},
        "status": {"enum": ["draft", "review", "published"]},
        "score": {"type": "number"},
        "items": {"type": "array", "items": {
            "type": "object", "properties": {"sku": {"type": "string"}, "qty": {"type": "integer"}},
            "required": ["sku", "qty"], "additionalProperties": False}},
    },
    "required": ["id", "title", "tags", "author", "status"],
    "additionalProperties": False,
}
OBJECT_MODE = {"type": "object"}
DOCS = {
    "tool": {"name": "get_weather", "arguments": {"location": "Paris, France", "unit": "celsius", "days": 3}},
    "nested": {"id": 42, "title": "Grammar-constrained speculative decoding", "tags": ["json", "spec", "cpu"],
               "author": {"name": "Ada Lovelace", "email": "ada@example.com"}, "status": "review",
               "score": 0.875, "items": [{"sku": "A-1", "qty": 2}, {"sku": "B-7", "qty": 10}]},
}


WALKS = (("tool", TOOL_SCHEMA, "tool"), ("nested", NESTED_SCHEMA, "nested"), ("json_object", OBJECT_MODE, "nested"))


def _med(xs: list[float]) -> float:
    return statistics.median(xs)


def _timed(fn, repeats: int) -> float:
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return _med(out)


def _doc_tokens(tok, doc: dict) -> list[int]:
    return list(tok.encode(json.dumps(doc), add_special_tokens=False))


# ---------------------------------------------------------------- llguidance
def bench_llguidance(tok, repeats: int, threads: int) -> dict:
    import llguidance
    import llguidance.hf
    import llguidance.torch as lt

    r: dict = {"library": "llguidance", "version": llguidance.__version__}
    t0 = time.perf_counter()
    lltok = llguidance.hf.from_tokenizer(tok)
    r["tokenizer_setup_s"] = time.perf_counter() - t0
    vocab = lltok.vocab_size

    def grammar(schema):
        return llguidance.LLMatcher.grammar_from_json_schema(schema)

    def compile_(schema):
        m = llguidance.LLMatcher(lltok, grammar(schema), log_level=0)
        assert not m.is_error(), m.get_error()
        return m

    r["compile_ms"] = {name: 1e3 * _timed(lambda s=s: compile_(s), repeats)
                       for name, s in (("tool_schema", TOOL_SCHEMA), ("nested_schema", NESTED_SCHEMA),
                                       ("json_object", OBJECT_MODE))}
    mask = lt.allocate_token_bitmask(1, vocab)
    per_token = {}
    for name, schema, doc in WALKS:
        ids = _doc_tokens(tok, DOCS[doc])
        times = []
        for _ in range(repeats):
            m = compile_(schema)
            for t in ids:
                t0 = time.perf_counter()
                lt.fill_next_token_bitmask(m, mask)
                times.append(time.perf_counter() - t0)
                assert m.consume_token(t), (name, t, m.get_error())
            assert m.is_accepting()
        per_token[name] = {"median_us": 1e6 * _med(times), "p99_us": 1e6 * sorted(times)[int(0.99 * len(times))],
                           "tokens": len(ids)}
    r["mask_per_token"] = per_token
    # rollback
    ids = _doc_tokens(tok, DOCS["nested"])
    m = compile_(NESTED_SCHEMA)
    m.consume_tokens(ids[:5])
    a = lt.allocate_token_bitmask(1, vocab)
    lt.fill_next_token_bitmask(m, a)
    m.consume_tokens(ids[5:21])
    m.rollback(16)
    b = lt.allocate_token_bitmask(1, vocab)
    lt.fill_next_token_bitmask(m, b)
    t_rb = _timed(lambda: (m.consume_tokens(ids[5:21]), m.rollback(16)), repeats)
    r["rollback"] = {"supported": True, "mask_equal_after_rollback_16": bool(torch.equal(a, b)),
                     "consume16_rollback16_us": 1e6 * t_rb}
    # batched: 16 matchers at different offsets of the document, each advanced one token between calls
    ex = llguidance.LLExecutor(num_threads=threads)
    starts = [(i * 5) % (len(ids) - 40) for i in range(16)]
    bm = lt.allocate_token_bitmask(16, vocab)
    big = lt.allocate_token_bitmask(16 * 16, vocab)
    t_batch, t_spec = [], []
    for _ in range(repeats):
        ms = []
        for n in starts:
            mm = compile_(NESTED_SCHEMA)
            mm.consume_tokens(ids[:n])
            ms.append(mm)
        for step in range(20):
            t0 = time.perf_counter()
            lt.fill_next_token_bitmask_par(ex, [(x, i) for i, x in enumerate(ms)], bm)
            t_batch.append(time.perf_counter() - t0)
            work = [(x, i * 16, ids[n + step: n + step + 15]) for i, (x, n) in enumerate(zip(ms, starts))]
            t0 = time.perf_counter()
            lt.fill_next_token_bitmask_par_with_draft_tokens(ex, work, big)  # the 15 drafts of a 16-token block
            t_spec.append(time.perf_counter() - t0)
            for x, n in zip(ms, starts):
                assert x.consume_token(ids[n + step])
    r["batch16_ms"] = 1e3 * _med(t_batch)
    r["spec_verify_16x16_ms"] = 1e3 * _med(t_spec)
    r["masks_sample"] = bm.clone()
    return r


# ---------------------------------------------------------------- xgrammar
def bench_xgrammar(tok, repeats: int, threads: int) -> dict:
    import xgrammar as xgr

    r: dict = {"library": "xgrammar", "version": getattr(xgr, "__version__", None)}
    try:
        from importlib.metadata import version

        r["version"] = version("xgrammar")
    except Exception:
        pass
    t0 = time.perf_counter()
    info = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=len(tok))
    compiler = xgr.GrammarCompiler(info, max_threads=threads, cache_enabled=False)
    r["tokenizer_setup_s"] = time.perf_counter() - t0
    vocab = info.vocab_size

    def compile_(schema):
        return compiler.compile_json_schema(json.dumps(schema))

    r["compile_ms"] = {name: 1e3 * _timed(lambda s=s: compile_(s), repeats)
                       for name, s in (("tool_schema", TOOL_SCHEMA), ("nested_schema", NESTED_SCHEMA),
                                       ("json_object", OBJECT_MODE))}
    r["compile_ms"]["builtin_json"] = 1e3 * _timed(compiler.compile_builtin_json_grammar, repeats)
    cached = xgr.GrammarCompiler(info, max_threads=threads, cache_enabled=True)
    cached.compile_json_schema(json.dumps(TOOL_SCHEMA))
    r["compile_ms"]["tool_schema_cache_hit"] = 1e3 * _timed(
        lambda: cached.compile_json_schema(json.dumps(TOOL_SCHEMA)), repeats)
    mask = xgr.allocate_token_bitmask(1, vocab)
    per_token = {}
    for name, schema, doc in WALKS:
        ids = _doc_tokens(tok, DOCS[doc])
        cg = compile_(schema)
        times = []
        for _ in range(repeats):
            m = xgr.GrammarMatcher(cg)
            for t in ids:
                t0 = time.perf_counter()
                m.fill_next_token_bitmask(mask)
                times.append(time.perf_counter() - t0)
                assert m.accept_token(t), (name, t)
        per_token[name] = {"median_us": 1e6 * _med(times), "p99_us": 1e6 * sorted(times)[int(0.99 * len(times))],
                           "tokens": len(ids)}
    r["mask_per_token"] = per_token
    ids = _doc_tokens(tok, DOCS["nested"])
    cg = compile_(NESTED_SCHEMA)
    m = xgr.GrammarMatcher(cg)
    for t in ids[:5]:
        m.accept_token(t)
    a = xgr.allocate_token_bitmask(1, vocab)
    m.fill_next_token_bitmask(a)

    def fwd_back():
        for t in ids[5:21]:
            m.accept_token(t)
        m.rollback(16)

    fwd_back()
    b = xgr.allocate_token_bitmask(1, vocab)
    m.fill_next_token_bitmask(b)
    r["rollback"] = {"supported": True, "mask_equal_after_rollback_16": bool(torch.equal(a, b)),
                     "consume16_rollback16_us": 1e6 * _timed(fwd_back, repeats)}
    starts = [(i * 5) % (len(ids) - 40) for i in range(16)]
    batch = xgr.BatchGrammarMatcher(max_threads=threads)
    bm = xgr.allocate_token_bitmask(16, vocab)
    big = xgr.allocate_token_bitmask(16 * 16, vocab)
    nxt = torch.tensor(list(range(1, 16)) + [-1], dtype=torch.int64)  # a chain: node k's child is k+1
    sib = torch.full((16,), -1, dtype=torch.int64)
    t_batch, t_spec = [], []
    for _ in range(repeats):
        ms = []
        for n in starts:
            mm = xgr.GrammarMatcher(cg)
            for t in ids[:n]:
                mm.accept_token(t)
            ms.append(mm)
        for step in range(20):
            t0 = time.perf_counter()
            batch.batch_fill_next_token_bitmask(ms, bm)
            t_batch.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            for i, (x, n) in enumerate(zip(ms, starts)):
                # node 0 = the last committed token (its mask = the next token's), nodes 1..15 = the drafts
                drafts = torch.tensor([ids[n + step - 1] if n + step else 0] + ids[n + step: n + step + 15],
                                      dtype=torch.int64)
                x.traverse_draft_tree(nxt, sib, drafts, big[i * 16: (i + 1) * 16])
            t_spec.append(time.perf_counter() - t0)
            for x, n in zip(ms, starts):
                assert x.accept_token(ids[n + step])
    r["batch16_ms"] = 1e3 * _med(t_batch)
    r["spec_verify_16x16_ms"] = 1e3 * _med(t_spec)
    r["masks_sample"] = bm.clone()
    return r


def bench_apply(vocab: int, masks: torch.Tensor | None, repeats: int) -> dict:
    """Applying a [16, V] int32 bitmask to fp32 logits in plain torch (the engine's path): grammar masks from
    the batched walk above, and random bits (the worst case for the branchy fill)."""
    from workers.structured.bitmask import BitmaskApplier, apply_bitmask

    applier = BitmaskApplier()
    logits = torch.randn(16, vocab)
    rand = torch.randint(-(2**31), 2**31 - 1, (16, (vocab + 31) // 32), dtype=torch.int32)
    out = {"clone_16xV_us": 1e6 * _timed(lambda: logits.clone(), repeats * 4),
           "apply_random_bits_16xV_us": 1e6 * _timed(lambda: applier.apply(logits.clone(), rand), repeats * 4)}
    if masks is not None:
        out["apply_grammar_masks_16xV_us"] = 1e6 * _timed(lambda: applier.apply(logits.clone(), masks), repeats * 4)
        out["apply_grammar_masks_1xV_us"] = 1e6 * _timed(lambda: applier.apply(logits[:1].clone(), masks[:1]),
                                                         repeats * 4)
        out["grammar_masks_allowed_fraction"] = [round(float(x), 4) for x in
                                                 (apply_bitmask(torch.zeros(16, vocab), masks) == 0).float().mean(1)]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    from transformers import AutoTokenizer

    path = a.model
    if path == "smollm2":
        from workers import hub

        path = str(hub.ensure_model("smollm2"))
    tok = AutoTokenizer.from_pretrained(path)
    res = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": platform.processor() or
           platform.machine(), "loadavg_start": Path("/proc/loadavg").read_text().split()[:3],
           "vocab": len(tok), "threads": a.threads, "libraries": []}
    for fn in (bench_xgrammar, bench_llguidance):
        try:
            res["libraries"].append(fn(tok, a.repeats, a.threads))
        except ImportError as exc:
            res["libraries"].append({"library": fn.__name__[6:], "skipped": f"not installed ({exc})"})
    masks = next((lib.pop("masks_sample") for lib in res["libraries"] if "masks_sample" in lib), None)
    for lib in res["libraries"]:
        lib.pop("masks_sample", None)
    res["apply"] = bench_apply(len(tok), masks, a.repeats)
    res["loadavg_end"] = Path("/proc/loadavg").read_text().split()[:3]
    text = json.dumps(res, indent=2)
    print(text)
    if a.out:
        Path(a.out).write_text(text)


if __name__ == "__main__":
    main()
