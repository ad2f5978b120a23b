"""A drafter's reduced draft vocabulary from a token corpus: the most frequent response tokens.

Drafting over the few thousand tokens a target actually emits costs a fraction of the full lm_head (8,192 of
SmolLM2's 49,152 rows: 1/6 of the drafter's largest GEMM) and loses acceptance only where the target's token is
outside the set, which ``coverage`` measures on the corpus itself (the share of response tokens inside).
The target verifies every draft, so output never changes (frequency-ranked drafting, as FR-Spec and
EAGLE-3's draft vocabulary do).

    python -m workers.training.draft_vocab --corpus data/corpus/smollm2-135m-instruct --size 8192 \\
        --drafter models/smollm2-135m-dflash-b16     # writes draft_vocab.json beside the checkpoint
"""
from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path


def draft_vocab(corpus: str | Path, size: int, always: list[int] | None = None,
                split: str = "train") -> tuple[list[int], float, int]:
    """-> (sorted token ids, coverage of the corpus's response tokens, response tokens counted)."""
    from workers.training.corpus import read_manifest, read_records

    m = read_manifest(corpus)
    counts: Counter[int] = Counter()
    for r in read_records(corpus, m):
        if split == "all" or r.split == split:
            counts.update(r.response_ids)
    total = sum(counts.values())
    keep = set(always or []) | set(m.target.get("eos_token_ids") or [])
    for t, _ in counts.most_common():
        if len(keep) >= size:
            break
        keep.add(t)
    covered = sum(n for t, n in counts.items() if t in keep)
    return sorted(keep), covered / max(1, total), total


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", required=True)
    ap.add_argument("--size", type=int, default=8192)
    ap.add_argument("--drafter", required=True, help="DFlash checkpoint directory: draft_vocab.json goes there")
    ap.add_argument("--split", default="train", choices=["train", "heldout", "all"])
    args = ap.parse_args()
    from workers.models.dflash import DRAFT_VOCAB_FILE, write_draft_vocab

    ids, coverage, total = draft_vocab(args.corpus, args.size, split=args.split)
    write_draft_vocab(Path(args.drafter) / DRAFT_VOCAB_FILE, ids, size=len(ids), coverage=round(coverage, 5),
                      corpus=str(args.corpus), split=args.split, response_tokens=total)
    print(f"{len(ids)} ids cover {coverage:.2%} of {total} {args.split} response tokens -> "
          f"{Path(args.drafter) / DRAFT_VOCAB_FILE}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
