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
    # one sequence's prefill chunk (runner.CHUNK_SPLIT_MIN tokens or more): its keys are the cache's first
    # prefix_len positions (no mask needed) and the chunk's own tokens (causal): ``chunk_attention``. None: the
    # masked paged path. Saves the mask and, with flash attention's causal tile skipping, half the self part.
    prefix_len: int | None = None


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


def _flash(q, k, v, causal: bool, scale: float):
    """q [1, nh, L, hd], k/v [1, nh, S, hd] -> (out [1, nh, L, hd], logsumexp [1, nh, L] fp32)."""
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, scale=scale)


def chunk_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    meta: AttnMetadata, scale: float) -> torch.Tensor:
    """One sequence's chunk: q/k/v [N, heads, hd] of its own tokens -> [N, nh*hd].

    softmax over [prefix ; own] = the two partial softmaxes merged by their log-sum-exp (as flash attention
    merges tiles): prefix part unmasked, own part causal."""
    n, nh, hd = q.shape
    kvh = k.shape[1]
    qq = q.transpose(0, 1)[None]  # [1, nh, N, hd]
    if q.device.type != "cpu":  # no log-sum-exp from the public SDPA: the masked path
        return paged_attention(q, k_cache, v_cache, meta, scale)

    def heads(x):  # [S, kvh, hd] -> [1, nh, S, hd]
        x = x.transpose(0, 1)[None]
        return x.repeat_interleave(nh // kvh, dim=1) if kvh != nh else x

    out, lse = _flash(qq, heads(k), heads(v), True, scale)
    if meta.prefix_len:
        p = meta.prefix_len
        kp = gather_kv(k_cache, meta.block_tables)[:, :, :p]  # [1, kvh, P, hd]
        vp = gather_kv(v_cache, meta.block_tables)[:, :, :p]
        rep = nh // kvh
        o_p, lse_p = _flash(qq, kp.repeat_interleave(rep, 1), vp.repeat_interleave(rep, 1), False, scale)
        m = torch.maximum(lse, lse_p)
        w, w_p = (lse - m).exp_()[..., None], (lse_p - m).exp_()[..., None]  # [1, nh, N, 1] fp32
        out = ((out.float() * w + o_p.float() * w_p) / (w + w_p)).to(q.dtype)
    return out[0].transpose(0, 1).reshape(n, nh * hd)


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
