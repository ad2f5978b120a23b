"""Verification of drafted blocks (the rejection sampler), separate from the proposer.

Row layout for one sequence with block size b: target rows p[0..b-1] (p[j] predicts the token after
block position j), drafts d[0..b-2] (d[j] sits at block position j+1, proposed with drafter dist q[j]).

Greedy: accept d[j] while d[j] == argmax p[j]; then commit argmax p at the first mismatch (bonus).
Stochastic (standard speculative sampling, Leviathan et al. / Chen et al.): accept d[j] with probability
min(1, p[j](d)/q[j](d)); on the first rejection sample from norm(max(0, p[j] - q[j])) and stop; if all are
accepted, sample the bonus from p[b-1]. Every committed token is then distributed exactly as the target
alone would sample it. ``q=None`` means the drafter drafted greedily (q one-hot at d).
"""
from __future__ import annotations

import torch


def verify_greedy(target_argmax: torch.Tensor, drafts: torch.Tensor, block_lens: torch.Tensor) -> torch.Tensor:
    """target_argmax [B, Q] long, drafts [B, Q-1], block_lens [B] -> number of accepted drafts [B]."""
    q1 = drafts.shape[1]
    valid = torch.arange(q1, device=drafts.device)[None, :] < (block_lens[:, None] - 1)
    match = (drafts == target_argmax[:, :-1]) & valid
    return match.long().cumprod(dim=1).sum(dim=1)


def committed_greedy(target_argmax: list[int], drafts: list[int], accepted: int) -> list[int]:
    return drafts[:accepted] + [target_argmax[accepted]]


def verify_stochastic(
    p: torch.Tensor,  # [b, V] processed target probabilities
    q: torch.Tensor | None,  # [b-1, V] drafter probabilities the drafts were sampled from; None = greedy drafts
    drafts: torch.Tensor,  # [b-1] long
    generator: torch.Generator | None = None,
) -> tuple[int, list[int]]:
    """-> (number of accepted drafts, committed tokens = accepted drafts + one corrected/bonus token)."""
    n = drafts.shape[0]
    rows = torch.arange(n, device=p.device)
    p_d = p[rows, drafts]  # [b-1]
    q_d = torch.ones_like(p_d) if q is None else q[rows, drafts]
    u = torch.rand(n, generator=generator, device=p.device)
    rejected = (u * q_d >= p_d).nonzero()  # accept iff u < p/q  <=>  u*q < p
    a = int(rejected[0, 0]) if rejected.numel() else n
    if a < n:
        if q is None:
            residual = p[a].clone()
            residual[drafts[a]] = 0.0
        else:
            residual = (p[a] - q[a]).clamp_min(0.0)
        total = residual.sum()
        dist = residual / total if float(total) > 0 else p[a]
    else:
        dist = p[n]
    last = int(torch.multinomial(dist, 1, generator=generator))
    return a, drafts[:a].tolist() + [last]
