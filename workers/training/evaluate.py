"""Offline acceptance, computed the way the engine drafts and verifies at temperature 0.

For a held-out corpus sequence (prompt P tokens, the target's greedy response up to T), every anchor
p in [P, T-2] is drafted with the block the engine would use there (``serving_block_len``: shortened near
``max_tokens``), over the target features of positions < p, and its accepted prefix is the number of leading
draft rows equal to the target's tokens. ``walk`` then replays speculative decoding along the sequence:
anchor P (the token the prefill pass sampled), commit accepted + 1 (the bonus), jump, a pass of 1 where the
engine runs autoregressively, and no bonus after EOS. Its passes are exactly the engine's ``RequestOutput.committed`` entries after
the first output (a test checks it against the engine), so tau here is the engine's tau at T=0, up to the
bf16 numerics of batched serving.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from workers.training.block_forward import blocks_forward
from workers.training.data import IGNORE, Sample, make_batch, serving_block_len
from workers.training.features import target_features
from workers.training.loss import argmax_rows


def walk(accepted: list[int], prompt_len: int, length: int, block_size: int, max_new_tokens: int | None) -> list[int]:
    """Tokens committed per target pass when decoding speculatively along the sequence (pure, torch-free).

    accepted[j - P] = accepted draft rows at anchor j, drafted with ``serving_block_len`` rows.
    """
    passes, j = [], prompt_len
    while j < length - 1:
        if max_new_tokens is not None and max_new_tokens - (j - prompt_len + 1) <= 0:
            break
        blk = block_size if max_new_tokens is None else min(block_size, max_new_tokens - (j - prompt_len + 1))
        c = 1 if blk <= 1 else accepted[j - prompt_len] + 1
        c = min(c, length - 1 - j)  # a pass that reaches EOS commits nothing after it (no bonus token)
        passes.append(c)
        j += c
    return passes


def accept_by_position(passes: list[int], block_size: int) -> list[float]:
    """P(draft position k accepted), k = 1..B-1, over target passes (as benchmarks/acceptance.py)."""
    n = max(1, len(passes))
    return [sum(c - 1 >= k for c in passes) / n for k in range(1, block_size)]


@torch.no_grad()
def sample_acceptance(drafter, target, sample: Sample, max_new_tokens: int | None, anchors_per_chunk: int = 128
                      ) -> list[int]:
    """Accepted draft rows at every anchor of ``sample`` (list indexed by anchor - P)."""
    c = drafter.config
    B, P, T = c.block_size, sample.prompt_len, len(sample.tokens)
    anchors = list(range(P, T - 1))
    if not anchors:
        return []
    dev = target.lm_head.weight.device
    feats = target_features(target, sample.tokens[None, : T - 2 + 1].to(dev), c.target_layer_ids)  # [1, T-1, F]
    emb_w, head_w = target.model.embed_tokens.weight, target.lm_head.weight
    out: list[int] = []
    for a0 in range(0, len(anchors), anchors_per_chunk):
        an = anchors[a0: a0 + anchors_per_chunk]
        blen = [serving_block_len(sample, p, B, max_new_tokens) for p in an]
        b = make_batch([sample], [an], B, c.mask_token_id, [blen])
        h = blocks_forward(drafter, F.embedding(b.block_ids.to(dev), emb_w), feats[:, : b.tokens.shape[1]],
                           b.anchors.to(dev), b.block_len.to(dev))
        dv = getattr(drafter, "draft_vocab", None)  # drafts come from the draft vocabulary, as served
        pred = (argmax_rows(h, head_w) if dv is None else dv[argmax_rows(h, head_w[dv.to(head_w.device)])])
        pred = pred.view(len(an), B).cpu()
        lab = b.labels.view(len(an), B)
        match = (pred[:, 1:] == lab[:, 1:]) & (lab[:, 1:] != IGNORE)
        out.extend(torch.cumprod(match.int(), dim=1).sum(1).tolist())
    return out


@torch.no_grad()
def offline_tau(drafter, target, samples: list[Sample], max_new_tokens: int | None) -> dict:
    """tau per category (walked passes pooled, like the engine benchmark) + all-anchor figures.

    The drafter is evaluated in the target's dtype (what serving loads), on a copy: training weights untouched.
    """
    dt = target.lm_head.weight.dtype
    d = copy.deepcopy(drafter).to(dt).eval() if next(drafter.parameters()).dtype != dt else drafter
    was = drafter.training
    d.eval()
    B = drafter.config.block_size
    passes: dict[str, list[int]] = {}
    anchors_acc: dict[str, list[int]] = {}
    for s in samples:
        acc = sample_acceptance(d, target, s, max_new_tokens)
        passes.setdefault(s.category, []).extend(walk(acc, s.prompt_len, len(s.tokens), B, max_new_tokens))
        anchors_acc.setdefault(s.category, []).extend(acc)
    if d is drafter and was:
        drafter.train()
    by_cat = {}
    for cat in sorted(passes):
        p, a = passes[cat], anchors_acc[cat]
        by_cat[cat] = {"tau": round(sum(p) / max(1, len(p)), 3), "passes": len(p),
                       "accept_by_position": [round(x, 3) for x in accept_by_position(p, B)],
                       "tau_all_anchors": round(1 + sum(a) / max(1, len(a)), 3)}
    allp = [c for v in passes.values() for c in v]
    return {"tau": round(sum(allp) / max(1, len(allp)), 3), "passes": len(allp),
            "p_first": round(accept_by_position(allp, B)[0], 3) if allp and B > 1 else 0.0,
            "by_category": by_cat, "sequences": len(samples)}
