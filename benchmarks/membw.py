"""The machine's streaming read bandwidth, measured in-process, and the decode roofline it implies.

A batch-1 AR decode step must read every weight once, so on a CPU it is memory-bound:
    roofline tokens/s (batch b) = b * read_bandwidth / weight_bytes      (KV reads ignored: small here)
``streaming_read_gbps`` reads a buffer much larger than the caches (``amax`` over int32 words: one compare per
word, so the reduction is not compute-bound) with the threads torch uses, and returns the median of a few runs.
"""
from __future__ import annotations

import time

import torch


def streaming_read_gbps(mib: int = 512, runs: int = 5) -> float:
    words = torch.ones(mib * (1 << 20) // 4, dtype=torch.int32)
    words.amax()  # first touch
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        words.amax()
        times.append(time.perf_counter() - t0)
    times.sort()
    return words.numel() * 4 / times[len(times) // 2] / 1e9


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes one decode step reads: every parameter once (a tied embedding / lm_head counts once)."""
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    return total


def roofline_tok_s(batch: int, gbps: float, nbytes: int) -> float:
    return batch * gbps * 1e9 / nbytes
