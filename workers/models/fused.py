"""Fewer, larger kernels for the graph path's target forward (the model's own ``forward_paged`` is the oracle).

  * ``fuse_projections``: q/k/v and gate/up weights of every layer are moved into one buffer each and the
    original ``nn.Linear`` weights become views of it (no extra memory; the eager path sees the same values),
    so a layer runs one QKV GEMM and one gate-up GEMM instead of five;
  * ``forward_paged_fused``: the same math as ``CausalLM.forward_paged`` / ``DecoderLayer.forward`` for a
    model without biases or tensor parallelism, split per layer into ``pre`` (norm, QKV, q/k-norm, RoPE) and
    ``post`` (o_proj, residual, norm, gate-up, SiLU, down, residual) around the paged attention (KV write,
    gather, SDPA), so ``pre`` / ``post`` can be ``torch.compile``d once for all layers and all shapes
    (``compiled_pieces``) while the in-place cache write stays outside the compiled code.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from workers.models.attention import AttnMetadata, paged_attention, write_kv
from workers.models.llama import CausalLM, apply_rope, rope_cos_sin


def supports(model: CausalLM) -> bool:
    c = model.config
    plain = not (c.attention_bias or c.o_bias or c.mlp_bias)
    return plain and "forward_paged" not in vars(model) and all(l.all_reduce is None for l in model.model.layers)


def _fuse(linears: list[nn.Linear]) -> torch.Tensor:
    w0 = linears[0].weight
    fused = torch.empty(sum(l.weight.shape[0] for l in linears), w0.shape[1], dtype=w0.dtype, device=w0.device)
    row = 0
    for l in linears:
        n = l.weight.shape[0]
        fused[row: row + n].copy_(l.weight)
        l.weight = nn.Parameter(fused[row: row + n], requires_grad=False)  # a view: the old copy is freed
        row += n
    return fused


@torch.no_grad()
def fuse_projections(model: CausalLM) -> CausalLM:
    """Idempotent; sets ``self_attn.qkv_weight`` [(nh+2kvh)*hd, H] and ``mlp.gate_up_weight`` [2I, H]."""
    if not supports(model):
        raise ValueError("projection fusion needs a bias-free, single-rank model")
    for layer in model.model.layers:
        at, mlp = layer.self_attn, layer.mlp
        if getattr(at, "qkv_weight", None) is None:
            at.qkv_weight = _fuse([at.q_proj, at.k_proj, at.v_proj])
        if getattr(mlp, "gate_up_weight", None) is None:
            mlp.gate_up_weight = _fuse([mlp.gate_proj, mlp.up_proj])
    return model


def layer_pre(layer, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """x [N, H] -> q [N, nh, hd], k [N, kvh, hd] (normed, rotated), v [N, kvh, hd]."""
    at = layer.self_attn
    nh, kvh, hd = at.num_heads, at.num_kv_heads, at.head_dim
    qkv = F.linear(layer.input_layernorm(x), at.qkv_weight)  # [N, (nh+2kvh)*hd]
    q, k, v = qkv.split([nh * hd, kvh * hd, kvh * hd], dim=-1)
    q, k, v = q.view(-1, nh, hd), k.view(-1, kvh, hd), v.view(-1, kvh, hd)
    if at.q_norm is not None:
        q, k = at.q_norm(q), at.k_norm(k)
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v


def layer_post(layer, x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
    """x [N, H] residual, attn [N, nh*hd] -> next residual [N, H]."""
    x = x + layer.self_attn.o_proj(attn)
    gate, up = F.linear(layer.post_attention_layernorm(x), layer.mlp.gate_up_weight).chunk(2, dim=-1)
    return x + layer.mlp.down_proj(F.silu(gate) * up)


_COMPILED: dict[str, object] = {}


def compiled_pieces():
    """(pre, post) compiled once per process, dynamic shapes: one artifact serves every layer and bucket."""
    if not _COMPILED:
        _COMPILED["pre"] = torch.compile(layer_pre, dynamic=True)
        _COMPILED["post"] = torch.compile(layer_post, dynamic=True)
    return _COMPILED["pre"], _COMPILED["post"]


def forward_paged_fused(model: CausalLM, input_ids: torch.Tensor, positions: torch.Tensor,
                        kv_caches: list[tuple[torch.Tensor, torch.Tensor]], meta: AttnMetadata,
                        capture_layers=(), pre=layer_pre, post=layer_post):
    """Same contract as ``CausalLM.forward_paged``: (final hidden [N, H], captured features [N, n*H] or None)."""
    cos, sin = rope_cos_sin(model.rope, positions)
    x = model.embed(input_ids)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    want, captured = set(capture_layers), {}
    for i, layer in enumerate(model.model.layers):
        at = layer.self_attn
        q, k, v = pre(layer, x, cos, sin)
        kc, vc = kv_caches[i]
        write_kv(kc, vc, k, v, meta.slot_mapping)
        x = post(layer, x, paged_attention(q, kc, vc, meta, at.scale))
        if i in want:
            captured[i] = x
    cap = torch.cat([captured[i] for i in capture_layers], dim=-1) if captured else None
    return model.model.norm(x), cap
