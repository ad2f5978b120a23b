"""Speculative acceptance kept in a block-independent form, reported as tau at one reference block.

A verified pass that proposed ``p`` drafts and accepted the first ``a`` is, under the router's model (each draft
accepted with the same probability alpha, independently: orchestrator/routing/score.py), ``a`` accepted draft
positions and, when ``a < p``, one rejected position; a pass whose block was all accepted is cut off there (its
next position was never tried). Pooling those counts gives alpha = accepted / (accepted + rejected), the maximum
likelihood estimate whatever block each pass ran at: a pass at block 4 that accepted its 3 drafts is evidence of
a high alpha, not a tau of 4 at the drafter's block. The tau reported is tau(ref) = sum_{k<ref} alpha^k at the
reference block (the block the router reads taus at, ``RoutingStats.block_size_default``); the router recovers
alpha from it (``alpha_from_tau``). With passes all at a block long enough to end in a rejection, tau(ref) is the
mean tokens per pass (alpha = (tau - 1) / tau), as before.

Counts are EWMAs per pass (the same weight for every pass, as the old tau EWMA), so the estimate follows drift.
Plain floats and ints: the engine reads ``accepted`` on the host already (SeqResult), nothing here syncs a device.
"""
from __future__ import annotations

AcceptEntry = tuple[float, float, int]  # (accepted positions EWMA, rejected positions EWMA, passes)


def pass_counts(proposed: int, accepted: int) -> tuple[int, int]:
    """(accepted positions, rejected positions) of one verified pass: the rejection is counted only where one
    happened (a fully accepted block never tried the position after it)."""
    accepted = max(0, min(int(accepted), int(proposed)))
    return accepted, (1 if accepted < proposed else 0)


def observe(entry: AcceptEntry | None, proposed: int, accepted: int, weight: float) -> AcceptEntry:
    """``entry`` after one pass; ``weight`` the EWMA weight of a new pass (the first pass is taken as is)."""
    hit, miss = pass_counts(proposed, accepted)
    if entry is None:
        return float(hit), float(miss), 1
    h, m, n = entry
    return (1.0 - weight) * h + weight * hit, (1.0 - weight) * m + weight * miss, n + 1


def alpha_of(hits: float, misses: float) -> float:
    """Per-position acceptance from the counts (1.0 with no rejection seen; 0.0 with nothing seen)."""
    total = hits + misses
    return hits / total if total > 0 else 0.0


def tau_from_alpha(alpha: float, block: int) -> float:
    """Expected committed tokens per pass at ``block`` (block - 1 drafts + the bonus token): sum_{k<block} alpha^k."""
    block = max(1, int(block))
    if alpha >= 1.0:
        return float(block)
    if alpha <= 0.0:
        return 1.0
    return (1.0 - alpha**block) / (1.0 - alpha)


def tau_at_ref(entry: AcceptEntry, ref_block: int) -> float:
    """The entry's tau at the reference block."""
    return tau_from_alpha(alpha_of(entry[0], entry[1]), ref_block)
