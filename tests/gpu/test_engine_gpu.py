"""Engine equalities on CUDA (skipped without it; run on the device machine).

fp32: greedy speculative == AR == the full-recompute oracle, token for token (as on CPU).
bf16: spec == AR token for token is not guaranteed by arithmetic (a verify pass runs [B, 16]-row GEMMs, an
AR pass [B, 1]-row ones, so near-ties can round differently); we require identical output on all but
at most one of the six requests.
"""
from __future__ import annotations

import pytest
import torch

from tests.helpers.tiny import make_tiny_hf_dir, reference_greedy, tiny_drafter
from workers.engine.config import EngineConfig
from workers.engine.llm_engine import LLMEngine
from workers.engine.params import SamplingParams, SpecParams
from workers.models.loader import load_model

PROMPTS = [list(range(5, 5 + n)) for n in (3, 17, 40, 9, 64, 23)]


def build(tmp_path, dtype):
    d = make_tiny_hf_dir(tmp_path, "qwen3", seed=1)
    lm = load_model(d, dtype, "cuda")
    dr = tiny_drafter(lm.config, block_size=8).to("cuda", getattr(torch, dtype))
    eng = LLMEngine(EngineConfig(model=str(d), device="cuda", dtype=dtype, kv_cache_bytes=64 * 2**20),
                    model=lm.model, drafter=dr, tokenizer=lm.tokenizer)
    return eng, lm


def run(eng, spec):
    for i, p in enumerate(PROMPTS):
        eng.add_request(str(i), p, SamplingParams(max_tokens=32, ignore_eos=True), spec)
    got = {str(i): [] for i in range(len(PROMPTS))}
    while eng.has_unfinished():
        for o in eng.step():
            got[o.request_id] += o.new_token_ids
    return [got[str(i)] for i in range(len(PROMPTS))]


def test_fp32_cuda_spec_equals_ar_equals_oracle(tmp_path):
    eng, lm = build(tmp_path, "float32")
    oracle = [reference_greedy(lm.model, p, 32) for p in PROMPTS]
    assert run(eng, SpecParams(enabled=False)) == oracle
    assert run(eng, SpecParams(True, 8)) == oracle


def test_bf16_cuda_spec_matches_ar(tmp_path):
    eng, _ = build(tmp_path, "bfloat16")
    ar = run(eng, SpecParams(enabled=False))
    sp = run(eng, SpecParams(True, 8))
    same = sum(a == s for a, s in zip(ar, sp))
    assert same >= len(PROMPTS) - 1, (same, ar, sp)
