"""Model and drafter specs for planning: named presets from public config values, or read from a
config.json (HF directory / DFlash checkpoint). Pure and torch-free.

Parameter counts are computed from the shapes (the tests check them against the published totals),
so a spec read from any config.json is budgeted the same way as a preset.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from typing import Any

MXFP4_BYTES = 4.25 / 8  # 4-bit E2M1 values + one 8-bit E8M0 scale per 32 values
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "fp8": 1, "mxfp4": MXFP4_BYTES}


@dataclass(frozen=True)
class ModelSpec:
    name: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int  # dense MLP width (0 for an all-MoE model)
    vocab_size: int
    max_position: int
    tie_embeddings: bool = False
    num_experts: int = 0  # MoE: routed experts per layer (0 = dense)
    experts_per_token: int = 0
    moe_intermediate_size: int = 0
    sliding_window: int | None = None
    num_sliding_layers: int = 0  # layers whose KV is bounded by sliding_window
    weight_bytes: float = 2.0  # bytes/param of the non-expert weights
    expert_bytes: float = 2.0  # bytes/param of the expert weights (MXFP4: 0.53125)
    kv_bytes: float = 2.0  # bytes per KV element
    source: str = ""

    # ---- parameter counts (per layer, then totals) ----
    @property
    def attn_params(self) -> int:  # q, k, v, o projections of one layer
        q = self.num_heads * self.head_dim
        kv = self.num_kv_heads * self.head_dim
        return self.hidden_size * (q + 2 * kv) + q * self.hidden_size

    @property
    def mlp_params(self) -> int:  # dense gated MLP of one layer
        return 3 * self.hidden_size * self.intermediate_size

    @property
    def expert_params(self) -> int:  # one routed expert
        return 3 * self.hidden_size * self.moe_intermediate_size

    @property
    def router_params(self) -> int:
        return self.hidden_size * self.num_experts

    @property
    def embed_params(self) -> int:
        return self.vocab_size * self.hidden_size

    @property
    def lm_head_params(self) -> int:  # the matrix read by the head (the embedding when tied)
        return self.vocab_size * self.hidden_size

    @property
    def norm_params(self) -> int:
        return (2 * self.num_layers + 1) * self.hidden_size

    @property
    def dense_layer_params(self) -> int:  # everything in a layer that is not a routed expert
        return self.attn_params + self.mlp_params + self.router_params

    @property
    def total_expert_params(self) -> int:
        return self.num_layers * self.num_experts * self.expert_params

    @property
    def total_params(self) -> int:
        head = 0 if self.tie_embeddings else self.lm_head_params
        return (self.num_layers * self.dense_layer_params + self.total_expert_params
                + self.embed_params + head + self.norm_params)

    @property
    def active_params(self) -> int:
        """Parameters a token touches (embedding lookup excluded, lm_head included)."""
        return (self.num_layers * (self.dense_layer_params + self.experts_per_token * self.expert_params)
                + self.lm_head_params)

    @property
    def weight_total_bytes(self) -> float:
        return (self.total_params - self.total_expert_params) * self.weight_bytes + \
            self.total_expert_params * self.expert_bytes

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def num_full_layers(self) -> int:
        return self.num_layers - self.num_sliding_layers

    def kv_bytes_per_token_layer(self, tp: int = 1) -> float:
        """K and V of one token in one layer on one TP rank (KV heads split, replicated if kv < tp)."""
        heads = max(1, self.num_kv_heads // tp) if self.num_kv_heads >= tp else 1
        return 2 * heads * self.head_dim * self.kv_bytes

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(total_params=self.total_params, active_params=self.active_params,
                 weight_total_bytes=self.weight_total_bytes)
        return d


@dataclass(frozen=True)
class DrafterSpec:
    """A DFlash drafter: a few Qwen3 layers at the target's width, plus fc over the target features."""

    name: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    num_features: int  # len(target_layer_ids)
    block_size: int = 16
    weight_bytes: float = 2.0
    kv_bytes: float = 2.0
    source: str = ""

    @property
    def params(self) -> int:
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        layer = self.hidden_size * (q + 2 * kv) + q * self.hidden_size + 3 * self.hidden_size * self.intermediate_size
        fc = self.hidden_size * self.num_features * self.hidden_size
        return self.num_layers * layer + fc + (2 * self.num_layers + 2) * self.hidden_size

    @property
    def weight_total_bytes(self) -> float:
        return self.params * self.weight_bytes

    @property
    def kv_bytes_per_token(self) -> float:  # its context K/V cache, all layers
        return self.num_layers * 2 * self.num_kv_heads * self.head_dim * self.kv_bytes

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(params=self.params, weight_total_bytes=self.weight_total_bytes)
        return d


_HF = "config.json of the public Hugging Face repository"
PRESETS: dict[str, ModelSpec] = {
    "qwen3-8b": ModelSpec("Qwen3-8B", 36, 4096, 32, 8, 128, 12288, 151936, 40960,
                          source=f"Qwen/Qwen3-8B {_HF} (8.2B params, bf16)"),
    "qwen3-32b": ModelSpec("Qwen3-32B", 64, 5120, 64, 8, 128, 25600, 151936, 40960,
                           source=f"Qwen/Qwen3-32B {_HF} (32.8B params, bf16)"),
    "llama-3.1-70b": ModelSpec("Llama-3.1-70B", 80, 8192, 64, 8, 128, 28672, 128256, 131072,
                               source=f"meta-llama/Llama-3.1-70B {_HF} (70.6B params, bf16)"),
    "gpt-oss-120b": ModelSpec(
        "gpt-oss-120b", 36, 2880, 64, 8, 64, 0, 201088, 131072,
        num_experts=128, experts_per_token=4, moe_intermediate_size=2880,
        sliding_window=128, num_sliding_layers=18, expert_bytes=MXFP4_BYTES,
        source=f"openai/gpt-oss-120b {_HF} + model card: 116.8B total / 5.1B active params, "
        "MoE weights natively MXFP4, alternating 128-token sliding-window and full attention"),
}
ALIASES = {"qwen/qwen3-8b": "qwen3-8b", "qwen/qwen3-32b": "qwen3-32b", "llama-70b": "llama-3.1-70b",
           "meta-llama/llama-3.1-70b": "llama-3.1-70b", "openai/gpt-oss-120b": "gpt-oss-120b"}


def default_drafter(model: ModelSpec, block_size: int = 16) -> DrafterSpec:
    """The DFlash shape we assume when no checkpoint is given: 5 layers at the target's attention
    shape (as z-lab's Qwen3-8B-DFlash-b16), 5 target features, MLP as wide as the target's active MLP."""
    inter = model.intermediate_size or model.moe_intermediate_size * model.experts_per_token
    return DrafterSpec(f"{model.name}-DFlash (assumed shape)", 5, model.hidden_size, model.num_heads,
                       model.num_kv_heads, model.head_dim, inter, 5, block_size,
                       source="assumed: 5 Qwen3 layers at the target's width, 5 target features")


def _read_config(path: str) -> dict[str, Any]:
    p = os.path.join(path, "config.json") if os.path.isdir(path) else path
    if not os.path.exists(p):
        raise FileNotFoundError(f"no config.json at {path}")
    with open(p) as f:
        return json.load(f)


def _dtype_bytes(cfg: dict[str, Any]) -> float:
    dt = str(cfg.get("torch_dtype") or cfg.get("dtype") or "bfloat16").replace("torch.", "")
    return float(DTYPE_BYTES.get(dt, 2))


def model_from_config(path_or_cfg: str | dict[str, Any], name: str | None = None) -> ModelSpec:
    cfg = path_or_cfg if isinstance(path_or_cfg, dict) else _read_config(path_or_cfg)
    try:
        hidden, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
        layers, vocab = int(cfg["num_hidden_layers"]), int(cfg["vocab_size"])
    except KeyError as exc:
        raise ValueError(f"config.json lacks {exc.args[0]!r}; not a decoder-only transformer config") from None
    n_exp = int(cfg.get("num_local_experts") or cfg.get("num_experts") or 0)
    types = cfg.get("layer_types") or []
    n_slide = sum(1 for t in types if "sliding" in str(t))
    quant = (cfg.get("quantization_config") or {}).get("quant_method", "")
    wb = _dtype_bytes(cfg)
    return ModelSpec(
        name=name or (cfg.get("_name_or_path") or (path_or_cfg if isinstance(path_or_cfg, str) else "model")),
        num_layers=layers, hidden_size=hidden, num_heads=heads,
        num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
        head_dim=int(cfg.get("head_dim") or hidden // heads),
        intermediate_size=0 if n_exp else int(cfg.get("intermediate_size", 4 * hidden)),
        vocab_size=vocab,
        max_position=int(cfg.get("max_position_embeddings", 4096)),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        num_experts=n_exp,
        experts_per_token=int(cfg.get("num_experts_per_tok") or cfg.get("experts_per_token") or 0),
        moe_intermediate_size=int(cfg.get("moe_intermediate_size") or cfg.get("intermediate_size", 0)) if n_exp else 0,
        sliding_window=cfg.get("sliding_window") if n_slide else None,
        num_sliding_layers=n_slide,
        weight_bytes=wb, expert_bytes=MXFP4_BYTES if quant == "mxfp4" else wb, kv_bytes=wb,
        source=f"config.json at {path_or_cfg}" if isinstance(path_or_cfg, str) else "config dict",
    )


def drafter_from_config(path_or_cfg: str | dict[str, Any]) -> DrafterSpec:
    cfg = path_or_cfg if isinstance(path_or_cfg, dict) else _read_config(path_or_cfg)
    dfl = cfg.get("dflash_config") or {}
    if "target_layer_ids" not in dfl:
        raise ValueError("not a DFlash checkpoint: config.json has no dflash_config.target_layer_ids")
    fallback = os.path.basename(os.path.normpath(path_or_cfg)) if isinstance(path_or_cfg, str) else "drafter"
    m = model_from_config(cfg, name=str(cfg.get("_name_or_path") or fallback))
    return DrafterSpec(m.name, m.num_layers, m.hidden_size, m.num_heads, m.num_kv_heads, m.head_dim,
                       m.intermediate_size, len(dfl["target_layer_ids"]), int(cfg.get("block_size", 16)),
                       m.weight_bytes, m.kv_bytes, source=m.source)


def resolve_model(name_or_path: str) -> ModelSpec:
    key = name_or_path.lower()
    key = ALIASES.get(key, key)
    if key in PRESETS:
        return PRESETS[key]
    if os.path.exists(name_or_path):
        return model_from_config(name_or_path, name=os.path.basename(os.path.normpath(name_or_path)))
    raise ValueError(f"unknown model {name_or_path!r}: not a preset ({', '.join(PRESETS)}) "
                     "and not a path to an HF directory / config.json")
