"""Step costs measured on the engine itself: one AR decode step and one speculative step (drafter + verify) at
each block size, at a few batch sizes, and the drafter's share of it.

The router needs these to decide where speculation pays (rate = tau(B) / t_spec(B) against 1 / t_ar): a cost
guessed from another machine turns speculation on where it loses and off where it wins. ``measure_step_costs``
runs real engine steps on a synthetic prompt (the same code path as serving; acceptance does not change a step's
cost: the verify forward runs the whole block either way) and returns a ``StepCosts`` table; the engine measures
it at start-up when ``EngineConfig.calibrate_step_costs`` is set and reports it in ``EngineStats.step_costs``.
``benchmarks/step_costs.py`` prints the same table.
"""
from __future__ import annotations

import statistics
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

from workers.engine.params import SamplingParams, SpecParams

DEFAULT_BATCHES = (1, 4, 16)
DEFAULT_BLOCKS = (2, 4, 8, 16)  # 2: the cheap probe of a session with no tau yet, measured, not interpolated


@dataclass
class StepCosts:
    """Median ms of one engine step, by batch size (running sequences): AR, and speculative by block size (the
    drafter's forward included; ``draft_ms`` is that share alone)."""

    ar_ms: dict[int, float] = field(default_factory=dict)  # batch -> ms
    spec_ms: dict[int, dict[int, float]] = field(default_factory=dict)  # block -> batch -> ms
    draft_ms: dict[int, dict[int, float]] = field(default_factory=dict)  # block -> batch -> ms

    def to_dict(self) -> dict:
        """JSON-safe (string keys)."""
        return {"ar_ms": {str(b): v for b, v in self.ar_ms.items()},
                "spec_ms": {str(k): {str(b): v for b, v in t.items()} for k, t in self.spec_ms.items()},
                "draft_ms": {str(k): {str(b): v for b, v in t.items()} for k, t in self.draft_ms.items()}}

    def rows(self) -> list[dict]:
        """The table as rows {batch, ar_ms, blocks: {k: {spec_ms, draft_ms, spec_over_ar, draft_over_ar}}}."""
        out = []
        for b, ar in sorted(self.ar_ms.items()):
            blocks = {k: {"spec_ms": t[b], "draft_ms": self.draft_ms.get(k, {}).get(b),
                          "spec_over_ar": t[b] / ar, "draft_over_ar": (self.draft_ms.get(k, {}).get(b) or 0.0) / ar}
                      for k, t in sorted(self.spec_ms.items()) if b in t}
            out.append({"batch": b, "ar_ms": ar, "blocks": blocks})
        return out


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
    """-> (median step ms, median drafter ms or None) over ``steps`` decode steps of ``batch`` sequences."""
    spec = SpecParams(enabled=False) if block is None else SpecParams(True, block)
    sp = SamplingParams(max_tokens=(steps + 2) * (block or 1) + 8, ignore_eos=True)
    ids = [f"calibrate-{batch}-{block}-{i}" for i in range(batch)]
    for rid in ids:
        engine.add_request(rid, prompt, sp, spec)
    try:
        while any(engine.scheduler.by_id[r].num_computed < len(prompt) for r in ids):  # prefill (maybe chunked)
            engine.step()
        engine.step()  # one decode step to warm up
        draft: list[float] = []
        times = []
        with _timed(engine.runner, "propose_logits", draft):
            for _ in range(steps):
                t0 = time.perf_counter()
                engine.step()
                times.append(time.perf_counter() - t0)
    finally:
        for rid in ids:
            engine.abort(rid)
        while engine.has_unfinished():
            engine.step()
    return statistics.median(times) * 1e3, (statistics.median(draft) * 1e3 if draft else None)


def measure_step_costs(engine, prompt: list[int] | None = None, batches=DEFAULT_BATCHES, blocks=DEFAULT_BLOCKS,
                       steps: int = 5) -> StepCosts:
    """Time real steps of ``engine`` (idle, nothing else running). Batches beyond ``max_num_seqs`` or the KV pool,
    and blocks beyond the drafter's, are skipped."""
    vocab = engine.model_config.vocab_size
    prompt = prompt or [(7 * i + 11) % vocab for i in range(64)]
    max_block = engine.max_block if engine.proposer is not None else 1
    costs = StepCosts()
    for b in batches:
        need = b * (len(prompt) + (steps + 2) * max([*blocks, 1]) + 8 + engine.blocks.block_size * 2)
        if b > engine.config.max_num_seqs or need > engine.blocks.free_tokens:
            continue
        costs.ar_ms[b], _ = _run(engine, prompt, b, None, steps)
        for k in blocks:
            if 2 <= k <= max_block:
                spec, draft = _run(engine, prompt, b, k, steps)
                costs.spec_ms.setdefault(k, {})[b] = spec
                if draft is not None:
                    costs.draft_ms.setdefault(k, {})[b] = draft
    return costs
