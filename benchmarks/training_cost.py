"""CPU cost of the drafter-training phases, from short measurements (to plan the long runs).

* generation: our engine (dtype auto, greedy) answering the prompt set's first turns with continuous batching,
  ``--gen-seconds`` per batch size after a warm-up, tokens/s at a full batch (finished requests are refilled);
* training: ``--train-steps`` steps at the given shapes on those answers (target features recomputed, bf16
  autocast where native), steps/s and response-token anchors per second.

    python -m benchmarks.training_cost --batches 16,32,64 --gen-seconds 10 --train-steps 6 --json cost.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def gen_rate(engine, prompts: list[list[int]], batch: int, seconds: float, max_tokens: int) -> dict:
    from workers.engine.params import SamplingParams

    sp = SamplingParams(max_tokens=max_tokens)
    nxt, live, done_tokens = 0, set(), 0
    t0 = None
    steps = 0
    while True:
        while len(live) < batch:
            rid = f"b{batch}-{nxt}"
            engine.add_request(rid, prompts[nxt % len(prompts)], sp)
            live.add(rid)
            nxt += 1
        res = engine.step()
        if t0 is None and steps >= 8:  # warm-up: prefills of the first wave done
            t0, done_tokens = time.time(), 0
        steps += 1
        for o in res:
            done_tokens += len(o.new_token_ids)
            if o.finished:
                live.discard(o.request_id)
        if t0 is not None and time.time() - t0 >= seconds:
            break
    wall = time.time() - t0
    for rid in list(live):
        engine.abort(rid)
    while engine.has_unfinished():
        engine.step()
    return {"batch": batch, "tokens_per_s": round(done_tokens / wall, 1), "seconds": round(wall, 1)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default="smollm2")
    ap.add_argument("--batches", default="16,32,64", help="generation batch sizes ('' to skip generation)")
    ap.add_argument("--gen-seconds", type=float, default=10.0)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--train-steps", type=int, default=6)
    ap.add_argument("--shapes", default="2x4x64,2x4x128,3x4x64,5x4x64",
                    help="layers x seqs_per_step x anchors_per_seq, comma-separated")
    ap.add_argument("--loss-vocab", default="full,restricted")
    ap.add_argument("--threads", type=int)
    ap.add_argument("--json")
    a = ap.parse_args(argv)

    import torch

    from workers.models.dflash import DrafterConfig
    from workers.engine.config import EngineConfig
    from workers.engine.llm_engine import LLMEngine
    from workers.training.data import Sample, make_batch, random_anchors
    from workers.training.drafter_init import random_drafter
    from workers.training.pipeline import choose_layer_ids, pick_mask_token, resolve_target
    from workers.training.prompts import build_conversations, chat_ids
    from workers.training.train import TrainConfig, step_loss, use_autocast

    if a.threads:
        torch.set_num_threads(a.threads)
    target = resolve_target(a.target)
    batches = [int(x) for x in a.batches.split(",") if x]
    top = max(batches + [32])
    engine = LLMEngine(EngineConfig(model=str(target), max_num_seqs=top, max_model_len=2048,
                                    kv_cache_bytes=min(8 << 30, top * 2100 * 23040 * 5 // 4)))
    convs = [c for c in build_conversations(200, 40) if c.split == "train"]
    prompts = [chat_ids(engine.tokenizer, c.messages([])) for c in convs]
    out: dict = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                 "load_average_start": Path("/proc/loadavg").read_text().split()[:3],
                 "torch_threads": torch.get_num_threads(), "dtype": str(engine.dtype), "generation": [], "training": []}
    for b in batches:
        r = gen_rate(engine, prompts, b, a.gen_seconds, a.max_tokens)
        out["generation"].append(r)
        print(f"generation batch {b}: {r['tokens_per_s']} tok/s", file=sys.stderr, flush=True)

    # training shapes on real answers (one wave of 32 answers, 256 tokens at most)
    from workers.engine.params import SamplingParams

    if a.train_steps <= 0:
        print(json.dumps(out, indent=1))
        if a.json:
            Path(a.json).write_text(json.dumps(out, indent=1))
        return 0

    for i, p in enumerate(prompts[:32]):
        engine.add_request(f"s{i}", p, SamplingParams(max_tokens=a.max_tokens))
    got: dict[str, list[int]] = {}
    while engine.has_unfinished():
        for o in engine.step():
            got.setdefault(o.request_id, []).extend(o.new_token_ids)
    samples = [Sample(f"s{i}", "x", torch.tensor(prompts[i] + got[f"s{i}"]), len(prompts[i]), "stop")
               for i in range(32) if len(got[f"s{i}"]) > 2]
    target_model = engine.model
    mc = engine.model_config
    ids = choose_layer_ids(mc.num_hidden_layers, 5, None)
    mask = pick_mask_token(engine.tokenizer, mc.vocab_size)
    vocab = torch.unique(torch.cat([s.tokens[s.prompt_len:] for s in samples]))
    import random

    for shape in a.shapes.split(","):
        layers, seqs, anchors = (int(x) for x in shape.split("x"))
        for lv in a.loss_vocab.split(","):
            cfg = TrainConfig(seqs_per_step=seqs, anchors_per_seq=anchors, loss_vocab=lv)
            dc = DrafterConfig.for_target(mc, num_hidden_layers=layers, mask_token_id=mask, block_size=16,
                                          target_layer_ids=ids)
            d = random_drafter(dc, target_model)
            opt = torch.optim.AdamW(d.parameters(), lr=1e-4)
            ac = use_autocast(cfg, torch.device("cpu"))
            rng = random.Random(0)
            times, rows = [], 0
            for step in range(a.train_steps + 1):
                seq = rng.sample(samples, seqs)
                batch = make_batch(seq, [random_anchors(s, anchors, rng) for s in seq], 16, mask)
                t = time.time()
                loss, m = step_loss(d, target_model, batch, cfg, ac, vocab if lv == "restricted" else None,
                                    torch.Generator().manual_seed(step))
                opt.zero_grad()
                loss.backward()
                opt.step()
                if step:  # the first step warms up the kernels
                    times.append(time.time() - t)
                    rows += m["rows"]
            s_step = sum(times) / len(times)
            r = {"layers": layers, "seqs_per_step": seqs, "anchors_per_seq": anchors, "loss_vocab": lv,
                 "s_per_step": round(s_step, 3), "steps_per_hour": round(3600 / s_step),
                 "blocks_per_s": round(seqs * anchors / s_step, 1), "rows_per_step": rows // len(times),
                 "autocast_bf16": ac}
            out["training"].append(r)
            print(f"train {shape} {lv}: {s_step:.2f} s/step", file=sys.stderr, flush=True)
    out["load_average_end"] = Path("/proc/loadavg").read_text().split()[:3]
    print(json.dumps(out, indent=1))
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
