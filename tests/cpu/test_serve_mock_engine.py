"""The mock engine: determinism, stop / length, KV accounting (NoCapacity), acceptance by role, health."""
from __future__ import annotations

import asyncio

import pytest

from orchestrator.config import MockProfile
from orchestrator.mock_engine import MockEngine
from workers.engine.params import InvalidRequest, NoCapacity, SamplingParams, SpecParams


async def _collect(engine, rid, prompt, sampling, spec=None, tags=None):
    outs = [o async for o in engine.generate(rid, prompt, sampling, spec, tags)]
    return outs, "".join(o.text for o in outs), [t for o in outs for t in o.new_token_ids]


async def test_deterministic_and_length():
    eng = MockEngine(MockProfile(step_ms=0))
    prompt = eng.tokenizer.encode("hello")
    a = await _collect(eng, "a", prompt, SamplingParams(max_tokens=40))
    b = await _collect(eng, "b", prompt, SamplingParams(max_tokens=40))
    assert a[1] == b[1] and len(a[2]) == 40
    assert a[0][-1].finished and a[0][-1].finish_reason == "length"
    assert eng.stats().kv_free_tokens == eng.stats().kv_total_tokens  # released


async def test_stop_string_is_cut():
    eng = MockEngine(MockProfile(step_ms=0))
    _, text, _ = await _collect(eng, "a", [5, 6, 7], SamplingParams(max_tokens=400))
    stop = text[10:14]
    outs, cut, _ = await _collect(eng, "b", [5, 6, 7], SamplingParams(max_tokens=400, stop=(stop,)))
    assert outs[-1].finish_reason == "stop" and cut == text[: text.index(stop)]


async def test_kv_accounting_raises_no_capacity_before_any_token():
    eng = MockEngine(MockProfile(step_ms=5, kv_total_tokens=100, max_model_len=100))
    first = eng.generate("a", [5] * 10, SamplingParams(max_tokens=80))
    await first.__anext__()
    with pytest.raises(NoCapacity, match="KV cache full"):
        await eng.generate("b", [5] * 10, SamplingParams(max_tokens=20)).__anext__()
    with pytest.raises(InvalidRequest, match="context"):
        await eng.generate("c", [5] * 10, SamplingParams(max_tokens=200)).__anext__()
    await eng.abort("a")
    rest = [o async for o in first]
    assert rest[-1].finish_reason == "abort"
    assert eng.stats().kv_free_tokens == 100


async def test_acceptance_profile_per_role_shows_in_stats():
    eng = MockEngine(MockProfile(step_ms=0, acceptance_by_role={"coder": 0.9, "critic": 0.1}))
    for role in ("coder", "critic"):
        for i in range(4):
            await _collect(eng, f"{role}{i}", [9, 9], SamplingParams(max_tokens=64), SpecParams(True, 8),
                           {"role": role, "session": f"s-{role}"})
    tau = eng.stats().tau_by_tag["role"]
    assert tau["coder"][0] > 3 > tau["critic"][0]
    ar = await _collect(eng, "ar", [9], SamplingParams(max_tokens=5), SpecParams(enabled=False))
    assert [o.committed for o in ar[0]] == [[1]] * 5


async def test_wedge_fails_health_check_and_fault_injection():
    eng = MockEngine(MockProfile(step_ms=0, fail_after_tokens=5))
    outs, _, _ = await _collect(eng, "x", [3], SamplingParams(max_tokens=50))
    assert outs[-1].finish_reason == "error" and "fault" in outs[-1].error
    eng.check_health()
    eng.wedge()
    with pytest.raises(RuntimeError, match="wedged"):
        eng.check_health()
    gen = eng.generate("y", [3], SamplingParams(max_tokens=5))
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(gen.__anext__(), 0.2)
