"""Step-cost table of the real engine: one AR decode step, one speculative step (drafter + verify) at each
block size, and the drafter's forward alone, at several batch sizes.

For each (batch, mode) the engine gets ``batch`` requests of the same prompt, finishes their prefill, then times
``steps`` engine steps (median). The drafter's share is timed inside those same steps by wrapping the runner's
proposal call. Acceptance does not change a step's cost (the verify forward runs the whole block either way).
"""
from __future__ import annotations

import statistics
import time
from contextlib import contextmanager


@contextmanager
def _timed(obj, name: str, sink: list[float]):
    real = getattr(obj, name)

    def wrapper(*a, **k):
        t0 = time.perf_counter()
        out = real(*a, **k)
        sink.append(time.perf_counter() - t0)
        return out

    setattr(obj, name, wrapper)
    try:
        yield
    finally:
        setattr(obj, name, real)


def _run(engine, prompt: list[int], batch: int, block: int | None, steps: int) -> tuple[float, float | None]:
    """-> (median step ms, median drafter ms or None) over ``steps`` decode steps."""
    from workers.engine.params import SamplingParams, SpecParams

    spec = SpecParams(enabled=False) if block is None else SpecParams(True, block)
    sp = SamplingParams(max_tokens=(steps + 4) * (block or 1) + 8, ignore_eos=True)
    ids = [f"cost-{batch}-{block}-{i}" for i in range(batch)]
    for rid in ids:
        engine.add_request(rid, prompt, sp, spec)
    while any(engine.scheduler.by_id[r].num_computed < len(prompt) for r in ids):  # prefill (maybe chunked)
        engine.step()
    engine.step()  # warm-up decode step
    draft: list[float] = []
    times = []
    with _timed(engine.runner, "propose_logits", draft):
        for _ in range(steps):
            t0 = time.perf_counter()
            engine.step()
            times.append(time.perf_counter() - t0)
    for rid in ids:
        engine.abort(rid)
    while engine.has_unfinished():
        engine.step()
    return statistics.median(times) * 1e3, (statistics.median(draft) * 1e3 if draft else None)


def step_cost_table(engine, prompt: list[int], batches: list[int], blocks: list[int], steps: int = 12) -> list[dict]:
    """Rows {batch, ar_ms, blocks: {k: {spec_ms, draft_ms, spec_over_ar, draft_over_ar}}}."""
    rows = []
    for b in batches:
        ar, _ = _run(engine, prompt, b, None, steps)
        row = {"batch": b, "ar_ms": ar, "blocks": {}}
        if engine.drafter is not None:
            for k in blocks:
                spec, draft = _run(engine, prompt, b, k, steps)
                row["blocks"][k] = {"spec_ms": spec, "draft_ms": draft, "spec_over_ar": spec / ar,
                                    "draft_over_ar": (draft or 0.0) / ar}
        rows.append(row)
    return rows


def format_table(rows: list[dict]) -> str:
    blocks = sorted({k for r in rows for k in r["blocks"]})
    head = "| batch | AR step ms | " + " | ".join(f"spec b{k} ms (x AR) | drafter b{k} ms (x AR)" for k in blocks)
    lines = [head + " |", "|" + "---|" * (2 + 2 * len(blocks))]
    for r in rows:
        cells = [str(r["batch"]), f"{r['ar_ms']:.1f}"]
        for k in blocks:
            c = r["blocks"].get(k)
            cells += ([f"{c['spec_ms']:.1f} ({c['spec_over_ar']:.2f}x)",
                       f"{c['draft_ms']:.1f} ({c['draft_over_ar']:.2f}x)"] if c else ["", ""])
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
