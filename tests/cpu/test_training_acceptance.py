"""benchmarks/acceptance.py on a tiny random target + drafter through the real engine (seconds)."""
from __future__ import annotations

import random

import pytest

from benchmarks.acceptance import heldout_items, markdown
from tests.helpers.tiny import tiny_engine
from workers.training.acceptance import Item, measure
from workers.training.prompts import CATEGORIES


pytestmark = pytest.mark.usefixtures("one_thread")


def test_measure_reports_tau_per_category(tmp_path):
    eng, _ = tiny_engine(tmp_path, "llama", drafter_block=4)
    rng = random.Random(0)
    items = [Item(c, [rng.randrange(4, 128) for _ in range(5)]) for c in ("math", "coder", "tool_caller") for _ in range(2)]
    res = measure(eng, items, temperature=0.0, max_tokens=9, block_size=4, progress=False)
    assert set(res["by_category"]) == {"math", "coder", "tool_caller"}
    for c in res["by_category"].values():
        assert 1.0 <= c["tau"] <= 4.0 and c["passes"] > 0
        pos = c["accept_by_position"]
        assert len(pos) == 3 and all(a >= b for a, b in zip(pos, pos[1:]))  # a prefix: non-increasing
        assert c["tau"] == pytest.approx(1 + sum(pos), abs=1e-2)
    assert all(len(v) == 9 for v in res["outputs"].values())
    res1 = measure(eng, items, temperature=1.0, max_tokens=9, block_size=4, progress=False)
    assert res1["tokens"] > 0 and not eng.has_unfinished()
    assert "| 0 | math |" in markdown([res, res1], "cmd", "cpu")


def test_heldout_items_from_the_corpus_or_the_prompt_builder(tmp_path):
    from workers.training.corpus import FORMAT, CorpusWriter, Manifest, Record

    eng, _ = tiny_engine(tmp_path / "t", "llama", drafter_block=4)
    items, source = heldout_items(eng.tokenizer, list(CATEGORIES), 2, None)
    assert "prompt builder" in source and [i.category for i in items] == [c for c in CATEGORIES for _ in range(2)]
    w = CorpusWriter(tmp_path / "c", Manifest(FORMAT, {"name": "t", "sha256": "x", "vocab_size": 128,
                                                       "eos_token_ids": [2]}, {}, {}))
    w.add(Record("coder-1", 1, "coder", "heldout", [5, 6, 7], [8, 2], "stop"))
    w.add(Record("coder-2", 0, "coder", "train", [5, 6], [8, 2], "stop"))
    w.flush()
    items, source = heldout_items(eng.tokenizer, ["coder"], 5, str(tmp_path / "c"))
    assert "corpus" in source and [i.prompt_ids for i in items] == [[5, 6, 7]]


def test_measure_waits_for_kv_room(tmp_path):
    """More requests than the KV pool holds at once: they are admitted as earlier ones finish."""
    from workers.engine.kv_cache import kv_bytes_per_block

    probe, lm = tiny_engine(tmp_path / "t", "llama", drafter_block=4)
    per_block = kv_bytes_per_block(4, [(2, 16)] * (lm.config.num_hidden_layers + 1), 4)
    eng, _ = tiny_engine(tmp_path / "t", "llama", drafter_block=4, max_num_seqs=8, kv_cache_bytes=12 * per_block)
    items = [Item("chat", [5 + i, 6, 7, 8]) for i in range(6)]
    res = measure(eng, items, temperature=0.0, max_tokens=12, block_size=4, progress=False)
    assert sorted(res["outputs"]) == sorted(f"chat-{i}" for i in range(6))
    assert all(len(v) == 12 for v in res["outputs"].values())
