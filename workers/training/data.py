"""Stage 3 of the trainer: cached target features -> DFlash training batches (many anchors per sequence).

A sample is one prompt+response with the raw target layer outputs of every position but the last
([T-1, n_feat*H], saved during generation). A batch packs several sequences; in each, ``n_anchors`` random
anchor positions p in the response each get a block of queries [anchor, MASK x (B-1)] at positions p..p+B-1.
Block-sparse mask: the rows of block a see the context features at positions < p_a and all rows of their own
block (non-causal inside the block), nothing else; labels are the target's tokens at p+1..p+B-1.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import torch

from workers.training.generate import features_dir, read_jsonl

IGNORE = -100


@dataclass
class Sample:
    id: str
    category: str
    tokens: torch.Tensor  # [T] int64, prompt + response
    prompt_len: int  # P: anchors live in [P, T-2]
    features: torch.Tensor  # [T-1, n_feat*H] bf16, raw target layer outputs at positions 0..T-2

    @property
    def num_anchors(self) -> int:
        return max(0, len(self.tokens) - 1 - self.prompt_len)


@dataclass
class Batch:
    block_ids: torch.Tensor  # [b, Q] token ids: anchor then mask ids, per block
    labels: torch.Tensor  # [b, Q] target token for rows k>=1 of each block, IGNORE elsewhere
    offsets: torch.Tensor  # [b, Q] k = row index inside its block (0 = anchor)
    q_positions: torch.Tensor  # [b, Q]
    ctx_features: torch.Tensor  # [b, C, F] float32
    ctx_positions: torch.Tensor  # [b, C]
    attn_mask: torch.Tensor  # [b, 1, Q, C+Q] bool (True = attend)
    categories: list[str]
    anchors_per_seq: list[int]


def load_samples(responses: Path, feature_width: int, vocab_size: int, split: str | None = "train") -> list[Sample]:
    """Records of ``responses`` (JSONL from generate.py) with their feature shards; corrupted data -> ValueError."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    recs = [r for r in read_jsonl(responses) if split is None or r.get("split") == split]
    fdir = features_dir(responses)
    by_shard: dict[str, list[dict]] = {}
    for r in recs:
        if "features" not in r:
            raise ValueError(f"{responses}: record {r.get('id')} has no cached features (regenerate with features)")
        by_shard.setdefault(r["features"], []).append(r)
    out = []
    for shard, rs in sorted(by_shard.items()):
        path = responses.parent / shard if "/" in shard else fdir / shard  # "dir/shard" = merged from a worker
        try:
            tensors = load_file(str(path))
        except (OSError, SafetensorError) as exc:
            raise ValueError(f"feature shard {path} is missing or corrupted ({exc}); delete "
                             f"{responses} and {fdir} to regenerate") from exc
        for r in rs:
            toks = torch.tensor(r["prompt_ids"] + r["response_ids"], dtype=torch.long)
            f = tensors.get(r["id"])
            if f is None or f.dim() != 2 or f.shape[0] != len(toks) - 1 or f.shape[1] != feature_width:
                got = None if f is None else tuple(f.shape)
                raise ValueError(f"features of {r['id']} in {shard} have shape {got}, expected "
                                 f"({len(toks) - 1}, {feature_width}): corrupted data or other target layers")
            if len(toks) and (int(toks.min()) < 0 or int(toks.max()) >= vocab_size):
                raise ValueError(f"record {r['id']} has token ids outside the target vocabulary ({vocab_size})")
            out.append(Sample(r["id"], r["category"], toks, len(r["prompt_ids"]), f))
    return out


def response_vocab(samples: list[Sample]) -> torch.Tensor:
    """Sorted unique token ids that ever appear as a label (the response tokens)."""
    return torch.unique(torch.cat([s.tokens[s.prompt_len:] for s in samples]))


def choose_anchors(sample: Sample, n_anchors: int, rng: random.Random, evenly: bool = False) -> list[int]:
    lo, hi = sample.prompt_len, len(sample.tokens) - 2  # need at least one label at p+1 <= T-1
    if hi < lo:
        return []
    cands = list(range(lo, hi + 1))
    if len(cands) <= n_anchors:
        return cands
    if evenly:
        step = len(cands) / n_anchors
        return [cands[int(i * step)] for i in range(n_anchors)]
    return sorted(rng.sample(cands, n_anchors))


def make_batch(samples: list[Sample], n_anchors: int, block_size: int, mask_token_id: int, rng: random.Random,
               evenly: bool = False) -> Batch:
    B = block_size
    anchors = [choose_anchors(s, n_anchors, rng, evenly) for s in samples]
    Q = max(1, max(len(a) for a in anchors)) * B
    C = max(1, max((max(a) if a else 1) for a in anchors))  # context rows 0..max_anchor-1
    b, F = len(samples), samples[0].features.shape[1]
    block_ids = torch.full((b, Q), mask_token_id, dtype=torch.long)
    labels = torch.full((b, Q), IGNORE, dtype=torch.long)
    offsets = torch.arange(Q).remainder(B).expand(b, Q).clone()
    q_pos = torch.zeros(b, Q, dtype=torch.long)
    ctx = torch.zeros(b, C, F, dtype=torch.float32)
    ctx_pos = torch.arange(C).expand(b, C).clone()
    mask = torch.zeros(b, 1, Q, C + Q, dtype=torch.bool)
    k = torch.arange(B)
    for i, (s, an) in enumerate(zip(samples, anchors)):
        T = len(s.tokens)
        n_ctx = min(C, T - 1)
        ctx[i, :n_ctx] = s.features[:n_ctx].float()
        for j, p in enumerate(an):
            r0 = j * B
            block_ids[i, r0] = s.tokens[p]
            q_pos[i, r0 : r0 + B] = p + k
            tgt = p + k[1:]
            ok = tgt < T
            labels[i, r0 + 1 : r0 + B][ok] = s.tokens[tgt[ok]]
            mask[i, 0, r0 : r0 + B, :p] = True  # context strictly before the anchor
            mask[i, 0, r0 : r0 + B, C + r0 : C + r0 + B] = True  # its own block, non-causal
        for r in range(len(an) * B, Q):  # padding rows attend to themselves only (no NaN rows)
            mask[i, 0, r, C + r] = True
            q_pos[i, r] = 0
    return Batch(block_ids, labels, offsets, q_pos, ctx, ctx_pos, mask, [s.category for s in samples],
                 [len(a) for a in anchors])
