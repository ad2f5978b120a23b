"""DFlash drafter: z-lab checkpoint round trip, validation errors, reference math, paged == dense forward."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers.tiny import tiny_drafter, tiny_hf_config
from workers.engine.params import IncompatibleDrafter
from workers.models.config import ModelConfig
from workers.models.dflash import DFlashDrafter, load_drafter, save_drafter


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def target_cfg():
    return ModelConfig.from_hf(tiny_hf_config("llama"))


def test_zlab_checkpoint_round_trip(tmp_path, target_cfg):
    d = tiny_drafter(target_cfg, num_layers=2, block_size=8, mask_token_id=3)
    save_drafter(d, tmp_path / "dr")
    cfg = json.loads((tmp_path / "dr" / "config.json").read_text())
    assert cfg["architectures"] == ["DFlashDraftModel"] and cfg["model_type"] == "qwen3"
    assert cfg["block_size"] == 8 and cfg["num_target_layers"] == 4
    assert cfg["dflash_config"] == {"mask_token_id": 3, "target_layer_ids": d.config.target_layer_ids}
    keys = set(load_file(str(tmp_path / "dr" / "model.safetensors")))
    assert {"fc.weight", "hidden_norm.weight", "norm.weight", "layers.1.self_attn.q_norm.weight",
            "layers.0.self_attn.k_norm.weight", "layers.0.mlp.gate_proj.weight",
            "layers.1.post_attention_layernorm.weight"} <= keys
    assert not any(k.startswith(("embed", "lm_head", "model.")) for k in keys)
    d2 = load_drafter(tmp_path / "dr", target_cfg)
    for (k, a), (k2, b) in zip(d.state_dict().items(), d2.state_dict().items()):
        assert k == k2 and torch.equal(a, b)


@pytest.mark.parametrize("change, msg", [
    ({"hidden_size": 32}, "hidden_size"),
    ({"num_target_layers": 8}, "8-layer"),
    ({"vocab_size": 99}, "vocab_size"),
    ({"dflash_config": {"mask_token_id": 3, "target_layer_ids": [0, 4]}}, "target_layer_ids"),
    ({"dflash_config": {"mask_token_id": 500, "target_layer_ids": [0, 1]}}, "mask_token_id"),
    ({"architectures": ["Qwen3ForCausalLM"]}, "not a DFlash"),
    ({"dflash_config": {"target_layer_ids": [0, 1]}}, "dflash_config"),
])
def test_incompatible_drafter_is_a_typed_error(tmp_path, target_cfg, change, msg):
    d = tiny_drafter(target_cfg)
    save_drafter(d, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg.update(change)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(IncompatibleDrafter, match=msg):
        load_drafter(tmp_path, target_cfg)


def reference_drafter(d: DFlashDrafter, noise, target_hidden, position_ids):
    """Straight transcription of the public reference math with transformers' Qwen3 pieces."""
    from transformers.models.qwen3.modeling_qwen3 import rotate_half

    c = d.config
    inv = 1.0 / (c.rope_theta ** (torch.arange(0, c.head_dim, 2).float() / c.head_dim))
    emb = torch.cat([position_ids[..., None].float() * inv] * 2, dim=-1)
    cos, sin = emb.cos()[:, None], emb.sin()[:, None]  # [B,1,C+Q,hd]

    def rms(x, w):
        return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + c.rms_norm_eps))

    th = rms(d.fc(target_hidden), d.hidden_norm.weight)
    h = noise
    b, q_len, ctx_len = noise.shape[0], noise.shape[1], target_hidden.shape[1]
    for layer in d.layers:
        a = layer.self_attn
        res = h
        x = rms(h, layer.input_layernorm.weight)
        q = rms(a.q_proj(x).view(b, q_len, -1, c.head_dim), a.q_norm.weight).transpose(1, 2)
        k = torch.cat([a.k_proj(th), a.k_proj(x)], 1).view(b, ctx_len + q_len, -1, c.head_dim)
        v = torch.cat([a.v_proj(th), a.v_proj(x)], 1).view(b, ctx_len + q_len, -1, c.head_dim).transpose(1, 2)
        k = rms(k, a.k_norm.weight).transpose(1, 2)
        q = q * cos[..., -q_len:, :] + rotate_half(q) * sin[..., -q_len:, :]
        k = k * cos + rotate_half(k) * sin
        g = c.num_attention_heads // c.num_key_value_heads
        k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
        att = torch.softmax(q @ k.transpose(-1, -2) * c.head_dim**-0.5, -1) @ v
        h = res + a.o_proj(att.transpose(1, 2).reshape(b, q_len, -1))
        h = h + layer.mlp(rms(h, layer.post_attention_layernorm.weight))
    return rms(h, d.norm.weight)


def test_forward_matches_reference_and_paged(target_cfg):
    d = tiny_drafter(target_cfg, num_layers=2, block_size=8)
    torch.manual_seed(0)
    C, Q, H = 10, 8, target_cfg.hidden_size
    feats = torch.randn(1, C, 2 * H)
    noise = torch.randn(1, Q, H)
    pos = torch.arange(C + Q)[None]
    with torch.no_grad():
        ref = reference_drafter(d, noise, feats, pos)
        dense = d(noise, feats, pos[:, C:], pos[:, :C])
        assert (dense - ref).abs().max().item() < 1e-4
        # paged: context K/V written in two chunks to blocks [3, 0, 5] of size 4, then a proposal
        bs = 4
        caches = [(torch.zeros(8, bs, 2, 16), torch.zeros(8, bs, 2, 16)) for _ in d.layers]
        blocks = torch.tensor([3, 0, 5])
        for lo, hi in ((0, 7), (7, C)):
            p = torch.arange(lo, hi)
            d.write_context(feats[0, lo:hi], p, caches, blocks[p // bs] * bs + p % bs)
        K = len(blocks) * bs
        mask = torch.cat([torch.arange(K) < C, torch.ones(Q, dtype=torch.bool)])[None, None, None].expand(1, 1, Q, -1)
        paged = d.propose_hidden(noise, pos[:, C:], caches, blocks[None], mask)
    assert (paged - ref).abs().max().item() < 1e-4
