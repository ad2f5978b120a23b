"""The CPU bf16 fast path: packed weights change kernels only, and bf16 disagreements are numerics.

* ``pack_for_cpu`` keeps every parameter (names, shapes, values), is idempotent, and gives the logits of the
  unpacked bf16 model up to bf16 rounding (target and drafter, Llama and Qwen3 shapes).
* Greedy speculative vs AR vs the full-recompute oracle: exact in fp32 (the same cases as in bf16); in bf16
  the outputs agree up to a first divergence, and at that position the two competing tokens are a near-tie
  of the fp32 model given the common prefix (a real defect — a misaligned position, a wrong mask — shows
  up as a divergence where the fp32 margin is large).
"""
from __future__ import annotations

import pytest
import torch

from tests.helpers.tiny import make_tiny_hf_dir, reference_greedy, tiny_drafter
from workers.engine.config import EngineConfig
from workers.engine.llm_engine import LLMEngine
from workers.engine.params import SamplingParams, SpecParams
from workers.models.loader import load_model
from workers.models.packed import can_pack, is_packed, pack_for_cpu

pytestmark = pytest.mark.usefixtures("one_thread")

needs_bf16 = pytest.mark.skipif(not can_pack(torch.bfloat16, torch.device("cpu")),
                                reason="this CPU has no native bf16 (AMX / AVX512-BF16)")
PROMPTS = [list(range(5, 17)), [9, 4, 33, 70, 2, 8], list(range(40, 71)), [100, 101, 7]]
N = 24


@pytest.fixture(scope="module", params=["llama", "qwen3"])
def tiny_dir(request, tmp_path_factory):
    return make_tiny_hf_dir(tmp_path_factory.mktemp(request.param), request.param)


@needs_bf16
def test_packing_keeps_parameters_and_logits(tiny_dir):
    lm = load_model(tiny_dir, "bfloat16", "cpu")
    model = lm.model
    drafter = tiny_drafter(lm.config, num_layers=2).to(torch.bfloat16)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    d_before = {k: v.clone() for k, v in drafter.state_dict().items()}
    ids = torch.tensor([PROMPTS[0]])
    with torch.inference_mode():
        ref = model(ids).float()
        feats = torch.randn(1, 5, len(drafter.config.target_layer_ids) * lm.config.hidden_size).bfloat16()
        emb = model.embed(torch.tensor([[5] + [3] * 7]))
        pos_q, pos_c = torch.arange(5, 13)[None], torch.arange(5)[None]
        d_ref = drafter(emb, feats, pos_q, pos_c).float()
    pack_for_cpu(pack_for_cpu(model))  # idempotent
    pack_for_cpu(drafter)
    assert is_packed(model) and is_packed(drafter)
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert drafter.state_dict().keys() == d_before.keys()
    with torch.inference_mode():
        got = model(ids).float()
        d_got = drafter(emb, feats, pos_q, pos_c).float()
    scale = ref.abs().max()
    assert (got - ref).abs().max() <= 0.03 * scale  # bf16: same product up to summation order
    assert (d_got - d_ref).abs().max() <= 0.03 * d_ref.abs().max()
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.9


def _engine(path, dtype: str):
    lm = load_model(path, dtype, "cpu")
    dr = tiny_drafter(lm.config, num_layers=1, block_size=8).to(lm.model.rope.dtype if dtype == "float32"
                                                               else torch.bfloat16)
    eng = LLMEngine(EngineConfig(model=str(path), device="cpu", dtype=dtype, kv_block_size=4, max_num_seqs=8),
                    model=lm.model, drafter=dr, tokenizer=lm.tokenizer)
    return eng, lm


def _greedy(eng, spec) -> list[list[int]]:
    for i, p in enumerate(PROMPTS):
        eng.add_request(f"{spec.enabled}-{i}", p, SamplingParams(max_tokens=N, ignore_eos=True), spec)
    got = {f"{spec.enabled}-{i}": [] for i in range(len(PROMPTS))}
    while eng.has_unfinished():
        for o in eng.step():
            got[o.request_id] += o.new_token_ids
    return list(got.values())


def test_fp32_speculative_equals_ar_equals_oracle(tiny_dir):
    eng, lm = _engine(tiny_dir, "float32")
    oracle = [reference_greedy(lm.model, p, N) for p in PROMPTS]
    assert _greedy(eng, SpecParams(True, 8)) == _greedy(eng, SpecParams(enabled=False)) == oracle


@needs_bf16
def test_bf16_divergences_are_fp32_near_ties(tiny_dir):
    eng, lm = _engine(tiny_dir, "bfloat16")
    assert is_packed(eng.model)
    fp32 = load_model(tiny_dir, "float32", "cpu").model
    oracle = [reference_greedy(fp32, p, N) for p in PROMPTS]
    same = total = 0
    for outs in (_greedy(eng, SpecParams(True, 8)), _greedy(eng, SpecParams(enabled=False))):
        for prompt, got, want in zip(PROMPTS, outs, oracle):
            assert len(got) == N
            k = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), N)
            same += k
            total += N
            if k == N:
                continue
            with torch.no_grad():
                logits = fp32(torch.tensor([prompt + want[:k]]))[0, -1]
            margin = float(logits[want[k]] - logits[got[k]])  # >= 0: want[k] is the fp32 argmax
            assert 0 <= margin <= 0.02 * float(logits.abs().max()) + 1e-3, (
                f"divergence at token {k} is not a near-tie: fp32 margin {margin:.4f}")
    assert same / total >= 0.5  # agreement up to the first divergence (reported by benchmarks/engine_bench.py)
