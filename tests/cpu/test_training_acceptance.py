"""benchmarks/acceptance.py on a tiny random target + drafter through the real engine (seconds)."""
from __future__ import annotations

import pytest

from benchmarks.acceptance import markdown, measure
from tests.helpers.tiny import tiny_engine
from workers.training.prompts import build_prompts


pytestmark = pytest.mark.usefixtures("one_thread")


def test_measure_reports_tau_per_category(tmp_path):
    eng, _ = tiny_engine(tmp_path, "llama", drafter_block=4)
    prompts = [p for p in build_prompts(6, 2) if p.split == "heldout"]
    res = measure(eng, prompts, temperature=0.0, max_tokens=9, block_size=4)
    assert set(res["by_category"]) == {"math", "code", "chat"}
    for c in res["by_category"].values():
        assert 1.0 <= c["tau"] <= 4.0 and c["passes"] > 0
        pos = c["accept_by_position"]
        assert len(pos) == 3 and all(a >= b for a, b in zip(pos, pos[1:]))  # a prefix: non-increasing
        assert c["tau"] == pytest.approx(1 + sum(pos), abs=1e-2)
    res1 = measure(eng, prompts, temperature=1.0, max_tokens=9, block_size=4)
    assert res1["tokens"] > 0 and not eng.has_unfinished()
    assert "| 0 | math |" in markdown([res, res1], "cmd", "cpu")
