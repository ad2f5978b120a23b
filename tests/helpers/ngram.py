"""A prompt-lookup (n-gram) proposer: the whole of what a new proposer takes, in one file and one registration.

Drafts the tokens that followed the most recent earlier occurrence of the sequence's last n tokens (n from
``max_n`` down to ``min_n``); with no match, repeats the anchor. No network, no KV layers, nothing captured,
nothing recorded on commit, deterministic drafts (``probs=None``): the verifier treats them as one-hot q,
so greedy and sampled decoding stay exact (tests/cpu/test_spec.py, tests/cpu/test_spec_sampling.py).
"""
from __future__ import annotations

from workers.speculative.proposer import CommitBatch, Draft, ProposeRequest, ProposerContext, register_proposer


class NgramProposer:
    def __init__(self, max_block: int = 8, min_n: int = 1, max_n: int = 3):
        self.max_block, self.min_n, self.max_n = max_block, min_n, max_n
        self.kv_layers: list[tuple[int, int]] = []
        self.capture_layers: list[int] = []
        self.network = None

    def lookup(self, ids: list[int], k: int) -> list[int]:
        for n in range(min(self.max_n, len(ids) - 1), self.min_n - 1, -1):
            tail = ids[-n:]
            for start in range(len(ids) - n - 1, -1, -1):  # most recent earlier occurrence first
                if ids[start: start + n] == tail:
                    found = ids[start + n: start + n + k]
                    return found + [found[-1]] * (k - len(found))
        return [ids[-1]] * k

    def propose(self, batch: list[ProposeRequest], runner) -> list[Draft]:
        return [Draft(self.lookup(r.token_ids, r.num_drafts), None) for r in batch]

    def commit(self, batch: CommitBatch, runner) -> None:
        pass  # a lookup proposer keeps nothing: the token ids are its whole state


def build(ctx: ProposerContext) -> NgramProposer:
    return NgramProposer()


register_proposer("ngram", build)
