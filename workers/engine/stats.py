"""Acceptance and timing statistics: per step, per request, per tag (session / role / team) -> EngineStats.

Acceptance per tag is kept as per-position counts (workers/engine/acceptance.py), whatever block each pass ran at
(the router steers blocks per request; max_tokens cuts blocks short), and reported as tau at the reference block
(``ref_block``: the engine's default block, which the replica reports as ``block_size_default``)."""
from __future__ import annotations

from collections import OrderedDict

from workers.engine.acceptance import AcceptEntry, alpha_of, observe, tau_at_ref, tau_from_alpha
from workers.engine.params import EngineStats

def pure_step(blocks: list[int]) -> tuple[int, int] | None:
    """(batch, block) of a decode step whose sequences all run one block (block 1: all AR), else None (a mixed
    step, or none). Only pure steps describe a step kind (``StatsTracker.record_step_time``): a step mixing AR rows
    with speculative ones, or blocks of different sizes, costs neither. The engine, the simulator and its step
    models all ask this."""
    if not blocks:
        return None
    b = blocks[0]
    return (len(blocks), b) if all(x == b for x in blocks) else None


MAX_TAG_VALUES = 10_000  # per tag key; the least recently updated values are dropped beyond this


class StatsTracker:
    def __init__(self, alpha: float = 0.1, max_block: int = 16, ref_block: int | None = None):
        self.alpha = alpha
        self.ref_block = max(2, int(ref_block if ref_block is not None else max_block))
        self.step_ms_ar: float | None = None
        self.step_ms_by_block: dict[int, float] = {}
        # every decode step (no prefill in it), mixed or pure: EWMAs of its ms, its target rows (1 per AR sequence,
        # the block per speculative one) and the tokens it committed; the router prices a request's block as the
        # rows it adds to this shared step (orchestrator/routing/score.py, "mixed steps")
        self.decode_ms: float | None = None
        self.decode_rows: float | None = None
        self.decode_tokens: float | None = None
        self.accept_by_tag: dict[str, OrderedDict[str, AcceptEntry]] = {}
        self.spec_passes = 0
        self.spec_tokens = 0
        self.spec_hits = 0  # accepted draft positions, all passes (block-independent: acceptance.py)
        self.spec_misses = 0  # rejected draft positions, all passes
        self.hits = [0] * max(1, max_block - 1)
        self.tries = [0] * max(1, max_block - 1)
        self.tokens_generated = 0
        self.target_passes = 0

    def _ewma(self, old: float | None, x: float) -> float:
        return x if old is None else (1 - self.alpha) * old + self.alpha * x

    def record_step_time(self, ms: float, block: int | None) -> None:
        """A pure decode step (no prefill in it); block None = AR only, else the largest spec block."""
        if block is None:
            self.step_ms_ar = self._ewma(self.step_ms_ar, ms)
        else:
            self.step_ms_by_block[block] = self._ewma(self.step_ms_by_block.get(block), ms)

    def record_decode_step(self, ms: float, rows: int, tokens: int) -> None:
        """Any decode step (no prefill in it): ``rows`` target rows verified or sampled, ``tokens`` committed."""
        self.decode_ms = self._ewma(self.decode_ms, ms)
        self.decode_rows = self._ewma(self.decode_rows, float(rows))
        self.decode_tokens = self._ewma(self.decode_tokens, float(tokens))

    def record_pass(self, committed: int) -> None:
        """One decode target pass of one sequence (AR or spec) that committed ``committed`` tokens."""
        self.target_passes += 1
        self.tokens_generated += committed

    def record_spec(self, proposed: int, accepted: int, tags: dict[str, str]) -> None:
        """One verified block: ``proposed`` drafts, the first ``accepted`` of them accepted."""
        committed = accepted + 1
        self.spec_passes += 1
        self.spec_tokens += committed
        self.spec_hits += accepted
        self.spec_misses += 1 if accepted < proposed else 0
        for j in range(min(proposed, len(self.tries))):
            self.tries[j] += 1
            if j < accepted:
                self.hits[j] += 1
        for key, value in tags.items():
            table = self.accept_by_tag.setdefault(str(key), OrderedDict())
            old = table.pop(str(value), None)
            table[str(value)] = observe(old, proposed, accepted, self.alpha)
            if len(table) > MAX_TAG_VALUES:
                table.popitem(last=False)

    def tau_by_tag(self) -> dict[str, dict[str, tuple[float, int]]]:
        """{tag key: {value: (tau at ref_block, passes)}}."""
        ref = self.ref_block
        return {k: {v: (tau_at_ref(e, ref), e[2]) for v, e in t.items()} for k, t in self.accept_by_tag.items()}

    def snapshot(self, kv_free_tokens: int, kv_total_tokens: int, num_running: int, num_waiting: int) -> EngineStats:
        return EngineStats(
            kv_free_tokens=kv_free_tokens,
            kv_total_tokens=kv_total_tokens,
            num_running=num_running,
            num_waiting=num_waiting,
            step_ms_ar=self.step_ms_ar,
            step_ms_by_block=dict(self.step_ms_by_block),
            decode_ms=self.decode_ms,
            decode_rows=self.decode_rows,
            decode_tokens=self.decode_tokens,
            tau_by_tag=self.tau_by_tag(),
            tau_mean=(tau_from_alpha(alpha_of(self.spec_hits, self.spec_misses), self.ref_block)
                      if self.spec_passes else None),
            tau_block=self.ref_block,
            accept_by_position=[h / t for h, t in zip(self.hits, self.tries) if t],
            tokens_generated=self.tokens_generated,
            target_passes=self.target_passes,
        )
