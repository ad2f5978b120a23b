"""Fast loading (meta construction + shard-by-shard loading) == the normal loader; random-weight presets."""
from __future__ import annotations

import json

import pytest
import torch

from workers.models.init import (config_from_preset, load_model_fast, meta_model, random_drafter, random_model)
from tests.helpers.tiny import make_tiny_hf_model
from workers.models.loader import load_model


@pytest.mark.parametrize("family", ["llama", "qwen3"])  # untied / tied embeddings
def test_sharded_fast_load_matches_loader(tmp_path, family):
    model = make_tiny_hf_model(family, seed=3)
    model.save_pretrained(str(tmp_path), max_shard_size="60KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("*.safetensors"))) > 2
    ref = load_model(tmp_path, "float32", "cpu").model
    fast = load_model_fast(tmp_path, "float32", "cpu").model
    assert fast.rope.dtype == ref.rope.dtype
    rs, fs = ref.state_dict(), fast.state_dict()
    assert rs.keys() == fs.keys()
    for k in rs:
        assert torch.equal(rs[k], fs[k]), k
    if family == "qwen3":
        assert fast.lm_head.weight is fast.model.embed_tokens.weight
    ids = torch.randint(0, 128, (2, 11))
    assert torch.equal(fast(ids), ref(ids))
    with torch.no_grad():
        assert torch.equal(fast(ids), model(ids).logits)
    # bf16 on the fly, same values as the loader's cast
    fb, rb = load_model_fast(tmp_path, "bfloat16", "cpu").model, load_model(tmp_path, "bfloat16", "cpu").model
    assert fb.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    assert torch.equal(fb(ids), rb(ids))


def test_fast_load_rejects_wrong_checkpoint(tmp_path):
    make_tiny_hf_model("llama").save_pretrained(str(tmp_path))
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(dict(cfg, num_hidden_layers=5)))
    with pytest.raises(ValueError, match="lacks weights"):
        load_model_fast(tmp_path, "float32", "cpu")
    (tmp_path / "config.json").write_text(json.dumps(dict(cfg, intermediate_size=96)))
    with pytest.raises(ValueError, match="shape"):
        load_model_fast(tmp_path, "float32", "cpu")


@pytest.mark.parametrize("name", ["qwen3-8b", "Qwen/Qwen3-32B"])
def test_preset_shapes_match_cluster_presets(name):
    from cluster.planning.presets import resolve_model

    spec = resolve_model(name)
    cfg = config_from_preset(name)
    m = meta_model(cfg)  # no memory: parameter count from the module tree itself
    n = sum(p.numel() for p in m.parameters())
    assert n == spec.total_params + spec.num_layers * 2 * spec.head_dim  # + Qwen3 q_norm/k_norm (not in presets)
    assert cfg.qk_norm and cfg.num_key_value_heads == spec.num_kv_heads and cfg.head_dim == 128
    with pytest.raises(ValueError, match="mixture-of-experts"):
        config_from_preset("gpt-oss-120b")


def test_random_model_and_drafter():
    cfg = config_from_preset("qwen3-8b")
    small = type(cfg)(**{**cfg.__dict__, "num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 96,
                         "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 256,
                         "max_position_embeddings": 128})
    a = random_model(small, dtype=torch.bfloat16, seed=5)
    b = random_model(small, dtype=torch.bfloat16, seed=5)
    c = random_model(small, dtype=torch.bfloat16, seed=6)
    wa = a.model.layers[1].self_attn.q_proj.weight
    assert wa.dtype == torch.bfloat16 and torch.isfinite(wa.float()).all()
    assert torch.equal(wa, b.model.layers[1].self_attn.q_proj.weight)
    assert not torch.equal(wa, c.model.layers[1].self_attn.q_proj.weight)
    assert float(wa.float().std()) == pytest.approx(0.02, rel=0.1)
    assert torch.equal(a.model.norm.weight, torch.ones_like(a.model.norm.weight))
    ids = torch.randint(0, 256, (1, 9))
    assert torch.isfinite(a(ids).float()).all()
    d = random_drafter(small, dtype=torch.bfloat16, num_layers=2, num_features=2, block_size=8)
    assert d.fc.weight.shape == (64, 128) and d.block_size == 8 and d.rope.dtype == torch.bfloat16
    assert all(torch.isfinite(p.float()).all() for p in d.parameters())
