"""Token bitmasks in torch: int32 words, bit j of word w = token 32*w + j (the xgrammar / llguidance layout).

Applying a mask adds a bias row (0 where allowed, -inf where forbidden) made with integer ops only: every
pass is a vectorised stream over the rows (torch's bool ``masked_fill`` on CPU runs ~10x slower). The bias
is built in a scratch buffer that is reused across steps (a fresh multi-MB tensor per step pays page faults).
"""
from __future__ import annotations

import torch

_NEG_INF_BITS = -8388608  # 0xFF800000: the int32 bit pattern of float32 -inf


def words(vocab: int) -> int:
    return (vocab + 31) // 32


def full_mask(rows: int, vocab: int, device=None) -> torch.Tensor:
    """[rows, W] int32, every token allowed."""
    return torch.full((rows, words(vocab)), -1, dtype=torch.int32, device=device)


class BitmaskApplier:
    """Adds -inf to the forbidden logits of some rows; owns the scratch buffer and the shift table."""

    def __init__(self, device=None):
        self.device = device
        self._shift: torch.Tensor | None = None
        self._buf: torch.Tensor | None = None

    def _scratch(self, rows: int, w: int, device) -> torch.Tensor:
        if self._buf is None or self._buf.shape[0] < rows or self._buf.shape[1] != w or self._buf.device != device:
            self._buf = torch.empty((max(rows, 16), w, 32), dtype=torch.int32, device=device)
            self._shift = 31 - torch.arange(32, dtype=torch.int32, device=device)  # bit j -> the sign bit
        return self._buf[:rows]

    def apply(self, logits: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
        """logits [R, V] float32 (in place) + bitmask [R, W] int32 -> logits, forbidden tokens at -inf.

        Columns past 32*W (a padded lm_head) are forbidden too."""
        rows, v = logits.shape
        w = bitmask.shape[1]
        bitmask = bitmask.to(logits.device)
        buf = self._scratch(rows, w, logits.device)
        # sign-extend bit j: allowed -> -1, forbidden -> 0; then ~ & -inf bits: allowed -> 0.0, forbidden -> -inf
        torch.bitwise_left_shift(bitmask.unsqueeze(-1), self._shift, out=buf)
        buf.bitwise_right_shift_(31).bitwise_not_().bitwise_and_(_NEG_INF_BITS)
        n = min(v, 32 * w)
        logits[:, :n].add_(buf.view(torch.float32).view(rows, 32 * w)[:, :n])
        if n < v:
            logits[:, n:] = float("-inf")
        return logits


def allowed(bitmask: torch.Tensor, vocab: int) -> torch.Tensor:
    """bitmask [R, W] int32 -> [R, vocab] bool (tests and diagnostics; the engine uses BitmaskApplier)."""
    shifts = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    return ((bitmask.unsqueeze(-1) >> shifts) & 1).view(bitmask.shape[0], -1)[:, :vocab].bool()


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """One-off form of BitmaskApplier.apply."""
    return BitmaskApplier().apply(logits, bitmask)
