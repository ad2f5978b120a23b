"""Execution of one scheduled step: draft -> target forward -> sample / verify -> drafter context write.

Returns, per request, (positions newly computed, committed tokens, committed per pass) or the exception
that failed that request. A failure in the batched forward is isolated by re-running the sequences one
by one, so one bad request fails alone and the rest of the batch continues.
"""
from __future__ import annotations

from typing import Any

import torch

from workers.engine.runner import SeqSlice, build_draft_inputs, build_step_inputs
from workers.engine.sampling import RowParams, processed_probs, sample
from workers.engine.scheduler import ScheduledSeq
from workers.spec.verifier import verify_stochastic

Result = tuple[int, list[int], int]


class StepExecutor:
    def __init__(self, engine: Any):
        self.e = engine

    def run(self, items: list[ScheduledSeq]) -> dict[str, Result | BaseException]:
        try:
            return self._run(items)
        except Exception as exc:  # isolate: the culprit fails alone
            if len(items) == 1:
                return {items[0].seq.request_id: exc}
            out: dict[str, Result | BaseException] = {}
            for it in items:
                out.update(self.run([it]))
            return out

    # ---- drafting ----
    def _draft(self, spec: list[ScheduledSeq]) -> dict[str, tuple[list[int], torch.Tensor | None]]:
        if not spec:
            return {}
        e = self.e
        d = build_draft_inputs(
            anchors=[it.seq.token_ids[-1] for it in spec],
            ctx_lens=[it.seq.num_computed for it in spec],
            blocks=[it.num_query for it in spec],
            tables=[e.blocks.table(it.seq.request_id) for it in spec],
            mask_token_id=e.drafter.config.mask_token_id, block_size=e.blocks.block_size, device=e.device,
        )
        logits = e.runner.propose_logits(d)  # [B, Q-1, V]
        greedy = logits.argmax(-1).tolist()
        out: dict[str, tuple[list[int], torch.Tensor | None]] = {}
        for i, it in enumerate(spec):
            n = it.num_query - 1
            sp = it.seq.sampling
            if sp.greedy:
                out[it.seq.request_id] = (greedy[i][:n], None)
            else:
                q = processed_probs(logits[i, :n], RowParams.build([sp], e.device).repeat(n))
                toks = sample(q, [e.generator_for(it.seq.request_id)])
                out[it.seq.request_id] = (toks.tolist(), q)
        return out

    # ---- one batch ----
    def _run(self, items: list[ScheduledSeq]) -> dict[str, Result | BaseException]:
        e = self.e
        drafts = self._draft([it for it in items if it.kind == "spec"])
        slices: list[SeqSlice] = []
        for it in items:
            seq, nc = it.seq, it.seq.num_computed
            if it.kind == "prefill":
                toks, rows = seq.token_ids[nc: nc + it.num_query], ([it.num_query - 1] if it.sample else [])
            elif it.kind == "ar":
                toks, rows = [seq.token_ids[-1]], [0]
            else:
                toks, rows = [seq.token_ids[-1]] + drafts[seq.request_id][0], list(range(it.num_query))
            slices.append(SeqSlice(toks, nc, e.blocks.table(seq.request_id), rows))
        capture = e.drafter is not None and any(it.seq.spec_block > 1 for it in items)
        inp = build_step_inputs(slices, e.blocks.block_size, e.device, capture)
        logits, feats = e.runner.run_target(inp)  # [R, V], [N, F] | None
        argmax = logits.argmax(-1).tolist()
        # processed target probabilities for the stochastic rows, in one batch
        row0, starts, stoch_rows, stoch_params = 0, [], [], []
        for it, sl in zip(items, slices):
            starts.append(row0)
            if sl.logits_rows and not it.seq.sampling.greedy:
                stoch_rows.extend(range(row0, row0 + len(sl.logits_rows)))
                stoch_params.extend([it.seq.sampling] * len(sl.logits_rows))
            row0 += len(sl.logits_rows)
        probs = None
        if stoch_rows:
            probs = processed_probs(logits[torch.tensor(stoch_rows, device=logits.device)],
                                    RowParams.build(stoch_params, e.device))
        prob_at = {r: i for i, r in enumerate(stoch_rows)}
        results: dict[str, Result | BaseException] = {}
        ctx_rows, ctx_pos, ctx_slots = [], [], []
        flat = 0
        for it, sl, r0 in zip(items, slices, starts):
            rid = it.seq.request_id
            try:
                res = self._finish_item(it, sl, r0, argmax, probs, prob_at, drafts.get(rid))
                results[rid] = res
                if capture and it.seq.spec_block > 1:
                    for k in range(res[0]):
                        ctx_rows.append(flat + k)
                        ctx_pos.append(sl.start_pos + k)
                        ctx_slots.append(e.blocks.slot(rid, sl.start_pos + k))
            except Exception as exc:
                results[rid] = exc
            flat += len(sl.token_ids)
        if ctx_rows:
            e.runner.write_context(feats, ctx_rows, ctx_pos, ctx_slots)
        return results

    def _finish_item(self, it: ScheduledSeq, sl: SeqSlice, r0: int, argmax: list[int], probs, prob_at,
                     draft) -> Result:
        e = self.e
        seq = it.seq
        gen = e.generator_for(seq.request_id)
        greedy = seq.sampling.greedy
        if it.kind == "prefill" and not it.sample:
            return it.num_query, [], 0
        if it.kind in ("prefill", "ar"):
            tok = argmax[r0] if greedy else int(sample(probs[prob_at[r0]][None], [gen])[0])
            return it.num_query, [tok], 1
        drafted, q = draft
        n = len(drafted)
        if greedy:
            target = argmax[r0: r0 + n + 1]
            a = 0
            while a < n and drafted[a] == target[a]:
                a += 1
            committed = drafted[:a] + [target[a]]
        else:
            p = probs[prob_at[r0]: prob_at[r0] + n + 1]
            a, committed = verify_stochastic(p, q, torch.tensor(drafted, device=p.device), gen)
        seq.spec_passes += 1
        seq.spec_tokens += a + 1
        e.tracker.record_spec(n, a, seq.tags)
        return a + 1, committed, a + 1
