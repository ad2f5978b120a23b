"""Rejection sampler and logit processing.

Statistical tests use fixed seeds and a stated threshold: Pearson chi-square against the exact target
distribution, rejecting at p < 1e-3 (so a correct sampler fails by chance with probability 1e-3, and with
the fixed seed the outcome is deterministic).
"""
from __future__ import annotations

import pytest
import torch
from scipy.stats import chi2

from workers.engine.params import SamplingParams
from workers.engine.sampling import RowParams, processed_probs
from workers.speculative.verifier import BlockToVerify, TargetRows, verify_blocks, verify_greedy, verify_stochastic


pytestmark = pytest.mark.usefixtures("one_thread")

ALPHA = 1e-3


def chi_square_ok(counts: torch.Tensor, probs: torch.Tensor) -> bool:
    n = counts.sum()
    keep = probs > 0
    exp = probs[keep] * n
    stat = float(((counts[keep] - exp) ** 2 / exp).sum())
    assert counts[~keep].sum() == 0, "sampled a token of probability 0"
    return stat < chi2.ppf(1 - ALPHA, int(keep.sum()) - 1)


def dist(v, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(v, generator=g) * 1.5, -1)


@pytest.mark.parametrize("greedy_draft", [False, True])
def test_stochastic_verification_is_lossless(greedy_draft):
    """First committed token ~ p0; given the first draft was accepted, the second ~ p1."""
    V, trials = 6, 6000
    p = torch.stack([dist(V, 1), dist(V, 2), dist(V, 3)])  # [b=3, V]
    q = torch.stack([dist(V, 4), dist(V, 5)])  # [b-1, V], deliberately different from p
    gen = torch.Generator().manual_seed(0)
    first, second = torch.zeros(V), torch.zeros(V)
    accepted_first = 0
    for _ in range(trials):
        if greedy_draft:
            drafts = q.argmax(-1)
            a, toks = verify_stochastic(p, None, drafts, gen)
        else:
            drafts = torch.multinomial(q, 1, generator=gen).squeeze(1)
            a, toks = verify_stochastic(p, q, drafts, gen)
        assert len(toks) == a + 1 and toks[:a] == drafts[:a].tolist()
        first[toks[0]] += 1
        if a >= 1:
            accepted_first += 1
            second[toks[1]] += 1
    assert chi_square_ok(first, p[0])
    assert accepted_first > 500
    assert chi_square_ok(second, p[1])


def test_verify_greedy_counts_prefix():
    target = torch.tensor([[1, 2, 3, 4], [1, 2, 3, 4], [5, 6, 7, 8]])
    drafts = torch.tensor([[1, 2, 3], [1, 9, 3], [5, 6, 7]])
    assert verify_greedy(target, drafts, torch.tensor([4, 4, 2])).tolist() == [3, 1, 1]


def test_verify_blocks_mixes_greedy_and_sampled_blocks_of_one_step():
    """The step's one call: greedy blocks of different widths batched, a sampled block with its generator."""
    V = 6
    am = [1, 2, 3, 4, 0, 5, 5, 2, 2]  # argmax of 9 logits rows: block A rows 0-3, AR row 4, block B 5-6, C 7-8
    logits = torch.full((9, V), -5.0)
    logits[torch.arange(9), torch.tensor(am)] = 5.0
    params = [SamplingParams()] * 7 + [SamplingParams(temperature=1.0)] * 2
    target = TargetRows.build(logits, params)
    assert target.argmax == am and target.probs.shape == (2, V) and target.prob_row == {7: 0, 8: 1}
    blocks = [BlockToVerify(0, [1, 2, 9], None, True), BlockToVerify(5, [5], None, True),
              BlockToVerify(7, [2], None, False, torch.Generator().manual_seed(0))]
    v = verify_blocks(target, blocks)
    assert [(x.accepted, x.tokens) for x in v[:2]] == [(2, [1, 2, 3]), (1, [5, 5])]
    a, toks = verify_stochastic(target.p(7, 2), None, torch.tensor([2]), torch.Generator().manual_seed(0))
    assert (v[2].accepted, v[2].tokens) == (a, toks)


def test_processed_probs_match_transformers_warpers():
    from transformers.generation.logits_process import (TemperatureLogitsWarper, TopKLogitsWarper,
                                                        TopPLogitsWarper)

    torch.manual_seed(0)
    logits = torch.randn(4, 50) * 3
    cases = [SamplingParams(temperature=0.7, top_k=5), SamplingParams(temperature=1.3, top_p=0.8),
             SamplingParams(temperature=1.0, top_k=10, top_p=0.5), SamplingParams(temperature=0.5)]
    got = processed_probs(logits, RowParams.build(cases, "cpu"))
    for i, sp in enumerate(cases):
        x = TemperatureLogitsWarper(sp.temperature)(None, logits[i:i + 1].clone())
        if sp.top_k:
            x = TopKLogitsWarper(sp.top_k)(None, x)
        if sp.top_p < 1:
            x = TopPLogitsWarper(sp.top_p)(None, x)
        assert torch.allclose(got[i], torch.softmax(x, -1)[0], atol=1e-6)
