"""Load a target model: an HF directory (config.json + model.safetensors or a sharded index) or a .gguf file.

GGUF files are de-quantized through transformers' GGUF conversion (which also undoes llama.cpp's q/k
row permutation), then copied into our decoder.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from workers.models.config import ModelConfig
from workers.models.llama import CausalLM


@dataclass
class LoadedModel:
    model: CausalLM
    config: ModelConfig
    tokenizer: Any | None  # HF tokenizer or None when the directory has none


def cpu_has_native_bf16(cpuinfo: str | None = None) -> bool:
    """True where the CPU computes bf16 natively (AMX-BF16 or AVX512-BF16): there bf16 GEMMs run several
    times faster than fp32 (measured 889 vs 191 GFLOP/s with AMX). Elsewhere bf16 is emulated and slower."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
    flags = set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[1].split())
            break
    return bool(flags & {"amx_bf16", "avx512_bf16"})


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """auto: bfloat16 on CUDA and on CPUs with native bf16 (AMX / AVX512-BF16), float32 on other CPUs."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        if device.type == "cuda" or (device.type == "cpu" and cpu_has_native_bf16()):
            return torch.bfloat16
        return torch.float32
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if dtype not in table:
        raise ValueError(f"unknown dtype {dtype!r}; use auto, float32, bfloat16 or float16")
    return table[dtype]


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available")
    return dev


def shard_files(path: Path) -> list[Path]:
    """The safetensors files of an HF directory: the sharded index's, else model.safetensors, else all."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (path / "model.safetensors").is_file():
        names = ["model.safetensors"]
    else:
        names = sorted(p.name for p in path.glob("*.safetensors"))
    if not names:
        raise FileNotFoundError(f"no *.safetensors weights in {path}")
    return [path / n for n in names]


def read_safetensors_dir(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for f in shard_files(path):
        state.update(load_file(str(f)))
    return state


def read_gguf(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor], Any]:
    """(HF config dict, HF state dict fp32, tokenizer) from a .gguf file via transformers."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    cfg = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    state = {k: v.detach() for k, v in hf.state_dict().items()}
    d = cfg.to_dict()
    d.pop("quantization_config", None)
    try:
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception:  # a GGUF without tokenizer metadata
        tok = None
    return d, state, tok


def load_tokenizer(path: Path) -> Any | None:
    if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def build_model(hf_config: dict[str, Any], state: dict[str, torch.Tensor], dtype: torch.dtype,
                device: torch.device) -> CausalLM:
    cfg = ModelConfig.from_hf(hf_config)
    with torch.device("meta"):
        model = CausalLM(cfg)
    expected = model.state_dict()
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)
        expected.pop("lm_head.weight", None)
    missing = sorted(set(expected) - set(state))
    if missing:
        raise ValueError(f"checkpoint lacks weights: {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    for k, v in expected.items():
        if tuple(state[k].shape) != tuple(v.shape):
            raise ValueError(f"weight {k} has shape {tuple(state[k].shape)}, config implies {tuple(v.shape)}")
    model = model.to_empty(device=device)
    model.load_state_dict({k: state[k].to(dtype) for k in expected}, strict=False)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    from workers.models.config import rope_table

    model.rope = rope_table(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling, cfg.max_position_embeddings).to(device)
    return model.to(dtype).eval().requires_grad_(False)


def load_model(path: str | Path, dtype: str | torch.dtype = "auto", device: str = "auto") -> LoadedModel:
    """HF directory or .gguf file -> (our CausalLM, ModelConfig, tokenizer or None)."""
    p = Path(path).expanduser()
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    if p.is_file() and p.suffix == ".gguf":
        hf_cfg, state, tok = read_gguf(p)
    elif p.is_dir():
        if not (p / "config.json").is_file():
            raise FileNotFoundError(f"{p} has no config.json (expected an HF model directory or a .gguf file)")
        hf_cfg = json.loads((p / "config.json").read_text())
        state = read_safetensors_dir(p)
        tok = load_tokenizer(p)
    else:
        raise FileNotFoundError(f"model path {p} is neither an HF model directory nor a .gguf file")
    model = build_model(hf_cfg, state, dt, dev)
    return LoadedModel(model=model, config=model.config, tokenizer=tok)
