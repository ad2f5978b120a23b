"""The grammar's part of one engine step: the narrow hook workers/engine/step.py calls.

    g = GrammarStep.start(decoder, items, generator_for)  # None if no constrained sequence runs this step;
                                                          # starts the AR rows' masks in a worker thread
    ProposeRequest(..., guide=g)                           # the proposer drafts through g.draw (DraftGuide)
    g.walk_unguided(drafts)                                # drafts not drawn through the grammar: checked
    g.mask_target(items, starts, n_rows, logits)           # -inf on the forbidden logits of their target rows
                                                           # (greedy rows: only where the argmax needs it)
    g.commit_all(results)                                  # grammar states follow the committed tokens
    g.rollback()                                           # the step failed before committing: undo the walks
"""
from __future__ import annotations

from typing import Any

import torch

from workers.speculative.proposer import Draft
from workers.structured.decoding import DraftWalk, StructuredDecoder


class GrammarStep:
    def __init__(self, decoder: StructuredDecoder, items: list[Any], generator_for):
        self.d = decoder
        self.ids = {it.seq.request_id for it in items if decoder.has(it.seq.request_id)}
        self.greedy = {it.seq.request_id: it.seq.sampling.greedy for it in items}
        self.generator_for = generator_for
        self.ar = [it.seq.request_id for it in items if it.seq.request_id in self.ids
                   and (it.kind == "ar" or (it.kind == "prefill" and it.sample))]
        self.future = decoder.prefetch(self.ar)  # next-token masks, computed while the forwards run
        self.walks: dict[str, DraftWalk] = {}

    @classmethod
    def start(cls, decoder: StructuredDecoder | None, items: list[Any], generator_for) -> "GrammarStep | None":
        if decoder is None or not any(decoder.has(it.seq.request_id) for it in items):
            return None
        return cls(decoder, items, generator_for)

    def constrained(self, request_id: str) -> bool:
        return request_id in self.ids

    # ---- drafting (workers.speculative.proposer.DraftGuide) ----
    def draw(self, requests: list[Any], logits: list[torch.Tensor]) -> list[Draft]:
        drawn = self.d.draft([r.request_id for r in requests], logits, [r.sampling for r in requests],
                             [r.generator for r in requests])
        out = []
        for r, (walk, q) in zip(requests, drawn):
            self.walks[r.request_id] = walk
            out.append(Draft(walk.drafts, q))  # q [n, V]: what the drafts were sampled from (None = greedy)
        return out

    def walk_unguided(self, drafts: dict[str, Draft]) -> None:
        for rid, d in drafts.items():
            if rid in self.ids and rid not in self.walks:
                self.walks[rid] = self.d.walk(rid, d.tokens, greedy=self.greedy[rid])

    # ---- target rows ----
    def mask_target(self, items: list[Any], starts: list[int], n_rows: list[int], logits: torch.Tensor) -> None:
        """items[i] owns logits rows starts[i] .. starts[i]+n_rows[i]-1 of logits [R, V] (masked in place)."""
        ar_masks = self.future.result() if self.future is not None else None
        ar_pos = {rid: j for j, rid in enumerate(self.ar)}
        rows: list[int] = []
        masks: list[torch.Tensor] = []
        greedy: list[bool] = []
        for it, r0, n in zip(items, starts, n_rows):
            rid = it.seq.request_id
            if rid not in self.ids or n == 0:
                continue
            if rid in self.walks and it.seq.sampling.greedy:  # masks computed only where a token depends on them
                self.d.settle_greedy(rid, self.walks[rid], logits, r0, n)
            elif rid in self.walks:
                rows.extend(range(r0, r0 + n))
                masks.extend(self.walks[rid].masks[:n])
                greedy.extend([it.seq.sampling.greedy] * n)
            elif rid in ar_pos:
                rows.append(r0)
                masks.append(ar_masks[ar_pos[rid]])
                greedy.append(it.seq.sampling.greedy)
        self.d.mask_target(logits, rows, masks, greedy)

    # ---- commit ----
    def commit_all(self, results: dict[str, Any]) -> None:
        """results: request id -> SeqResult (its .tokens were committed) or the exception that failed it."""
        for rid, res in list(results.items()):
            if rid not in self.ids:
                continue
            if isinstance(res, BaseException):
                self._undo(rid)
                continue
            try:
                if res.tokens:
                    self.d.commit(rid, res.tokens, self.walks.pop(rid, None))
                else:
                    self._undo(rid)
            except Exception as exc:  # the grammar refused a committed token: this request fails alone
                results[rid] = exc

    def _undo(self, rid: str) -> None:
        walk = self.walks.pop(rid, None)
        if walk is not None and self.d.has(rid):
            self.d.undo(rid, walk)

    def rollback(self) -> None:
        for rid in list(self.walks):
            self._undo(rid)
        if self.future is not None:
            self.future.cancel()
