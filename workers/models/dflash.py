"""DFlash block-diffusion drafter: model, z-lab checkpoint format (load/save with validation), serving ops.

Format (z-lab/dflash): config.json with ``architectures: ["DFlashDraftModel"]``, ``model_type: "qwen3"``,
``block_size``, ``num_target_layers``, ``dflash_config: {mask_token_id, target_layer_ids}`` plus Qwen3 keys;
one model.safetensors with ``layers.N.*``, ``fc``, ``hidden_norm``, ``norm`` (no embedding / lm_head: the
target's are used).

Math: ctx = hidden_norm(fc(concat of target layer outputs)) [C, H]. In every drafter layer the block's
queries attend (non-causally) to K/V of [ctx ; block] computed with the same k/v projections (+ Qwen3 k_norm,
RoPE at absolute positions). Serving keeps only the context K/V in a paged cache (``write_context``);
the block's own K/V are recomputed in each ``propose`` and never stored.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from workers.engine.params import IncompatibleDrafter
from workers.models.attention import attn_bias, gather_kv, write_kv
from workers.models.config import ModelConfig, read_rope, rope_table
from workers.models.llama import MLP, RMSNorm, apply_rope, rope_cos_sin


def default_target_layer_ids(num_target_layers: int, num_features: int) -> list[int]:
    """Evenly spaced target layers from 1 to L-3 (the spread the public DFlash drafters use)."""
    if num_features == 1:
        return [num_target_layers // 2]
    lo, hi = 1, max(1, num_target_layers - 3)
    return [round(lo + i * (hi - lo) / (num_features - 1)) for i in range(num_features)]


@dataclass
class DrafterConfig:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    block_size: int
    num_target_layers: int
    mask_token_id: int
    target_layer_ids: list[int]
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 40960
    attention_bias: bool = False
    extra: dict[str, Any] = field(default_factory=dict)  # other config.json keys, kept on save

    @classmethod
    def for_target(cls, target: ModelConfig, num_hidden_layers: int, mask_token_id: int, block_size: int = 16,
                   target_layer_ids: list[int] | None = None, num_features: int | None = None) -> "DrafterConfig":
        """A drafter shaped like the target's layers (the usual DFlash choice)."""
        ids = target_layer_ids or default_target_layer_ids(target.num_hidden_layers, num_features or num_hidden_layers)
        return cls(
            hidden_size=target.hidden_size, intermediate_size=target.intermediate_size,
            num_hidden_layers=num_hidden_layers, num_attention_heads=target.num_attention_heads,
            num_key_value_heads=target.num_key_value_heads, head_dim=target.head_dim,
            vocab_size=target.vocab_size, block_size=block_size, num_target_layers=target.num_hidden_layers,
            mask_token_id=mask_token_id, target_layer_ids=list(ids), rms_norm_eps=target.rms_norm_eps,
            rope_theta=target.rope_theta, rope_scaling=target.rope_scaling,
            max_position_embeddings=target.max_position_embeddings,
        )

    def to_hf(self) -> dict[str, Any]:
        d = dict(self.extra)
        d.update(
            architectures=["DFlashDraftModel"], model_type="qwen3", hidden_act="silu",
            hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers, num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads, head_dim=self.head_dim, vocab_size=self.vocab_size,
            rms_norm_eps=self.rms_norm_eps, rope_theta=self.rope_theta, rope_scaling=self.rope_scaling,
            max_position_embeddings=self.max_position_embeddings, attention_bias=self.attention_bias,
            tie_word_embeddings=False, block_size=self.block_size, num_target_layers=self.num_target_layers,
            dflash_config={"mask_token_id": self.mask_token_id, "target_layer_ids": list(self.target_layer_ids)},
        )
        return d

    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> "DrafterConfig":
        if "DFlashDraftModel" not in (d.get("architectures") or []):
            raise IncompatibleDrafter(f"not a DFlash drafter: architectures={d.get('architectures')!r}")
        dc = d.get("dflash_config")
        for key in ("block_size", "num_target_layers"):
            if key not in d:
                raise IncompatibleDrafter(f"drafter config.json lacks required key {key!r}")
        if not isinstance(dc, dict) or "mask_token_id" not in dc or "target_layer_ids" not in dc:
            raise IncompatibleDrafter("drafter config.json needs dflash_config {mask_token_id, target_layer_ids}")
        theta, scaling = read_rope(d)
        heads = int(d["num_attention_heads"])
        known = set(asdict(cls(1, 1, 1, 1, 1, 1, 1, 1, 1, 0, [])).keys()) | {"dflash_config", "architectures"}
        return cls(
            hidden_size=int(d["hidden_size"]), intermediate_size=int(d["intermediate_size"]),
            num_hidden_layers=int(d["num_hidden_layers"]), num_attention_heads=heads,
            num_key_value_heads=int(d.get("num_key_value_heads") or heads),
            head_dim=int(d.get("head_dim") or int(d["hidden_size"]) // heads), vocab_size=int(d["vocab_size"]),
            block_size=int(d["block_size"]), num_target_layers=int(d["num_target_layers"]),
            mask_token_id=int(dc["mask_token_id"]), target_layer_ids=[int(i) for i in dc["target_layer_ids"]],
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)), rope_theta=theta, rope_scaling=scaling,
            max_position_embeddings=int(d.get("max_position_embeddings", 40960)),
            attention_bias=bool(d.get("attention_bias", False)),
            extra={k: v for k, v in d.items() if k not in known and k not in ("rope_parameters",)},
        )


class DraftAttention(nn.Module):
    def __init__(self, c: DrafterConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.scale = c.head_dim**-0.5
        self.q_proj = nn.Linear(c.hidden_size, c.num_attention_heads * c.head_dim, bias=c.attention_bias)
        self.k_proj = nn.Linear(c.hidden_size, c.num_key_value_heads * c.head_dim, bias=c.attention_bias)
        self.v_proj = nn.Linear(c.hidden_size, c.num_key_value_heads * c.head_dim, bias=c.attention_bias)
        self.o_proj = nn.Linear(c.num_attention_heads * c.head_dim, c.hidden_size, bias=c.attention_bias)
        self.q_norm = RMSNorm(c.head_dim, c.rms_norm_eps)
        self.k_norm = RMSNorm(c.head_dim, c.rms_norm_eps)
        self.fused_kv: nn.Module | None = None  # one GEMM for k/v, set by workers/models/packed.py

    def kv(self, x, cos, sin):
        """x [..., H] -> k, v [..., kvh, hd] (k normed and rotated)."""
        lead = x.shape[:-1]
        if self.fused_kv is not None:
            k, v = self.fused_kv(x).chunk(2, dim=-1)  # [..., 2 kvh hd]
        else:
            k, v = self.k_proj(x), self.v_proj(x)
        k = self.k_norm(k.reshape(*lead, self.num_kv_heads, self.head_dim))
        return apply_rope(k, cos, sin), v.reshape(*lead, self.num_kv_heads, self.head_dim)

    def q(self, x, cos, sin):
        q = self.q_norm(self.q_proj(x).view(*x.shape[:-1], self.num_heads, self.head_dim))
        return apply_rope(q, cos, sin)

    def attend(self, q, k, v, mask):
        """q [B, Q, nh, hd], k/v [B, kvh, K, hd] -> [B, Q, H] (non-causal, optional bool mask [B,1,Q,K])."""
        b, nq = q.shape[:2]
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k, v, attn_mask=mask, scale=self.scale, enable_gqa=self.num_kv_heads != self.num_heads
        )
        return self.o_proj(out.transpose(1, 2).reshape(b, nq, self.num_heads * self.head_dim))


class DraftLayer(nn.Module):
    def __init__(self, c: DrafterConfig):
        super().__init__()
        self.self_attn = DraftAttention(c)
        self.mlp = MLP(c.hidden_size, c.intermediate_size)
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)

    def finish(self, x, a):
        x = x + a
        return x + self.mlp(self.post_attention_layernorm(x))


class DFlashDrafter(nn.Module):
    def __init__(self, c: DrafterConfig):
        super().__init__()
        self.config = c
        self.layers = nn.ModuleList(DraftLayer(c) for _ in range(c.num_hidden_layers))
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.fc = nn.Linear(len(c.target_layer_ids) * c.hidden_size, c.hidden_size, bias=False)
        self.hidden_norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        table = rope_table(c.head_dim, c.rope_theta, c.rope_scaling, c.max_position_embeddings)
        self.register_buffer("rope", table, persistent=False)  # [P, 2, hd]
        # optional reduced draft vocabulary (draft_vocab.json): drafts are drawn from these token ids only, with
        # logits from draft_head = the target lm_head's rows for them (attach_draft_head); None = full vocabulary
        self.register_buffer("draft_vocab", None, persistent=False)  # [Vd] long, sorted
        self.draft_head: nn.Module | None = None

    @property
    def block_size(self) -> int:
        return self.config.block_size

    def attach_draft_head(self, lm_head_weight: torch.Tensor) -> None:
        """draft_head = lm_head restricted to draft_vocab: [Vd, H] rows of the target's [V, H] weight."""
        if self.draft_vocab is None or lm_head_weight.shape[0] != self.config.vocab_size:
            return  # no draft vocabulary, or a vocab-parallel (sharded) lm_head: drafts use the full vocabulary
        head = nn.Linear(lm_head_weight.shape[1], self.draft_vocab.numel(), bias=False,
                         device=lm_head_weight.device, dtype=lm_head_weight.dtype)
        with torch.no_grad():
            head.weight.copy_(lm_head_weight.detach().index_select(0, self.draft_vocab.to(lm_head_weight.device)))
        head.requires_grad_(False)
        self.draft_head = head

    def project_context(self, features: torch.Tensor) -> torch.Tensor:
        """raw concatenated target layer outputs [..., n_feat*H] -> [..., H]."""
        return self.hidden_norm(self.fc(features))

    def forward(
        self,
        block_embeds: torch.Tensor,  # [B, Q, H] target embedding of [anchor, MASK x]
        ctx_features: torch.Tensor,  # [B, C, n_feat*H] raw concatenated target layer outputs
        q_positions: torch.Tensor,  # [B, Q]
        ctx_positions: torch.Tensor,  # [B, C]
        attn_mask: torch.Tensor | None = None,  # [B, 1, Q, C+Q] bool; None = attend to everything
    ) -> torch.Tensor:  # [B, Q, H] after the final norm; logits = target lm_head
        ctx = self.project_context(ctx_features)
        qc, qs = rope_cos_sin(self.rope, q_positions)
        cc, cs = rope_cos_sin(self.rope, ctx_positions)
        dt = block_embeds.dtype
        qc, qs, cc, cs = qc.to(dt), qs.to(dt), cc.to(dt), cs.to(dt)
        x = block_embeds
        for layer in self.layers:
            at = layer.self_attn
            h = layer.input_layernorm(x)
            kc, vc = at.kv(ctx, cc, cs)  # [B, C, kvh, hd]
            kb, vb = at.kv(h, qc, qs)  # [B, Q, kvh, hd]
            k = torch.cat([kc, kb], dim=1).transpose(1, 2)
            v = torch.cat([vc, vb], dim=1).transpose(1, 2)
            x = layer.finish(x, at.attend(at.q(h, qc, qs), k, v, attn_mask))
        return self.norm(x)

    # ---- serving: the context K/V live in a paged cache that shares the target's block tables ----
    def write_context(self, features: torch.Tensor, positions: torch.Tensor, kv_caches, slots: torch.Tensor):
        """features [N, n_feat*H] of committed tokens at positions [N] -> per-layer K/V at cache slots [N]."""
        ctx = self.project_context(features)
        cos, sin = rope_cos_sin(self.rope, positions)
        cos, sin = cos.to(ctx.dtype), sin.to(ctx.dtype)
        for layer, (kc, vc) in zip(self.layers, kv_caches):
            k, v = layer.self_attn.kv(ctx, cos, sin)
            write_kv(kc, vc, k, v, slots)

    def propose_hidden(
        self,
        block_embeds: torch.Tensor,  # [B, Q, H]
        q_positions: torch.Tensor,  # [B, Q]
        kv_caches,  # per drafter layer (k, v) [nb, bs, kvh, hd]
        block_tables: torch.Tensor,  # [B, nblk]
        mask: torch.Tensor | None = None,  # [B, 1, Q, nblk*bs + Q] bool: context rows < ctx_len, own rows < q_len
        own: "OwnBlocks | None" = None,  # instead of the mask: the CPU kernel's layout
    ) -> torch.Tensor:  # [B, Q, H] (with ``own``, rows past a block's length are computed from zeros: ignore them)
        """Every block row attends (non-causally) to its cached context + its own block: by gathering the context
        and masking (``mask``), or through the CPU attention kernel (``own``: the block's K/V are written into the
        cache at the block's positions, then one kernel call per layer covers every block)."""
        cos, sin = rope_cos_sin(self.rope, q_positions)
        cos, sin = cos.to(block_embeds.dtype), sin.to(block_embeds.dtype)
        if own is None:
            mask = attn_bias(mask, block_embeds.dtype)  # once, shared by every layer
        x = block_embeds
        for layer, (kcache, vcache) in zip(self.layers, kv_caches):
            at = layer.self_attn
            h = layer.input_layernorm(x)
            kb, vb = at.kv(h, cos, sin)  # [B, Q, kvh, hd]
            q = at.q(h, cos, sin)  # [B, Q, nh, hd]
            if own is None:
                k = torch.cat([gather_kv(kcache, block_tables), kb.transpose(1, 2)], dim=2)  # [B, kvh, K+Q, hd]
                v = torch.cat([gather_kv(vcache, block_tables), vb.transpose(1, 2)], dim=2)
                a = at.attend(q, k, v, mask)
            else:
                a = own.attend(at, q, kb, vb, kcache, vcache, block_tables)
            x = layer.finish(x, a)
        return self.norm(x)


@dataclass
class OwnBlocks:
    """A proposal's layout for the CPU attention kernel (workers/kernels/cpu.py): which rows of the flattened
    [B*Q] block are real, the cache slots of their positions, and the kernel's per-block runs."""

    rows: torch.Tensor  # [M] long
    slots: torch.Tensor  # [M] long
    runs: Any  # np.ndarray [B, 5] int64: (row0, n, kv0, slot0, table row)

    def attend(self, at: "DraftAttention", q, kb, vb, kcache, vcache, block_tables) -> torch.Tensor:
        """q [B, Q, nh, hd], the block's k/v [B, Q, kvh, hd] -> attention output after o_proj [B, Q, H]."""
        from workers.kernels import cpu as cpu_kernels

        b, nq = q.shape[:2]
        write_kv(kcache, vcache, kb.reshape(b * nq, *kb.shape[2:])[self.rows],
                 vb.reshape(b * nq, *vb.shape[2:])[self.rows], self.slots)
        qq = q.reshape(b * nq, at.num_heads, at.head_dim).contiguous()
        out = torch.zeros_like(qq)
        cpu_kernels.attention(qq, kcache, vcache, out, self.runs, block_tables, at.scale, causal=False)
        return at.o_proj(out.view(b, nq, at.num_heads * at.head_dim))


def validate_against_target(c: DrafterConfig, target: ModelConfig) -> None:
    if c.hidden_size != target.hidden_size:
        raise IncompatibleDrafter(f"drafter hidden_size {c.hidden_size} != target hidden_size {target.hidden_size}")
    if c.num_target_layers != target.num_hidden_layers:
        raise IncompatibleDrafter(
            f"drafter was built for a {c.num_target_layers}-layer target; this target has {target.num_hidden_layers}"
        )
    bad = [i for i in c.target_layer_ids if not 0 <= i < target.num_hidden_layers]
    if bad or not c.target_layer_ids:
        raise IncompatibleDrafter(
            f"drafter target_layer_ids {c.target_layer_ids} must be non-empty and < {target.num_hidden_layers}"
        )
    if c.vocab_size != target.vocab_size:
        raise IncompatibleDrafter(f"drafter vocab_size {c.vocab_size} != target vocab_size {target.vocab_size}")
    if not 0 <= c.mask_token_id < target.vocab_size:
        raise IncompatibleDrafter(f"mask_token_id {c.mask_token_id} is not a row of the target's embedding table")
    if c.block_size < 2:
        raise IncompatibleDrafter(f"drafter block_size must be >= 2, got {c.block_size}")


def load_drafter(path: str | Path, target_cfg: ModelConfig, dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu") -> DFlashDrafter:
    from safetensors.torch import load_file

    p = Path(path)
    if not (p / "config.json").is_file():
        raise IncompatibleDrafter(f"{p} is not a DFlash checkpoint directory (no config.json)")
    c = DrafterConfig.from_hf(json.loads((p / "config.json").read_text()))
    validate_against_target(c, target_cfg)
    files = sorted(p.glob("*.safetensors"))
    if not files:
        raise IncompatibleDrafter(f"{p} has no *.safetensors weights")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    state = {k.removeprefix("model."): v for k, v in state.items()}
    c.max_position_embeddings = max(c.max_position_embeddings, target_cfg.max_position_embeddings)
    with torch.device("meta"):
        d = DFlashDrafter(c)
    expected = {k: tuple(v.shape) for k, v in d.state_dict().items()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise IncompatibleDrafter(f"drafter weights do not match its config: missing {missing[:5]}, "
                                  f"unexpected {unexpected[:5]}")
    for k, shape in expected.items():
        if tuple(state[k].shape) != shape:
            raise IncompatibleDrafter(f"drafter weight {k} has shape {tuple(state[k].shape)}, expected {shape}")
    d = d.to_empty(device=device)
    d.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=True)
    d.rope = rope_table(c.head_dim, c.rope_theta, c.rope_scaling, c.max_position_embeddings).to(device)
    d = d.to(dtype).eval()
    if (p / DRAFT_VOCAB_FILE).is_file():
        d.draft_vocab = read_draft_vocab(p / DRAFT_VOCAB_FILE, c.vocab_size).to(device)
    return d


DRAFT_VOCAB_FILE = "draft_vocab.json"  # {"token_ids": [...], ...}: an extra file, ignored by the z-lab reference


def read_draft_vocab(path: Path, vocab_size: int) -> torch.Tensor:
    """-> sorted unique token ids [Vd] long; IncompatibleDrafter when malformed or outside the vocabulary."""
    try:
        ids = json.loads(Path(path).read_text())["token_ids"]
        ids = sorted({int(t) for t in ids})
    except (ValueError, KeyError, TypeError) as exc:
        raise IncompatibleDrafter(f"{path}: not a draft vocabulary ({exc})") from None
    if not ids or ids[0] < 0 or ids[-1] >= vocab_size:
        raise IncompatibleDrafter(f"{path}: draft vocabulary ids must be non-empty and in [0, {vocab_size})")
    return torch.tensor(ids, dtype=torch.long)


def write_draft_vocab(path: str | Path, token_ids: list[int], **info) -> None:
    Path(path).write_text(json.dumps({"token_ids": sorted({int(t) for t in token_ids}), **info}) + "\n")


def save_drafter(drafter: DFlashDrafter, path: str | Path, dtype: torch.dtype | None = None) -> None:
    """Write config.json + model.safetensors in the z-lab layout."""
    from safetensors.torch import save_file

    p = Path(path)
    p.mkdir(parents=True, exist_ok=True)
    cfg = drafter.config.to_hf()
    sd = {k: (v.to(dtype) if dtype else v).detach().contiguous().cpu() for k, v in drafter.state_dict().items()}
    cfg["torch_dtype"] = str(next(iter(sd.values())).dtype).removeprefix("torch.")
    (p / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    save_file(sd, str(p / "model.safetensors"), metadata={"format": "pt"})
    if drafter.draft_vocab is not None:
        write_draft_vocab(p / DRAFT_VOCAB_FILE, drafter.draft_vocab.tolist())
