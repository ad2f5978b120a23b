"""A reduced draft vocabulary (draft_vocab.json beside a DFlash checkpoint): drafts come from those ids only,
through the target lm_head's rows for them; output stays the target's own (the verifier decides)."""
from __future__ import annotations

import json

import pytest
import torch

from tests.helpers.tiny import reference_greedy, tiny_drafter, tiny_engine
from workers.engine.params import IncompatibleDrafter, SamplingParams, SpecParams
from workers.models.dflash import DRAFT_VOCAB_FILE, load_drafter, save_drafter, write_draft_vocab
from workers.models.loader import load_model

pytestmark = pytest.mark.usefixtures("one_thread")


def test_round_trip_and_bad_files(tmp_path):
    eng, lm = tiny_engine(tmp_path / "t", "llama", drafter_block=None)
    d = tiny_drafter(lm.config, block_size=8)
    save_drafter(d, tmp_path / "d")
    assert not (tmp_path / "d" / DRAFT_VOCAB_FILE).exists()
    assert load_drafter(tmp_path / "d", lm.config).draft_vocab is None
    write_draft_vocab(tmp_path / "d" / DRAFT_VOCAB_FILE, [9, 3, 3, 40], coverage=0.9)
    back = load_drafter(tmp_path / "d", lm.config)
    assert back.draft_vocab.tolist() == [3, 9, 40]
    save_drafter(back, tmp_path / "d2")
    assert json.loads((tmp_path / "d2" / DRAFT_VOCAB_FILE).read_text())["token_ids"] == [3, 9, 40]
    for bad in ('{"token_ids": [1, 99999]}', '{"ids": [1]}', "not json", '{"token_ids": []}'):
        (tmp_path / "d" / DRAFT_VOCAB_FILE).write_text(bad)
        with pytest.raises(IncompatibleDrafter, match="draft vocabulary"):
            load_drafter(tmp_path / "d", lm.config)


def test_greedy_with_a_draft_vocabulary_is_the_targets_output(tmp_path):
    base, lm = tiny_engine(tmp_path / "t", "qwen3", drafter_block=None)
    d = tiny_drafter(lm.config, block_size=8)
    vocab = list(range(0, lm.config.vocab_size, 2))  # half the ids: the target's argmax is often outside
    d.draft_vocab = torch.tensor(vocab)
    save_drafter(d, tmp_path / "d")
    eng, lm = tiny_engine(tmp_path / "t", "qwen3", drafter_block=None, drafter=str(tmp_path / "d"))
    assert eng.drafter.draft_head is not None and eng.drafter.draft_head.weight.shape[0] == len(vocab)
    drafted = []
    real = eng.runner.propose_logits

    def spy(inp):
        out = real(inp)
        assert out.shape[-1] == len(vocab)  # logits over the draft vocabulary only
        return out

    eng.runner.propose_logits = spy
    real_propose = eng.proposer.propose
    eng.proposer.propose = lambda batch, runner: [drafted.extend(x.tokens) or x for x in real_propose(batch, runner)]
    prompts = [list(range(5, 17)), [9, 4, 33, 70, 2, 8]]
    for i, p in enumerate(prompts):
        eng.add_request(str(i), p, SamplingParams(max_tokens=20, ignore_eos=True), SpecParams(True, 8))
    got = {"0": [], "1": []}
    while eng.has_unfinished():
        for o in eng.step():
            got[o.request_id] += o.new_token_ids
    assert drafted and set(drafted) <= set(vocab)
    assert [got["0"], got["1"]] == [reference_greedy(lm.model, p, 20) for p in prompts]


def test_draft_vocab_from_a_corpus_keeps_the_most_frequent_and_eos(tmp_path):
    from workers.training.corpus import FORMAT, CorpusWriter, Manifest, Record
    from workers.training.draft_vocab import draft_vocab

    w = CorpusWriter(tmp_path / "c", Manifest(FORMAT, {"name": "t", "sha256": "x", "vocab_size": 128,
                                                       "eos_token_ids": [2]}, {}, {}))
    responses = [[5] * 50 + [6] * 30 + [7] * 15 + [8] * 5, [5, 6, 9, 9, 9]]  # train: 5 > 6 > 7 > 9 > 8
    for i, resp in enumerate(responses):
        w.add(Record(f"c{i}", 0, "math", "train", [1, 3], resp, "stop"))
    w.add(Record("h", 0, "math", "heldout", [1], [100] * 500, "stop"))  # held out: not counted
    w.flush()
    ids, coverage, total = draft_vocab(tmp_path / "c", 4)
    assert ids == [2, 5, 6, 7] and total == 105 and coverage == pytest.approx(97 / 105)
    ids, coverage, _ = draft_vocab(tmp_path / "c", 10)
    assert ids == [2, 5, 6, 7, 8, 9] and coverage == 1.0


def test_training_loss_over_the_draft_vocabulary_skips_labels_outside(tmp_path):
    """step_loss with loss_vocab="draft": the CE over the draft vocabulary's rows of the lm_head, rows whose
    label is outside it dropped; equal to the loss computed by hand on those rows."""
    from workers.training.data import make_batch
    from workers.training.loss import fused_linear_ce
    from workers.training.train import TrainConfig, step_loss

    _, lm = tiny_engine(tmp_path / "t", "llama", drafter_block=None)
    d = tiny_drafter(lm.config, block_size=4).train()
    d.draft_vocab = torch.arange(0, lm.config.vocab_size, 2)  # even ids only
    from workers.training.data import Sample

    toks = torch.randint(4, lm.config.vocab_size, (40,))
    batch = make_batch([Sample("s", "math", toks, 5, "stop")], [list(range(5, 20))], 4, 3, None)
    cfg = TrainConfig(minutes=1, loss_vocab="draft", autocast="off")
    loss, m = step_loss(d, lm.model, batch, cfg, autocast=False)
    labels = batch.labels[batch.labels != -100]
    assert 0 < m["rows"] < len(labels)  # odd labels dropped
    assert m["rows"] == int((labels % 2 == 0).sum())
    assert torch.isfinite(loss) and loss.item() > 0
