"""Stochastic speculative decoding through the whole engine matches the target's own distribution.

Tiny vocabulary (16 tokens), temperature 1 / top-k 8. For one prompt, the exact marginal distributions of
output tokens 2 and 3 are computed by enumeration with the full-recompute model; N samples from the
engine (AR, speculative with a proposer whose q differs from p, and speculative with the deterministic
n-gram proposer of tests/helpers/ngram.py) are compared with a Pearson chi-square test at p < 1e-3 (fixed
seeds: deterministic).
"""
from __future__ import annotations

import itertools

import pytest
import torch
from scipy.stats import chi2

from tests.helpers.tiny import tiny_engine
from workers.engine.params import SamplingParams, SpecParams
from workers.engine.sampling import RowParams, processed_probs


pytestmark = pytest.mark.usefixtures("one_thread")

V, N, PROMPT = 16, 700, [5, 9, 3, 12]
SP = dict(temperature=1.0, top_k=8)


def exact_marginals(model, sp):
    rp = RowParams.build([SamplingParams(**sp)], "cpu")

    def dist(ids):
        with torch.no_grad():
            return processed_probs(model(torch.tensor([ids]))[0, -1:], rp)[0].double()

    p1 = dist(PROMPT)
    p2 = torch.zeros(V, dtype=torch.float64)
    p3 = torch.zeros(V, dtype=torch.float64)
    for t1 in range(V):
        if p1[t1] == 0:
            continue
        d2 = dist(PROMPT + [t1])
        p2 += p1[t1] * d2
        for t2 in range(V):
            if d2[t2] > 0:
                p3 += p1[t1] * d2[t2] * dist(PROMPT + [t1, t2])
    return p1, p2, p3


def chi_square_ok(counts, probs):
    keep = probs > 1e-12
    assert counts[~keep].sum() == 0
    exp = probs[keep] * counts.sum()
    stat = float(((counts[keep] - exp) ** 2 / exp).sum())
    return stat < chi2.ppf(1 - 1e-3, int(keep.sum()) - 1), stat


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    eng, lm = tiny_engine(tmp_path_factory.mktemp("smp"), "llama", drafter_block=4, seed=2,
                          model_overrides={"vocab_size": V})
    return eng, lm, exact_marginals(lm.model, SP)


@pytest.fixture(scope="module")
def ngram_setup(tmp_path_factory):
    import tests.helpers.ngram  # noqa: F401  (registers the "ngram" proposer)

    eng, lm = tiny_engine(tmp_path_factory.mktemp("smp-ngram"), "llama", drafter_block=None, seed=2,
                          model_overrides={"vocab_size": V}, proposer="ngram")
    return eng, lm, exact_marginals(lm.model, SP)


def sample_many(eng, spec):
    counts = torch.zeros(3, V, dtype=torch.float64)
    ids = itertools.count()
    pending = N
    while pending or eng.has_unfinished():
        while pending and len(eng.scheduler.running) + len(eng.scheduler.waiting) < 16:
            eng.add_request(f"r{next(ids)}", PROMPT, SamplingParams(max_tokens=3, ignore_eos=True, **SP), spec)
            pending -= 1
        for o in eng.step():
            got = eng._outs.setdefault(o.request_id, [])
            got += o.new_token_ids
            if o.finished:
                for k, t in enumerate(eng._outs.pop(o.request_id)):
                    counts[k, t] += 1
    return counts


@pytest.mark.parametrize("mode", ["ar", "spec", "spec-draft-vocab"])
def test_engine_sampling_matches_target(setup, mode, monkeypatch):
    eng, lm, exact = setup
    eng._outs = {}
    spec = SpecParams(enabled=False) if mode == "ar" else SpecParams(True, 4)
    if mode.startswith("spec"):  # proposer: the target's own processed distribution, tempered, so q != p but close
        rp = RowParams.build([SamplingParams(temperature=1.5, top_k=12)], "cpu")

        def propose(d):
            out = []
            for i in range(d.block_ids.shape[0]):
                ids = d.block_ids[i, :1].tolist()
                seq = next(s for s in eng.scheduler.running if s.num_computed == int(d.positions[i, 0]))
                ctx = seq.token_ids[:-1]
                rows = []
                for _ in range(d.block_ids.shape[1] - 1):
                    with torch.no_grad():
                        logit = lm.model(torch.tensor([ctx + ids]))[0, -1]
                    rows.append(logit)
                    ids.append(int(torch.multinomial(processed_probs(logit[None], rp)[0], 1)))
                out.append(torch.stack(rows))
            return torch.stack(out)

        if mode == "spec-draft-vocab":  # drafts only from 11 of the 16 tokens (q = 0 elsewhere, p is not)
            vocab = torch.tensor([0, 1, 2, 4, 5, 7, 8, 10, 11, 13, 14])
            monkeypatch.setattr(eng.drafter, "draft_vocab", vocab)
            monkeypatch.setattr(eng.drafter, "draft_head", torch.nn.Identity())  # marks the [.., Vd] logits
            full = propose
            propose = lambda d: full(d)[..., vocab]  # noqa: E731  [B, Q-1, Vd] as a draft head gives them
        monkeypatch.setattr(eng.runner, "propose_logits", propose)
        passes0, toks0 = eng.tracker.spec_passes, eng.tracker.spec_tokens
    counts = sample_many(eng, spec)
    assert counts.sum(1).tolist() == [N] * 3
    for k in range(3):
        ok, stat = chi_square_ok(counts[k], exact[k])
        assert ok, (mode, k, stat)
    if mode.startswith("spec"):
        tau = (eng.tracker.spec_tokens - toks0) / (eng.tracker.spec_passes - passes0)
        assert tau > 1.3  # the verification path with accepted drafts really ran


def test_ngram_sampling_matches_target(ngram_setup):
    eng, _, exact = ngram_setup
    eng._outs = {}
    counts = sample_many(eng, SpecParams(True, 4))
    assert counts.sum(1).tolist() == [N] * 3
    for k in range(3):
        ok, stat = chi_square_ok(counts[k], exact[k])
        assert ok, ("ngram", k, stat)
    assert eng.tracker.spec_tokens / eng.tracker.spec_passes > 1.0  # some lookups were accepted
