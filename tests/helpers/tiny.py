"""Tiny random models for tests and demos (no network): an HF directory written by transformers itself.

``make_tiny_hf_dir(path, family)`` saves a randomly initialised transformers Llama or Qwen3 model (plus a
small word-level tokenizer when ``with_tokenizer``), so tests can compare against transformers and exercise
the real loader. ``tiny_drafter`` builds a random DFlash drafter for a target config.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

TINY_VOCAB = 128


def tiny_hf_config(family: str = "llama", **overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = dict(
        vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
        rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2, pad_token_id=0, hidden_act="silu",
        tie_word_embeddings=False,
    )
    if family == "llama":
        base.update(model_type="llama", architectures=["LlamaForCausalLM"], rope_theta=10000.0)
    elif family == "llama3":
        base.update(model_type="llama", architectures=["LlamaForCausalLM"], rope_theta=500000.0,
                    rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                  "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
    elif family == "qwen3":
        base.update(model_type="qwen3", architectures=["Qwen3ForCausalLM"], rope_theta=1000000.0,
                    tie_word_embeddings=True)
    else:
        raise ValueError(f"unknown tiny family {family!r}")
    base.update(overrides)
    return base


def make_tiny_hf_model(family: str = "llama", seed: int = 0, **overrides: Any):
    """A random transformers model (fp32, eval) for the given tiny config."""
    from transformers import AutoConfig, AutoModelForCausalLM

    d = tiny_hf_config(family, **overrides)
    cfg = AutoConfig.for_model(d.pop("model_type"), **d)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    with torch.no_grad():  # make norms non-trivial so a missed norm shows up in comparisons
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return model


def make_tiny_hf_dir(path: str | Path, family: str = "llama", seed: int = 0, with_tokenizer: bool = True,
                     **overrides: Any) -> Path:
    p = Path(path)
    model = make_tiny_hf_model(family, seed, **overrides)
    model.save_pretrained(str(p))
    if with_tokenizer:
        save_tiny_tokenizer(p, model.config.vocab_size)
    return p


def save_tiny_tokenizer(path: Path, vocab_size: int = TINY_VOCAB) -> None:
    """A word-level tokenizer: specials <pad> <s> </s> <mask>, then 'w4' ... as words."""
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<mask>": 3}
    vocab.update({f"w{i}": i for i in range(4, vocab_size)})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.save_pretrained(str(path))
    cfg_path = path / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["model_max_length"] = 512
    cfg_path.write_text(json.dumps(cfg, indent=2))


def tiny_drafter(target_cfg, num_layers: int = 1, block_size: int = 8, mask_token_id: int = 3, seed: int = 0,
                 target_layer_ids: list[int] | None = None):
    from workers.models.dflash import DFlashDrafter, DrafterConfig

    c = DrafterConfig.for_target(target_cfg, num_hidden_layers=num_layers, mask_token_id=mask_token_id,
                                 block_size=block_size, target_layer_ids=target_layer_ids,
                                 num_features=min(2, target_cfg.num_hidden_layers))
    torch.manual_seed(seed)
    d = DFlashDrafter(c)
    with torch.no_grad():
        for name, p in d.named_parameters():
            if p.dim() == 2:
                torch.nn.init.normal_(p, std=0.05)
    return d.eval()


def reference_greedy(model, prompt: list[int], n: int) -> list[int]:
    """Oracle: plain full-recompute greedy decoding (no cache of any kind)."""
    ids = torch.tensor([prompt])
    out: list[int] = []
    with torch.no_grad():
        for _ in range(n):
            t = int(model(ids)[0, -1].argmax())
            out.append(t)
            ids = torch.cat([ids, torch.tensor([[t]])], dim=1)
    return out


def tiny_engine(path: str | Path, family: str = "llama", drafter_block: int | None = 8, seed: int = 0,
                drafter_seed: int = 0, **cfg_overrides: Any):
    """(LLMEngine, loaded model) for a tiny random model written under ``path`` (with a random drafter)."""
    from workers.engine.config import EngineConfig
    from workers.engine.llm_engine import LLMEngine
    from workers.models.loader import load_model

    model_overrides = cfg_overrides.pop("model_overrides", {})
    d = Path(path)
    if not (d / "config.json").is_file():
        make_tiny_hf_dir(d, family, seed=seed, **model_overrides)
    lm = load_model(d, "float32", "cpu")
    dr = None if drafter_block is None else tiny_drafter(lm.config, block_size=drafter_block, seed=drafter_seed)
    cfg = EngineConfig(model=str(d), device="cpu", kv_block_size=cfg_overrides.pop("kv_block_size", 4),
                       **cfg_overrides)
    return LLMEngine(cfg, model=lm.model, drafter=dr, tokenizer=lm.tokenizer), lm


def greedy_outputs(engine, reqs: list[tuple[list[int], int]], spec) -> list[list[int]]:
    """Run ``reqs`` [(prompt ids, n new tokens)] through ``engine`` to the end (EOS ignored) -> tokens per request."""
    from workers.engine.params import SamplingParams

    got: dict[str, list[int]] = {str(i): [] for i in range(len(reqs))}
    for i, (p, n) in enumerate(reqs):
        engine.add_request(str(i), p, SamplingParams(max_tokens=n, ignore_eos=True), spec)
    while engine.has_unfinished():
        for o in engine.step():
            got[o.request_id] += o.new_token_ids
    return [got[str(i)] for i in range(len(reqs))]
