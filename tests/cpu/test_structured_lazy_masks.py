"""Greedy constrained speculation computes grammar masks only where a token depends on them (issue 18).

- xgrammar's accept_token refuses exactly the tokens the mask forbids (never-allowed specials aside), in
  every state of a constrained output: the premise of testing an argmax with the matcher instead of a mask;
- a greedy draft + verify step with lazily settled target rows commits the same tokens and leaves the same
  grammar state as the eager oracle (every row masked), or the step's start state when undone, over random
  drafter / target logits, with fewer mask fills than target rows (a drafter the grammar agrees with needs
  none at all);
- through the engine: greedy constrained speculation (guided and unguided drafts) == constrained greedy AR
  token for token, with fewer mask fills than the eager walk's one per target row.
"""
from __future__ import annotations

import pytest
import torch

from tests.cpu.test_structured_engine import PROMPTS, TAGGED, WEATHER, _run, _spec, _Unguided
from tests.helpers.char_tokenizer import make_char_model_dir
from tests.helpers.tiny import tiny_engine
from workers.engine.params import SamplingParams, SpecParams
from workers.structured.bitmask import allowed
from workers.structured.decoding import build_decoder

pytestmark = pytest.mark.usefixtures("one_thread")

V = 128
GREEDY = SamplingParams(max_tokens=80)
TEXT = '{"city": "Paris", "unit": "celsius", "days": 3}'


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_char_model_dir(tmp_path_factory.mktemp("lazy_masks"))


@pytest.fixture(scope="module")
def tok(tiny_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_dir)


def _decoder(tok):
    return build_decoder(tok, V, [2])


class _Fills:
    """Counts the mask rows a decoder fills on the engine thread (batched walk fills + single fills)."""

    def __init__(self, d):
        self.rows = 0
        fill, now = d._fill, d._mask_now

        def counted_fill(batch, rids):
            if batch is d._batch:  # not the AR rows' prefetch thread
                self.rows += len(rids)
            return fill(batch, rids)

        def counted_now(m):
            self.rows += 1
            return now(m)

        d._fill, d._mask_now = counted_fill, counted_now


def _eager(d, m) -> torch.Tensor:
    if m.is_terminated():
        return d.stop_only.clone()
    out = torch.empty((1, d.w), dtype=torch.int32)
    m.fill_next_token_bitmask(out)
    return (out & d.keep)[0]


def test_accept_token_refuses_exactly_what_the_mask_forbids(tok):
    d = _decoder(tok)
    st = _spec("json_schema", WEATHER)
    d.add("r", st)
    m = d.matchers["r"]
    text = tok.encode(TEXT, add_special_tokens=False) + [2]
    for t_next in text:
        ok = allowed(_eager(d, m)[None], V)[0]
        for t in range(V):
            acc = d._accept(m, t)
            if acc:
                m.rollback(1)
            assert acc == bool(ok[t]), (t, tok.decode([t]))
        assert d._accept(m, t_next)
    assert m.is_terminated()


def _oracle(d, st, prefix: list[int], drafts: list[int], target: torch.Tensor) -> list[int]:
    """Eager greedy verification: every row masked by a fresh matcher's state -> the committed tokens."""
    m = d.compiler.matcher(st)
    for t in prefix:
        assert m.accept_token(t)
    out = []
    for j in range(target.shape[0]):
        row = target[j].clone()
        row[~allowed(_eager(d, m)[None], V)[0]] = float("-inf")
        a = int(row.argmax())
        out.append(a)
        if j == len(drafts) or a != drafts[j]:
            return out
        if not m.is_terminated():
            assert m.accept_token(a)
    raise AssertionError("unreachable")


def test_lazily_settled_greedy_rows_commit_what_the_eager_masks_commit(tok):
    d = _decoder(tok)
    st = _spec("json_schema", TAGGED)
    path = tok.encode('{"ok": true, "tags": ["a", "null"]}', add_special_tokens=False) + [2, 2, 2]
    g = torch.Generator().manual_seed(0)
    fills, rows = _Fills(d), 0
    for trial in range(60):
        d.add("r", st)
        n = 8
        start = trial % 12  # where in the output the step begins: commit the path's first tokens
        d.commit("r", path[:start])
        ahead = path[start: start + n]
        draft_logits = torch.randn(n, V, generator=g)
        follow = torch.rand(n, generator=g) < 0.8  # the drafter mostly proposes the grammar's own path
        for k in range(n):
            if follow[k] and k < len(ahead):
                draft_logits[k, ahead[k]] += 10.0
        (walk, q), = d.draft(["r"], [draft_logits], [GREEDY], [None])
        assert q is None and len(walk.drafts) == n
        target = torch.randn(n + 1, V, generator=g)
        agree = int(torch.randint(0, n + 1, (1,), generator=g))
        for j in range(min(agree, n)):
            target[j, walk.drafts[j]] += 10.0
        if trial % 3 == 0:  # a forbidden token on top, the draft second: the masked row must still accept
            j = min(agree, n - 1)
            target[j, 0] += 20.0  # <pad>: never allowed
            target[j, walk.drafts[j]] += 15.0
        want = _oracle(d, st, path[:start], walk.drafts, target)
        settled = target.clone()
        d.settle_greedy("r", walk, settled, 0, n + 1)
        am = settled.argmax(-1).tolist()
        a = next((j for j in range(n) if am[j] != walk.drafts[j]), n)
        got = walk.drafts[:a] + [am[a]]
        assert got == want, (trial, got, want)
        done = [] if trial % 4 == 1 else got  # some steps fail after verifying: undone to the step's start
        if done:
            d.commit("r", got, walk)
        else:
            d.undo("r", walk)
        rows += n + 1
        ref = d.compiler.matcher(st)
        for t in path[:start] + done:
            if not ref.is_terminated():
                assert ref.accept_token(t)
        assert torch.equal(_eager(d, d.matchers["r"]), _eager(d, ref))  # the same grammar state after the step
        d.remove("r")
    assert 0 < fills.rows < rows, (fills.rows, rows)


def test_a_drafter_and_target_the_grammar_agrees_with_need_no_mask(tok):
    d = _decoder(tok)
    st = _spec("json_schema", WEATHER)
    d.add("r", st)
    path = tok.encode(TEXT, add_special_tokens=False)
    n = 10
    logits = torch.zeros(n, V)
    logits[torch.arange(n), torch.tensor(path[:n])] = 1.0
    fills = _Fills(d)
    (walk, _), = d.draft(["r"], [logits], [GREEDY], [None])
    assert walk.drafts == path[:n] and walk.advanced == n
    target = torch.zeros(n + 1, V)
    target[torch.arange(n + 1), torch.tensor(path[:n + 1])] = 1.0
    d.settle_greedy("r", walk, target, 0, n + 1)
    assert fills.rows == 0  # the eager walk filled n + 1 masks here
    d.commit("r", path[:n + 1], walk)
    assert d._accept(d.matchers["r"], path[n + 1])


@pytest.mark.parametrize("unguided", [False, True])
def test_greedy_speculation_equals_ar_with_fewer_mask_fills(tiny_dir, unguided):
    eng, _ = tiny_engine(tiny_dir, "llama", drafter_block=8)
    reqs = [(p, SamplingParams(max_tokens=60, structured=_spec("json_schema", s)))
            for p, s in zip(PROMPTS, [WEATHER, TAGGED, WEATHER, TAGGED])]
    plain = _run(eng, reqs, SpecParams(enabled=False))
    d = eng.structured_decoder
    fills, rows = _Fills(d), [0]
    draft, walk = d.draft, d.walk

    def counted_draft(*a, **k):
        out = draft(*a, **k)
        rows[0] += sum(len(w.masks) for w, _ in out)
        return out

    def counted_walk(*a, **k):
        w = walk(*a, **k)
        rows[0] += len(w.masks)
        return w

    d.draft, d.walk = counted_draft, counted_walk
    if unguided:
        eng.executor.proposer = _Unguided(eng.executor.proposer)
    spec = _run(eng, reqs, SpecParams(enabled=True, block_size=8))
    assert [t for t, _ in spec] == [t for t, _ in plain]
    assert rows[0] > 0 and fills.rows < rows[0], (fills.rows, rows[0])
