"""Verification of drafted blocks (the rejection sampler): the same for every proposer.

Row layout for one sequence with block size b: target rows p[0..b-1] (p[j] predicts the token after
block position j), drafts d[0..b-2] (d[j] sits at block position j+1, proposed with drafter dist q[j]).

Greedy: accept d[j] while d[j] == argmax p[j]; then commit argmax p at the first mismatch (bonus).
Stochastic (standard speculative sampling, Leviathan et al. / Chen et al.): accept d[j] with probability
min(1, p[j](d)/q[j](d)); on the first rejection sample from norm(max(0, p[j] - q[j])) and stop; if all are
accepted, sample the bonus from p[b-1]. Every committed token is then distributed exactly as the target
alone would sample it. ``q=None`` means the drafts are deterministic (argmax, lookup: q one-hot at d).

``verify_blocks`` verifies every block of a step in one call (the step and the tests call it): the greedy
blocks batched in one tensor op, the stochastic ones each with their own generator.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from workers.engine.params import SamplingParams
from workers.engine.sampling import RowParams, processed_probs
from workers.kernels import cpu as cpu_kernels


@dataclass
class TargetRows:
    """The target's side of a step, per logits row: its argmax, and for rows of sampled requests the
    processed probabilities (temperature -> top-k -> top-p, the same processing the drafter's q gets)."""

    argmax: list[int]  # [R]
    probs: torch.Tensor | None  # [S, V] fp32, the rows of sampled (non-greedy) requests
    prob_row: dict[int, int]  # logits row -> row of probs

    @classmethod
    def build(cls, logits: torch.Tensor, params: list[SamplingParams]) -> "TargetRows":
        """logits [R, V]; params[r]: the sampling settings of the request that owns row r."""
        stoch = [r for r, p in enumerate(params) if not p.greedy]
        probs = None
        if stoch:
            probs = processed_probs(logits[torch.tensor(stoch, device=logits.device)],
                                    RowParams.build([params[r] for r in stoch], logits.device))
        return cls(cpu_kernels.argmax(logits).tolist(), probs, {r: i for i, r in enumerate(stoch)})

    def p(self, row: int, n: int = 1) -> torch.Tensor:
        """[n, V] processed probabilities of logits rows row .. row+n-1 (rows of one request)."""
        i = self.prob_row[row]
        return self.probs[i: i + n]


@dataclass
class BlockToVerify:
    row: int  # logits row of block position 0; rows row .. row+len(drafts) belong to this block
    drafts: list[int]  # the proposed tokens
    draft_probs: torch.Tensor | None  # [len(drafts), V] what they were sampled from; None = deterministic
    greedy: bool  # the request decodes greedily
    generator: torch.Generator | None = None


@dataclass
class Verdict:
    accepted: int  # drafts accepted
    tokens: list[int]  # committed: the accepted drafts + one corrected (or bonus) token


def verify_blocks(target: TargetRows, blocks: list[BlockToVerify]) -> list[Verdict]:
    out: list[Verdict | None] = [None] * len(blocks)
    greedy = [i for i, b in enumerate(blocks) if b.greedy]
    if greedy:
        width = max(len(blocks[i].drafts) for i in greedy)
        am = target.argmax
        tgt = [[am[blocks[i].row + min(j, len(blocks[i].drafts))] for j in range(width + 1)] for i in greedy]
        drafts = [blocks[i].drafts + [-1] * (width - len(blocks[i].drafts)) for i in greedy]
        lens = [len(blocks[i].drafts) + 1 for i in greedy]
        accepted = verify_greedy(torch.tensor(tgt), torch.tensor(drafts),
                                 torch.tensor(lens)).tolist()
        for i, a in zip(greedy, accepted):
            b = blocks[i]
            out[i] = Verdict(a, b.drafts[:a] + [am[b.row + a]])
    for i, b in enumerate(blocks):
        if not b.greedy:
            p = target.p(b.row, len(b.drafts) + 1)
            a, tokens = verify_stochastic(p, b.draft_probs, torch.tensor(b.drafts, device=p.device), b.generator)
            out[i] = Verdict(a, tokens)
    return out  # type: ignore[return-value]


def verify_greedy(target_argmax: torch.Tensor, drafts: torch.Tensor, block_lens: torch.Tensor) -> torch.Tensor:
    """target_argmax [B, Q] long, drafts [B, Q-1], block_lens [B] -> number of accepted drafts [B]."""
    q1 = drafts.shape[1]
    valid = torch.arange(q1, device=drafts.device)[None, :] < (block_lens[:, None] - 1)
    match = (drafts == target_argmax[:, :-1]) & valid
    return match.long().cumprod(dim=1).sum(dim=1)


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
