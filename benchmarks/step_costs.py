"""Step-cost table of the real engine: one AR decode step, one speculative step (drafter + verify) at each
block size, and the drafter's forward alone, at several batch sizes -- measured by the engine's own
calibration (workers/engine/calibrate.py, what a serving replica reports to the router), printed as a table.
"""
from __future__ import annotations

from workers.engine.calibrate import measure_step_costs


def step_cost_table(engine, prompt: list[int], batches: list[int], blocks: list[int], steps: int = 12) -> list[dict]:
    """Rows {batch, ar_ms, blocks: {k: {spec_ms, draft_ms, spec_over_ar, draft_over_ar}}}."""
    return measure_step_costs(engine, prompt, batches, blocks, steps).rows()


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
