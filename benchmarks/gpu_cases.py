"""The models gpu_bench.py times, and the issue-10 goals it checks.

  qwen3-8b / qwen3-32b  random weights of the public shape (cluster/planning/presets.py), bf16 on CUDA, built on the meta
                        device and allocated once on the GPU; drafter: random, of the shape the planner assumes
                        (cluster.planning.presets.default_drafter: 5 Qwen3 layers at the target's width, 5 features)
  demo                  SmolLM2-135M-Instruct + the committed DFlash drafter (models/); real weights when the HF
                        directory is there (then also end-to-end AR vs DFlash tokens/s); random weights of its
                        config when only config.json is there (step times only)
With --smoke every case is a tiny random shape (CPU check of the code paths).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

GOALS = {  # issue 10, measured on one GPU
    "qwen3-8b AR B=1 HBM roofline fraction": (">=", 0.90),
    "qwen3-8b verify16/AR B=1": ("<=", 1.30),
    "qwen3-8b draft/AR B=1": ("<=", 0.15),
    "demo DFlash/AR tok/s concurrency 1": (">=", 3.0),
    "demo DFlash/AR tok/s concurrency 16": (">=", 2.0),
}


@dataclass
class Case:
    name: str
    note: str
    model: Any
    drafter: Any
    dtype: torch.dtype
    e2e: dict | None = None  # kwargs of gpu_bench.e2e_tokens_per_s
    e2e_skip: str | None = None


def _tiny_cfg(family: str):
    from tests.helpers.tiny import tiny_hf_config
    from workers.models.config import ModelConfig

    return ModelConfig.from_hf(tiny_hf_config(family, num_hidden_layers=4, vocab_size=256))


def build_cases(a, device: torch.device) -> Iterator[Case]:
    from cluster.planning.presets import default_drafter, resolve_model
    from workers.models.init import config_from_preset, random_drafter, random_model

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    for name in [c.strip() for c in a.cases.split(",") if c.strip()]:
        if name == "demo":
            yield _demo_case(a, device, dtype)
            continue
        if a.smoke:
            cfg, dspec = _tiny_cfg("qwen3"), None
            note = f"SMOKE: tiny random qwen3 shape standing in for {name}"
        else:
            cfg = config_from_preset(name, max_position=a.ctx + 4 * a.block + 64)
            dspec = default_drafter(resolve_model(name), a.block)
            note = f"random weights, {name} shape ({cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}), {dtype}"
        model = random_model(cfg, device, dtype, seed=0)
        if dspec is None:
            drafter = random_drafter(cfg, device, dtype, num_layers=1, num_features=2, block_size=a.block)
        else:
            drafter = random_drafter(cfg, device, dtype, num_layers=dspec.num_layers, num_features=dspec.num_features,
                                     block_size=a.block, intermediate_size=dspec.intermediate_size)
        yield Case(name, note, model, drafter, dtype, e2e_skip="random weights: acceptance would be meaningless")


def _demo_case(a, device: torch.device, dtype: torch.dtype) -> Case:
    from workers.hub import model_dir
    from workers.models.config import ModelConfig
    from workers.models.dflash import load_drafter
    from workers.models.init import load_model_fast, random_drafter, random_model

    if a.smoke:  # a tiny random pair through the real engine: exercises the end-to-end path
        from tests.helpers.tiny import tiny_drafter

        cfg = _tiny_cfg("llama")
        model = random_model(cfg, device, dtype, seed=2)
        drafter = tiny_drafter(cfg, block_size=a.block).to(device=device, dtype=dtype)
        e2e = dict(target="", drafter=None, dtype=str(dtype).removeprefix("torch."), model=model,
                   drafter_mod=drafter, tokenizer=None)
        return Case("demo", "SMOKE: tiny random llama + random drafter", model, drafter, dtype, e2e=e2e)
    target = Path(a.demo_target).expanduser() if a.demo_target else model_dir("smollm2")
    dpath = Path(a.demo_drafter)
    if not (target / "config.json").is_file():
        raise SystemExit(f"demo target config not found at {target} (see docs/gpu.md: carry .gpu/smollm2)")
    has_weights = any(target.glob("*.safetensors"))
    tok = None
    if has_weights:
        lm = load_model_fast(target, dtype, str(device))
        model, tok, note = lm.model, lm.tokenizer, f"SmolLM2-135M-Instruct real weights from {target}"
    else:
        cfg = ModelConfig.from_hf(json.loads((target / "config.json").read_text()))
        model, note = random_model(cfg, device, dtype, seed=0), "SmolLM2-135M shape, RANDOM weights (no weights here)"
    if (dpath / "config.json").is_file():
        drafter = load_drafter(dpath, model.config, dtype, device)
        note += f"; drafter {dpath.name}"
    else:
        drafter = random_drafter(model.config, device, dtype, num_layers=5, num_features=5, block_size=a.block)
        note += "; drafter RANDOM (no checkpoint under models/)"
    if has_weights and (dpath / "config.json").is_file():
        e2e = dict(target=str(target), drafter=str(dpath), dtype=str(dtype).removeprefix("torch."), model=model,
                   drafter_mod=drafter, tokenizer=tok)
        return Case("demo", note, model, drafter, dtype, e2e=e2e)
    return Case("demo", note, model, drafter, dtype, e2e_skip="needs the real SmolLM2 weights and the trained drafter")


def _best(rows: list[dict], case: str, batch: int) -> dict | None:
    cand = [r for r in rows if r["case"] == case and r["batch"] == batch]
    graph = [r for r in cand if r["mode"] == "graph"]
    return (graph or cand or [None])[0]


def check_goals(res: dict) -> dict[str, dict]:
    out: dict[str, dict] = {}
    r = _best(res["steps"], "qwen3-8b", 1)
    vals: dict[str, float | None] = {
        "qwen3-8b AR B=1 HBM roofline fraction": r and r["ar_roofline_frac"],
        "qwen3-8b verify16/AR B=1": r and r.get("verify_over_ar"),
        "qwen3-8b draft/AR B=1": r and r.get("draft_over_ar"),
    }
    e2e = res["e2e"].get("demo")
    for c in (1, 16):
        rows = [x for x in e2e if x["concurrency"] == c] if isinstance(e2e, list) else []
        rows.sort(key=lambda x: not x["graphs"])
        vals[f"demo DFlash/AR tok/s concurrency {c}"] = rows[0]["speedup"] if rows else None
    smoke = res["args"].get("smoke") or res["env"]["device"] == "cpu"
    for k, (op, thr) in GOALS.items():
        v = vals.get(k)
        ok = None if v is None else (v >= thr if op == ">=" else v <= thr)
        out[k] = {"value": v, "target": f"{op} {thr}", "met": ok if not smoke else None,
                  **({"note": "CPU smoke: not a measurement of the goal"} if smoke else {})}
    return out
