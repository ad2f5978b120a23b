"""One plain-PyTorch decoder for the Llama / Qwen2 / Qwen3 families (config flags, not one file per model).

Parameter names follow HF (``model.layers.N.self_attn.q_proj`` ...) so an HF state dict loads as is and
tensor parallelism can shard the plain ``nn.Linear`` modules (column-parallel q/k/v/gate/up, row-parallel
o/down) after dividing ``Attention.num_heads`` / ``num_kv_heads`` by the TP degree; a TP wrapper sets
``DecoderLayer.all_reduce`` to a callable that sums the row-parallel outputs across ranks.

Two forwards share the layer code:
  * ``forward_hidden``: full sequences [B, T], causal, no cache (trainer, test oracle);
  * ``forward_paged``: a flat batch of new tokens [N] of many sequences over a paged KV cache (serving).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

import dataclasses

from workers.kernels import cpu as cpu_kernels
from workers.models.attention import AttnMetadata, attn_bias, paged_attention, ragged_attention, write_kv
from workers.models.config import ModelConfig, rope_table


@dataclasses.dataclass
class FastRope:
    """RoPE of this step's positions in fp32 for the CPU kernels' layer path: cos / sin [N, hd] contiguous."""

    cos: torch.Tensor
    sin: torch.Tensor


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [..., heads, hd]; cos/sin broadcastable [..., 1, hd] (rotate-half layout)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def rope_cos_sin(table: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """table [P, 2, hd], positions [...] -> cos, sin [..., 1, hd]."""
    cs = table[positions]
    return cs[..., 0:1, :], cs[..., 1:2, :]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        h, hd = cfg.hidden_size, cfg.head_dim
        self.num_heads = cfg.num_attention_heads  # divide by TP degree when sharding
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = hd
        self.scale = hd**-0.5
        self.q_proj = nn.Linear(h, self.num_heads * hd, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(h, self.num_kv_heads * hd, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(h, self.num_kv_heads * hd, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(self.num_heads * hd, h, bias=cfg.o_bias)
        self.q_norm = RMSNorm(hd, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(hd, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.fused_qkv: nn.Module | None = None  # one GEMM for q/k/v, set by workers/models/packed.py

    def qkv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """x [..., H] -> q [..., nh, hd], k/v [..., kvh, hd] (q, k normed and rotated)."""
        lead = x.shape[:-1]
        nq, nkv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        if self.fused_qkv is not None:
            qkv = self.fused_qkv(x)  # [..., nq + 2 nkv]
            if self.q_norm is None:  # q and k side by side: one RoPE over [..., nh + kvh, hd]
                qk = apply_rope(qkv[..., : nq + nkv].reshape(*lead, self.num_heads + self.num_kv_heads, self.head_dim),
                                cos, sin)
                v = qkv[..., nq + nkv:].reshape(*lead, self.num_kv_heads, self.head_dim)
                return qk[..., : self.num_heads, :], qk[..., self.num_heads:, :], v
            q, k, v = qkv.split([nq, nkv, nkv], dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.view(*lead, self.num_heads, self.head_dim)
        k = k.view(*lead, self.num_kv_heads, self.head_dim)
        v = v.view(*lead, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def forward_full(self, x, cos, sin, attn_mask: torch.Tensor | None) -> torch.Tensor:
        """x [B, T, H] -> [B, T, H]; causal unless attn_mask [B, 1, T, T] bool is given."""
        b, t, _ = x.shape
        q, k, v = self.qkv(x, cos, sin)
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=attn_mask,
            is_causal=attn_mask is None, scale=self.scale, enable_gqa=self.num_kv_heads != self.num_heads,
        )  # [B, nh, T, hd]
        return self.o_proj(out.transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim))

    def forward_paged(self, x, cos, sin, kv: tuple[torch.Tensor, torch.Tensor], meta: AttnMetadata):
        """x [N, H] -> [N, H]; writes this step's K/V into the cache first."""
        q, k, v = self.qkv(x, cos, sin)
        write_kv(kv[0], kv[1], k, v, meta.slot_mapping)
        if meta.seqs is not None:
            return self.o_proj(ragged_attention(q, k, v, kv[0], kv[1], meta, self.scale))
        return self.o_proj(paged_attention(q, kv[0], kv[1], meta, self.scale))

    def forward_kernels(self, x, rope: FastRope, kv: tuple[torch.Tensor, torch.Tensor], meta: AttnMetadata):
        """``forward_paged`` through the CPU kernels (a step of short query runs only): x [N, H] -> [N, H]."""
        if self.fused_qkv is not None:
            qkv = self.fused_qkv(x)
        else:
            qkv = torch.cat([self.q_proj(x), self.k_proj(x), self.v_proj(x)], dim=-1)
        q = cpu_kernels.rope_qkv(qkv, rope.cos, rope.sin, meta.slot_mapping, kv[0], kv[1], self.num_heads)
        out = torch.empty_like(q)
        cpu_kernels.attention(q, kv[0], kv[1], out, meta.short_runs, meta.block_tables, self.scale, causal=True)
        return self.o_proj(out.view(x.shape[0], self.num_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, h: int, inter: int, bias: bool = False):
        super().__init__()
        self.gate_proj = nn.Linear(h, inter, bias=bias)
        self.up_proj = nn.Linear(h, inter, bias=bias)
        self.down_proj = nn.Linear(inter, h, bias=bias)
        self.fused_gate_up: nn.Module | None = None  # one GEMM for gate/up, set by workers/models/packed.py

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused_gate_up is not None:
            gate, up = self.fused_gate_up(x).chunk(2, dim=-1)  # [..., 2I] -> 2 x [..., I]
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(F.silu(gate) * up)

    def forward_kernels(self, x: torch.Tensor) -> torch.Tensor:
        """x [N, H] -> [N, H] with silu(gate) * up in one CPU-kernel call."""
        gu = self.fused_gate_up(x) if self.fused_gate_up is not None else \
            torch.cat([self.gate_proj(x), self.up_proj(x)], dim=-1)
        return self.down_proj(cpu_kernels.silu_mul(gu))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None  # set by tensor parallelism

    def _reduce(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.all_reduce is None else self.all_reduce(x)

    def forward_kernels(self, x, rope: FastRope, kv, meta: AttnMetadata):
        """The serving forward of a step of short query runs through the CPU kernels: norms, RoPE + K/V write,
        attention and silu * up each one call (the GEMMs stay oneDNN's)."""
        n1, n2 = self.input_layernorm, self.post_attention_layernorm
        h, _ = cpu_kernels.rmsnorm(x, n1.weight, n1.eps)
        a = self._reduce(self.self_attn.forward_kernels(h, rope, kv, meta))
        h, x = cpu_kernels.rmsnorm(a, n2.weight, n2.eps, residual=x)
        return x + self._reduce(self.mlp.forward_kernels(h))

    def forward(self, x, cos, sin, attn_mask=None, kv=None, meta: AttnMetadata | None = None):
        h = self.input_layernorm(x)
        if meta is None:
            a = self.self_attn.forward_full(h, cos, sin, attn_mask)
        else:
            a = self.self_attn.forward_paged(h, cos, sin, kv, meta)
        x = x + self._reduce(a)
        return x + self._reduce(self.mlp(self.post_attention_layernorm(x)))


class DecoderModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class CausalLM(nn.Module):
    """HF-compatible parameter layout: ``model.*`` and ``lm_head`` (tied to the embedding if configured)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = DecoderModel(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        table = rope_table(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling, cfg.max_position_embeddings)
        self.register_buffer("rope", table, persistent=False)  # [P, 2, hd]

    @property
    def num_layers(self) -> int:
        return len(self.model.layers)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [...] -> [..., H]."""
        return self.model.embed_tokens(ids)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """h [..., H] (after the final norm) -> [..., V]."""
        return self.lm_head(h)

    def forward_hidden(
        self,
        input_ids: torch.Tensor,  # [B, T]
        positions: torch.Tensor | None = None,  # [B, T]; default arange(T)
        capture_layers: list[int] | tuple[int, ...] = (),
        attn_mask: torch.Tensor | None = None,  # [B, 1, T, T] bool; default causal
    ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """Full-sequence forward: (final hidden [B, T, H] after the final norm, {layer: raw output [B, T, H]})."""
        if positions is None:
            positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        cos, sin = rope_cos_sin(self.rope, positions)
        x = self.embed(input_ids)
        want, captured = set(capture_layers), {}
        for i, layer in enumerate(self.model.layers):
            x = layer(x, cos.to(x.dtype), sin.to(x.dtype), attn_mask=attn_mask)
            if i in want:
                captured[i] = x
        return self.model.norm(x), captured

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """Plain logits [B, T, V] (test oracle)."""
        return self.logits(self.forward_hidden(input_ids, positions)[0])

    def kernel_step(self, x: torch.Tensor, meta: AttnMetadata) -> bool:
        """Whether this step runs through the CPU kernels: the CPU's ragged layout with short query runs only
        (decode / verify; prefill chunks keep the torch path), a Llama-style layer (no q/k norm), a supported
        dtype and head_dim, the kernels built."""
        at = self.model.layers[0].self_attn
        return (meta.seqs is not None and meta.short_runs is not None and len(meta.short_runs) == len(meta.seqs)
                and at.q_norm is None and at.head_dim in cpu_kernels.HEAD_DIMS and at.head_dim % 2 == 0
                and cpu_kernels.supports_layer_ops(x))

    def forward_paged(
        self,
        input_ids: torch.Tensor,  # [N]
        positions: torch.Tensor,  # [N]
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],  # per layer (k, v) [nb, bs, kvh, hd]
        meta: AttnMetadata,
        capture_layers: list[int] | tuple[int, ...] = (),
        inputs_embeds: torch.Tensor | None = None,  # [N, H] instead of input_ids
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Serving forward: (final hidden [N, H], captured layer outputs concatenated [N, n_cap*H] or None)."""
        cos, sin = rope_cos_sin(self.rope, positions)
        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds
        want, captured = set(capture_layers), {}
        if self.kernel_step(x, meta):
            rope = FastRope(cos[:, 0].float().contiguous(), sin[:, 0].float().contiguous())  # [N, hd] fp32 (the table
            # is in the model's dtype: bf16 in a bf16 model)
            for i, layer in enumerate(self.model.layers):
                x = layer.forward_kernels(x, rope, kv_caches[i], meta)
                if i in want:
                    captured[i] = x
        else:
            cos, sin = cos.to(x.dtype), sin.to(x.dtype)
            if meta.seqs is None:
                meta = dataclasses.replace(meta, mask=attn_bias(meta.mask, x.dtype))  # once, shared by every layer
            for i, layer in enumerate(self.model.layers):
                x = layer(x, cos, sin, kv=kv_caches[i], meta=meta)
                if i in want:
                    captured[i] = x
        cap = torch.cat([captured[i] for i in capture_layers], dim=-1) if captured else None
        return self.model.norm(x), cap
