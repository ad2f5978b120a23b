"""Greedy speculative decoding == AR greedy == the full-recompute oracle, token for token.

Drafters: a random DFlash drafter, a deliberately bad one (huge random weights), an "almost right"
proposer (the oracle's continuation with ~30% of positions corrupted, so partial / full acceptance and
rollback all happen), the committed trained drafter when it exists, and a prompt-lookup n-gram proposer
(tests/helpers/ngram.py: a proposer added as one file and one registration). Batches mix prompt lengths, block
sizes, AR and spec requests, and requests join mid-run.
"""
from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from tests.helpers.tiny import reference_greedy, tiny_drafter, tiny_engine
from workers.engine.params import SamplingParams, SpecParams


pytestmark = pytest.mark.usefixtures("one_thread")

REQS = [  # (prompt, max_tokens, spec block or None=AR, join step)
    (list(range(5, 12)), 24, 8, 0),
    (list(range(20, 61)), 17, 5, 0),
    ([9, 4, 33], 20, None, 0),
    (list(range(70, 85)), 22, 8, 3),
    ([100, 101], 9, 2, 5),
]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    eng, lm = tiny_engine(tmp_path_factory.mktemp("spec"), "qwen3", drafter_block=8, max_num_batched_tokens=48)
    oracle = [reference_greedy(lm.model, p, n) for p, n, _, _ in REQS]
    return eng, lm, oracle


def run_mixed(eng, reqs=REQS, all_ar=False):
    got = {str(i): [] for i in range(len(reqs))}
    step = 0
    while True:
        for i, (p, n, blk, join) in enumerate(reqs):
            if join == step:
                spec = SpecParams(enabled=False) if (all_ar or blk is None) else SpecParams(True, blk)
                eng.add_request(str(i), p, SamplingParams(max_tokens=n, ignore_eos=True), spec, {"role": f"r{i % 2}"})
        for o in eng.step():
            got[o.request_id] += o.new_token_ids
        step += 1
        if step > max(j for *_, j in reqs) and not eng.has_unfinished():
            break
    return [got[str(i)] for i in range(len(reqs))]


def test_ar_matches_oracle(setup):
    eng, _, oracle = setup
    assert run_mixed(eng, all_ar=True) == oracle


def test_random_drafter_lossless(setup):
    eng, _, oracle = setup
    assert run_mixed(eng) == oracle
    assert eng.blocks.num_free_blocks == eng.blocks.num_blocks  # everything returned


@pytest.fixture(scope="module")
def ngram_setup(tmp_path_factory):
    import tests.helpers.ngram  # noqa: F401  (registers the "ngram" proposer)

    eng, lm = tiny_engine(tmp_path_factory.mktemp("ngram"), "qwen3", drafter_block=None, max_num_batched_tokens=48,
                          proposer="ngram")
    return eng, lm, [reference_greedy(lm.model, p, n) for p, n, _, _ in REQS]


def test_ngram_proposer_lossless(ngram_setup):
    eng, _, oracle = ngram_setup
    assert eng.proposer is not None and eng.drafter is None  # speculative, with no network at all
    assert run_mixed(eng) == oracle
    tr = eng.tracker
    assert tr.spec_tokens / tr.spec_passes > 2.0  # drafts really got accepted (the tiny model repeats itself)
    assert eng.blocks.num_free_blocks == eng.blocks.num_blocks


def test_bad_drafter_lossless(setup):
    eng, lm, oracle = setup
    bad = tiny_drafter(lm.config, block_size=8, seed=7)
    with torch.no_grad():
        for p in bad.parameters():
            p.mul_(50.0)
    old, eng.runner.drafter = eng.runner.drafter, bad
    try:
        assert run_mixed(eng) == oracle
    finally:
        eng.runner.drafter = old


def test_almost_right_proposer_lossless(setup, monkeypatch):
    """Drafts = the oracle continuation, 30% corrupted: exercises partial and full acceptance + rollback."""
    eng, lm, oracle = setup
    rng = random.Random(0)
    vocab = lm.config.vocab_size
    real = eng.runner.propose_logits

    def propose(d):
        logits = real(d)  # keep the real drafter path running (shapes, masks)
        out = torch.full_like(logits, -10.0)
        for i in range(d.block_ids.shape[0]):
            ctx = int(d.positions[i, 0])
            seq = next(s for s in eng.scheduler.running if s.num_computed == ctx and s.token_ids[-1] == int(d.block_ids[i, 0]))
            full = oracle[int(seq.request_id)] + [0] * logits.shape[1]
            cont = full[seq.num_output: seq.num_output + logits.shape[1]]  # the true greedy continuation
            for j, t in enumerate(cont):
                out[i, j, rng.randrange(vocab) if rng.random() < 0.3 else t] = 10.0
        return out

    monkeypatch.setattr(eng.runner, "propose_logits", propose)
    before, tr = eng.stats(), eng.tracker
    passes0, toks0 = tr.spec_passes, tr.spec_tokens
    assert run_mixed(eng) == oracle
    st = eng.stats()
    assert (tr.spec_tokens - toks0) / (tr.spec_passes - passes0) > 2.0  # drafts really got accepted
    assert set(st.tau_by_tag["role"]) == {"r0", "r1"}
    assert st.tokens_generated - before.tokens_generated == sum(n for _, n, _, _ in REQS)


TRAINED = Path(__file__).resolve().parents[2] / "models" / "smollm2-135m-dflash-b16"


@pytest.mark.demo
@pytest.mark.slow
def test_trained_drafter_lossless():
    from workers.engine.config import EngineConfig
    from workers.engine.llm_engine import LLMEngine

    target = Path("~/.cache/specfleet/models/smollm2-135m-instruct").expanduser()
    if not (TRAINED / "config.json").is_file() or not (target / "config.json").is_file():
        pytest.skip("trained drafter or SmolLM2 HF directory not available")
    eng = LLMEngine(EngineConfig(model=str(target), drafter=str(TRAINED), device="cpu", dtype="float32",
                                 max_model_len=1024))  # fp32: the equality is exact (bf16 differs by numerics)
    from orchestrator.commands.generate import encode_prompt

    prompt = encode_prompt(eng.tokenizer, "Write a Python function that adds two numbers.", chat=True)
    outs = {}
    for name, spec in (("ar", SpecParams(enabled=False)), ("spec", SpecParams(True, 16))):
        eng.add_request(name, prompt, SamplingParams(max_tokens=48, ignore_eos=True), spec)
        toks = []
        while eng.has_unfinished():
            for o in eng.step():
                toks += o.new_token_ids
        outs[name] = toks
    assert outs["spec"] == outs["ar"] == reference_greedy(eng.model, prompt, 48)
    assert eng.stats().tau_mean > 1.5
