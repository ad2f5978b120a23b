"""Sanity check: the pipeline can learn. Overfit a few dozen sequences; tau on those same sequences must
approach the block size, offline AND through the engine.

If features, positions, the block mask or the labels were misaligned with how the engine drafts, the drafter
could not memorise its training blocks in the engine's terms: offline tau could still rise (it shares the
training code's conventions) but the engine's would not, and the two would disagree pass by pass. Hence both
are measured on the same greedy sequences, and their per-pass lists compared.

    python -m workers.training.overfit --target smollm2 --sequences 16 --max-new-tokens 32 --minutes 5
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from workers.training.acceptance import Item, measure
from workers.training.data import Sample
from workers.training.evaluate import offline_tau, sample_acceptance, walk
from workers.training.train import TrainConfig, train


def greedy_samples(engine, items: list[Item], max_new_tokens: int) -> list[Sample]:
    """The target's greedy answers through ``engine`` (no drafter needed) as training samples."""
    res = measure(engine, items, 0.0, max_new_tokens, block_size=2, progress=False)
    out = []
    for i, it in enumerate(items):
        resp = res["outputs"][f"{it.category}-{i}"]
        finish = "stop" if resp and resp[-1] in engine.eos_token_ids else "length"
        out.append(Sample(f"{it.category}-{i}", it.category, torch.tensor(it.prompt_ids + resp), len(it.prompt_ids),
                          finish))
    return out


def overfit(engine, drafter, items: list[Item], cfg: TrainConfig, max_new_tokens: int, work: Path) -> dict:
    """Train ``drafter`` on the greedy answers to ``items``, then measure tau on them offline and through a
    speculative engine sharing ``engine``'s target; -> figures + whether the per-pass lists agree."""
    from workers.engine.llm_engine import LLMEngine

    target = engine.model
    samples = greedy_samples(engine, items, max_new_tokens)
    t0 = time.time()
    state = train(drafter, target, samples, samples, cfg, work / "checkpoint.pt", {"target_sha256": None,
                  "vocab_size": target.config.vocab_size}, max_new_tokens, resume=False)
    train_s = time.time() - t0
    ev = offline_tau(drafter, target, samples, max_new_tokens)
    serving = copy.deepcopy(drafter).to(next(target.parameters()).dtype).eval()
    spec = LLMEngine(engine.config, model=target, drafter=serving, tokenizer=engine.tokenizer)
    B = drafter.config.block_size
    eng = measure(spec, items, 0.0, max_new_tokens, B, progress=False)
    same, compared = 0, 0
    for i, (it, s) in enumerate(zip(items, samples)):
        rid = f"{it.category}-{i}"
        if eng["outputs"][rid] != s.tokens[s.prompt_len:].tolist():
            continue  # bf16 batch numerics changed the greedy output itself: not comparable
        compared += 1
        offline = walk(sample_acceptance(serving, target, s, max_new_tokens), s.prompt_len, len(s.tokens), B,
                       max_new_tokens)
        same += offline == eng["passes"][rid]
    return {"sequences": len(samples), "response_tokens": sum(s.num_anchors + 1 for s in samples),
            "steps": state.step, "train_s": round(train_s, 1), "block_size": B,
            "offline_tau": ev["tau"], "engine_tau": eng["tau"], "p_first": ev["p_first"],
            "engine_by_category": {k: v["tau"] for k, v in eng["by_category"].items()},
            "sequences_compared": compared, "sequences_same_passes": same, "history": state.history}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default="smollm2")
    ap.add_argument("--sequences", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--minutes", type=float, default=5.0)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seqs-per-step", type=int, default=4)
    ap.add_argument("--init", help="warm start from this drafter directory (same shapes)")
    ap.add_argument("--eval-every", type=int, default=25, help="steps between tau measurements")
    ap.add_argument("--stop-at-tau", type=float, help="default: 0.8 x block size")
    ap.add_argument("--threads", type=int)
    ap.add_argument("--json", help="write the result here")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)

    from workers.models.dflash import DrafterConfig
    from workers.engine.config import EngineConfig
    from workers.engine.llm_engine import LLMEngine
    from workers.training.drafter_init import random_drafter
    from workers.training.pipeline import choose_layer_ids, pick_mask_token, resolve_target
    from workers.training.prompts import build_conversations, chat_ids, interleave

    target_dir = resolve_target(a.target)
    engine = LLMEngine(EngineConfig(model=str(target_dir), max_num_seqs=max(1, a.sequences), max_model_len=1024))
    mc = engine.model_config
    convs = [c for c in interleave(build_conversations(60, 40, seed=0)) if c.split == "train"][: a.sequences]
    items = [Item(c.category, chat_ids(engine.tokenizer, c.messages([]))) for c in convs]
    ids = choose_layer_ids(mc.num_hidden_layers, 5, None)
    dc = DrafterConfig.for_target(mc, num_hidden_layers=a.layers, mask_token_id=pick_mask_token(engine.tokenizer,
                                  mc.vocab_size), block_size=a.block_size, target_layer_ids=ids)
    drafter = random_drafter(dc, engine.model)
    if a.init:
        from workers.training.drafter_init import warm_start

        warm_start(drafter, a.init, mc)
    cfg = TrainConfig(minutes=a.minutes, seqs_per_step=min(a.seqs_per_step, a.sequences), anchors_per_seq=10_000,
                      lr=a.lr, warmup=20, eval_every_steps=a.eval_every, ckpt_minutes=1e9,
                      stop_at_tau=a.stop_at_tau or 0.8 * a.block_size)
    with tempfile.TemporaryDirectory() as tmp:
        res = overfit(engine, drafter, items, cfg, a.max_new_tokens, Path(tmp))
    res["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    res["load_average"] = Path("/proc/loadavg").read_text().split()[:3]
    print(json.dumps(res, indent=1))
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
