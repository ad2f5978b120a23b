"""Trainer smoke tests on a tiny random target (no network, a few seconds each)."""
from __future__ import annotations

import json
import random

import pytest
import torch

from tests.helpers.tiny import make_tiny_hf_dir
from workers.models.config import ModelConfig
from workers.models.dflash import load_drafter
from workers.training.data import IGNORE, Sample, make_batch
from workers.training.generate import read_jsonl
from workers.training.pipeline import PipelineConfig, run_pipeline
from workers.training.prompts import CATEGORIES, build_prompts
from workers.training.train import TrainConfig


def test_prompts_deterministic_with_heldout_split():
    a, b = build_prompts(40, 5, seed=3), build_prompts(40, 5, seed=3)
    assert a == b and build_prompts(40, 5, seed=4) != a
    for cat in CATEGORIES:
        rows = [p for p in a if p.category == cat]
        assert len(rows) == 40 and len({p.text for p in rows}) == 40
        assert sum(p.split == "heldout" for p in rows) == 5
    assert build_prompts(20, 5)[:3] == build_prompts(40, 5)[:3]  # a smaller set is a prefix per category


def test_batch_mask_is_block_sparse():
    toks = torch.arange(10, 30)  # T = 20, prompt 5
    s = Sample("x", "math", toks, 5, torch.randn(19, 8).to(torch.bfloat16))
    b = make_batch([s], n_anchors=3, block_size=4, mask_token_id=99, rng=random.Random(0))
    C = b.ctx_features.shape[1]
    for j in range(3):
        r = slice(4 * j, 4 * j + 4)
        p = int(b.q_positions[0, 4 * j])
        assert b.block_ids[0, 4 * j] == toks[p] and (b.block_ids[0, 4 * j + 1 : 4 * j + 4] == 99).all()
        assert b.labels[0, 4 * j] == IGNORE
        assert b.labels[0, 4 * j + 1 : 4 * j + 4].tolist() == [int(toks[p + k]) if p + k < 20 else IGNORE
                                                                for k in (1, 2, 3)]
        m = b.attn_mask[0, 0, r]
        assert m[:, :p].all() and not m[:, p:C].any()  # context strictly before the anchor
        own = torch.zeros(m.shape[1] - C, dtype=torch.bool)
        own[4 * j : 4 * j + 4] = True
        assert (m[:, C:] == own).all()  # its own block only, non-causal


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_target(tmp_path_factory):
    return make_tiny_hf_dir(tmp_path_factory.mktemp("target"), "llama", seed=1)


def _cfg(target, tmp, steps, **kw):
    tc = TrainConfig(steps=steps, seqs_per_step=4, anchors_per_seq=8, lr=3e-3, warmup=2, n_negatives=16,
                     eval_every=10, ckpt_every=5, eval_anchors=4)
    return PipelineConfig(target=str(target), out=str(tmp / "drafter"), work_dir=str(tmp / "work"), block_size=4,
                          layers=1, num_features=2, mask_token_id=3, prompts_per_category=5,
                          heldout_per_category=1, val_per_category=1, max_new_tokens=12, gen_batch_size=8,
                          device="cpu", train=tc, **kw)


def test_pipeline_trains_saves_and_resumes(tiny_target, tmp_path):
    s1 = run_pipeline(_cfg(tiny_target, tmp_path, steps=30))
    log = [json.loads(line) for line in (tmp_path / "work" / "train_log.jsonl").read_text().splitlines()]
    first = sum(r["loss"] for r in log[:5]) / 5
    last = sum(r["loss"] for r in log[-5:]) / 5
    assert last < first * 0.9, (first, last)
    recs = read_jsonl(tmp_path / "work" / "responses.jsonl")
    assert len(recs) == 12 and all(r["split"] == "train" for r in recs)
    tcfg = ModelConfig.from_hf(json.loads((tiny_target / "config.json").read_text()))
    d = load_drafter(tmp_path / "drafter", tcfg)
    assert d.config.block_size == 4 and d.config.mask_token_id == 3 and len(d.config.target_layer_ids) == 2
    assert 1.0 <= s1["offline_tau"]["tau"] <= 4.0

    # resume: a longer run continues from the checkpoint (the old log lines stay, new steps are appended)
    s2 = run_pipeline(_cfg(tiny_target, tmp_path, steps=40))
    log2 = [json.loads(line) for line in (tmp_path / "work" / "train_log.jsonl").read_text().splitlines()]
    assert s2["steps"] == 40 and [r["step"] for r in log2] == list(range(1, 41))


def test_bad_inputs(tiny_target, tmp_path):
    with pytest.raises(ValueError, match="target_layer_ids"):
        run_pipeline(_cfg(tiny_target, tmp_path / "a", steps=1, target_layer_ids=[1, 9]))
    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / "config.json").write_text(json.dumps({"model_type": "gpt2", "vocab_size": 10}))
    with pytest.raises(ValueError, match="cannot hook target"):
        run_pipeline(_cfg(odd, tmp_path / "b", steps=1))
    with pytest.raises(FileNotFoundError):
        run_pipeline(_cfg(tmp_path / "nope", tmp_path / "c", steps=1))


def test_corrupted_features_are_reported(tiny_target, tmp_path):
    cfg = _cfg(tiny_target, tmp_path, steps=1)
    run_pipeline(cfg)
    shard = next((tmp_path / "work" / "responses.features").glob("shard-*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(ValueError, match="corrupted"):
        run_pipeline(cfg)


def test_jsonl_torn_tail_and_worker_merge(tmp_path):
    from workers.training.generate import _repair_tail, merge_worker_outputs

    main = tmp_path / "responses.jsonl"
    main.write_text(json.dumps({"id": "a", "features": "shard-00000.safetensors"}) + "\n" + '{"id": "b", "fea')
    assert [r["id"] for r in read_jsonl(main)] == ["a"]  # a torn last line is an interrupted write
    _repair_tail(main)
    assert main.read_text().endswith("\n")
    (tmp_path / "responses-w0.jsonl").write_text(
        "\n".join(json.dumps({"id": i, "features": "shard-00001.safetensors"}) for i in ("a", "b", "c")) + "\n")
    assert merge_worker_outputs(main) == 2 and merge_worker_outputs(main) == 0
    recs = read_jsonl(main)
    assert [r["id"] for r in recs] == ["a", "b", "c"]
    assert recs[1]["features"] == "responses-w0.features/shard-00001.safetensors"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": 1}\n{broken\n{"id": 2}\n')
    with pytest.raises(ValueError, match="corrupted"):
        read_jsonl(bad)


def test_prompt_texts_are_reproducible_across_processes():
    import subprocess
    import sys

    code = "from workers.training.prompts import build_prompts; print([p.id for p in build_prompts(60, 5)])"
    runs = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
            for _ in range(2)]
    assert runs[0] == runs[1] == str([p.id for p in build_prompts(60, 5)]) + "\n"
