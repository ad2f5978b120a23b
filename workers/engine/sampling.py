"""Logit processing and sampling shared by AR sampling, drafting and verification.

The same processing (temperature -> top-k -> top-p -> softmax) gives the target's p and the drafter's q,
so speculative sampling stays lossless with respect to the processed target distribution.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from workers.engine.params import SamplingParams


@dataclass
class RowParams:
    """Per-row sampling settings as tensors (rows of a logits matrix)."""

    temperature: torch.Tensor  # [R] float (> 0 for rows that are processed)
    top_k: torch.Tensor  # [R] long, 0 = off
    top_p: torch.Tensor  # [R] float, 1 = off

    @classmethod
    def build(cls, params: list[SamplingParams], device) -> "RowParams":
        return cls(
            torch.tensor([max(p.temperature, 1e-5) for p in params], dtype=torch.float32, device=device),
            torch.tensor([p.top_k for p in params], dtype=torch.long, device=device),
            torch.tensor([p.top_p for p in params], dtype=torch.float32, device=device),
        )

    def repeat(self, n: int) -> "RowParams":
        """Each row repeated n times (one per block position)."""
        return RowParams(*(t.repeat_interleave(n) for t in (self.temperature, self.top_k, self.top_p)))


def processed_probs(logits: torch.Tensor, rp: RowParams) -> torch.Tensor:
    """logits [R, V] -> probabilities [R, V] fp32 after temperature, top-k, top-p."""
    x = logits.float() / rp.temperature[:, None]
    vocab = x.shape[-1]
    if bool((rp.top_k > 0).any()):
        k = torch.where(rp.top_k > 0, rp.top_k.clamp(max=vocab), torch.full_like(rp.top_k, vocab))
        kth = torch.topk(x, int(k.max()), dim=-1).values.gather(1, (k - 1)[:, None])  # [R, 1]
        x = x.masked_fill(x < kth, float("-inf"))
    if bool((rp.top_p < 1.0).any()):
        sorted_x, order = torch.sort(x, dim=-1, descending=True)
        sp = torch.softmax(sorted_x, dim=-1)
        before = sp.cumsum(-1) - sp  # mass strictly before each token
        drop_sorted = before >= rp.top_p[:, None]  # keeps the smallest prefix with mass >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
        x = x.masked_fill(drop, float("-inf"))
    return torch.softmax(x, dim=-1)


def sample(probs: torch.Tensor, generators: list[torch.Generator | None]) -> torch.Tensor:
    """probs [R, V] -> token ids [R]; a row's own generator when it has a seed."""
    if all(g is generators[0] for g in generators):
        return torch.multinomial(probs, 1, generator=generators[0]).squeeze(1)
    return torch.cat([torch.multinomial(probs[i], 1, generator=g) for i, g in enumerate(generators)])
