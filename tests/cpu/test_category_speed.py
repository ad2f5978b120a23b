"""benchmarks/category_speed.py (engine_bench's ``categories`` section): DFlash vs AR per prompt category at
batch 1, stopping at EOS, on a tiny random target + drafter through the real engine (seconds)."""
from __future__ import annotations

import json
import random
from types import SimpleNamespace

import pytest

from benchmarks import category_speed as cs
from benchmarks.acceptance import heldout_items
from tests.helpers.tiny import greedy_outputs, tiny_engine
from workers.training.acceptance import Item

pytestmark = pytest.mark.usefixtures("one_thread")

CATS = ["math", "code"]


# ------------------------------------------------------------------ accounting (pure)

def test_first_divergence_and_compare():
    assert cs.first_divergence([5, 6, 7], [5, 6, 7]) is None
    assert cs.first_divergence([5, 6, 7], [5, 9, 7]) == 1
    assert cs.first_divergence([5, 6], [5, 6, 7]) == 2  # a strict prefix diverges where the shorter ends
    assert cs.first_divergence([], []) is None
    got = cs.compare([[1, 2], [3, 4, 5], [6]], [[1, 2], [3, 0, 5], [6, 2]])
    assert got == {"identical_prompts": 1, "prompts": 3, "first_divergence": [None, 1, 1]}
    with pytest.raises(ValueError):
        cs.compare([[1]], [])


def test_summarize_per_category_and_all():
    ar = [cs.Run("math", [4, 5, 2], 0.5, 0.4, [1, 1, 1], "stop"),
          cs.Run("code", [7] * 4, 1.0, 0.9, [1] * 4, "length")]
    df = [cs.Run("math", [4, 5, 2], 0.25, 0.2, [1, 2], "stop"),
          cs.Run("code", [7, 7, 8, 7], 0.5, 0.4, [1, 3], "length")]
    s = cs.summarize(ar, df, ["math", "code"])
    assert list(s) == ["math", "code", "all"]
    m = s["math"]
    assert m["ar"]["tokens"] == 3 and m["ar"]["tok_s"] == pytest.approx(6.0) and m["ar"]["tau"] == 1.0
    assert m["dflash"]["tok_s"] == pytest.approx(12.0) and m["dflash"]["tau"] == 2.0  # prefill pass not counted
    assert m["dflash_over_ar"] == pytest.approx(2.0) and m["agreement"]["identical_prompts"] == 1
    assert m["ar"]["stopped_at_eos"] == 1 and s["code"]["ar"]["stopped_at_eos"] == 0
    assert s["code"]["agreement"]["first_divergence"] == [2]
    a = s["all"]
    assert a["prompts"] == 2 and a["ar"]["tokens"] == 7 and a["ar"]["seconds"] == pytest.approx(1.5)
    assert a["dflash"]["tau"] == pytest.approx(2.5) and a["dflash"]["target_passes"] == 4
    assert a["agreement"] == {"identical_prompts": 1, "prompts": 2, "first_divergence": [None, 2]}
    assert "math" in cs.format_table({"block": 4, "max_tokens": 8, "by_category": s})


def test_parse_categories():
    assert cs.parse_categories(" math,code ") == ["math", "code"]
    with pytest.raises(ValueError, match="unknown categories.*nope"):
        cs.parse_categories("math,nope")
    with pytest.raises(ValueError):
        cs.parse_categories(",")


# ------------------------------------------------------------------ through the engine (fp32: DFlash == AR)

def _consistent(c: dict, block: int) -> None:
    for name in ("ar", "dflash"):
        r = c[name]
        assert r["tok_s"] == pytest.approx(r["tokens"] / r["seconds"])
        assert r["seconds"] > 0 and r["tokens"] > 0
    d = c["dflash"]
    assert 1.0 <= d["tau"] <= block
    # every prompt's prefill pass commits one token; tau is over the passes after it
    assert d["tau"] * (d["target_passes"] - c["prompts"]) == pytest.approx(d["tokens"] - c["prompts"])
    assert c["ar"]["target_passes"] == c["ar"]["tokens"]
    assert c["dflash_over_ar"] == pytest.approx(d["tok_s"] / c["ar"]["tok_s"])


def test_measure_stops_at_eos_and_dflash_equals_ar_in_fp32(tmp_path):
    from workers.engine.params import SpecParams

    eng, _ = tiny_engine(tmp_path, "llama", drafter_block=4)
    rng = random.Random(0)  # the tiny word-level tokenizer reads real prompts as <pad>s: random in-vocab ones
    items = [Item(c, [rng.randrange(4, 128) for _ in range(6 + 3 * k)]) for c in CATS for k in range(2)]
    max_tokens = 16
    # a random model rarely says EOS: make EOS a token AR emits before the cap for some prompt and in no prompt's
    # first two tokens (so every prompt has decode passes after its prefill pass)
    probe = greedy_outputs(eng, [(i.prompt_ids, max_tokens) for i in items], SpecParams(False))
    eos = next(t for p in probe for t in p[2:-1] if all(t not in q[:2] for q in probe))
    eng.eos_token_ids = [eos]
    want = [p[: p.index(eos) + 1] if eos in p else p for p in probe]  # what a user gets: stop at EOS
    assert any(len(w) < max_tokens for w in want)
    res = cs.measure_categories(eng, items, CATS, max_tokens, progress=False)
    assert res["block"] == 4 and res["batch"] == 1 and not eng.has_unfinished()
    outs = res["outputs"]
    assert [o["ar"] for o in outs] == want
    assert [o["dflash"] for o in outs] == want  # fp32 speculative decoding is exact
    assert all(sum(o["dflash_passes"]) == len(o["dflash"]) for o in outs)
    by = res["by_category"]
    assert list(by) == CATS + ["all"]
    assert sum(by[c]["ar"]["stopped_at_eos"] for c in CATS) == by["all"]["dflash"]["stopped_at_eos"] == sum(
        eos in w for w in want)
    for cat in CATS:
        c = by[cat]
        assert c["prompts"] == 2 and c["agreement"] == {"identical_prompts": 2, "prompts": 2,
                                                        "first_divergence": [None, None]}
        assert c["ar"]["tokens"] == sum(len(o["ar"]) for o in outs if o["category"] == cat)
        _consistent(c, 4)
    _consistent(by["all"], 4)
    assert by["all"]["ar"]["tokens"] == by["math"]["ar"]["tokens"] + by["code"]["ar"]["tokens"]
    assert by["all"]["ar"]["seconds"] == pytest.approx(by["math"]["ar"]["seconds"] + by["code"]["ar"]["seconds"])


def test_measure_needs_a_drafter_and_an_idle_engine(tmp_path):
    from workers.engine.params import SamplingParams, SpecParams

    ar_only, _ = tiny_engine(tmp_path / "a", "llama", drafter_block=None)
    with pytest.raises(ValueError, match="no drafter"):
        cs.measure_categories(ar_only, [Item("math", [5, 6, 7])], ["math"], 4, progress=False)
    eng, _ = tiny_engine(tmp_path / "b", "llama", drafter_block=4)
    eng.add_request("busy", [5, 6, 7], SamplingParams(max_tokens=4), SpecParams(False))
    with pytest.raises(RuntimeError, match="batch 1"):
        cs.measure_categories(eng, [Item("math", [5, 6, 7])], ["math"], 4, progress=False)


def test_engine_bench_categories_section(tmp_path, capsys):
    from benchmarks.engine_bench import section_categories

    eng, _ = tiny_engine(tmp_path / "t", "llama", drafter_block=4)
    args = SimpleNamespace(categories="chat", category_prompts=1, category_max_tokens=5, block=2, corpus=str(tmp_path))
    res = section_categories(args, eng)  # no corpus there: the prompt builder's held-out first turns
    assert res["block"] == 2 and res["per_category"] == 1 and "prompt builder" in res["prompts_source"]
    assert list(res["by_category"]) == ["chat", "all"] and res["by_category"]["chat"]["prompts"] == 1
    assert "DF/AR" in capsys.readouterr().out
    ar_only, _ = tiny_engine(tmp_path / "a", "llama", drafter_block=None)
    assert section_categories(args, ar_only) is None


def test_command_line(tmp_path):
    from tests.helpers.tiny import tiny_drafter
    from workers.models.dflash import save_drafter

    _, lm = tiny_engine(tmp_path / "t", "llama", drafter_block=None)
    save_drafter(tiny_drafter(lm.config, block_size=4), tmp_path / "d")
    out = tmp_path / "cat.json"
    argv = ["--model", str(tmp_path / "t"), "--drafter", str(tmp_path / "d"), "--categories", "math,code",
            "--prompts", "1", "--max-tokens", "6", "--corpus", "", "--dtype", "float32", "--max-model-len", "256",
            "--json", str(out)]
    assert cs.main(argv) == 0
    got = json.loads(out.read_text())
    meta = got["meta"]
    assert meta["command"].startswith("python -m benchmarks.category_speed --model")
    assert {"started", "ended", "machine", "loadavg_start", "loadavg_end", "commit", "threads", "dtype"} <= set(meta)
    assert meta["dtype"] == "float32" and got["block"] == 4 and got["max_tokens"] == 6
    assert list(got["by_category"]) == ["math", "code", "all"]
    assert got["by_category"]["all"]["agreement"]["identical_prompts"] == 2
    with pytest.raises(SystemExit):
        cs.main(argv[:4] + ["--categories", "math,nope"])
    with pytest.raises(SystemExit):
        cs.main(["--model", str(tmp_path / "t"), "--drafter", str(tmp_path / "missing")])
