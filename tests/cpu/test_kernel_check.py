"""The engine's start-up CPU-kernel self-check (workers/engine/kernel_check.py): healthy kernels pass it on tiny
head_dim-64 models (fp32 and bf16, target and drafter) and stay on, with no KV block or traffic left behind; a
deliberately broken kernel (RoPE, RMSNorm, the drafter's attention) fails it, the engine turns the kernels off and
still decodes the oracle's greedy tokens."""
from __future__ import annotations

import copy
import logging
import math

import pytest
import torch

from workers.kernels import cpu as cpu_kernels

pytestmark = pytest.mark.skipif(not cpu_kernels.available(), reason="no C++ compiler: CPU kernels unavailable")

HD64 = dict(hidden_size=128, intermediate_size=256, num_attention_heads=2, num_key_value_heads=1, head_dim=64)


@pytest.fixture(autouse=True)
def _restore_kernel_state(monkeypatch):
    """A failed check turns the kernels off for the process: undo that after each test."""
    monkeypatch.setattr(cpu_kernels, "_disabled", None)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from tests.helpers.tiny import make_tiny_hf_dir

    return make_tiny_hf_dir(tmp_path_factory.mktemp("kc_llama"), "llama", **HD64)


def _engine(path, dtype=torch.float32, drafter_block=8, **cfg):
    from tests.helpers.tiny import tiny_drafter
    from workers.engine.config import EngineConfig
    from workers.engine.llm_engine import LLMEngine
    from workers.models.loader import load_model

    lm = load_model(path, "float32", "cpu")
    model = copy.deepcopy(lm.model).to(dtype)
    dr = None if drafter_block is None else tiny_drafter(lm.config, block_size=drafter_block).to(dtype)
    config = EngineConfig(model=str(path), device="cpu", dtype="auto", kv_block_size=4, max_num_batched_tokens=48,
                          **cfg)
    return LLMEngine(config, model=model, drafter=dr, tokenizer=lm.tokenizer), lm


def _assert_clean(eng):
    from workers.engine.kernel_check import _SEQ_IDS

    assert eng.blocks.num_free_blocks == eng.blocks.num_blocks
    assert not any(sid in eng.blocks for sid in _SEQ_IDS)
    st = eng.stats()
    assert st.tokens_generated == 0 and st.target_passes == 0 and st.step_ms_ar is None and not st.tau_by_tag


@pytest.mark.parametrize("family", ["llama", "qwen3"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_healthy_kernels_pass_and_stay_on(tmp_path, family, dtype):
    from tests.helpers.tiny import make_tiny_hf_dir

    eng, _ = _engine(make_tiny_hf_dir(tmp_path, family, **HD64), dtype)
    kc = eng.kernel_check
    assert kc["ok"] and kc["skipped"] is None and kc["kernels_on"] and not kc["failures"], kc
    assert kc["dtype"] == str(dtype).removeprefix("torch.")
    assert [p["name"] for p in kc["parts"]] == ["target", "drafter"]
    for p in kc["parts"]:
        assert p["agree"] >= p["min_agree"] and p["rel_err"] <= p["tolerance"] and p["rows"] > 0
    assert cpu_kernels.available() and cpu_kernels.disabled_reason() is None
    assert eng.stats().kernel_check == kc
    _assert_clean(eng)


def _bf16_table_read_as_fp32(real):
    """The incident: rope_qkv read the [R, hd] bf16 cos / sin as fp32 (each float two bf16 values; the second half
    of the rows past the end of the table: zeros here)."""
    def bits(t):
        flat = t.to(torch.bfloat16).reshape(-1)
        return torch.cat([flat, torch.zeros_like(flat)]).view(torch.float32).view(t.shape)
    return lambda qkv, cos, sin, *a: real(qkv, bits(cos), bits(sin), *a)


def _norm_without_weight(real):
    return lambda x, weight, eps, residual=None: real(x, torch.ones_like(weight), eps, residual)


def _raises(real):
    def broken(*a, **k):
        raise TypeError("rope_qkv takes fp32 cos / sin")
    return broken


BREAKAGES = {  # name -> (object, attribute, broken version of the real one, the part that must fail)
    "rope_bf16_table": (cpu_kernels, "rope_qkv", _bf16_table_read_as_fp32, "target"),
    "rope_raises": (cpu_kernels, "rope_qkv", _raises, "target"),
    "rmsnorm": (cpu_kernels, "rmsnorm", _norm_without_weight, "target"),
    "drafter_attention": ("OwnBlocks", "attend", lambda real: lambda self, at, q, *a: real(self, at, q * 0, *a),
                          "drafter"),
}


@pytest.mark.parametrize("broken", sorted(BREAKAGES))
def test_broken_kernel_turns_kernels_off_and_output_stays_exact(tiny_dir, monkeypatch, caplog, broken):
    from tests.cpu.test_spec import REQS, run_mixed
    from tests.helpers.tiny import reference_greedy
    from workers.models.dflash import OwnBlocks

    obj, attr, breaker, part = BREAKAGES[broken]
    obj = OwnBlocks if obj == "OwnBlocks" else obj
    calls = []
    bad = breaker(getattr(obj, attr))
    monkeypatch.setattr(obj, attr, lambda *a, **k: calls.append(1) or bad(*a, **k))
    with caplog.at_level(logging.ERROR, logger="workers.engine.kernel_check"):
        eng, lm = _engine(tiny_dir)
    kc = eng.kernel_check
    assert not kc["ok"] and not kc["kernels_on"] and calls
    assert [f.split(":")[0] for f in kc["failures"]] == [part], kc
    assert eng.stats().kernel_check["failures"] == kc["failures"]
    assert not cpu_kernels.available() and part in cpu_kernels.disabled_reason()
    assert any("Kernels are OFF" in r.getMessage() and part in r.getMessage() for r in caplog.records)
    _assert_clean(eng)
    calls.clear()
    oracle = [reference_greedy(lm.model, p, n) for p, n, _, _ in REQS]
    assert run_mixed(eng, all_ar=True) == oracle
    assert run_mixed(eng) == oracle
    assert not calls  # the broken kernel is never called again: every op took the torch path


def test_switch_off_skips_the_check(tiny_dir, monkeypatch):
    from workers.engine import kernel_check

    monkeypatch.setattr(kernel_check, "run_check", lambda eng: pytest.fail("the check ran"))
    eng, _ = _engine(tiny_dir, drafter_block=None, check_cpu_kernels=False)
    assert eng.kernel_check is None and eng.stats().kernel_check is None


def test_kernels_already_off_skip_the_check(tiny_dir):
    cpu_kernels.disable("an earlier engine's check failed")
    eng, _ = _engine(tiny_dir, drafter_block=None)
    kc = eng.kernel_check
    assert kc["ok"] is None and "already off" in kc["skipped"] and not kc["kernels_on"] and not kc["parts"]


def test_compare_counts_exact_ties_and_fails_non_finite_logits():
    from workers.engine.kernel_check import compare

    plain = torch.tensor([[1.0, 4.0, 4.0, 0.0], [2.0, 0.0, 1.0, 0.0]], dtype=torch.bfloat16)
    fast = plain.clone()
    fast[0, 2] += 0.5  # the kernel's greedy token is the second of a tie: agrees, not exactly
    p = compare("target", fast, plain, torch.bfloat16)
    assert p.agree == 1.0 and p.exact == 0.5 and 0 < p.rel_err < p.tolerance and p.ok
    fast[1] = torch.tensor([0.0, 0.0, 0.0, 9.0])  # a row with another greedy token and far-off logits
    p = compare("target", fast, plain, torch.bfloat16)
    assert p.agree == 0.5 and p.rel_err > 1 and not p.ok and p.failure().startswith("target:")
    fast[1, 0] = float("nan")
    p = compare("target", fast, plain, torch.bfloat16)
    assert math.isinf(p.rel_err) and not p.ok


def test_a_context_too_short_for_the_check_skips_it(tiny_dir):
    eng, _ = _engine(tiny_dir, drafter_block=None, max_model_len=16)
    kc = eng.kernel_check
    assert kc["ok"] is None and "too short" in kc["skipped"] and kc["kernels_on"] and cpu_kernels.available()
    _assert_clean(eng)



@pytest.mark.parametrize("broken", ["rope_raises", "rmsnorm", "drafter_attention"])
def test_broken_kernel_fails_the_check_on_a_bf16_engine(tiny_dir, monkeypatch, broken):
    obj, attr, breaker, part = BREAKAGES[broken]
    if obj == "OwnBlocks":
        from workers.models.dflash import OwnBlocks as obj
    monkeypatch.setattr(obj, attr, breaker(getattr(obj, attr)))
    eng, _ = _engine(tiny_dir, torch.bfloat16)
    kc = eng.kernel_check
    assert kc["dtype"] == "bfloat16" and not kc["ok"] and not kc["kernels_on"] and not cpu_kernels.available()
    assert [f.split(":")[0] for f in kc["failures"]] == [part], kc
    _assert_clean(eng)


def test_a_check_that_cannot_run_never_stops_the_engine(tiny_dir, monkeypatch):
    from workers.engine import kernel_check

    def boom(*a, **k):
        raise RuntimeError("no prefill today")

    monkeypatch.setattr(kernel_check, "_prefill", boom)
    eng, _ = _engine(tiny_dir, drafter_block=None)
    kc = eng.kernel_check
    assert kc["ok"] is None and "no prefill today" in kc["skipped"] and kc["kernels_on"] and cpu_kernels.available()
    _assert_clean(eng)
