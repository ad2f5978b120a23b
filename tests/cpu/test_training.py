"""Drafter training pipeline on tiny random models (no network, seconds each).

The central test is the overfit check: a drafter trained on a handful of the target's greedy sequences must
reach a tau near the block size on those sequences, measured offline AND through the engine, and the two must
agree pass by pass: proof that features, positions, the block mask and the labels follow the engine's
drafting convention.
"""
from __future__ import annotations

import copy
import json
import os
import random
import subprocess
import sys

import pytest
import torch

from workers.models.dflash import DrafterConfig, load_drafter
from workers.models.config import ModelConfig
from tests.helpers.tiny import make_tiny_hf_dir, tiny_drafter, tiny_engine, tiny_hf_config
from workers.training.acceptance import Item, measure
from workers.training.block_forward import blocks_forward, dense_mask
from workers.training.corpus import (FORMAT, CorpusWriter, Manifest, Record, check_target, decode_shard,
                                     encode_shard, read_manifest, read_records)
from workers.training.data import IGNORE, MixSampler, Sample, make_batch, parse_mix, serving_block_len
from workers.training.drafter_init import from_target_layers, random_drafter, warm_start
from workers.training.evaluate import offline_tau, sample_acceptance, walk
from workers.training.features import target_features
from workers.training.generate import GenerationConfig, generate_corpus
from workers.training.loss import fused_linear_ce
from workers.training.overfit import greedy_samples, overfit
from workers.training.prompts import (AGENT_ROLES, AGENT_SYSTEM, AGENT_TASKS, CATEGORIES, Conversation,
                                      build_conversations)
from workers.training.train import TrainConfig

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------------------ prompts
def test_prompt_set_covers_roles_multiturn_and_heldout():
    a = build_conversations(60, 10, seed=3)
    assert a == build_conversations(60, 10, seed=3) and a != build_conversations(60, 10, seed=4)
    for cat in CATEGORIES:
        rows = [c for c in a if c.category == cat]
        assert len(rows) == 60 and len({c.id for c in rows}) == 60
        assert sum(c.split == "heldout" for c in rows) == 10 and all(c.split == "heldout" for c in rows[:10])
    assert build_conversations(30, 10, seed=3)[:5] == a[:5]  # a smaller set is a prefix per category
    agents = [c for c in a if c.category in AGENT_ROLES]
    assert sum(len(c.turns) > 1 for c in agents) > len(agents) / 2
    assert all(c.system.startswith(AGENT_SYSTEM[c.category]) for c in agents)
    assert all(c.system is None for c in a if c.category not in AGENT_ROLES)
    c = next(x for x in agents if len(x.turns) >= 3)
    m = c.messages(["first answer", "second answer"])
    assert [x["role"] for x in m] == ["system", "user", "assistant", "user", "assistant", "user"]
    assert m[2]["content"] == "first answer" and m[-1]["content"] == c.turns[2]
    with pytest.raises(ValueError, match="no turn"):
        c.messages(["a"] * len(c.turns))
    with pytest.raises(ValueError, match="unknown prompt category"):
        build_conversations({"poetry": 50})


def test_agent_prompts_match_the_workload_roles_but_not_its_tasks():
    from benchmarks.workload import ROLES, SYSTEM, TASKS

    assert set(ROLES) == set(AGENT_ROLES) and SYSTEM == AGENT_SYSTEM
    assert not {n for n, _ in TASKS} & {n for n, _ in AGENT_TASKS}  # the router benchmarks' traffic stays unseen


def test_default_prompt_set_is_large_enough():
    convs = build_conversations()
    assert len(convs) >= 10_000 and sum(len(c.turns) for c in convs) > 15_000


def test_prompt_ids_are_reproducible_across_processes():
    code = "from workers.training.prompts import build_conversations; print([c.id for c in build_conversations(50, 5)])"
    runs = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
            for _ in range(2)]
    assert runs[0] == runs[1] == str([c.id for c in build_conversations(50, 5)]) + "\n"


# ------------------------------------------------------------------------------------------- corpus
def _manifest(vocab=49152, sha="abc"):
    return Manifest(FORMAT, {"name": "t", "sha256": sha, "vocab_size": vocab, "eos_token_ids": [2]},
                    {"seed": 0, "heldout": 1}, {"max_new_tokens": 8})


def test_corpus_round_trip_is_compact_and_checked(tmp_path):
    rng = random.Random(0)
    recs = [Record(f"c{i}", i % 2, "math" if i % 3 else "coder", "train" if i else "heldout",
                   [rng.randrange(49152) for _ in range(30)], [rng.randrange(2000) for _ in range(200)], "stop")
            for i in range(40)]
    data = encode_shard(recs, 49152)
    assert decode_shard(data, "x") == recs
    assert len(data) < 2 * sum(len(r.prompt_ids) + len(r.response_ids) for r in recs)  # uint16 + xz
    w = CorpusWriter(tmp_path / "c", _manifest())
    for r in recs[:25]:
        w.add(r)
    w.flush()
    for r in recs[25:]:
        w.add(r)
    w.flush()
    m = read_manifest(tmp_path / "c")
    assert m.num_records == 40 and len(m.shards) == 2 and read_records(tmp_path / "c") == recs
    assert m.counts()["coder/heldout"]["records"] == 1
    check_target(m, "abc", 49152, "corpus")
    with pytest.raises(ValueError, match="vocabulary 49152"):
        check_target(m, "abc", 32000, "corpus")
    with pytest.raises(ValueError, match="sha256"):
        check_target(m, "def", 49152, "corpus")
    shard = tmp_path / "c" / m.shards[1]["file"]
    shard.write_bytes(shard.read_bytes()[:-10] + b"0123456789")
    with pytest.raises(ValueError, match="corrupted"):
        read_records(tmp_path / "c")
    with pytest.raises(FileNotFoundError, match="not a token corpus"):
        read_manifest(tmp_path)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        encode_shard([Record("x", 0, "math", "train", [5], [70000], "stop")], 49152)


def _words(rng, n):
    return " ".join(f"w{rng.randrange(4, 128)}" for _ in range(n))


def _tiny_convs(n=6, seed=0):
    rng = random.Random(seed)
    return [Conversation(f"math-{i}" if i % 2 else f"coder-{i}", "math" if i % 2 else "coder",
                         None if i % 2 else "w5 w6 w7", tuple(_words(rng, 5) for _ in range(1 + i % 3)),
                         "heldout" if i < 2 else "train") for i in range(n)]


def test_generation_streams_multiturn_resumes_and_refuses_other_settings(tmp_path):
    eng, lm = tiny_engine(tmp_path / "t", "llama", drafter_block=None, max_num_seqs=4)
    convs = _tiny_convs()
    prompts = {"seed": 0, "heldout": 2}
    gc = GenerationConfig(max_new_tokens=6, batch=4, flush_every=2)
    full = generate_corpus(tmp_path / "t", tmp_path / "full", convs, prompts, gc, engine=eng)
    recs = {r.id: r for r in read_records(tmp_path / "full")}
    assert full.num_records == sum(len(c.turns) for c in convs) == len(recs)
    c = next(c for c in convs if len(c.turns) == 3)
    r0, r1 = recs[f"{c.id}/0"], recs[f"{c.id}/1"]
    assert r1.prompt_ids[: len(r0.prompt_ids)] == r0.prompt_ids  # turn 2 = the conversation so far
    answer = eng.tokenizer.decode([t for t in r0.response_ids if t not in eng.eos_token_ids],
                                  skip_special_tokens=True)
    assert eng.tokenizer.decode(r1.prompt_ids).count(answer) >= 1
    # interrupted after 3 turns, then continued: the same corpus as one uninterrupted run (fp32: exact)
    part = generate_corpus(tmp_path / "t", tmp_path / "part", convs, prompts,
                           GenerationConfig(max_new_tokens=6, batch=4, flush_every=2, max_turns=3), engine=eng)
    assert part.num_records == 3
    generate_corpus(tmp_path / "t", tmp_path / "part", convs, prompts, gc, engine=eng)
    again = {r.id: r for r in read_records(tmp_path / "part")}
    assert again == recs
    with pytest.raises(ValueError, match="max_new_tokens=6"):
        generate_corpus(tmp_path / "t", tmp_path / "part", convs, prompts, GenerationConfig(max_new_tokens=9),
                        engine=eng)
    with pytest.raises(ValueError, match="prompt seed"):
        generate_corpus(tmp_path / "t", tmp_path / "part", convs, {"seed": 1, "heldout": 2}, gc, engine=eng)


# --------------------------------------------------------------------------------- batches and math
def test_blocks_follow_the_engine_convention():
    toks = torch.arange(10, 30)  # T = 20, prompt P = 5
    s = Sample("x", "math", toks, 5, "length")
    b = make_batch([s], [[5, 9, 18]], block_size=4, mask_token_id=99, block_lens=[[4, 4, 1]])
    assert b.tokens.shape[1] == 18 and (b.tokens[0] == toks[:18]).all()  # context: positions < the last anchor
    for j, p in enumerate([5, 9, 18]):
        row = slice(4 * j, 4 * j + 4)
        assert b.block_ids[0, row].tolist() == [int(toks[p]), 99, 99, 99]  # anchor = token at p, then MASK
        assert b.labels[0, 4 * j] == IGNORE
    assert b.labels[0, 1:4].tolist() == [16, 17, 18]  # row k: token at p + k
    assert b.labels[0, 5:8].tolist() == [20, 21, 22]
    assert b.labels[0, 9:12].tolist() == [IGNORE] * 3  # a 1-row block (AR pass) drafts nothing
    assert serving_block_len(s, 5, 16, 15) == 14 and serving_block_len(s, 17, 16, 15) == 2 and serving_block_len(s, 18, 16, 15) == 1
    assert serving_block_len(s, 17, 16, None) == 16


def test_walk_replays_speculative_decoding():
    # P = 2, T = 12 (10 response tokens), block 4, max_new 10; accepted drafts per anchor 2..10
    acc = [3, 0, 1, 2, 2, 0, 1, 0, 0]
    # j=2: +4 -> j=6: +3 -> j=9: 2-row block (2 tokens left), +1 -> j=10: 1 left, an AR pass -> j=11 = T-1
    assert walk(acc, 2, 12, 4, 10) == [4, 3, 1, 1]
    assert walk([3, 0, 1, 2, 0, 3, 1, 0, 0], 2, 12, 4, 10) == [4, 1, 4]
    assert walk([1], 5, 7, 4, 30) == [1]  # the draft accepted EOS (the last token): no bonus after it
    assert walk([], 3, 4, 4, None) == []


def test_block_forward_equals_the_dense_oracle():
    cfg = ModelConfig.from_hf(tiny_hf_config("llama"))
    d = tiny_drafter(cfg, num_layers=2, block_size=4)
    b, n, B, C = 2, 3, 4, 10
    emb = torch.randn(b, n * B, cfg.hidden_size, requires_grad=True)
    feats = torch.randn(b, C, len(d.config.target_layer_ids) * cfg.hidden_size)
    anchors = torch.tensor([[3, 5, 9], [1, 0, 7]])
    blen = torch.tensor([[4, 2, 4], [4, 1, 3]])
    for bl in (None, blen):
        out = blocks_forward(d, emb, feats, anchors, bl)
        q_pos = (anchors[:, :, None] + torch.arange(B)).reshape(b, n * B)
        ref = d(emb, feats, q_pos, torch.arange(C).expand(b, C), dense_mask(anchors, C, B, bl))
        torch.testing.assert_close(out, ref, atol=2e-6, rtol=1e-5)
        g1 = torch.autograd.grad(out.square().sum(), emb)[0]
        g2 = torch.autograd.grad(ref.square().sum(), emb)[0]
        torch.testing.assert_close(g1, g2, atol=2e-5, rtol=1e-4)


def test_fused_full_vocab_loss_equals_autograd():
    torch.manual_seed(0)
    h = torch.randn(37, 16, requires_grad=True)
    W, t, w = torch.randn(50, 16), torch.randint(0, 50, (37,)), torch.rand(37)
    loss, correct = fused_linear_ce(h, W, t, w, chunk=8)
    (g,) = torch.autograd.grad(2 * loss, h)
    ref = (w * torch.nn.functional.cross_entropy(h @ W.T, t, reduction="none")).sum() / w.sum()
    (gr,) = torch.autograd.grad(2 * ref, h)
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(g, gr)
    assert (correct == ((h @ W.T).argmax(-1) == t)).all()


def test_target_features_equal_the_capture_of_the_full_forward(tmp_path):
    _, lm = tiny_engine(tmp_path, "llama", drafter_block=None)
    toks = torch.randint(4, 128, (2, 9))
    f = target_features(lm.model, toks, [0, 2])
    _, cap = lm.model.forward_hidden(toks, capture_layers=[0, 2])
    torch.testing.assert_close(f, torch.cat([cap[0], cap[2]], dim=-1))


def test_context_features_per_sequence_equal_the_padded_batch(tmp_path):
    """One forward per sequence at its own length (no padding compute) gives the padded batch's features on every
    position a block can see, and zeros past each sequence's context."""
    from workers.training.features import context_features

    _, lm = tiny_engine(tmp_path, "llama", drafter_block=None)
    toks = torch.randint(4, 128, (3, 11))
    lengths = [11, 4, 7]
    f = context_features(lm.model, toks, lengths, [0, 2])
    ref = target_features(lm.model, toks, [0, 2])
    for i, n in enumerate(lengths):
        torch.testing.assert_close(f[i, :n], ref[i, :n])
        assert (f[i, n:] == 0).all()


def test_mix_sampler_weights_and_resume():
    samples = [Sample(f"{c}{i}", c, torch.arange(5), 2, "stop") for c in ("math", "code", "chat") for i in range(7)]
    s = MixSampler(samples, parse_mix("code=3,math=1"), seed=1)
    draws = [x.category for st in range(50) for x in s.draw(4, st)]
    assert "chat" not in draws and draws.count("code") > 2 * draws.count("math")
    a, b = MixSampler(samples, None, 2), MixSampler(samples, None, 2)
    for st in range(5):
        a.draw(3, st)
    b.state = copy.deepcopy(a.state)
    assert [x.id for x in a.draw(3, 5)] == [x.id for x in b.draw(3, 5)]
    with pytest.raises(ValueError, match="no training data"):
        MixSampler(samples, {"planner": 1.0}, 0)
    with pytest.raises(ValueError, match="category=weight"):
        parse_mix("code:3")


# --------------------------------------------------------------------------- the overfit sanity check
def test_overfit_reaches_the_block_size_offline_and_through_the_engine(tmp_path):
    """A few greedy sequences, memorised: tau close to B = 4, offline == engine pass by pass."""
    eng, lm = tiny_engine(tmp_path / "t", "llama", drafter_block=None, max_num_seqs=8)
    rng = random.Random(0)
    items = [Item(["math", "code"][i % 2], [rng.randrange(4, 128) for _ in range(6)]) for i in range(8)]
    dc = DrafterConfig.for_target(lm.config, num_hidden_layers=1, mask_token_id=3, block_size=4,
                                  target_layer_ids=[0, 2])
    cfg = TrainConfig(minutes=1.0, max_steps=400, seqs_per_step=4, anchors_per_seq=1000, lr=3e-3, warmup=10,
                      eval_every_steps=25, ckpt_minutes=1e9, stop_at_tau=3.7, autocast="off")
    r = overfit(eng, random_drafter(dc, lm.model), items, cfg, 20, tmp_path)
    assert r["offline_tau"] >= 3.6 and r["p_first"] >= 0.9, r
    assert r["sequences_compared"] == 8 and r["sequences_same_passes"] == 8, r
    assert abs(r["engine_tau"] - r["offline_tau"]) < 1e-6
    assert r["history"][0]["tau"] < r["history"][-1]["tau"]


def test_offline_tau_equals_engine_tau_for_an_untrained_drafter(tmp_path):
    """Equivalence also where acceptance is partial and ragged (random drafter with some lucky blocks)."""
    eng, lm = tiny_engine(tmp_path / "t", "llama", drafter_block=None, max_num_seqs=6)
    rng = random.Random(1)
    items = [Item("chat", [rng.randrange(4, 128) for _ in range(5)]) for _ in range(6)]
    samples = greedy_samples(eng, items, 30)
    d = tiny_drafter(lm.config, block_size=4, target_layer_ids=[1, 3])
    from workers.engine.llm_engine import LLMEngine

    spec = LLMEngine(eng.config, model=lm.model, drafter=d, tokenizer=lm.tokenizer)
    res = measure(spec, items, 0.0, 30, 4, progress=False)
    for i, s in enumerate(samples):
        acc = sample_acceptance(d, lm.model, s, 30)
        assert walk(acc, s.prompt_len, len(s.tokens), 4, 30) == res["passes"][f"chat-{i}"]
    assert offline_tau(d, lm.model, samples, 30)["tau"] == pytest.approx(res["tau"], abs=1e-3)


# -------------------------------------------------------------------------------- training pipeline
@pytest.fixture(scope="module")
def tiny_corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("tc")
    target = make_tiny_hf_dir(root / "target", "llama", seed=1)
    eng, _ = tiny_engine(target, "llama", drafter_block=None, max_num_seqs=8)
    generate_corpus(target, root / "corpus", _tiny_convs(12, seed=3), {"seed": 0, "heldout": 2},
                    GenerationConfig(max_new_tokens=16, batch=8), engine=eng)
    return target, root / "corpus"


def _rc(target, corpus, tmp, **kw):
    from workers.training.pipeline import RunConfig

    tc = TrainConfig(minutes=5.0, max_steps=kw.pop("steps", 6), seqs_per_step=2, anchors_per_seq=8, lr=3e-3, warmup=2,
                     eval_every_steps=3, ckpt_minutes=1e9, **kw.pop("train", {}))
    return RunConfig(target=str(target), corpus=str(corpus), out=str(tmp / "drafter"), work_dir=str(tmp / "work"),
                     block_size=4, layers=kw.pop("layers", 1), num_features=2, mask_token_id=3,
                     eval_per_category=2, train=tc, **kw)


def test_training_exports_resumes_and_refuses_mismatches(tiny_corpus, tmp_path):
    from workers.training.pipeline import run_training

    target, corpus = tiny_corpus
    s1 = run_training(_rc(target, corpus, tmp_path, steps=6))
    assert s1["step"] == 6 and [h["step"] for h in s1["history"]] == [0, 3, 6]
    tcfg = ModelConfig.from_hf(json.loads((target / "config.json").read_text()))
    d = load_drafter(tmp_path / "drafter", tcfg)
    assert d.config.block_size == 4 and d.config.mask_token_id == 3
    # default loss over the drafter's draft vocabulary: exported beside it, what the engine drafts from
    dv = json.loads((tmp_path / "drafter" / "draft_vocab.json").read_text())["token_ids"]
    assert d.draft_vocab.tolist() == dv and s1["drafter"]["draft_vocab"]["size"] == len(dv)
    assert "draft vocabulary: the" in (tmp_path / "drafter" / "README.md").read_text()
    card = (tmp_path / "drafter" / "README.md").read_text()
    assert "tau vs training time" in card and "training.json" not in card
    assert json.loads((tmp_path / "drafter" / "training.json").read_text())["step"] == 6
    # resume: continues at step 6 with the sampler where it stopped (and the draft vocabulary it started with)
    s2 = run_training(_rc(target, corpus, tmp_path, steps=9))
    assert s2["step"] == 9 and [h["step"] for h in s2["history"]] == [0, 3, 6, 9]
    assert json.loads((tmp_path / "drafter" / "draft_vocab.json").read_text())["token_ids"] == dv
    log = [json.loads(line) for line in (tmp_path / "work" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "step" in r and "loss" in r and "eval" not in r] == list(range(1, 10))
    # a checkpoint for another drafter shape / another target is refused, naming the mismatch
    with pytest.raises(ValueError, match="num_hidden_layers=1"):
        run_training(_rc(target, corpus, tmp_path, steps=10, layers=2))
    other = make_tiny_hf_dir(tmp_path / "other", "llama", seed=7)
    with pytest.raises(ValueError, match="sha256"):
        run_training(_rc(other, corpus, tmp_path / "x", steps=1))
    # warm start needs equal shapes
    with pytest.raises(ValueError, match="cannot warm-start .* num_hidden_layers"):
        run_training(_rc(target, corpus, tmp_path / "w", steps=1, layers=2, init=str(tmp_path / "drafter")))


def test_training_options_restricted_loss_mix_init_from_target(tiny_corpus, tmp_path):
    from workers.training.pipeline import run_training

    target, corpus = tiny_corpus
    s = run_training(_rc(target, corpus, tmp_path, steps=4, layers=2, init_from_target="last",
                         train={"loss_vocab": "restricted", "n_negatives": 8, "mix": {"coder": 2.0, "math": 1.0},
                                "row_sampling": True}))
    assert s["step"] == 4 and s["drafter"]["init"].startswith("layers copied from target layers [2, 3]")
    assert not (tmp_path / "drafter" / "draft_vocab.json").exists()  # restricted loss: full-vocabulary drafting
    with pytest.raises(ValueError, match="no training data"):
        run_training(_rc(target, corpus, tmp_path / "m", steps=1, train={"mix": {"planner": 1.0}}))


def test_init_from_target_layers_and_warm_start(tmp_path):
    _, lm = tiny_engine(tmp_path / "t", "llama", drafter_block=None)
    dc = DrafterConfig.for_target(lm.config, num_hidden_layers=2, mask_token_id=3, block_size=4,
                                  target_layer_ids=[0, 2])
    d = random_drafter(dc, lm.model)
    from_target_layers(d, lm.model, [1, 3])
    torch.testing.assert_close(d.layers[1].mlp.up_proj.weight, lm.model.model.layers[3].mlp.up_proj.weight.float())
    assert (d.layers[0].self_attn.q_norm.weight == 1).all()
    from workers.models.dflash import save_drafter

    save_drafter(d, tmp_path / "d")
    e = random_drafter(dc, lm.model, seed=5)
    warm_start(e, tmp_path / "d", lm.config)
    torch.testing.assert_close(e.fc.weight, d.fc.weight)


def test_card_attaches_engine_acceptance(tiny_corpus, tmp_path):
    from workers.training.card import attach_acceptance
    from workers.training.pipeline import run_training

    target, corpus = tiny_corpus
    run_training(_rc(target, corpus, tmp_path, steps=2))
    acc = {"command": "python -m benchmarks.acceptance x", "date": "d", "machine": "m", "results": [
        {"temperature": 0.0, "tau": 1.5, "by_category": {"coder": {"tau": 1.5, "accept_by_position": [0.4, 0.1, 0]}}},
        {"temperature": 1.0, "tau": 1.2, "by_category": {"coder": {"tau": 1.2, "accept_by_position": [0.2, 0, 0]}}}]}
    (tmp_path / "acc.json").write_text(json.dumps(acc))
    card = attach_acceptance(tmp_path / "drafter", tmp_path / "acc.json").read_text()
    assert "T=1 (all: tau 1.20)" in card and "| tau | 1.50 |" in card
    # the documented command, as a module run (a helper defined below `if __name__ == "__main__"` broke only this)
    (tmp_path / "drafter" / "README.md").unlink()
    res = subprocess.run([sys.executable, "-m", "workers.training.card", str(tmp_path / "drafter"), "--acceptance",
                          str(tmp_path / "acc.json")], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert res.returncode == 0, res.stderr[-2000:]
    assert "T=1 (all: tau 1.20)" in (tmp_path / "drafter" / "README.md").read_text()


def test_commands_make_corpus_and_train_drafter(tmp_path):
    from orchestrator.cli import main

    target = make_tiny_hf_dir(tmp_path / "target", "llama", seed=2)
    counts = ",".join(f"{c}=3" for c in CATEGORIES)
    assert main(["make-corpus", "--target", str(target), "--out", str(tmp_path / "corpus"), "--counts", counts,
                 "--heldout", "1", "--max-new-tokens", "6", "--batch", "8"]) == 0
    m = read_manifest(tmp_path / "corpus")
    assert {k.split("/")[0] for k in m.counts()} == set(CATEGORIES) and m.generation["max_new_tokens"] == 6
    assert main(["train-drafter", "--target", str(target), "--corpus", str(tmp_path / "corpus"), "--out",
                 str(tmp_path / "d"), "--work-dir", str(tmp_path / "w"), "--max-steps", "2", "--layers", "1",
                 "--block-size", "4", "--num-features", "2", "--seqs-per-step", "2", "--anchors-per-seq", "4",
                 "--mask-token-id", "3", "--eval-per-category", "1"]) == 0
    assert (tmp_path / "d" / "model.safetensors").is_file()
    assert main(["train-drafter", "--target", str(target), "--corpus", str(tmp_path), "--out", str(tmp_path / "e")]) == 1


@pytest.mark.slow  # two subprocesses importing torch: ~20 s on a quiet 2-core box
@pytest.mark.parametrize("how", ["sigterm", "sigint_in_background"])
def test_killed_training_resumes_where_it_stopped(tiny_corpus, tmp_path, how):
    """SIGTERM mid-run, or `kill -INT` of a run started in the background (where the shell leaves SIGINT ignored):
    the checkpoint holds every finished step; the rerun continues from it."""
    import os
    import signal
    import time

    target, corpus = tiny_corpus
    work = tmp_path / "work"
    cmd = [sys.executable, "-m", "orchestrator.cli", "train-drafter", "--target", str(target), "--corpus",
           str(corpus), "--out", str(tmp_path / "d"), "--work-dir", str(work), "--minutes", "10", "--layers", "1",
           "--block-size", "4", "--num-features", "2", "--seqs-per-step", "2", "--anchors-per-seq", "4",
           "--mask-token-id", "3", "--eval-per-category", "1", "--threads", "1"]
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    ignore_int = (lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if how == "sigint_in_background" else None
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=ignore_int)
    log = work / "train_log.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (log.exists() and log.read_text().count('"grad_norm"') >= 5):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM if how == "sigterm" else signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err.decode()[-2000:]
    ck = torch.load(work / "checkpoint.pt", weights_only=False)
    done = ck["state"]["step"]
    assert done >= 5
    res = subprocess.run(cmd + ["--max-steps", str(done + 2)], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert f"resuming {work / 'checkpoint.pt'} at step {done}" in res.stderr
    assert json.loads(res.stdout.strip().splitlines()[-1])["step"] == done + 2
