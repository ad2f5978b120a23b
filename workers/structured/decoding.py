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

Greedy sequences compute masks only where they change a token (a full-vocab mask costs 0.1-0.2 ms, a
matcher step microseconds): a greedy draft is the drafter's argmax when the matcher accepts it (xgrammar's
accept_token refuses without advancing exactly the tokens the mask forbids, once the never-allowed special
tokens are kept out), and a greedy target row is settled lazily (`settle_greedy`): an argmax equal to the
row's grammar-valid draft is allowed; the first other row is checked against the matcher rolled back to its
state and masked only if refused, and the rows after the first row whose (masked) argmax differs from its
draft are not read by the greedy verifier, so they are left as they are.
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

    drafts: list[int]  # n drafted tokens (a stop token repeated after the grammar ends)
    masks: list[torch.Tensor | None]  # n+1 rows [W] int32: mask of target row j = state after drafts[:j];
    #                                   None where not computed (greedy rows compute masks only when needed)
    advanced: int  # tokens the matcher accepted during the walk (<= n; fewer once a stop token ended it)
    valid: int  # leading drafts that are grammar-valid (n when drawn through the grammar)
    at: int  # the matcher's position now, in tokens accepted since the step began (<= advanced)


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
        self._keep_np = keep.numpy()
        self._stops = set(compiler.stop_token_ids)
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

    def _mask_now(self, m: Any) -> torch.Tensor:
        """[W] int32: the next-token mask of one matcher's current state."""
        if m.is_terminated():
            return self.stop_only.clone()
        out = torch.empty((1, self.w), dtype=torch.int32)
        m.fill_next_token_bitmask(out)
        out &= self.keep
        return out[0]

    def _accept(self, m: Any, t: int) -> bool:
        """Advance the (not terminated) matcher over t iff its mask allows t: xgrammar's accept_token refuses,
        without advancing, exactly the tokens its mask forbids, apart from the never-allowed ones."""
        return 0 <= t < self.vocab and _allows(self._keep_np, t) and bool(m.accept_token(t))

    def _to(self, m: Any, walk: DraftWalk, j: int) -> None:
        """Move the matcher to target row j's state (after drafts[:j]; past walk.advanced the grammar ended)."""
        j = min(j, walk.advanced)
        if walk.at > j:
            m.rollback(walk.at - j)
        for t in walk.drafts[walk.at: j]:
            if not m.accept_token(int(t)):
                raise RuntimeError(f"the grammar refused draft token {t} it accepted before")
        walk.at = j

    def _allowed_at(self, m: Any, walk: DraftWalk, j: int, t: int) -> bool:
        """Does target row j's grammar state allow token t?"""
        if walk.masks[j] is not None:
            return _allows(walk.masks[j].numpy(), t)
        self._to(m, walk, j)
        if m.is_terminated():
            return t in self._stops
        if self._accept(m, t):
            m.rollback(1)
            return True
        return False

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
        argmax (greedy requests; their unmasked argmax when the matcher accepts it, with no mask computed,
        which is the same token) or a sample from q = softmax(masked logits / temperature), which is returned
        [n_i, V] for the verifier (any q is exact there; top-k / top-p stay on the target's side).
        """
        host = [x.float().cpu().numpy() if x.device.type != "cpu" else x.numpy() for x in logits]  # [n_i, V]
        n_max = max((x.shape[0] for x in host), default=0)
        walks = [DraftWalk([], [None] * (x.shape[0] + 1), 0, x.shape[0], 0) for x in host]
        qs = [np.zeros((x.shape[0], x.shape[1]), dtype=np.float32) if not sp.greedy else None
              for x, sp in zip(host, samplings)]
        ms = [self.matchers[r] for r in rids]
        ended = [m.is_terminated() for m in ms]
        for k in range(n_max + 1):
            need = []  # sequences whose position k needs its mask: sampled ones, greedy ones whose argmax is refused
            for i, x in enumerate(host):
                if k > x.shape[0]:
                    continue
                if qs[i] is None:
                    if k == x.shape[0]:
                        continue  # the last target row's mask: computed later if that row needs it
                    t = int(x[k].argmax())
                    if ended[i] and t in self._stops:
                        walks[i].drafts.append(t)
                        continue
                    if not ended[i] and self._accept(ms[i], t):  # the matcher advanced over its argmax
                        walks[i].drafts.append(t)
                        walks[i].advanced += 1
                        ended[i] = ms[i].is_terminated()
                        continue
                need.append(i)
            if not need:
                continue
            masks = self._fill(self._batch, [rids[i] for i in need])
            for j, i in enumerate(need):
                walks[i].masks[k] = masks[j]
                if k == host[i].shape[0]:
                    continue
                row = host[i][k: k + 1]  # [1, V] view
                apply_np(row, masks[j: j + 1].numpy())  # masked in place
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
        for w in walks:
            w.at = w.advanced
        out = []
        for i, w in enumerate(walks):
            q = None if qs[i] is None else torch.from_numpy(qs[i]).to(logits[i].device)
            out.append((w, q))
        return out

    def walk(self, request_id: str, drafts: list[int], greedy: bool = False) -> DraftWalk:
        """Drafts proposed without the grammar: advance over them while the grammar accepts them. Row j's mask
        is the state after drafts[:j]; past the first forbidden draft (rejected by the verifier, as the masked
        target cannot produce it) the rows repeat that position's mask. A greedy request computes no mask
        here (`settle_greedy` does where one is needed)."""
        m = self.matchers[request_id]
        n = len(drafts)
        masks: list[torch.Tensor | None] = [None] * (n + 1)
        advanced, valid = 0, n
        for j in range(n + 1):
            if not greedy:
                masks[j] = self._mask_now(m)
            if j == n:
                break
            t = int(drafts[j])
            if m.is_terminated():
                if t not in self._stops:
                    valid = j
                    break
            elif self._accept(m, t):
                advanced += 1
            else:
                valid = j
                break
        if not greedy:
            for j in range(valid + 1, n + 1):
                masks[j] = masks[valid]
        return DraftWalk(list(drafts), masks, advanced, valid, advanced)

    # ---- greedy target rows ----
    @torch.inference_mode()
    def settle_greedy(self, request_id: str, walk: DraftWalk, logits: torch.Tensor, r0: int, n: int) -> None:
        """A greedy request's target rows r0 .. r0+n-1 of logits [R, V] (row j: state after walk.drafts[:j]),
        masked in place where needed so that the greedy verifier reads the masked argmax: rows 0.. up to the
        first row whose (masked) argmax is not its grammar-valid draft; the rows after it are not read."""
        m = self.matchers[request_id]
        cpu = logits.device.type == "cpu"
        ln = logits.numpy() if cpu else None
        am = None if cpu else logits[r0: r0 + n].argmax(-1).tolist()
        for j in range(n):
            a = int(ln[r0 + j].argmax()) if cpu else am[j]
            if j < walk.valid and a == walk.drafts[j]:
                continue  # a grammar-valid draft is allowed in its row
            if self._allowed_at(m, walk, j, a):
                return  # the masked argmax is a (the first maximum is allowed): the verifier stops here
            if walk.masks[j] is None:
                self._to(m, walk, j)
                walk.masks[j] = self._mask_now(m)
            if cpu:
                apply_np(ln[r0 + j: r0 + j + 1], walk.masks[j][None].numpy())
                a = int(ln[r0 + j].argmax())
            else:
                row = logits[r0 + j: r0 + j + 1]
                self.applier.apply(row, walk.masks[j][None])
                a = int(row.argmax())
            if not (j < walk.valid and a == walk.drafts[j]):
                return

    # ---- commit ----
    def commit(self, request_id: str, tokens: list[int], walk: DraftWalk | None = None) -> None:
        """The step committed ``tokens``: with a draft walk, the first len(tokens)-1 are accepted drafts."""
        m = self.matchers[request_id]
        if walk is not None:
            keep = min(len(tokens) - 1, walk.advanced)
            self._to(m, walk, keep)  # the accepted prefix's state (drafts past `advanced` are stop tokens)
            tokens = tokens[keep:]
        for t in tokens:
            if m.is_terminated():
                if t in self._stops:
                    continue
                raise RuntimeError(f"token {t} after the grammar ended")
            if not m.accept_token(int(t)):
                raise RuntimeError(f"the grammar refused committed token {t}")

    def undo(self, request_id: str, walk: DraftWalk) -> None:
        """The step failed before committing: back to the state before the walk."""
        self._to(self.matchers[request_id], walk, 0)

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
