"""Token bitmasks: int32 words, bit j of word w = token 32*w + j (the xgrammar / llguidance layout).

Applying a mask adds 0 to the allowed logits (bit-exact: x + 0.0 == x) and -inf to the forbidden ones.
On CPU this runs in numpy (`np.unpackbits`, one thread: 61 µs a 49k-token row on the 2-core sandbox): the
rows are small, and torch's intra-op threads on such small ops cost milliseconds of wake-up latency when the
CPU is oversubscribed (measured 4-12 ms a row with 2 threads at load 6, 60 µs with 1). On an accelerator the
same arithmetic runs in torch on the device (integer ops only; torch's bool masked_fill is slower).
"""
from __future__ import annotations

import numpy as np
import torch

_NEG_INF_BITS = -8388608  # 0xFF800000: the int32 bit pattern of float32 -inf
_ZERO_NEG_INF = np.array([-np.inf, 0.0], dtype=np.float32)


def words(vocab: int) -> int:
    return (vocab + 31) // 32


def full_mask(rows: int, vocab: int, device=None) -> torch.Tensor:
    """[rows, W] int32, every token allowed."""
    return torch.full((rows, words(vocab)), -1, dtype=torch.int32, device=device)


def allowed_np(bitmask: np.ndarray, vocab: int) -> np.ndarray:
    """bitmask [R, W] int32 -> [R, vocab] uint8 (1 = allowed)."""
    bm = np.ascontiguousarray(bitmask, dtype=np.int32)
    return np.unpackbits(bm.view(np.uint8), axis=1, bitorder="little")[:, :vocab]


def apply_np(logits: np.ndarray, bitmask: np.ndarray) -> np.ndarray:
    """logits [R, V] float32 (in place) + bitmask [R, W] -> logits; columns past 32*W are forbidden."""
    v = logits.shape[1]
    n = min(v, 32 * bitmask.shape[1])
    bias = _ZERO_NEG_INF[allowed_np(bitmask, n)]  # [R, n]: 0 allowed, -inf forbidden
    np.add(logits[:, :n], bias, out=logits[:, :n])
    if n < v:
        logits[:, n:] = -np.inf
    return logits


class BitmaskApplier:
    """Adds -inf to the forbidden logits of some rows (numpy on CPU, torch integer ops on a device)."""

    def __init__(self):
        self._shift: torch.Tensor | None = None
        self._buf: torch.Tensor | None = None

    def apply(self, logits: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
        """logits [R, V] float32, contiguous (in place) + bitmask [R, W] int32 -> logits."""
        if logits.device.type == "cpu":
            apply_np(logits.numpy(), bitmask.numpy())
            return logits
        return self._apply_torch(logits, bitmask)

    def _apply_torch(self, logits: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
        rows, v = logits.shape
        w = bitmask.shape[1]
        bitmask = bitmask.to(logits.device, non_blocking=True)
        buf = self._buf
        if buf is None or buf.shape[0] < rows or buf.shape[1] != w or buf.device != logits.device:
            buf = self._buf = torch.empty((max(rows, 16), w, 32), dtype=torch.int32, device=logits.device)
            self._shift = 31 - torch.arange(32, dtype=torch.int32, device=logits.device)  # bit j -> sign bit
        buf = buf[:rows]
        # sign-extend bit j: allowed -> -1, forbidden -> 0; then ~ & -inf bits: allowed -> 0.0, forbidden -> -inf
        torch.bitwise_left_shift(bitmask.unsqueeze(-1), self._shift, out=buf)
        buf.bitwise_right_shift_(31).bitwise_not_().bitwise_and_(_NEG_INF_BITS)
        n = min(v, 32 * w)
        logits[:, :n].add_(buf.view(torch.float32).view(rows, 32 * w)[:, :n])
        if n < v:
            logits[:, n:] = float("-inf")
        return logits


def allowed(bitmask: torch.Tensor, vocab: int) -> torch.Tensor:
    """bitmask [R, W] int32 -> [R, vocab] bool (tests and diagnostics)."""
    return torch.from_numpy(allowed_np(bitmask.cpu().numpy(), vocab).astype(bool))


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """One-off form of BitmaskApplier.apply."""
    return BitmaskApplier().apply(logits, bitmask)
