"""Engine API: typed errors before work, NoCapacity admission, stop conditions, abort, async streaming,
per-request error isolation, wedge detection, tag-keyed stats."""
from __future__ import annotations

import asyncio
import time

import pytest

from tests.helpers.tiny import reference_greedy, tiny_engine
from workers.engine.async_engine import AsyncLLMEngine
from workers.engine.detokenize import IncrementalDetokenizer
from workers.engine.params import InvalidRequest, NoCapacity, SamplingParams, SpecParams


pytestmark = pytest.mark.usefixtures("one_thread")


PER_BLOCK = 4 * (4 * 2 * 2 * 16 + 1 * 2 * 2 * 16) * 4  # tiny llama + 1-layer drafter, 4-token blocks, fp32


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    path = tmp_path_factory.mktemp("eng")
    eng, lm = tiny_engine(path, "llama", drafter_block=8, kv_cache_bytes=100 * PER_BLOCK, max_model_len=256)
    return path, eng, lm


def drain(eng):
    outs = {}
    while eng.has_unfinished():
        for o in eng.step():
            outs.setdefault(o.request_id, []).append(o)
    return outs


@pytest.mark.parametrize("prompt, sp, spec, msg", [
    ([5] * 256, SamplingParams(max_tokens=1), None, "does not fit the context"),
    ([5, 6], SamplingParams(max_tokens=255), None, "exceeds the context"),
    ([5, 6], SamplingParams(temperature=-1), None, "temperature"),
    ([5, 6], SamplingParams(top_p=0.0), None, "top_p"),
    ([5, 6], SamplingParams(top_k=-2), None, "top_k"),
    ([5, 6], SamplingParams(max_tokens=0), None, "max_tokens"),
    ([], SamplingParams(), None, "empty"),
    ([5, 999], SamplingParams(), None, "token ids"),
    ([5, 6], SamplingParams(), SpecParams(True, 9), "exceeds the drafter"),
    ([5, 6], SamplingParams(), SpecParams(True, 1), "block_size"),
])
def test_bad_input_is_typed_and_does_no_work(made, prompt, sp, spec, msg):
    _, eng, _ = made
    free = eng.blocks.num_free_blocks
    with pytest.raises(InvalidRequest, match=msg):
        eng.add_request("bad", prompt, sp, spec)
    assert eng.blocks.num_free_blocks == free and not eng.has_unfinished()


def test_no_capacity_while_others_continue(made):
    _, eng, lm = made
    sp = SamplingParams(max_tokens=100, ignore_eos=True)  # worst case 10 + 100 + 4 slack = 29 blocks
    prompt = list(range(10, 20))
    for r in "abc":
        eng.add_request(r, prompt, sp)
    first = {o.request_id: o for o in eng.step()}
    with pytest.raises(NoCapacity, match="KV pool full"):
        eng.add_request("d", prompt, sp)
    outs = drain(eng)
    for r in "abc":
        outs[r].insert(0, first[r])
    oracle = reference_greedy(lm.model, prompt, 100)
    for r in "abc":
        assert [t for o in outs[r] for t in o.new_token_ids] == oracle
        assert outs[r][-1].finish_reason == "length"
    eng.add_request("d", prompt, SamplingParams(max_tokens=3))  # room again
    drain(eng)


def test_eos_stop_and_stop_strings(made):
    _, eng, lm = made
    prompt = [7, 8, 9]
    oracle = reference_greedy(lm.model, prompt, 30)
    words = [eng.tokenizer.decode([t]) for t in oracle]
    eng.eos_token_ids = [oracle[5]]  # pretend the 6th token is EOS
    try:
        eng.add_request("eos", prompt, SamplingParams(max_tokens=30))
        outs = drain(eng)["eos"]
    finally:
        eng.eos_token_ids = [2]
    toks = [t for o in outs for t in o.new_token_ids]
    first = oracle.index(oracle[5])
    assert toks == oracle[: first + 1] and outs[-1].finish_reason == "stop"
    stop = " ".join(words[3:5])  # a stop string spanning two tokens
    eng.add_request("ss", prompt, SamplingParams(max_tokens=30, stop=(stop,), ignore_eos=True))
    outs = drain(eng)["ss"]
    text = "".join(o.text for o in outs)
    dec = lambda ids: eng.tokenizer.decode(ids, skip_special_tokens=True)
    full = dec(prompt + oracle)[len(dec(prompt)):]  # the continuation's text, as it follows the prompt
    assert outs[-1].finish_reason == "stop" and text == full[: full.index(stop)] and stop not in text


def test_incremental_detokenizer_deltas(made):
    _, eng, _ = made
    ids = [10, 11, 12, 13, 14]
    d = IncrementalDetokenizer(eng.tokenizer, [4, 5], stop=("w13",))
    text = "".join(d.add([t])[0] for t in ids[:2])
    delta, hit = d.add([12, 13])
    assert hit and text + delta + d.flush() == " w10 w11 w12 "  # continues "w4 w5"


def test_abort_and_tags(made):
    _, eng, _ = made
    eng.add_request("x", [5, 6, 7], SamplingParams(max_tokens=50, ignore_eos=True), SpecParams(True, 4),
                    tags={"session": "s1", "role": "coder"})
    eng.step()
    eng.step()
    eng.abort("x")
    outs = eng.step()
    assert outs[-1].finish_reason == "abort" and outs[-1].finished
    assert not eng.has_unfinished() and eng.blocks.num_free_blocks == eng.blocks.num_blocks
    st = eng.stats()
    assert "s1" in st.tau_by_tag["session"] and st.tau_by_tag["role"]["coder"][1] >= 1
    eng.abort("never-existed")  # no-op


def test_error_in_one_request_fails_only_it(made, monkeypatch):
    _, eng, lm = made
    real = eng.executor._finish_item

    def flaky(it, *a):
        if it.seq.request_id == "boom" and it.seq.num_output >= 2:
            raise RuntimeError("injected")
        return real(it, *a)

    monkeypatch.setattr(eng.executor, "_finish_item", flaky)
    eng.add_request("ok", [5, 6], SamplingParams(max_tokens=12, ignore_eos=True))
    eng.add_request("boom", [5, 6], SamplingParams(max_tokens=12, ignore_eos=True), SpecParams(enabled=False))
    outs = drain(eng)
    assert outs["boom"][-1].finish_reason == "error" and "injected" in outs["boom"][-1].error
    assert [t for o in outs["ok"] for t in o.new_token_ids] == reference_greedy(lm.model, [5, 6], 12)


async def test_async_stream_errors_abort_and_health(made):
    _, eng, lm = made
    aeng = AsyncLLMEngine(eng, wedge_timeout_s=1.0)
    try:
        sp = SamplingParams(max_tokens=10, ignore_eos=True)
        agen = aeng.generate("bad", [5], SamplingParams(top_p=2.0))
        with pytest.raises(InvalidRequest):
            await agen.__anext__()
        toks, texts = [], []
        async for o in aeng.generate("s", [5, 6, 7], sp, SpecParams(True, 8)):
            toks += o.new_token_ids
            texts.append(o.text)
        assert toks == reference_greedy(lm.model, [5, 6, 7], 10)
        dec = lambda ids: eng.tokenizer.decode(ids, skip_special_tokens=True)
        assert "".join(texts) == dec([5, 6, 7] + toks)[len(dec([5, 6, 7])):]

        async def consume_two():  # a client that goes away after two chunks -> the engine aborts it
            n = 0
            async for _ in aeng.generate("gone", [5, 6], SamplingParams(max_tokens=200, ignore_eos=True)):
                n += 1
                if n == 2:
                    break
        await consume_two()
        for _ in range(50):
            if not eng.has_unfinished():
                break
            await asyncio.sleep(0.05)
        assert not eng.has_unfinished()
        aeng.check_health()
        # wedge: a step that hangs past the timeout makes check_health raise
        real = eng.step
        eng.step = lambda: (time.sleep(2.0), real())[1]
        stream = aeng.generate("slow", [5, 6], SamplingParams(max_tokens=2))
        task = asyncio.ensure_future(stream.__anext__())
        await asyncio.sleep(1.5)
        with pytest.raises(RuntimeError, match="wedged"):
            aeng.check_health()
        await task
        eng.step = real
        async for _ in stream:
            pass
        assert aeng.stats().tokens_generated > 0
    finally:
        await aeng.shutdown()


def test_step_times_are_recorded_for_pure_steps_only(made):
    """The live step-time EWMAs the router corrects its table with describe pure steps: a step that mixes an AR row
    with a speculative row is recorded as neither (never_slower c16, 2026-12-03: such steps, keyed by their largest
    block, made speculation look cheap at batch 13-16); all-AR and all-block-4 steps are recorded as such."""
    _, eng, _ = made
    calls = []
    tracker = eng.tracker
    orig = tracker.record_step_time
    tracker.record_step_time = lambda ms, block: calls.append(block)
    try:
        sp = SamplingParams(max_tokens=6, ignore_eos=True)
        eng.add_request("m-ar", [5, 6], sp, SpecParams(enabled=False))
        eng.add_request("m-sp", [5, 7], sp, SpecParams(True, 4))
        eng.step()  # prefill of both: not recorded
        assert calls == []
        eng.step()  # one AR row + one block-4 row: mixed, not recorded (was recorded as a block-4 step)
        assert calls == []
        drain(eng)
        calls.clear()
        eng.add_request("p-a", [5, 6], sp, SpecParams(True, 4))
        eng.add_request("p-b", [5, 7], sp, SpecParams(True, 4))
        eng.step()
        eng.step()  # both at block 4: a pure speculative step
        assert calls == [4]
        drain(eng)
        calls.clear()
        eng.add_request("a-a", [5, 6], sp, SpecParams(enabled=False))
        eng.add_request("a-b", [5, 7], sp, SpecParams(enabled=False))
        eng.step()
        eng.step()  # a pure AR step
        assert calls == [None]
        drain(eng)
    finally:
        tracker.record_step_time = orig
