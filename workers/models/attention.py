"""Attention over a paged KV cache, for a flat batch of query tokens from several sequences.

Layout (all tensors built once per step by the runner and shared by every layer):
  N  = number of new tokens in the step (flat, no padding in the linears)
  B  = number of sequences, Tq = longest query run, K = longest key run (multiple of the KV block size)
Cache per layer: k_cache / v_cache [num_blocks, block_size, n_kv_heads, head_dim].
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class AttnMetadata:
    slot_mapping: torch.Tensor  # [N] int64: flat cache slot (block*block_size + offset) of each new token
    block_tables: torch.Tensor  # [B, nblk] int64: KV block ids per sequence (padding ids are masked)
    q_index: torch.Tensor | None  # [B*Tq] int64 row of the flat batch for each padded query; None = B==1
    out_index: torch.Tensor | None  # [N] int64 row of the padded output for each flat token; None = B==1
    mask: torch.Tensor  # [B, 1, Tq, K] bool (True = attend), or the additive bias of ``attn_bias``
    batch: int
    q_len: int  # Tq


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor):
    """k, v [N, kvh, hd] -> cache rows at slots [N]."""
    kvh, hd = k_cache.shape[-2:]
    k_cache.view(-1, kvh, hd).index_copy_(0, slots, k.to(k_cache.dtype))
    v_cache.view(-1, kvh, hd).index_copy_(0, slots, v.to(v_cache.dtype))


def gather_kv(cache: torch.Tensor, block_tables: torch.Tensor) -> torch.Tensor:
    """cache [nb, bs, kvh, hd], block_tables [B, nblk] -> [B, kvh, nblk*bs, hd]."""
    b, nblk = block_tables.shape
    _, bs, kvh, hd = cache.shape
    # index_select: ~4x cheaper than advanced indexing (cache[block_tables]) for a handful of blocks
    return cache.index_select(0, block_tables.reshape(-1)).view(b, nblk * bs, kvh, hd).transpose(1, 2)


def attn_bias(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """bool mask (True = attend) -> additive bias (0 / -inf) in ``dtype``; made once per forward, not per layer
    (SDPA converts a bool mask on every call)."""
    if mask.dtype != torch.bool:
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))


def paged_attention(
    q: torch.Tensor,  # [N, nh, hd] (RoPE applied)
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttnMetadata,
    scale: float,
) -> torch.Tensor:  # [N, nh*hd]
    n, nh, hd = q.shape
    b, tq = meta.batch, meta.q_len
    kk = gather_kv(k_cache, meta.block_tables)  # [B, kvh, K, hd]
    vv = gather_kv(v_cache, meta.block_tables)
    if meta.q_index is None:
        qq = q.view(1, n, nh, hd).transpose(1, 2)  # [1, nh, N, hd]
    else:
        qq = q[meta.q_index].view(b, tq, nh, hd).transpose(1, 2)  # [B, nh, Tq, hd]
    out = F.scaled_dot_product_attention(
        qq, kk.to(qq.dtype), vv.to(qq.dtype), attn_mask=meta.mask, scale=scale, enable_gqa=kk.shape[1] != nh
    )  # [B, nh, Tq, hd]
    out = out.transpose(1, 2).reshape(b * tq, nh * hd)
    return out if meta.out_index is None else out[meta.out_index]
