"""Speculative acceptance (tau) on grammar-constrained turns beside unconstrained ones, same prompts.

    python -m benchmarks.constrained_tau [--drafter models/smollm2-135m-dflash-b16] [--block 16]
        [--max-tokens 96] [--batch 8] [--dtype float32] [--threads 2] [--out runs/constrained_tau.json]

Agent-style prompts with tools, rendered exactly as the API renders them (orchestrator/api/chat_prompt.py,
the model's template or the Hermes fallback), then decoded greedily with speculation, three ways:
  tool_required  the tool-call grammar of `tool_choice: "required"` (calls only),
  tool_auto      the grammar of `tool_choice: "auto"` (free text; a started call must be complete),
  free           no grammar at all (the same prompt, tools listed);
and JSON-answer prompts with `response_format: json_schema` vs free. tau = tokens committed per target pass
over the decode passes of each request (the prefill's sampled token excluded), pooled per condition, plus
the acceptance rate per draft position. The lead runs this with each new drafter.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
from pathlib import Path

TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Current weather for a city",
                                      "parameters": {"type": "object", "properties": {
                                          "city": {"type": "string"},
                                          "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                                          "required": ["city", "unit"], "additionalProperties": False}}},
    {"type": "function", "function": {"name": "search_web", "description": "Search the web",
                                      "parameters": {"type": "object", "properties": {
                                          "query": {"type": "string"},
                                          "max_results": {"type": "integer", "minimum": 1, "maximum": 10}},
                                          "required": ["query", "max_results"], "additionalProperties": False}}},
    {"type": "function", "function": {"name": "create_event", "description": "Add an event to the calendar",
                                      "parameters": {"type": "object", "properties": {
                                          "title": {"type": "string"}, "date": {"type": "string", "format": "date"},
                                          "attendees": {"type": "array", "items": {"type": "string"}}},
                                          "required": ["title", "date", "attendees"],
                                          "additionalProperties": False}}},
]
TOOL_PROMPTS = [
    "What's the weather in Paris right now?", "Is it raining in London? Use celsius.",
    "Find three articles about speculative decoding.", "Search for the best pizza in Naples.",
    "Schedule a meeting called 'Planning' on 2025-05-04 with Ana and Li.", "How hot is it in Cairo in fahrenheit?",
    "Look up the population of Tokyo.", "Put 'Dentist' in my calendar for 2025-09-12.",
    "Check the weather in Oslo for me.", "Search the web for Rust async tutorials, five results.",
    "Create an event 'Team lunch' on 2025-06-20 with the whole team.", "What's the temperature in Sydney?",
]
JSON_SCHEMA = {"type": "object", "properties": {
    "answer": {"type": "string"}, "confidence": {"type": "number", "minimum": 0, "maximum": 1},
    "sources": {"type": "array", "items": {"type": "string"}, "maxItems": 3}},
    "required": ["answer", "confidence", "sources"], "additionalProperties": False}
JSON_PROMPTS = ["What is the capital of Australia? Answer in JSON.", "Who wrote Hamlet? Reply as JSON.",
                "How many legs does a spider have? JSON please.", "What is the boiling point of water? JSON.",
                "Name the largest planet. Answer with JSON.", "What language is spoken in Brazil? JSON answer."]


def _body(tools=None, tool_choice=None, response_format=None):
    from orchestrator.api.schemas import ChatCompletionRequest

    def make(prompt):
        d = {"model": "m", "messages": [{"role": "user", "content": prompt}]}
        if tools:
            d["tools"] = tools
        if tool_choice:
            d["tool_choice"] = tool_choice
        if response_format:
            d["response_format"] = response_format
        return ChatCompletionRequest.model_validate(d)

    return make


def run_condition(eng, prompts, make, grammar: bool, block: int, max_tokens: int, batch: int) -> dict:
    from orchestrator.api.tools import plan_chat
    from workers.engine.params import SamplingParams, SpecParams, StructuredSpec

    tok = eng.tokenizer
    tokens = passes = 0
    hits, tries = [0] * (block - 1), [0] * (block - 1)
    outputs = []
    for start in range(0, len(prompts), batch):
        group = prompts[start: start + batch]
        per: dict[str, list] = {}
        for i, p in enumerate(group):
            plan = plan_chat(tok, make(p))
            ids = tok.encode(plan.prompt, add_special_tokens=False)
            st = StructuredSpec(**plan.constraint) if (grammar and plan.constraint) else None
            rid = f"{start + i}"
            per[rid] = []
            eng.add_request(rid, ids, SamplingParams(max_tokens=max_tokens, structured=st),
                            SpecParams(enabled=True, block_size=block))
        while eng.has_unfinished():
            for o in eng.step():
                per[o.request_id].append(o)
        for rid, outs in per.items():
            toks = [t for o in outs for t in o.new_token_ids]
            decode = outs[1:]  # outs[0]: the token sampled at the end of prefill
            tokens += sum(len(o.new_token_ids) for o in decode)
            passes += len(decode)
            for o in decode:
                a = len(o.new_token_ids) - 1  # drafts accepted in this pass (the last token is the bonus)
                for j in range(min(block - 1, a + 1)):
                    tries[j] += 1
                    hits[j] += j < a
            outputs.append(tok.decode(toks, skip_special_tokens=True))
    return {"requests": len(prompts), "decode_tokens": tokens, "decode_passes": passes,
            "tau": tokens / passes if passes else None,
            "accept_by_position": [h / t if t else None for h, t in zip(hits, tries)], "examples": outputs[:3]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--drafter", default=None, help="DFlash checkpoint (default: the demo drafter)")
    ap.add_argument("--block", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    import torch

    from workers import hub
    from workers.engine.config import EngineConfig
    from workers.engine.llm_engine import LLMEngine

    torch.set_num_threads(a.threads)
    drafter = a.drafter or str(hub.default_drafter_path())
    eng = LLMEngine(EngineConfig(model=str(hub.ensure_model("smollm2")), drafter=drafter, dtype=a.dtype,
                                 device="cpu", max_num_seqs=a.batch, max_model_len=4096))
    block = min(a.block, eng.max_block)
    res = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "machine": platform.machine(),
           "loadavg_start": Path("/proc/loadavg").read_text().split()[:3], "args": vars(a), "drafter": drafter,
           "conditions": {}}
    conds = [
        ("tool_required", TOOL_PROMPTS, _body(TOOLS, "required"), True),
        ("tool_auto", TOOL_PROMPTS, _body(TOOLS, "auto"), True),
        ("tool_free", TOOL_PROMPTS, _body(TOOLS, "auto"), False),
        ("json_schema", JSON_PROMPTS, _body(response_format={"type": "json_schema", "json_schema": {
            "name": "answer", "schema": JSON_SCHEMA}}), True),
        ("json_free", JSON_PROMPTS, _body(), False),
    ]
    for name, prompts, make, grammar in conds:
        r = run_condition(eng, prompts, make, grammar, block, a.max_tokens, a.batch)
        res["conditions"][name] = r
        print(name, json.dumps({k: v for k, v in r.items() if k != "examples"}), flush=True)
    res["loadavg_end"] = Path("/proc/loadavg").read_text().split()[:3]
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
