"""Continuous-batching scheduler (torch-free): which sequences run this step, and with how many tokens.

A step is schedule -> execute -> update. Every sequence is in one of three shapes each step:
  * prefill: a chunk of its prompt (chunked so one long prompt never starves the decoders);
  * ar: its one pending token (the last sampled token, not yet in the KV cache);
  * spec: its pending token as the anchor plus block-1 drafted tokens, verified in the same pass.
Budgets: at most ``max_num_seqs`` running sequences and ``max_num_batched_tokens`` query tokens per step.
Memory never decides here: admission (``add``) already reserved each request's worst case.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from workers.engine.kv_cache import BlockManager
from workers.engine.params import SamplingParams


@dataclass
class Sequence:
    request_id: str
    prompt_ids: list[int]
    sampling: SamplingParams
    spec_block: int  # drafted block size incl. the anchor; 1 = autoregressive
    tags: dict[str, str] = field(default_factory=dict)
    token_ids: list[int] = field(default_factory=list)  # prompt + output
    num_computed: int = 0  # positions whose K/V (and drafter context K/V) are in the cache
    arrival: float = field(default_factory=time.monotonic)
    finished: bool = False

    def __post_init__(self):
        if not self.token_ids:
            self.token_ids = list(self.prompt_ids)

    @property
    def num_prompt(self) -> int:
        return len(self.prompt_ids)

    @property
    def num_output(self) -> int:
        return len(self.token_ids) - len(self.prompt_ids)

    @property
    def in_prefill(self) -> bool:
        return self.num_computed < self.num_prompt


@dataclass
class ScheduledSeq:
    seq: Sequence
    kind: str  # "prefill" | "ar" | "spec"
    num_query: int  # tokens fed to the target this step (spec: the block size)
    sample: bool  # whether the last query row's logits are needed (decode, or the final prefill chunk)


@dataclass
class SchedulerOutput:
    items: list[ScheduledSeq]

    @property
    def empty(self) -> bool:
        return not self.items


class Scheduler:
    def __init__(self, blocks: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 draft_slack: int = 0):
        self.blocks = blocks
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.draft_slack = draft_slack
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.by_id: dict[str, Sequence] = {}

    # ---- admission ----
    def worst_case_tokens(self, seq: Sequence) -> int:
        return seq.num_prompt + seq.sampling.max_tokens + (self.draft_slack if seq.spec_block > 1 else 0)

    def add(self, seq: Sequence) -> None:
        """Reserve the worst case now (MemoryError if it does not fit); the sequence then waits for a slot."""
        if seq.request_id in self.by_id:
            raise KeyError(f"request id {seq.request_id!r} is already in use")
        self.blocks.reserve(seq.request_id, self.worst_case_tokens(seq))
        self.by_id[seq.request_id] = seq
        self.waiting.append(seq)

    def finish(self, seq: Sequence) -> None:
        seq.finished = True
        self.by_id.pop(seq.request_id, None)
        if seq in self.running:
            self.running.remove(seq)
        else:
            try:
                self.waiting.remove(seq)
            except ValueError:
                pass
        self.blocks.free(seq.request_id)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- one step ----
    def decode_block(self, seq: Sequence) -> int:
        """Block size for this step: never draft past max_tokens (so the KV never outgrows the reservation)."""
        remaining = seq.sampling.max_tokens - seq.num_output
        return max(1, min(seq.spec_block, remaining))

    def schedule(self) -> SchedulerOutput:
        budget = self.max_num_batched_tokens
        items: list[ScheduledSeq] = []
        for seq in self.running:  # decoders first: they hold KV and users are waiting on them
            if seq.in_prefill:
                continue
            b = self.decode_block(seq)
            if b > budget:
                b = 1 if budget >= 1 else 0  # shrink a spec block rather than stall it
                if b == 0:
                    break
            items.append(ScheduledSeq(seq, "spec" if b > 1 else "ar", b, True))
            budget -= b
        for seq in self.running:  # prompts already started
            if budget <= 0:
                break
            if seq.in_prefill:
                items.append(self._prefill_item(seq, budget))
                budget -= items[-1].num_query
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting.popleft()
            self.running.append(seq)
            items.append(self._prefill_item(seq, budget))
            budget -= items[-1].num_query
        for it in items:
            self.blocks.ensure(it.seq.request_id, it.seq.num_computed + it.num_query)
        return SchedulerOutput(items)

    @staticmethod
    def _prefill_item(seq: Sequence, budget: int) -> ScheduledSeq:
        chunk = min(seq.num_prompt - seq.num_computed, budget)
        return ScheduledSeq(seq, "prefill", chunk, seq.num_computed + chunk == seq.num_prompt)

    # ---- update after execute ----
    def commit(self, seq: Sequence, num_new_computed: int, new_tokens: list[int]) -> None:
        """Advance the computed length, roll the KV table back to it, append the committed tokens."""
        seq.num_computed += num_new_computed
        self.blocks.truncate(seq.request_id, seq.num_computed)
        seq.token_ids.extend(new_tokens)
