"""`specfleet train-drafter`: train (or continue training) a DFlash drafter on a token corpus.

    specfleet make-corpus --target smollm2 --out data/corpus/smollm2-135m-instruct
    specfleet train-drafter --target smollm2 --corpus data/corpus/smollm2-135m-instruct \
        --out models/smollm2-135m-dflash-b16 --minutes 120
Rerunning the same command continues: the checkpoint in --work-dir is resumed (a larger --minutes trains
longer); target features are recomputed from the corpus' token ids, nothing is regenerated.
"""
from __future__ import annotations

import argparse


def _ids(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer ids, got {text!r}") from None


def register(subparsers) -> None:
    p = subparsers.add_parser("train-drafter", help="train a DFlash drafter on a token corpus",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", required=True, help="HF model directory or a known model name (smollm2)")
    p.add_argument("--corpus", required=True, help="token corpus directory (specfleet make-corpus)")
    p.add_argument("--out", required=True, help="output drafter directory (z-lab DFlash format)")
    p.add_argument("--work-dir", help="checkpoint + log (default: <cache>/train/<out name>)")
    p.add_argument("--minutes", type=float, default=60.0, help="training time of the run, over resumes")
    p.add_argument("--max-steps", type=int, help="also stop after this many steps")
    p.add_argument("--layers", type=int, default=2, help="drafter decoder layers")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--num-features", type=int, default=5, help="evenly spaced target layers tapped")
    p.add_argument("--target-layer-ids", type=_ids, help="explicit target layers, e.g. 1,8,14,20,27")
    p.add_argument("--mask-token-id", type=int, help="MASK row (default: an unused special token)")
    p.add_argument("--init", help="warm start from this drafter directory (same shapes)")
    p.add_argument("--init-from-target", help="'last' or layer ids: copy these target layers into the drafter")
    p.add_argument("--seqs-per-step", type=int, default=4)
    p.add_argument("--anchors-per-seq", type=int, default=64)
    p.add_argument("--lr", type=float, default=6e-4)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--gamma", type=float, default=7.0, help="loss weight exp(-(k-1)/gamma)")
    p.add_argument("--loss-vocab", choices=("draft", "full", "restricted"), default="draft",
                   help="draft: the drafter's own draft vocabulary (--draft-vocab-size most frequent response tokens, "
                        "written as draft_vocab.json; it drafts from these when served)")
    p.add_argument("--draft-vocab-size", type=int, default=8192)
    p.add_argument("--negatives", type=int, default=4096, help="sampled ids with --loss-vocab restricted")
    p.add_argument("--row-sampling", action="store_true",
                   help="loss on rows drawn with probability exp(-(k-1)/gamma) (about 45%% of the lm_head cost)")
    p.add_argument("--mix", help="data mix, e.g. code=4,coder=4,tool_caller=4,reviewer=2 (others 0)")
    p.add_argument("--eval-minutes", type=float, default=10.0, help="held-out tau + export every N minutes")
    p.add_argument("--eval-per-category", type=int, default=8, help="held-out sequences per category")
    p.add_argument("--ckpt-minutes", type=float, default=5.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--autocast", choices=("auto", "on", "off"), default="auto", help="bf16 autocast")
    p.add_argument("--threads", type=int, help="torch intra-op threads")
    p.add_argument("--no-resume", action="store_true", help="start over (the old checkpoint is set aside)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import json
    import shlex
    import signal
    import sys

    from workers.training.data import parse_mix
    from workers.training.pipeline import RunConfig, run_training
    from workers.training.train import TrainConfig

    def _term(*_):  # kill / timeout: leave through the checkpointing path
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _term)
    signal.signal(signal.SIGINT, _term)  # also when started with `&`/nohup, where the shell leaves SIGINT ignored
    tc = TrainConfig(minutes=args.minutes, max_steps=args.max_steps, seqs_per_step=args.seqs_per_step,
                     anchors_per_seq=args.anchors_per_seq, lr=args.lr, warmup=args.warmup, gamma=args.gamma,
                     loss_vocab=args.loss_vocab, draft_vocab_size=args.draft_vocab_size, n_negatives=args.negatives, row_sampling=args.row_sampling,
                     eval_minutes=args.eval_minutes,
                     ckpt_minutes=args.ckpt_minutes, seed=args.seed, mix=parse_mix(args.mix), autocast=args.autocast)
    rc = RunConfig(target=args.target, corpus=args.corpus, out=args.out, work_dir=args.work_dir,
                   block_size=args.block_size, layers=args.layers, num_features=args.num_features,
                   target_layer_ids=args.target_layer_ids, mask_token_id=args.mask_token_id, init=args.init,
                   init_from_target=args.init_from_target, eval_per_category=args.eval_per_category,
                   device=args.device, threads=args.threads, resume=not args.no_resume,
                   command="specfleet train-drafter " + " ".join(shlex.quote(a) for a in sys.argv[2:]), train=tc)
    s = run_training(rc)
    ev = s.get("offline_tau") or {}
    print(json.dumps({"out": args.out, "step": s["step"], "train_minutes": s["train_minutes"], "tau": ev.get("tau"),
                      "tau_by_category": {k: v["tau"] for k, v in ev.get("by_category", {}).items()}}))
    return 0
