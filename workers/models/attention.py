"""Attention over a paged KV cache, for a flat batch of query tokens from several sequences.

Layout (all tensors built once per step by the runner and shared by every layer):
  N  = number of new tokens in the step (flat, no padding in the linears)
  B  = number of sequences, Tq = longest query run, K = longest key run (multiple of the KV block size)
Cache per layer: k_cache / v_cache [num_blocks, block_size, n_kv_heads, head_dim].

Two paths:
  * ``ragged_attention`` (CPU): one attention call per sequence over exactly its own keys — a view of the
    cache when its blocks are one contiguous run (kv_cache.BlockManager hands out such runs), else a gather of
    its own blocks; decode rows need no mask, a short block (verify) a small causal-tail bias, a long chunk
    (prefill) is split into its cached prefix (unmasked) and its own tokens (causal) merged by log-sum-exp.
    No padding of queries or keys to the batch's longest: a step mixing one prefill chunk with 31 decodes costs
    what those sequences need, not 32 x the longest.
  * ``paged_attention`` (CUDA, and the graph runner's static buffers): one batched call over the padded
    [B, Tq] x [B, K] layout with a mask.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from workers.kernels import cpu as cpu_kernels


@dataclass
class AttnMetadata:
    slot_mapping: torch.Tensor  # [N] int64: flat cache slot (block*block_size + offset) of each new token
    block_tables: torch.Tensor  # [B, nblk] int64: KV block ids per sequence (padding ids are masked)
    q_index: torch.Tensor | None  # [B*Tq] int64 row of the flat batch for each padded query; None = B==1
    out_index: torch.Tensor | None  # [N] int64 row of the padded output for each flat token; None = B==1
    mask: torch.Tensor  # [B, 1, Tq, K] bool (True = attend), or the additive bias of ``attn_bias``
    batch: int
    q_len: int  # Tq
    seqs: tuple["SeqSpan", ...] | None = None  # host-side per-sequence layout: the ragged path (CPU); None = padded
    # [S, 5] int64 (row0, n, start, slot0, index) of the sequences with short query runs (n < CHUNK_SPLIT_MIN):
    # one CPU-kernel call per layer covers them all (workers/kernels/cpu.py); None = no kernel
    short_runs: np.ndarray | None = None


CHUNK_SPLIT_MIN = 64  # a sequence's query run of this many tokens or more: prefix + own-causal split


@dataclass(frozen=True)
class SeqSpan:
    """One sequence's rows of the flat batch and where its keys are."""

    row0: int  # its first query row in the flat batch
    n: int  # its query rows this step
    start: int  # position of its first query (= keys already cached before this step)
    slot0: int  # cache slot of its position 0 when its blocks are one contiguous run, else -1
    index: int  # its row of block_tables


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


def _heads(x: torch.Tensor, nh: int) -> torch.Tensor:
    """[S, kvh, hd] -> [1, nh, S, hd] (KV heads repeated for the private flash op, which has no GQA)."""
    x = x.transpose(0, 1)[None]
    return x.repeat_interleave(nh // x.shape[1], dim=1) if x.shape[1] != nh else x


def chunk_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_prefix: torch.Tensor | None,
                    v_prefix: torch.Tensor | None, scale: float) -> torch.Tensor:
    """One sequence's chunk: q [N, nh, hd], its own k/v [N, kvh, hd], cached prefix k/v [P, kvh, hd] or None
    -> [N, nh*hd]. softmax over [prefix ; own] = the two partial softmaxes merged by their log-sum-exp (as flash
    attention merges tiles): prefix part unmasked, own part causal."""
    n, nh, hd = q.shape
    qq = q.transpose(0, 1)[None]  # [1, nh, N, hd]
    out, lse = _flash(qq, _heads(k, nh), _heads(v, nh), True, scale)
    if k_prefix is not None and k_prefix.shape[0]:
        o_p, lse_p = _flash(qq, _heads(k_prefix, nh), _heads(v_prefix, nh), False, scale)
        m = torch.maximum(lse, lse_p)
        w, w_p = (lse - m).exp_()[..., None], (lse_p - m).exp_()[..., None]  # [1, nh, N, 1] fp32
        out = ((out.float() * w + o_p.float() * w_p) / (w + w_p)).to(q.dtype)
    return out[0].transpose(0, 1).reshape(n, nh * hd)


def _seq_keys(cache: torch.Tensor, meta: AttnMetadata, s: SeqSpan, length: int) -> torch.Tensor:
    """A sequence's first ``length`` cached positions -> [length, kvh, hd] (a view when its run is contiguous)."""
    _, bs, kvh, hd = cache.shape
    flat = cache.view(-1, kvh, hd)
    if s.slot0 >= 0:
        return flat[s.slot0: s.slot0 + length]
    blocks = meta.block_tables[s.index, : -(-length // bs)]
    return cache.index_select(0, blocks).view(-1, kvh, hd)[:length]


def short_runs(seqs: tuple[SeqSpan, ...]) -> np.ndarray:
    """[S, 5] int64 rows (row0, n, start, slot0, index) of the sequences whose query run is short."""
    rows = [(s.row0, s.n, s.start, s.slot0, s.index) for s in seqs if s.n < CHUNK_SPLIT_MIN]
    return np.array(rows, dtype=np.int64).reshape(-1, 5)


def _chunk(q, k, v, k_cache, v_cache, meta: AttnMetadata, s: SeqSpan, scale: float) -> torch.Tensor:
    """A long query run: its cached prefix (unmasked) and its own keys (causal) -> [n, nh*hd]."""
    kp = _seq_keys(k_cache, meta, s, s.start) if s.start else None
    vp = _seq_keys(v_cache, meta, s, s.start) if s.start else None
    rows = slice(s.row0, s.row0 + s.n)
    return chunk_attention(q[rows], k[rows], v[rows], kp, vp, scale)


def ragged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                     v_cache: torch.Tensor, meta: AttnMetadata, scale: float) -> torch.Tensor:
    """q [N, nh, hd], this step's k/v [N, kvh, hd] (already written to the cache) -> [N, nh*hd]."""
    n_all, nh, hd = q.shape
    if meta.short_runs is not None and cpu_kernels.supports_attention(q, k_cache):
        # every short run (decode rows, verify blocks) in one kernel call; long chunks below, one call each
        out = torch.empty(n_all, nh, hd, dtype=q.dtype)
        cpu_kernels.attention(q.contiguous(), k_cache, v_cache, out, meta.short_runs, meta.block_tables, scale,
                              causal=True)
        for s in meta.seqs:
            if s.n >= CHUNK_SPLIT_MIN:
                out[s.row0: s.row0 + s.n] = _chunk(q, k, v, k_cache, v_cache, meta, s, scale).view(s.n, nh, hd)
        return out.view(n_all, nh * hd)
    gqa = k.shape[1] != nh
    outs = []
    for s in meta.seqs:
        qi = q[s.row0: s.row0 + s.n]  # [n, nh, hd]
        if s.n >= CHUNK_SPLIT_MIN:
            outs.append(_chunk(q, k, v, k_cache, v_cache, meta, s, scale))
            continue
        length = s.start + s.n
        kk = _seq_keys(k_cache, meta, s, length).transpose(0, 1)[None]  # [1, kvh, L, hd]
        vv = _seq_keys(v_cache, meta, s, length).transpose(0, 1)[None]
        bias = None
        if s.n > 1:  # query j (position start + j) sees keys <= start + j
            hide = torch.arange(length, device=q.device)[None, :] > (s.start + torch.arange(s.n, device=q.device))[:, None]
            bias = torch.zeros(s.n, length, dtype=q.dtype, device=q.device).masked_fill_(hide, float("-inf"))
        o = F.scaled_dot_product_attention(qi.transpose(0, 1)[None], kk, vv, attn_mask=bias, scale=scale,
                                           enable_gqa=gqa)  # [1, nh, n, hd]
        outs.append(o[0].transpose(0, 1).reshape(s.n, nh * hd))
    return outs[0] if len(outs) == 1 else torch.cat(outs)


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
