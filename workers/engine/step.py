"""One scheduled step, in four stages: propose -> target forward -> sample / verify -> proposer commit.

  1. propose: the proposer drafts a block for every speculative sequence (workers/speculative/proposer.py);
  2. target forward: one pass over the flat batch (prefill chunks, AR tokens, anchor + drafts) -> logits
     [R, V] for the rows whose next token is needed. Per-request logits processing (a grammar's token
     bitmask per row, say) belongs right after this forward, before ``TargetRows.build``: every row that is
     sampled or verified is built from those logits, and ``rows`` says which request and block position
     each row belongs to;
  3. sample the AR / last-prefill rows, verify the drafted blocks (workers/speculative/verifier.py, one call);
  4. commit: the proposer records the tokens that entered the KV cache.
Grammar-constrained sequences (workers/structured/step.py): the proposer draws their drafts through the
grammar (``ProposeRequest.guide``), their target rows get the grammar's token masks right after the forward,
and their grammar states follow the committed tokens (rolled back with the batch when it fails).
Returns a ``SeqResult`` per request, or the exception that failed that request: a failure in the batched
work is isolated by re-running the sequences one by one, so one bad request fails alone.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from workers.engine.kv_cache import BlockManager
from workers.engine.runner import ModelRunner, SeqSlice, build_step_inputs
from workers.engine.sampling import sample
from workers.engine.scheduler import ScheduledSeq
from workers.speculative.proposer import CommitBatch, Draft, Proposer, ProposeRequest
from workers.speculative.verifier import BlockToVerify, TargetRows, Verdict, verify_blocks
from workers.structured.step import GrammarStep


@dataclass
class SeqResult:
    """What one step did for one sequence."""

    num_computed: int  # positions newly written to the KV cache
    tokens: list[int]  # committed tokens, before the engine's EOS / max_tokens cut
    proposed: int = 0  # drafts verified this step (0: not a speculative pass)
    accepted: int = 0  # how many of them were accepted


class StepExecutor:
    def __init__(self, runner: ModelRunner, blocks: BlockManager, proposer: Proposer | None,
                 generator_for: Callable[[str], torch.Generator], device: torch.device,
                 grammar: Callable[[], object | None] = lambda: None):
        self.runner, self.blocks, self.proposer = runner, blocks, proposer
        self.generator_for, self.device = generator_for, device
        self.grammar = grammar  # -> the engine's StructuredDecoder, or None while no request is constrained
        self._g: GrammarStep | None = None

    def run(self, items: list[ScheduledSeq]) -> dict[str, SeqResult | BaseException]:
        try:
            return self._run(items)
        except Exception as exc:  # isolate: the culprit fails alone
            if len(items) == 1:
                return {items[0].seq.request_id: exc}
            out: dict[str, SeqResult | BaseException] = {}
            for it in items:
                out.update(self.run([it]))
            return out

    # ---- 1. propose ----
    def _propose(self, spec: list[ScheduledSeq]) -> dict[str, Draft]:
        if not spec:
            return {}
        g = self._g
        reqs = [ProposeRequest(it.seq.request_id, it.seq.token_ids, it.seq.num_computed, it.num_query - 1,
                               self.blocks.table(it.seq.request_id), it.seq.sampling,
                               self.generator_for(it.seq.request_id),
                               guide=g if g is not None and g.constrained(it.seq.request_id) else None)
                for it in spec]
        drafts = self.proposer.propose(reqs, self.runner)
        for r, d in zip(reqs, drafts):
            if len(d.tokens) != r.num_drafts:
                raise RuntimeError(f"proposer returned {len(d.tokens)} drafts for {r.request_id}, "
                                   f"{r.num_drafts} were asked for")
        out = {r.request_id: d for r, d in zip(reqs, drafts)}
        if g is not None:
            g.walk_unguided(out)  # drafts the proposer did not draw through the grammar: checked against it
        return out

    # ---- one batch ----
    def _run(self, items: list[ScheduledSeq]) -> dict[str, SeqResult | BaseException]:
        self._g = GrammarStep.start(self.grammar(), items, self.generator_for)
        try:
            results = self._run_batch(items)
            if self._g is not None:  # last, so a failure above retries from the committed grammar states
                self._g.commit_all(results)
            return results
        except BaseException:
            if self._g is not None:
                self._g.rollback()
            raise
        finally:
            self._g = None

    def _run_batch(self, items: list[ScheduledSeq]) -> dict[str, SeqResult | BaseException]:
        drafts = self._propose([it for it in items if it.kind == "spec"])
        slices: list[SeqSlice] = []
        for it in items:
            seq, nc = it.seq, it.seq.num_computed
            if it.kind == "prefill":
                toks, rows = seq.token_ids[nc: nc + it.num_query], ([it.num_query - 1] if it.sample else [])
            elif it.kind == "ar":
                toks, rows = [seq.token_ids[-1]], [0]
            else:
                toks, rows = [seq.token_ids[-1]] + drafts[seq.request_id].tokens, list(range(it.num_query))
            slices.append(SeqSlice(toks, nc, self.blocks.table(seq.request_id), rows))
        feeds_proposer = self.proposer is not None and bool(self.proposer.capture_layers)
        capture = feeds_proposer and any(it.seq.spec_block > 1 for it in items)
        inp = build_step_inputs(slices, self.blocks.block_size, self.device, capture)
        logits, feats = self.runner.run_target(inp)  # [R, V], [N, F] | None
        # row r of logits: request rows[r][0], offset rows[r][1] in its query run (block position for spec)
        starts, rows = [], []
        for it, sl in zip(items, slices):
            starts.append(len(rows))
            rows.extend((it, k) for k in sl.logits_rows)
        if self._g is not None:  # the grammar's token masks on the constrained rows (fp32 rows, masked in place)
            logits = logits.float()
            self._g.mask_target(items, starts, [len(sl.logits_rows) for sl in slices], logits)
        target = TargetRows.build(logits, [it.seq.sampling for it, _ in rows])
        results: dict[str, SeqResult | BaseException] = {}
        spec_items = [(it, r0) for it, r0 in zip(items, starts) if it.kind == "spec"]
        verdicts = self._verify_greedy(target, spec_items, drafts)
        commit = CommitBatch(feats, [], [], [])
        flat = 0
        for it, sl, r0 in zip(items, slices, starts):
            rid = it.seq.request_id
            try:
                res = self._finish_item(it, r0, target, verdicts.get(rid), drafts.get(rid))
                results[rid] = res
                if self.proposer is not None and it.seq.spec_block > 1:
                    for k in range(res.num_computed):
                        commit.rows.append(flat + k)
                        commit.positions.append(sl.start_pos + k)
                        commit.slots.append(self.blocks.slot(rid, sl.start_pos + k))
            except Exception as exc:
                results[rid] = exc
            flat += len(sl.token_ids)
        if self.proposer is not None:
            self.proposer.commit(commit, self.runner)
        return results

    # ---- 3. sample / verify ----
    def _block(self, it: ScheduledSeq, r0: int, draft: Draft) -> BlockToVerify:
        rid = it.seq.request_id
        return BlockToVerify(r0, draft.tokens, draft.probs, it.seq.sampling.greedy, self.generator_for(rid))

    def _verify_greedy(self, target: TargetRows, spec_items: list[tuple[ScheduledSeq, int]],
                       drafts: dict[str, Draft]) -> dict[str, Verdict]:
        """Every greedy block of the step in one batched call (no random numbers drawn)."""
        greedy = [(it, r0) for it, r0 in spec_items if it.seq.sampling.greedy]
        verdicts = verify_blocks(target, [self._block(it, r0, drafts[it.seq.request_id]) for it, r0 in greedy])
        return {it.seq.request_id: v for (it, _), v in zip(greedy, verdicts)}

    def _finish_item(self, it: ScheduledSeq, r0: int, target: TargetRows, verdict: Verdict | None,
                     draft: Draft | None) -> SeqResult:
        if it.kind == "prefill" and not it.sample:
            return SeqResult(it.num_query, [])
        if it.kind in ("prefill", "ar"):
            if it.seq.sampling.greedy:
                tok = target.argmax[r0]
            else:
                tok = int(sample(target.p(r0), [self.generator_for(it.seq.request_id)])[0])
            return SeqResult(it.num_query, [tok])
        if verdict is None:  # sampled: verified here, so random numbers are drawn in the batch's order
            verdict = verify_blocks(target, [self._block(it, r0, draft)])[0]
        return SeqResult(verdict.accepted + 1, verdict.tokens, len(draft.tokens), verdict.accepted)
