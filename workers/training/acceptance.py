"""Acceptance through the engine: run prompts with speculation on and tally committed tokens per target pass.

tau = mean committed tokens per target pass after the first output of each request (the prefill pass samples
one token and drafts nothing): accepted drafts + the bonus token, a pass of 1 where the engine ran
autoregressively near ``max_tokens``. ``accept_by_position[k-1]`` = P(draft position k accepted) over those
passes. benchmarks/acceptance.py is the command line; the trainer's offline tau (evaluate.py) equals this at
T=0 (tests/cpu/test_training.py checks it on the same sequences).
"""
from __future__ import annotations

import sys
import time
from collections import defaultdict
from dataclasses import dataclass


@dataclass
class Item:
    category: str
    prompt_ids: list[int]


def measure(engine, items: list[Item], temperature: float, max_tokens: int, block_size: int, seed: int = 0,
            progress: bool = True) -> dict:
    """Items admitted as the KV pool allows (the engine batches them); -> tau per category, tokens, wall time, and the
    committed-per-pass lists (``passes``, per request id) for exact comparisons."""
    from tqdm import tqdm

    from workers.engine.params import NoCapacity, SamplingParams, SpecParams

    cat_of, passes = {}, defaultdict(list)
    pending = list(enumerate(items))
    seen_first: set[str] = set()
    outputs: dict[str, list[int]] = defaultdict(list)
    n_tokens = 0
    t0 = time.time()
    bar = tqdm(total=len(items), desc=f"T={temperature:g}", unit="req", file=sys.stderr, disable=not progress)
    while pending or engine.has_unfinished():
        while pending:  # admit while the KV pool holds their worst case; the rest waits for finished ones
            i, it = pending[0]
            rid = f"{it.category}-{i}"
            try:
                engine.add_request(rid, it.prompt_ids, SamplingParams(temperature=temperature, max_tokens=max_tokens,
                                                                      seed=seed + i),
                                   SpecParams(enabled=True, block_size=block_size), tags={"role": it.category})
            except NoCapacity:
                if not engine.has_unfinished():
                    raise
                break
            cat_of[rid] = it.category
            pending.pop(0)
        for out in engine.step():
            if out.error:
                raise RuntimeError(f"request {out.request_id} failed: {out.error}")
            n_tokens += len(out.new_token_ids)
            outputs[out.request_id].extend(out.new_token_ids)
            if out.request_id not in seen_first:
                seen_first.add(out.request_id)
            else:
                passes[out.request_id].extend(out.committed)
            if out.finished:
                bar.update(1)
    bar.close()
    wall = time.time() - t0
    by_cat: dict[str, list[int]] = defaultdict(list)
    for rid, acc in passes.items():
        by_cat[cat_of[rid]].extend(acc)
    result = {"temperature": temperature, "wall_s": round(wall, 1), "tokens": n_tokens,
              "tokens_per_s": round(n_tokens / max(wall, 1e-9), 2), "by_category": {}}
    for cat, acc in sorted(by_cat.items()):
        result["by_category"][cat] = {
            "tau": round(sum(acc) / len(acc), 3), "passes": len(acc),
            "accept_by_position": [round(sum(a - 1 >= k for a in acc) / len(acc), 3) for k in range(1, block_size)],
        }
    allp = [a for acc in by_cat.values() for a in acc]
    result["tau"] = round(sum(allp) / max(1, len(allp)), 3)
    result["passes"] = {rid: list(v) for rid, v in passes.items()}
    result["outputs"] = dict(outputs)
    return result
