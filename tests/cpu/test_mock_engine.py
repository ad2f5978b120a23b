"""The mock engine's stop strings: the text ends before the earliest stop string whatever the step boundaries
(AR steps add one token, speculative steps several), as a real engine's detokenizer holds back a possible stop."""
from __future__ import annotations

from orchestrator.mock_engine import MockEngine
from workers.engine.params import SamplingParams, SpecParams


async def _text(spec: SpecParams, stop: tuple[str, ...], n: int = 40) -> tuple[str, str]:
    outs = [o async for o in MockEngine().generate("r", [5, 6, 7], SamplingParams(max_tokens=n, stop=stop), spec)]
    return "".join(o.text for o in outs), outs[-1].finish_reason


async def test_stop_strings_cut_at_their_first_occurrence_across_step_boundaries():
    full, why = await _text(SpecParams(False), ())
    assert len(full) == 40 and why == "length"
    for spec in (SpecParams(False), SpecParams(True, 4), SpecParams(True, 16)):
        for i in range(0, 36, 2):
            stop = full[i:i + 3]
            assert await _text(spec, (stop,)) == (full[:full.find(stop)], "stop"), (spec, stop)
        # the earliest of several, whatever their order; a partial match that never completes is sent in full
        a, b = full[20:22], full[5:8]
        assert await _text(spec, (a, b)) == (full[:min(full.find(a), full.find(b))], "stop")
        assert await _text(spec, (full[-2:] + "#",)) == (full, "length")
