"""The drafter's forward over many draft blocks per sequence, with block-sparse attention (training, offline tau).

Same math as ``DFlashDrafter.forward`` with the DFlash training mask (its test oracle), without building the
dense [Q, C+Q] mask or attending over it: every row of block n sees the context rows c < anchor_n and the
first ``block_len_n`` rows of its own block (non-causal), nothing else. Scores are computed as
[rows, C] (context) and [B, B] per block (own block), normalised together in one softmax.

Serving equivalence: the engine drafts the block at anchor p (the last committed token, not yet in the
cache) at positions p..p+B-1, over context K/V of the committed tokens at positions < p; a block shortened
to b rows near ``max_tokens`` sees only its b rows (``block_len``).
"""
from __future__ import annotations

import torch

from workers.models.dflash import DFlashDrafter
from workers.models.llama import rope_cos_sin


def blocks_forward(
    drafter: DFlashDrafter,
    block_embeds: torch.Tensor,  # [b, N*B, H] target embedding of [anchor, MASK x (B-1)] per block
    ctx_features: torch.Tensor,  # [b, C, n_feat*H] raw target layer outputs at positions 0..C-1
    anchors: torch.Tensor,  # [b, N] long: anchor position of each block (0 for a padding block)
    block_len: torch.Tensor | None = None,  # [b, N] long: visible rows of each block (default B)
) -> torch.Tensor:  # [b, N*B, H] after the drafter's final norm (logits = target lm_head)
    c = drafter.config
    b, nb, _ = block_embeds.shape
    n, B = anchors.shape[1], c.block_size
    C = ctx_features.shape[1]
    nh, kvh, hd = c.num_attention_heads, c.num_key_value_heads, c.head_dim
    g = nh // kvh
    dev = block_embeds.device
    q_pos = (anchors[:, :, None] + torch.arange(B, device=dev)).reshape(b, nb)  # [b, N*B]
    c_pos = torch.arange(C, device=dev).expand(b, C)
    dt = block_embeds.dtype
    qc, qs = (t.to(dt) for t in rope_cos_sin(drafter.rope, q_pos))
    cc, cs = (t.to(dt) for t in rope_cos_sin(drafter.rope, c_pos))
    if block_len is None:
        block_len = torch.full_like(anchors, B)
    vis = torch.cat([torch.arange(C, device=dev) < anchors[..., None],  # [b, N, C]
                     torch.arange(B, device=dev) < block_len[..., None]], dim=-1)  # [b, N, C+B]
    hidden_mask = ~vis[:, None, None, :, None, :]  # [b, 1, 1, N, 1, C+B]

    ctx = drafter.project_context(ctx_features)  # [b, C, H]
    x = block_embeds
    for layer in drafter.layers:
        at = layer.self_attn
        h = layer.input_layernorm(x)
        q = at.q(h, qc, qs)  # [b, NB, nh, hd]
        kc, vc = at.kv(ctx, cc, cs)  # [b, C, kvh, hd]
        kb, vb = at.kv(h, qc, qs)  # [b, NB, kvh, hd]
        qh = q.view(b, nb, kvh, g, hd).permute(0, 2, 3, 1, 4)  # [b, kvh, g, NB, hd]; head = kv * g + gi
        s_ctx = qh.reshape(b, kvh, g * nb, hd) @ kc.permute(0, 2, 3, 1)  # [b, kvh, g*NB, C]
        kbh = kb.view(b, n, B, kvh, hd).permute(0, 3, 1, 4, 2)  # [b, kvh, N, hd, B]
        s_blk = qh.reshape(b, kvh, g, n, B, hd) @ kbh[:, :, None]  # [b, kvh, g, N, B, B]
        scores = torch.cat([s_ctx.view(b, kvh, g, n, B, C), s_blk], dim=-1) * at.scale  # [b, kvh, g, N, B, C+B]
        w = torch.softmax(scores.float().masked_fill(hidden_mask, float("-inf")), dim=-1).to(vc.dtype)
        o_ctx = w[..., :C].reshape(b, kvh, g * nb, C) @ vc.transpose(1, 2)  # [b, kvh, g*NB, hd]
        vbh = vb.view(b, n, B, kvh, hd).permute(0, 3, 1, 2, 4)  # [b, kvh, N, B, hd]
        o_blk = w[..., C:] @ vbh[:, :, None]  # [b, kvh, g, N, B, hd]
        o = o_ctx.view(b, kvh, g, n, B, hd) + o_blk
        o = o.permute(0, 3, 4, 1, 2, 5).reshape(b, nb, nh * hd)  # [b, NB, nh*hd]
        x = layer.finish(x, at.o_proj(o))
    return drafter.norm(x)


def dense_mask(anchors: torch.Tensor, C: int, B: int, block_len: torch.Tensor | None = None) -> torch.Tensor:
    """The same visibility as a dense [b, 1, N*B, C+N*B] bool mask for ``DFlashDrafter.forward`` (the oracle)."""
    b, n = anchors.shape
    if block_len is None:
        block_len = torch.full_like(anchors, B)
    rows = torch.arange(n * B)
    blk = rows // B  # block of each query row
    ctx = torch.arange(C)[None, None, :] < anchors[:, blk, None]  # [b, NB, C]
    key_blk, key_k = rows // B, rows % B
    own = (key_blk[None, None, :] == blk[None, :, None]) & (key_k[None, None, :] < block_len[:, blk, None])
    return torch.cat([ctx, own.expand(b, -1, -1)], dim=-1)[:, None]
