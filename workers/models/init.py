"""Fast model construction for large targets and for benchmark shapes we cannot download.

  * ``meta_model`` builds the module tree on the meta device (no memory, no init kernels);
  * ``materialize`` casts it to the serving dtype while still on meta, then allocates it once, directly on
    the target device (``to_empty``): no float32 copy on the host, no second copy on the GPU;
  * ``load_shards`` reads each safetensors tensor straight onto that device (``safe_open(device=...)``) and
    copies it into its parameter, one tensor at a time: no whole state dict in host memory;
  * ``random_model`` / ``random_drafter`` fill a materialised model with random weights on the device
    (seeded), from a named preset of cluster/planning/presets.py (Qwen3-8B, Qwen3-32B ...) or any ModelConfig.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from workers.models.config import ModelConfig, rope_table
from workers.models.llama import CausalLM
from workers.models.loader import LoadedModel, load_model, load_tokenizer, resolve_device, resolve_dtype, shard_files

# RoPE base per family (not part of cluster.planning.presets.ModelSpec; it does not change step times)
_ROPE = {"qwen3": (1_000_000.0, None), "llama": (500_000.0, None)}


def config_from_preset(name: str, max_position: int | None = None) -> ModelConfig:
    """A decoder config from cluster/planning/presets.py (the public config values) for dense Llama / Qwen3 presets."""
    from cluster.planning.presets import resolve_model

    spec = resolve_model(name)
    if spec.is_moe:
        raise ValueError(f"{spec.name} is a mixture-of-experts model; our decoder is dense only")
    family = "qwen3" if spec.name.lower().startswith("qwen3") else "llama"
    theta, scaling = _ROPE[family]
    return ModelConfig(
        vocab_size=spec.vocab_size, hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers, num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads, head_dim=spec.head_dim, model_type=family,
        rms_norm_eps=1e-6, rope_theta=theta, rope_scaling=scaling,
        max_position_embeddings=min(spec.max_position, max_position or spec.max_position),
        tie_word_embeddings=spec.tie_embeddings, qk_norm=family == "qwen3",
    )


def meta_model(cfg: ModelConfig) -> CausalLM:
    with torch.device("meta"):
        return CausalLM(cfg)


def materialize(model: CausalLM, device: str | torch.device, dtype: torch.dtype) -> CausalLM:
    """Meta model -> uninitialised parameters of ``dtype`` on ``device`` (one allocation each)."""
    cfg = model.config
    model = model.to(dtype).to_empty(device=device)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    table = rope_table(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling, cfg.max_position_embeddings)
    model.rope = table.to(device=device, dtype=dtype)
    return model.eval().requires_grad_(False)


@torch.no_grad()
def load_shards(model: CausalLM, path: str | Path, progress: bool = False) -> CausalLM:
    """Copy every checkpoint tensor straight from its shard onto the model's device, into its parameter."""
    from safetensors import safe_open
    from tqdm import tqdm

    params = dict(model.named_parameters(remove_duplicate=False))
    tied = model.config.tie_word_embeddings
    device = next(iter(params.values())).device
    dev = "cpu" if device.type == "cpu" else str(device if device.index is not None else torch.device("cuda", 0))
    seen: set[str] = set()
    for f in tqdm(shard_files(Path(path)), desc="loading shards", disable=not progress):
        with safe_open(str(f), framework="pt", device=dev) as sf:
            for k in sf.keys():
                p = params.get(k)
                if p is None or (tied and k == "lm_head.weight"):
                    continue  # e.g. a saved copy of a tied head, rotary buffers of older checkpoints
                t = sf.get_tensor(k)
                if tuple(t.shape) != tuple(p.shape):
                    raise ValueError(f"weight {k} has shape {tuple(t.shape)}, config implies {tuple(p.shape)}")
                p.copy_(t)
                seen.add(k)
    missing = sorted(set(params) - seen - ({"lm_head.weight"} if tied else set()))
    if missing:
        raise ValueError(f"checkpoint lacks weights: {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    return model


def load_model_fast(path: str | Path, dtype: str | torch.dtype = "auto", device: str = "auto",
                    progress: bool = False) -> LoadedModel:
    """HF directory -> model built on meta, allocated on ``device``, shards read straight to it (.gguf: loader)."""
    p = Path(path).expanduser()
    if p.is_file() and p.suffix == ".gguf":
        return load_model(p, dtype, device)
    if not (p / "config.json").is_file():
        raise FileNotFoundError(f"{p} has no config.json (expected an HF model directory)")
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    cfg = ModelConfig.from_hf(json.loads((p / "config.json").read_text()))
    model = load_shards(materialize(meta_model(cfg), dev, dt), p, progress)
    return LoadedModel(model=model, config=cfg, tokenizer=load_tokenizer(p))


@torch.no_grad()
def random_init_(module: torch.nn.Module, seed: int = 0, std: float = 0.02) -> torch.nn.Module:
    """Seeded random weights on the module's own device: matrices ~ N(0, std), norms 1, biases 0."""
    device = next(module.parameters()).device
    g = torch.Generator(device=device).manual_seed(seed)
    for name, p in module.named_parameters():
        if p.dim() >= 2:
            p.normal_(0.0, std, generator=g)
        elif name.endswith("norm.weight"):
            p.fill_(1.0)
        else:
            p.zero_()
    return module


def random_model(cfg_or_preset: ModelConfig | str, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32, seed: int = 0, max_position: int | None = None) -> CausalLM:
    """A random-weight target of a preset's (or a config's) shape, allocated on ``device`` once."""
    cfg = config_from_preset(cfg_or_preset, max_position) if isinstance(cfg_or_preset, str) else cfg_or_preset
    return random_init_(materialize(meta_model(cfg), device, dtype), seed)


def random_drafter(target: ModelConfig, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                   seed: int = 1, num_layers: int = 5, num_features: int = 5, block_size: int = 16,
                   intermediate_size: int | None = None, mask_token_id: int = 0):
    """A random DFlash drafter for ``target`` (default: the shape cluster.planning.presets.default_drafter assumes)."""
    from workers.models.dflash import DFlashDrafter, DrafterConfig

    c = DrafterConfig.for_target(target, num_hidden_layers=num_layers, mask_token_id=mask_token_id,
                                 block_size=block_size, num_features=min(num_features, target.num_hidden_layers))
    if intermediate_size:
        c.intermediate_size = intermediate_size
    with torch.device("meta"):
        d = DFlashDrafter(c)
    d = d.to(dtype).to_empty(device=device)
    d.rope = rope_table(c.head_dim, c.rope_theta, c.rope_scaling, c.max_position_embeddings).to(device, dtype)
    return random_init_(d, seed).eval().requires_grad_(False)
