"""Grammar-constrained decoding inside the engine step, speculation included, exact.

Per constrained request a grammar matcher holds the state after the committed tokens. In one step:
- AR / final-prefill rows: the next-token mask is computed for all of them in one batched call, in a worker
  thread started before the drafter and target forwards (`prefetch`) and joined after (`target_masks`);
- speculative rows: the drafter's logits are masked position by position while the matcher advances over
  its own drafts (`draft`; batched across sequences per position), so every draft is grammar-valid; the
  masks of that walk are exactly the target rows' masks (row j = state after drafts 0..j-1), and the
  matcher is rolled back after the verification (`commit`: back to the accepted prefix, then the bonus);
- `mask_target` adds -inf to the forbidden logits of the constrained target rows before argmax / sampling.
Greedy: the committed tokens are the masked target argmax, as without speculation. Stochastic: drafts are
sampled from the masked drafter distribution q' and verified against the masked target p', so committed
tokens are distributed exactly as p' (workers/verify.py). After the grammar ends (a stop token), only stop
tokens are allowed: later drafts are a stop token and their rows allow stop tokens only.
"""
from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from workers.engine.params import InvalidRequest, StructuredSpec
from workers.structured.bitmask import BitmaskApplier, apply_np, words
from workers.structured.compiler import GrammarCompiler


@dataclass
class DraftWalk:
    """One sequence's grammar walk over its drafts this step."""

    drafts: list[int]  # n drafted tokens, all grammar-valid (a stop token repeated after the grammar ends)
    masks: torch.Tensor  # [n+1, W] int32: mask of target row j = state after drafts[:j]
    advanced: int  # tokens the matcher accepted during the walk (<= n; fewer once a stop token ended it)


class StructuredDecoder:
    def __init__(self, compiler: GrammarCompiler, threads: int = 1):
        import xgrammar as xgr

        self.compiler = compiler
        self.vocab = compiler.vocab_size
        self.w = words(self.vocab)
        self.matchers: dict[str, Any] = {}
        self.specs: dict[str, StructuredSpec] = {}
        self.applier = BitmaskApplier()
        self._batch = xgr.BatchGrammarMatcher(max_threads=threads)  # the engine thread's
        self._batch_bg = xgr.BatchGrammarMatcher(max_threads=threads)  # the prefetch thread's
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="specfleet-grammar")
        keep = torch.full((self.w,), -1, dtype=torch.int32)
        for t in compiler.never:  # never-allowed special tokens (see compiler.py)
            keep[t // 32] &= ~(1 << (t % 32))
        self.keep = keep  # [W]
        stop = torch.zeros((self.w,), dtype=torch.int32)
        for t in compiler.stop_token_ids:
            if 0 <= t < self.vocab:
                stop[t // 32] |= 1 << (t % 32)
        self.stop_only = stop  # [W] mask after the grammar has ended
        self.stop_token = compiler.stop_token_ids[0] if compiler.stop_token_ids else 0
        self.compile_s = 0.0

    # ---- requests ----
    def add(self, request_id: str, spec: StructuredSpec) -> None:
        m = self.compiler.matcher(spec)
        first = torch.zeros((1, self.w), dtype=torch.int32)
        m.fill_next_token_bitmask(first)
        if not bool(((first[0] & self.keep) != 0).any()):  # e.g. {"anyOf": [{"$ref": "#"}]}
            raise InvalidRequest(f"{spec.param or 'the grammar'} admits no output at all", param=spec.param)
        self.matchers[request_id] = m
        self.specs[request_id] = spec

    def remove(self, request_id: str) -> None:
        self.matchers.pop(request_id, None)
        self.specs.pop(request_id, None)

    def has(self, request_id: str) -> bool:
        return request_id in self.matchers

    # ---- masks ----
    def _fill(self, batch: Any, rids: list[str]) -> torch.Tensor:
        """Next-token masks [len(rids), W] int32 for the requests' current states."""
        out = torch.empty((len(rids), self.w), dtype=torch.int32)
        ms = [self.matchers[r] for r in rids]
        live = [i for i, m in enumerate(ms) if not m.is_terminated()]
        if live:
            batch.batch_fill_next_token_bitmask([ms[i] for i in live], out, indices=live)
        for i, m in enumerate(ms):
            if m.is_terminated():
                out[i] = self.stop_only
        out &= self.keep
        return out

    def prefetch(self, rids: list[str]) -> Future | None:
        """Start the next-token masks of these requests (AR / final-prefill rows) in the worker thread."""
        if not rids:
            return None
        return self._pool.submit(self._fill, self._batch_bg, list(rids))

    @torch.inference_mode()  # the logits are inference tensors
    def mask_target(self, logits: torch.Tensor, rows: list[int], masks: list[torch.Tensor],
                    greedy: list[bool] | None = None) -> None:
        """logits [R, V] in place: rows[i] gets masks[i] ([W] each). A greedy row whose argmax the grammar
        allows is left as it is: the masked argmax is that same token (the first maximum is allowed), and a
        greedy row is only ever read through its argmax."""
        if not rows:
            return
        bm = torch.stack(masks)  # [k, W]
        if logits.device.type == "cpu":  # numpy: one thread, no intra-op wake-ups for a few rows
            ln, bmn = logits.numpy(), bm.numpy()
            keep = [j for j, r in enumerate(rows) if not (greedy and greedy[j] and _allows(bmn[j], int(ln[r].argmax())))]
            if keep:
                sel = [rows[j] for j in keep]
                sub = ln[sel]
                apply_np(sub, bmn[keep])
                ln[sel] = sub
            return
        idx = torch.tensor(rows, device=logits.device)
        sub = logits.index_select(0, idx)
        self.applier.apply(sub, bm)
        logits.index_copy_(0, idx, sub)

    # ---- drafting ----
    @torch.inference_mode()
    def draft(self, rids: list[str], logits: list[torch.Tensor], samplings: list[Any],
              generators: list[Any]) -> list[tuple[DraftWalk, torch.Tensor | None]]:
        """Masked drafting for constrained speculative sequences.

        rids[i] has drafter logits logits[i] [n_i, V] fp32. Position k of every sequence is masked by its
        grammar state after drafts 0..k-1 (one batched mask call per position), then drawn: the masked
        argmax (greedy requests) or a sample from q = softmax(masked logits / temperature), which is returned
        [n_i, V] for the verifier (any q is exact there; top-k / top-p stay on the target's side).
        """
        host = [x.float().cpu().numpy() if x.device.type != "cpu" else x.numpy() for x in logits]  # [n_i, V]
        n_max = max((x.shape[0] for x in host), default=0)
        walks = [DraftWalk([], torch.empty((x.shape[0] + 1, self.w), dtype=torch.int32), 0) for x in host]
        qs = [np.zeros((x.shape[0], x.shape[1]), dtype=np.float32) if not sp.greedy else None
              for x, sp in zip(host, samplings)]
        ms = [self.matchers[r] for r in rids]
        ended = [m.is_terminated() for m in ms]
        for k in range(n_max + 1):
            act = [i for i, x in enumerate(host) if k <= x.shape[0]]
            live = [j for j, i in enumerate(act) if not ended[i]]
            masks = torch.empty((len(act), self.w), dtype=torch.int32)
            if live:
                self._batch.batch_fill_next_token_bitmask([ms[act[j]] for j in live], masks, indices=live)
            for j, i in enumerate(act):
                if ended[i]:
                    masks[j] = self.stop_only
            masks &= self.keep
            for j, i in enumerate(act):
                walks[i].masks[k] = masks[j]
                if k == host[i].shape[0]:
                    continue
                row = host[i][k: k + 1]  # [1, V] view
                mask = masks[j: j + 1].numpy()
                t = int(row[0].argmax()) if qs[i] is None else -1
                if t < 0 or not _allows(mask[0], t):  # greedy with its argmax allowed needs no mask
                    apply_np(row, mask)  # masked in place
                    if qs[i] is None:
                        t = int(row[0].argmax())
                    else:
                        t = _sample(row[0], samplings[i].temperature, generators[i], qs[i][k])
                walks[i].drafts.append(t)
                if ended[i]:
                    continue
                if not ms[i].accept_token(t):
                    raise RuntimeError(f"grammar refused its own masked draft token {t}")
                walks[i].advanced += 1
                ended[i] = ms[i].is_terminated()
        out = []
        for i, w in enumerate(walks):
            q = None if qs[i] is None else torch.from_numpy(qs[i]).to(logits[i].device)
            out.append((w, q))
        return out

    def walk(self, request_id: str, drafts: list[int]) -> DraftWalk:
        """Drafts proposed without the grammar: advance over them while the grammar accepts them. Row j's mask
        is the state after drafts[:j]; past the first forbidden draft (rejected by the verifier, as the masked
        target cannot produce it) the rows repeat that position's mask."""
        m = self.matchers[request_id]
        masks = torch.empty((len(drafts) + 1, self.w), dtype=torch.int32)
        advanced, ok = 0, True
        for j in range(len(drafts) + 1):
            if not ok:
                masks[j] = masks[j - 1]
                continue
            if m.is_terminated():
                masks[j] = self.stop_only
            else:
                m.fill_next_token_bitmask(masks, j)
                masks[j] &= self.keep
            if j == len(drafts):
                break
            t = int(drafts[j])
            if m.is_terminated():
                ok = t in self.compiler.stop_token_ids
            elif (int(masks[j, t // 32]) >> (t % 32)) & 1 and m.accept_token(t):
                advanced += 1
            else:
                ok = False
        return DraftWalk(list(drafts), masks, advanced)

    # ---- commit ----
    def commit(self, request_id: str, tokens: list[int], walk: DraftWalk | None = None) -> None:
        """The step committed ``tokens``: with a draft walk, the first len(tokens)-1 are accepted drafts."""
        m = self.matchers[request_id]
        if walk is not None:
            accepted = len(tokens) - 1
            keep = min(accepted, walk.advanced)
            if walk.advanced > keep:
                m.rollback(walk.advanced - keep)
            tokens = tokens[keep:] if accepted <= walk.advanced else []
        for t in tokens:
            if m.is_terminated():
                if t in self.compiler.stop_token_ids:
                    continue
                raise RuntimeError(f"token {t} after the grammar ended")
            if not m.accept_token(int(t)):
                raise RuntimeError(f"the grammar refused committed token {t}")

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def _allows(mask_row: np.ndarray, token: int) -> bool:
    """mask_row [W] int32: is token allowed?"""
    return bool((int(mask_row[token >> 5]) >> (token & 31)) & 1)


def _sample(row: np.ndarray, temperature: float, generator: Any, q_out: np.ndarray) -> int:
    """A token from softmax(row / temperature) (forbidden = -inf -> 0); the distribution goes to q_out."""
    x = row / max(float(temperature), 1e-5)
    x -= x.max()
    np.exp(x, out=q_out)
    q_out /= q_out.sum()
    u = float(torch.rand(1, generator=generator))
    cdf = np.cumsum(q_out, dtype=np.float64)
    t = int(np.searchsorted(cdf, u * cdf[-1], side="right"))
    t = min(t, len(q_out) - 1)
    while q_out[t] == 0.0:  # u at a boundary of a zero-probability run: step back to an allowed token
        t -= 1
    return t


def build_decoder(tokenizer: Any, vocab_size: int, stop_token_ids: list[int]) -> StructuredDecoder | None:
    """None when there is no tokenizer (structured requests are then refused)."""
    if tokenizer is None:
        return None
    return StructuredDecoder(GrammarCompiler(tokenizer, vocab_size, stop_token_ids))


def require(decoder: StructuredDecoder | None, spec: StructuredSpec) -> StructuredDecoder:
    if decoder is None:
        raise InvalidRequest("structured outputs need the model's tokenizer; this engine has none", param=spec.param)
    return decoder
