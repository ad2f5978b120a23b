"""`specfleet train-drafter`: reproduce a DFlash drafter from scratch (prompts -> responses -> features -> train).

Example (the committed demo drafter):
    specfleet models pull smollm2
    specfleet train-drafter --target smollm2 --out models/smollm2-135m-dflash-b16
Rerunning the same command resumes (finished generations and the last checkpoint are kept).
"""
from __future__ import annotations

import argparse


def _ids(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer ids, got {text!r}") from None


def register(subparsers) -> None:
    p = subparsers.add_parser("train-drafter", help="train a DFlash drafter for a target model",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", required=True, help="HF model directory or a known model name (smollm2)")
    p.add_argument("--out", required=True, help="output drafter directory (z-lab DFlash format)")
    p.add_argument("--work-dir", help="data + checkpoints (default: <cache>/train/<out name>)")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--max-minutes", type=float, help="stop training after this wall time (and save)")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--layers", type=int, default=2, help="drafter decoder layers")
    p.add_argument("--num-features", type=int, default=5, help="evenly spaced target layers tapped")
    p.add_argument("--target-layer-ids", type=_ids, help="explicit target layers, e.g. 1,8,14,20,27")
    p.add_argument("--mask-token-id", type=int, help="MASK row (default: an unused special token)")
    p.add_argument("--prompts-per-category", type=int, default=330)
    p.add_argument("--heldout-per-category", type=int, default=30)
    p.add_argument("--max-new-tokens", type=int, default=160)
    p.add_argument("--gen-batch-size", type=int, default=16)
    p.add_argument("--gen-workers", type=int, default=1, help="single-threaded generation processes")
    p.add_argument("--seqs-per-step", type=int, default=4)
    p.add_argument("--anchors-per-seq", type=int, default=32)
    p.add_argument("--lr", type=float, default=6e-4)
    p.add_argument("--gamma", type=float, default=7.0, help="loss weight exp(-(k-1)/gamma)")
    p.add_argument("--negatives", type=int, default=4096, help="sampled extra vocabulary rows per step")
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, help="torch intra-op threads (1 on a busy shared CPU)")
    p.add_argument("--no-resume", action="store_true", help="ignore an existing training checkpoint")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import json
    import os
    from pathlib import Path

    from workers.training.pipeline import PipelineConfig, run_pipeline
    from workers.training.train import TrainConfig

    if args.steps < 1:
        raise ValueError("--steps must be >= 1")
    tc = TrainConfig(steps=args.steps, seqs_per_step=args.seqs_per_step, anchors_per_seq=args.anchors_per_seq,
                     lr=args.lr, gamma=args.gamma, n_negatives=args.negatives, eval_every=args.eval_every,
                     seed=args.seed, max_minutes=args.max_minutes)
    pc = PipelineConfig(target=args.target, out=args.out, work_dir=args.work_dir, block_size=args.block_size,
                        layers=args.layers, num_features=args.num_features, target_layer_ids=args.target_layer_ids,
                        mask_token_id=args.mask_token_id, prompts_per_category=args.prompts_per_category,
                        heldout_per_category=args.heldout_per_category, max_new_tokens=args.max_new_tokens,
                        gen_batch_size=args.gen_batch_size, gen_workers=args.gen_workers, device=args.device,
                        threads=args.threads, train=tc)
    if args.no_resume:
        work = Path(args.work_dir) if args.work_dir else None
        from workers.hub import cache_root

        ck = (work or cache_root() / "train" / Path(args.out).name) / "checkpoint.pt"
        if ck.exists():
            os.remove(ck)
    summary = run_pipeline(pc)
    print(json.dumps({"out": args.out, "steps": summary["steps"], "tau": summary["offline_tau"]["tau"],
                      "tau_by_category": summary["offline_tau"]["tau_by_category"]}))
    return 0
