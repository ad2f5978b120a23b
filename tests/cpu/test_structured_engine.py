"""Grammar-constrained decoding through the engine, speculation included (tiny random models, fp32).

- greedy: constrained output with speculation == constrained greedy without it, token for token, alone and
  batched with unconstrained requests; every finished output parses and matches its schema;
- sampling: tokens of a speculative constrained run follow the constrained distribution (chi-square against
  the exact marginals of a full-recompute model with the grammar's masks);
- a grammar that cannot finish within max_tokens ends with finish_reason "length";
- a grammar the engine cannot compile is a 400-class InvalidRequest that names the field;
- acceptance of constrained turns is tracked per kind and per session.
"""
from __future__ import annotations

import json

import jsonschema
import pytest
import torch
from scipy.stats import chi2

from tests.helpers.char_tokenizer import make_char_model_dir
from tests.helpers.tiny import tiny_engine
from workers.engine.params import InvalidRequest, SamplingParams, SpecParams, StructuredSpec
from workers.engine.sampling import RowParams, processed_probs

pytestmark = pytest.mark.usefixtures("one_thread")

WEATHER = {"type": "object", "properties": {
    "city": {"type": "string", "maxLength": 10}, "unit": {"enum": ["celsius", "fahrenheit"]},
    "days": {"type": "integer", "minimum": 1, "maximum": 9}},
    "required": ["city", "unit", "days"], "additionalProperties": False}
TAGGED = {"type": "object", "properties": {"ok": {"type": "boolean"}, "tags": {
    "type": "array", "items": {"enum": ["a", "b", "null"]}, "maxItems": 3}}, "required": ["ok", "tags"],
    "additionalProperties": False}
TOOL_TAG = {"type": "structural_tag", "format": {"type": "triggered_tags", "triggers": ["<tool_call>"], "tags": [
    {"type": "tag", "begin": '<tool_call>\n{"name": "get_weather", "arguments": ', "content": {
        "type": "json_schema", "json_schema": WEATHER}, "end": "}\n</tool_call>"}]}}
PROMPTS = [[5, 9, 3, 12, 40], [7, 7, 60, 61], [90, 4, 33, 20, 21, 22], [100, 101, 8]]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_char_model_dir(tmp_path_factory.mktemp("grammar"))


@pytest.fixture(scope="module")
def engine(tiny_dir):
    eng, _ = tiny_engine(tiny_dir, "llama", drafter_block=8)
    return eng


def _spec(kind: str, value) -> StructuredSpec:
    return StructuredSpec(kind, value if isinstance(value, str) else json.dumps(value), param="response_format")


def _run(eng, reqs, spec: SpecParams):
    """reqs: [(prompt, SamplingParams)] all at once -> [(tokens, finish_reason)]."""
    got = {str(i): ([], None) for i in range(len(reqs))}
    for i, (p, sp) in enumerate(reqs):
        eng.add_request(str(i), p, sp, spec)
    while eng.has_unfinished():
        for o in eng.step():
            assert o.error is None, o.error
            toks, fr = got[o.request_id]
            got[o.request_id] = (toks + o.new_token_ids, o.finish_reason or fr)
    return [got[str(i)] for i in range(len(reqs))]


def _text(eng, toks):
    return eng.tokenizer.decode([t for t in toks if t not in eng.eos_token_ids], skip_special_tokens=True)


@pytest.mark.parametrize("schema", [WEATHER, TAGGED])
def test_greedy_speculation_equals_constrained_greedy_and_outputs_are_valid(engine, schema):
    st = _spec("json_schema", schema)
    reqs = [(p, SamplingParams(max_tokens=80, structured=st)) for p in PROMPTS]
    plain = _run(engine, reqs, SpecParams(enabled=False))
    for block in (4, 8):
        spec = _run(engine, reqs, SpecParams(enabled=True, block_size=block))
        assert [t for t, _ in spec] == [t for t, _ in plain]
    finished = 0
    for toks, fr in plain:
        if fr == "stop":
            jsonschema.validate(json.loads(_text(engine, toks)), schema)
            finished += 1
        else:
            assert fr == "length"
    assert finished >= 1


def test_constrained_and_free_requests_batched_together_keep_their_own_tokens(engine):
    st = _spec("structural_tag", TOOL_TAG)
    reqs = [(PROMPTS[0], SamplingParams(max_tokens=40, structured=st)),
            (PROMPTS[1], SamplingParams(max_tokens=40)),
            (PROMPTS[2], SamplingParams(max_tokens=40, structured=_spec("json_object", ""))),
            (PROMPTS[3], SamplingParams(max_tokens=40, structured=_spec("json_schema", WEATHER)))]
    alone = [_run(engine, [r], SpecParams(enabled=False))[0][0] for r in reqs]
    batched = _run(engine, reqs, SpecParams(enabled=True, block_size=8))
    assert [t for t, _ in batched] == alone
    free = _run(engine, [(PROMPTS[1], SamplingParams(max_tokens=40))], SpecParams(enabled=True, block_size=8))
    assert free[0][0] == alone[1]  # the unconstrained request is untouched by its neighbours' grammars


def test_a_grammar_that_cannot_finish_in_max_tokens_ends_with_length(engine):
    st = _spec("json_schema", {"type": "object", "properties": {"s": {"type": "string", "minLength": 50}},
                               "required": ["s"]})
    for spec in (SpecParams(enabled=False), SpecParams(enabled=True, block_size=8)):
        (toks, fr), = _run(engine, [(PROMPTS[0], SamplingParams(max_tokens=12, structured=st))], spec)
        assert fr == "length" and len(toks) == 12
        with pytest.raises(ValueError):
            json.loads(_text(engine, toks))


def test_an_uncompilable_grammar_is_invalid_request_naming_the_field(engine):
    bad = StructuredSpec("json_schema", json.dumps({"type": "strin"}), param="response_format.json_schema.schema")
    with pytest.raises(InvalidRequest) as e:
        engine.add_request("bad", PROMPTS[0], SamplingParams(max_tokens=5, structured=bad))
    assert e.value.param == "response_format.json_schema.schema" and "strin" in str(e.value)
    assert not engine.has_unfinished()
    with pytest.raises(InvalidRequest):
        engine.add_request("x", PROMPTS[0], SamplingParams(max_tokens=5, ignore_eos=True,
                                                           structured=_spec("json_object", "")))


def test_constrained_acceptance_is_tracked_per_kind_and_session(engine):
    st = _spec("json_schema", WEATHER)
    engine.add_request("t", PROMPTS[0], SamplingParams(max_tokens=30, structured=st),
                       SpecParams(enabled=True, block_size=8), tags={"session": "s-42"})
    while engine.has_unfinished():
        engine.step()
    tags = engine.stats().tau_by_tag
    assert tags["constrained"]["json_schema"][1] >= 1 and tags["constrained_session"]["s-42"][1] >= 1
    assert tags["session"]["s-42"][1] >= 1


# ---------------------------------------------------------------- sampling
GRAMMAR = 'root ::= ("a" [a-c] | "b" [c-e] | [c-e] [a-e]) [a-e]'
V, N = 128, 700


def _allowed(tok, prefix_text: str) -> torch.Tensor:
    """[V] bool: tokens the grammar allows after prefix_text (a fresh xgrammar matcher, the oracle)."""
    import xgrammar as xgr

    info = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=V, stop_token_ids=[2])
    m = xgr.GrammarMatcher(xgr.GrammarCompiler(info).compile_grammar(GRAMMAR), override_stop_tokens=[2])
    assert m.accept_string(prefix_text) if prefix_text else True
    bm = xgr.allocate_token_bitmask(1, V)
    m.fill_next_token_bitmask(bm)
    from workers.structured.bitmask import allowed

    ok = allowed(bm, V)[0]
    ok[[0, 1, 3]] = False  # never-allowed specials (workers/structured/compiler.py)
    return ok


def test_speculative_sampling_follows_the_constrained_distribution(tiny_dir):
    eng, lm = tiny_engine(tiny_dir, "llama", drafter_block=4, drafter_seed=3)
    tok = eng.tokenizer
    sp = dict(temperature=1.0)
    rp = RowParams.build([SamplingParams(**sp)], "cpu")
    prompt = PROMPTS[0]

    def dist(ids, text):
        with torch.no_grad():
            logits = lm.model(torch.tensor([prompt + ids]))[0, -1:].float()
        logits[0, ~_allowed(tok, text)] = float("-inf")
        return processed_probs(logits, rp)[0].double()

    p1 = dist([], "")
    p2 = torch.zeros(V, dtype=torch.float64)
    for t1 in p1.nonzero().flatten().tolist():
        p2 += p1[t1] * dist([t1], tok.decode([t1]))
    counts = [torch.zeros(V, dtype=torch.float64) for _ in range(2)]
    st = StructuredSpec("ebnf", GRAMMAR)
    for start in range(0, N, 50):
        reqs = [(prompt, SamplingParams(max_tokens=4, structured=st, seed=start + i, **sp)) for i in range(50)]
        for toks, _ in _run(eng, reqs, SpecParams(enabled=True, block_size=4)):
            counts[0][toks[0]] += 1
            counts[1][toks[1]] += 1
    assert eng.stats().tau_mean > 1.0  # drafts were accepted: the speculative path was exercised
    for c, p in zip(counts, (p1, p2)):
        keep = p > 1e-12
        assert c[~keep].sum() == 0  # never a token the grammar forbids
        exp = p[keep] * c.sum()
        stat = float(((c[keep] - exp) ** 2 / exp).sum())
        assert stat < chi2.ppf(1 - 1e-3, int(keep.sum()) - 1), stat


def test_a_grammar_that_admits_nothing_is_refused_at_admission(engine):
    st = StructuredSpec("json_schema", json.dumps({"anyOf": [{"$ref": "#"}]}), param="response_format.json_schema.schema")
    with pytest.raises(InvalidRequest, match="admits no output"):
        engine.add_request("none", PROMPTS[0], SamplingParams(max_tokens=5, structured=st))
    assert not engine.has_unfinished() and not engine.structured_decoder.has("none")


class _Unguided:
    """A proposer that ignores the grammar guide (as a model-free proposer would): its drafts are checked
    against the grammar after proposing, and a forbidden draft ends the accepted prefix."""

    def __init__(self, inner):
        self.inner = inner
        self.max_block, self.kv_layers = inner.max_block, inner.kv_layers
        self.capture_layers, self.network = inner.capture_layers, inner.network

    def propose(self, batch, runner):
        from dataclasses import replace

        return self.inner.propose([replace(r, guide=None) for r in batch], runner)

    def commit(self, batch, runner):
        self.inner.commit(batch, runner)


def test_drafts_proposed_without_the_grammar_are_checked_and_stay_exact(tiny_dir):
    eng, _ = tiny_engine(tiny_dir, "llama", drafter_block=8)
    st = _spec("json_schema", WEATHER)
    reqs = [(p, SamplingParams(max_tokens=60, structured=st)) for p in PROMPTS]
    plain = _run(eng, reqs, SpecParams(enabled=False))
    eng.executor.proposer = _Unguided(eng.executor.proposer)
    spec = _run(eng, reqs, SpecParams(enabled=True, block_size=8))
    assert [t for t, _ in spec] == [t for t, _ in plain]
