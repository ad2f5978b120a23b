"""Decoder configuration for the Llama / Qwen2 / Qwen3 families, read from an HF config.json dict.

Reads both spellings of the RoPE settings: top-level ``rope_theta`` / ``rope_scaling`` (older HF
configs, the public DFlash drafters) and transformers-5 ``rope_parameters``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3", "mistral")


@dataclass
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    model_type: str = "llama"
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None  # {"rope_type": "llama3"|"linear"|"default", ...}
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    qk_norm: bool = False  # Qwen3: RMSNorm over head_dim on q and k before RoPE
    attention_bias: bool = False  # bias on q/k/v projections (Qwen2)
    o_bias: bool = False
    mlp_bias: bool = False
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    pad_token_id: int | None = None

    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> "ModelConfig":
        mt = d.get("model_type", "llama")
        if mt not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"unsupported model_type {mt!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
        act = d.get("hidden_act", "silu")
        if act not in ("silu", "swish"):
            raise ValueError(f"unsupported hidden_act {act!r} (only SwiGLU/silu models are supported)")
        heads = int(d["num_attention_heads"])
        hidden = int(d["hidden_size"])
        theta, scaling = read_rope(d)
        eos = d.get("eos_token_id")
        eos_ids = [] if eos is None else ([int(eos)] if isinstance(eos, int) else [int(e) for e in eos])
        qkv_bias = bool(d.get("attention_bias", mt == "qwen2"))
        return cls(
            vocab_size=int(d["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(d["intermediate_size"]),
            num_hidden_layers=int(d["num_hidden_layers"]),
            num_attention_heads=heads,
            num_key_value_heads=int(d.get("num_key_value_heads") or heads),
            head_dim=int(d.get("head_dim") or hidden // heads),
            model_type=mt,
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_scaling=scaling,
            max_position_embeddings=int(d.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            qk_norm=(mt == "qwen3"),
            attention_bias=qkv_bias,
            o_bias=bool(d.get("attention_bias", False)) and mt != "qwen2",
            mlp_bias=bool(d.get("mlp_bias", False)),
            bos_token_id=d.get("bos_token_id"),
            eos_token_ids=eos_ids,
            pad_token_id=d.get("pad_token_id"),
        )


def read_rope(d: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, scaling dict or None) from either config spelling."""
    params = d.get("rope_parameters")
    if isinstance(params, dict) and params:
        if "rope_theta" not in params and all(isinstance(v, dict) for v in params.values()):
            params = params.get("full_attention") or next(iter(params.values()))
        theta = float(params.get("rope_theta", d.get("rope_theta", 10000.0)))
        rtype = params.get("rope_type", params.get("type", "default"))
        scaling = None if rtype == "default" else dict(params, rope_type=rtype)
        return theta, scaling
    theta = float(d.get("rope_theta", 10000.0))
    rs = d.get("rope_scaling")
    if not rs:
        return theta, None
    rtype = rs.get("rope_type", rs.get("type", "default"))
    return theta, (None if rtype == "default" else dict(rs, rope_type=rtype))


def rope_inv_freq(head_dim: int, theta: float, scaling: dict[str, Any] | None) -> torch.Tensor:
    """inv_freq [head_dim/2] fp32, with Llama-3 / linear scaling applied."""
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if not scaling:
        return inv
    rtype = scaling["rope_type"]
    if rtype == "linear":
        return inv / float(scaling["factor"])
    if rtype == "llama3":
        factor = float(scaling["factor"])
        lo = float(scaling.get("low_freq_factor", 1.0))
        hi = float(scaling.get("high_freq_factor", 4.0))
        old_ctx = float(scaling.get("original_max_position_embeddings", 8192))
        lo_wavelen, hi_wavelen = old_ctx / lo, old_ctx / hi
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > lo_wavelen, inv / factor, inv)
        smooth = (old_ctx / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= hi_wavelen) & (wavelen <= lo_wavelen)
        return torch.where(medium, smoothed, scaled)
    raise ValueError(f"unsupported rope scaling type {rtype!r} (supported: default, linear, llama3)")


def rope_table(head_dim: int, theta: float, scaling: dict[str, Any] | None, max_pos: int) -> torch.Tensor:
    """cos/sin table [max_pos, 2, head_dim] fp32 in the rotate-half layout (HF convention)."""
    inv = rope_inv_freq(head_dim, theta, scaling)
    t = torch.arange(max_pos, dtype=torch.float32)
    freqs = torch.outer(t, inv)  # [P, hd/2]
    emb = torch.cat([freqs, freqs], dim=-1)  # [P, hd]
    return torch.stack([emb.cos(), emb.sin()], dim=1)
