"""Stage 2 of the trainer: corpus records -> DFlash training batches (many draft blocks per sequence).

Convention (the engine's, workers/engine/step.py + runner.build_draft_inputs): the anchor of a block is a
committed token at position p that has no K/V yet; the block's rows are positions p..p+B-1 with input ids
[token_p, MASK x (B-1)]; the drafter's context is the target features of positions < p; row k >= 1 is
verified against the target's greedy token at p+k, so its label is token p+k. In a response of a prompt of
length P, the first anchor is p = P (the token the prefill pass sampled); the last useful one is T-2.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from workers.training.corpus import Record

IGNORE = -100


@dataclass
class Sample:
    id: str
    category: str
    tokens: torch.Tensor  # [T] long: prompt + response
    prompt_len: int  # P
    finish: str  # "stop" | "length"

    @property
    def num_anchors(self) -> int:
        return max(0, len(self.tokens) - 1 - self.prompt_len)


def to_samples(records: list[Record], split: str | None = None) -> list[Sample]:
    return [Sample(r.id, r.category,
                   torch.tensor(r.prompt_ids + r.response_ids, dtype=torch.long), len(r.prompt_ids), r.finish)
            for r in records if (split is None or r.split == split) and len(r.response_ids) >= 2]


@dataclass
class Batch:
    tokens: torch.Tensor  # [b, C] long: the context tokens 0..C-1 of each sequence (right-padded with 0)
    anchors: torch.Tensor  # [b, N] long (0 for padding blocks)
    block_len: torch.Tensor  # [b, N] long: visible rows per block (B; fewer where serving would shorten it)
    block_ids: torch.Tensor  # [b, N*B] long: anchor then MASK, per block
    labels: torch.Tensor  # [b, N*B] long: token p+k for rows k >= 1, IGNORE elsewhere
    categories: list[str]
    num_blocks: list[int]  # real blocks per sequence

    @property
    def block_size(self) -> int:
        return self.block_ids.shape[1] // max(1, self.anchors.shape[1])


def random_anchors(s: Sample, n: int, rng: random.Random) -> list[int]:
    cands = range(s.prompt_len, len(s.tokens) - 1)  # p in [P, T-2]: at least one label at p+1
    return sorted(rng.sample(cands, n)) if len(cands) > n else list(cands)


def serving_block_len(s: Sample, p: int, block_size: int, max_new_tokens: int | None) -> int:
    """Rows the engine drafts at anchor p: it never drafts past max_tokens (scheduler.decode_block)."""
    if max_new_tokens is None:
        return block_size
    produced = p - s.prompt_len + 1  # response tokens committed once the anchor is
    return max(1, min(block_size, max_new_tokens - produced))


def make_batch(samples: list[Sample], anchors: list[list[int]], block_size: int, mask_token_id: int,
               block_lens: list[list[int]] | None = None) -> Batch:
    """Blocks at the given anchor positions of each sample (block_lens: per block, default full)."""
    B, b = block_size, len(samples)
    n = max(1, max(len(a) for a in anchors))
    C = max(1, max((max(a) for a in anchors if a), default=1))  # features of positions < the last anchor
    tokens = torch.zeros(b, C, dtype=torch.long)
    anc = torch.zeros(b, n, dtype=torch.long)
    blen = torch.full((b, n), B, dtype=torch.long)
    block_ids = torch.full((b, n, B), mask_token_id, dtype=torch.long)
    labels = torch.full((b, n, B), IGNORE, dtype=torch.long)
    k = torch.arange(1, B)
    for i, (s, an) in enumerate(zip(samples, anchors)):
        T = len(s.tokens)
        m = min(C, T)
        tokens[i, :m] = s.tokens[:m]
        if not an:
            continue
        a = torch.tensor(an, dtype=torch.long)
        anc[i, : len(an)] = a
        if block_lens is not None:
            blen[i, : len(an)] = torch.tensor(block_lens[i], dtype=torch.long)
        block_ids[i, : len(an), 0] = s.tokens[a]
        tgt = a[:, None] + k  # [n_i, B-1]
        ok = (tgt < T) & (k < blen[i, : len(an), None])
        labels[i, : len(an), 1:] = torch.where(ok, s.tokens[tgt.clamp(max=T - 1)], IGNORE)
    return Batch(tokens, anc, blen, block_ids.view(b, n * B), labels.view(b, n * B), [s.category for s in samples],
                 [len(a) for a in anchors])


class MixSampler:
    """Sequences per step by category weight (None: as often as the corpus holds them), without replacement
    inside each category (a fresh seeded permutation per epoch). State = per-category (epoch, cursor), saved in
    the checkpoint, so a resumed run draws exactly what the uninterrupted one would have."""

    def __init__(self, samples: list[Sample], weights: dict[str, float] | None, seed: int):
        self.by_cat: dict[str, list[Sample]] = {}
        for s in samples:
            self.by_cat.setdefault(s.category, []).append(s)
        if weights is None:
            weights = {c: float(len(v)) for c, v in self.by_cat.items()}
        unknown = sorted(c for c, w in weights.items() if w > 0 and c not in self.by_cat)
        if unknown:
            raise ValueError(f"data mix names categories with no training data: {unknown}; "
                             f"the corpus holds {sorted(self.by_cat)}")
        self.cats = sorted(c for c in self.by_cat if weights.get(c, 0) > 0)
        if not self.cats:
            raise ValueError("the data mix gives every category weight 0")
        self.weights = [weights[c] for c in self.cats]
        self.seed = seed
        self.state: dict[str, list[int]] = {c: [0, 0] for c in self.cats}
        self._perms: dict[tuple[str, int], list[int]] = {}

    def _perm(self, cat: str, epoch: int) -> list[int]:
        key = (cat, epoch)
        if key not in self._perms:
            idx = list(range(len(self.by_cat[cat])))
            random.Random(f"{self.seed}:{cat}:{epoch}").shuffle(idx)
            self._perms = {k: v for k, v in self._perms.items() if k[0] != cat}
            self._perms[key] = idx
        return self._perms[key]

    def draw(self, n: int, step: int) -> list[Sample]:
        rng = random.Random(self.seed * 1_000_003 + step)
        out = []
        for cat in rng.choices(self.cats, self.weights, k=n):
            epoch, cur = self.state[cat]
            rows = self.by_cat[cat]
            out.append(rows[self._perm(cat, epoch)[cur]])
            cur += 1
            self.state[cat] = [epoch + 1, 0] if cur >= len(rows) else [epoch, cur]
        return out

    def epochs(self) -> dict[str, float]:
        return {c: round(e + cur / len(self.by_cat[c]), 3) for c, (e, cur) in self.state.items()}


def parse_mix(text: str | None) -> dict[str, float] | None:
    """'code=4,tool_caller=4,math=1' -> weights; unnamed categories get 0. None/'' -> None (corpus mix)."""
    if not text:
        return None
    out = {}
    for part in text.split(","):
        if not part.strip():
            continue
        k, sep, v = part.partition("=")
        try:
            w = float(v)
        except ValueError:
            w = -1.0
        if not sep or w < 0:
            raise ValueError(f"data mix entry {part!r} must be category=weight with weight >= 0")
        out[k.strip()] = w
    return out
