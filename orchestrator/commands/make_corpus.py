"""`specfleet make-corpus`: the target answers the project's prompt set through our engine -> a token corpus.

    specfleet make-corpus --target smollm2 --out data/corpus/smollm2-135m-instruct --batch 64
Rerunning continues where a killed run stopped (answered turns are kept; more --counts extend the corpus).
"""
from __future__ import annotations

import argparse


def register(subparsers) -> None:
    p = subparsers.add_parser("make-corpus", help="generate a drafter training corpus with the target",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", required=True, help="HF model directory or a known model name (smollm2)")
    p.add_argument("--out", required=True, help="corpus directory")
    p.add_argument("--counts", help="conversations per category, e.g. math=2000,code=2000,chat=2000,planner=1000,"
                                    "coder=1200,reviewer=1000,tool_caller=1200 (the default)")
    p.add_argument("--heldout", type=int, default=40, help="conversations per category held out (never trained)")
    p.add_argument("--seed", type=int, default=0, help="prompt set seed")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--batch", type=int, default=64, help="sequences in flight (continuous batching)")
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--dtype", default="auto", help="auto = bf16 on CPUs with AMX / AVX512-BF16")
    p.add_argument("--device", default="auto")
    p.add_argument("--drafter", help="speculate with this drafter while generating (greedy output unchanged)")
    p.add_argument("--flush-every", type=int, default=256, help="records per corpus shard")
    p.add_argument("--max-turns", type=int, help="stop after this many new turns (cost measurements)")
    p.add_argument("--threads", type=int, help="torch intra-op threads")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import json
    import signal

    from workers.training.generate import GenerationConfig
    from workers.training.pipeline import CorpusConfig, run_make_corpus
    from workers.training.prompts import parse_counts

    def _term(*_):  # kill / timeout: flush what is answered
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _term)
    signal.signal(signal.SIGINT, _term)  # also when started with `&`/nohup, where the shell leaves SIGINT ignored
    gc = GenerationConfig(max_new_tokens=args.max_new_tokens, batch=args.batch, max_model_len=args.max_model_len,
                          dtype=args.dtype, device=args.device, drafter=args.drafter, flush_every=args.flush_every,
                          max_turns=args.max_turns)
    cc = CorpusConfig(target=args.target, out=args.out, counts=parse_counts(args.counts) if args.counts else None,
                      heldout=args.heldout, seed=args.seed, gen=gc, threads=args.threads)
    print(json.dumps(run_make_corpus(cc)))
    return 0
