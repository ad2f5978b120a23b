"""Token bitmasks: the integer-op application equals a plain boolean reference, bit layout included."""
from __future__ import annotations

import torch

from workers.structured.bitmask import BitmaskApplier, allowed, full_mask, words


def _reference(logits: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    out = logits.clone()
    v = logits.shape[1]
    for r in range(logits.shape[0]):
        for t in range(v):
            w, b = divmod(t, 32)
            if w >= bitmask.shape[1] or not (int(bitmask[r, w]) >> b) & 1:
                out[r, t] = float("-inf")
    return out


def test_apply_equals_the_boolean_reference_and_keeps_allowed_logits_bit_exact():
    g = torch.Generator().manual_seed(0)
    applier = BitmaskApplier()
    for rows, vocab in ((1, 40), (3, 64), (5, 97)):
        logits = torch.randn(rows, vocab, generator=g)
        bm = torch.randint(-(2**31), 2**31 - 1, (rows, words(vocab)), dtype=torch.int32, generator=g)
        out = applier.apply(logits.clone(), bm)
        assert torch.equal(out, _reference(logits, bm))
        ok = allowed(bm, vocab)
        assert torch.equal(out[ok], logits[ok])  # + 0.0 leaves every allowed logit unchanged


def test_a_padded_lm_head_beyond_the_mask_is_forbidden_and_full_masks_change_nothing():
    logits = torch.randn(2, 70)
    out = BitmaskApplier().apply(logits.clone(), full_mask(2, 64))
    assert torch.isinf(out[:, 64:]).all() and torch.equal(out[:, :64], logits[:, :64])
    assert torch.equal(BitmaskApplier().apply(logits.clone(), full_mask(2, 70)), logits)


def test_bit_j_of_word_w_is_token_32w_plus_j():
    bm = torch.zeros(1, 2, dtype=torch.int32)
    bm[0, 1] = 1 << 3  # token 35 only
    out = BitmaskApplier().apply(torch.zeros(1, 64), bm)
    assert torch.isfinite(out[0]).nonzero().flatten().tolist() == [35]


def test_the_device_path_equals_the_numpy_path():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(4, 100, generator=g)
    bm = torch.randint(-(2**31), 2**31 - 1, (4, words(100)), dtype=torch.int32, generator=g)
    a = BitmaskApplier()
    assert torch.equal(a._apply_torch(logits.clone(), bm), a.apply(logits.clone(), bm))
