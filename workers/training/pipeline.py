"""`specfleet train-drafter` end to end: prompts -> target responses (+ cached features) -> training -> checkpoint.

Every stage resumes: generation appends to a JSONL and skips finished ids, training continues from its last
atomic checkpoint. The work directory (default ``<cache>/train/<out dir name>``) holds the data and checkpoints;
the output directory receives only the z-lab-format drafter (config.json, model.safetensors) and a model card.
"""
from __future__ import annotations

import gc
import json
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from workers.training.prompts import CATEGORIES, build_prompts
from workers.training.train import TrainConfig


@dataclass
class PipelineConfig:
    target: str  # HF model dir, or a known model name ("smollm2") fetched into the cache
    out: str
    work_dir: str | None = None
    block_size: int = 16
    layers: int = 2  # drafter decoder layers
    num_features: int = 5  # number of target layers tapped (evenly spaced)
    target_layer_ids: list[int] | None = None
    mask_token_id: int | None = None  # default: an unused special token of the target vocabulary
    prompts_per_category: int = 330
    heldout_per_category: int = 30
    val_per_category: int = 8  # train-split records kept out of training for the tau estimate
    max_new_tokens: int = 160
    gen_batch_size: int = 16
    gen_workers: int = 1  # generation processes (single-threaded each)
    device: str = "auto"
    threads: int | None = None  # torch intra-op threads (1 is best on a busy shared CPU)
    train: TrainConfig = field(default_factory=TrainConfig)


def resolve_target(target: str) -> Path:
    p = Path(target).expanduser()
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise ValueError(f"{p} has no config.json: the trainer needs an HF model directory")
        return p
    if p.suffix == ".gguf":
        raise ValueError("the trainer needs an HF model directory, not a .gguf file (see `specfleet models pull`)")
    from workers import hub

    try:
        hub.resolve_spec(target)
    except hub.HubError:
        raise FileNotFoundError(f"target {target!r} is neither a model directory nor a known model name") from None
    return hub.ensure_model(target)


def pick_mask_token(tokenizer, vocab_size: int) -> int:
    """An id that chat serving never produces: the tokenizer's mask token, else its last unused special marker.

    SmolLM2 has no spare embedding row; ids 3-16 are code-metadata markers (<repo_name> ... <empty_output>)
    that the chat model does not emit, so the highest of them is reused as the MASK input row.
    """
    if tokenizer is None:
        raise ValueError("the target has no tokenizer; pass --mask-token-id")
    if getattr(tokenizer, "mask_token_id", None) is not None:
        return int(tokenizer.mask_token_id)
    reserved = {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.unk_token_id}
    template = str(getattr(tokenizer, "chat_template", "") or "")
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    cands = [i for i, t in added.items() if getattr(t, "special", False) and i not in reserved
             and str(t) not in template and 0 <= i < vocab_size]
    if not cands:
        raise ValueError("the target vocabulary has no unused special token; pass --mask-token-id")
    return max(cands)


def _split_val(samples, per_category: int):
    val, seen = [], {}
    for s in samples:
        if seen.get(s.category, 0) < per_category:
            seen[s.category] = seen.get(s.category, 0) + 1
            val.append(s)
    ids = {s.id for s in val}
    return [s for s in samples if s.id not in ids], val


def run_pipeline(pc: PipelineConfig) -> dict:
    from workers.hub import cache_root
    from workers.models.dflash import DFlashDrafter, DrafterConfig, default_target_layer_ids, load_drafter, save_drafter
    from workers.models.loader import load_model
    from workers.training.data import load_samples, response_vocab
    from workers.training.generate import generate_parallel
    from workers.training.train import estimate_tau, train_drafter

    t0 = time.time()
    if pc.threads:
        torch.set_num_threads(pc.threads)
    target_dir = resolve_target(pc.target)
    hf_cfg = json.loads((target_dir / "config.json").read_text())
    from workers.models.config import ModelConfig

    try:
        tcfg = ModelConfig.from_hf(hf_cfg)
    except ValueError as exc:
        raise ValueError(f"cannot hook target {target_dir}: {exc}") from exc
    n_layers = tcfg.num_hidden_layers
    ids = list(pc.target_layer_ids or default_target_layer_ids(n_layers, pc.num_features))
    if not pc.target_layer_ids and len(set(ids)) != len(ids):  # a shallow target: spread over all raw layers
        k = min(pc.num_features, n_layers - 1)
        ids = sorted({round(i * (n_layers - 2) / max(1, k - 1)) for i in range(k)})
    if not ids or any(not 0 <= i < n_layers - 1 for i in ids) or len(set(ids)) != len(ids):
        raise ValueError(f"target_layer_ids {ids} must be distinct layers in [0, {n_layers - 2}] "
                         f"(the target has {n_layers} layers; its last output is normed, not raw)")
    if pc.block_size < 2:
        raise ValueError(f"block size must be >= 2, got {pc.block_size}")

    out = Path(pc.out).expanduser()
    work = Path(pc.work_dir).expanduser() if pc.work_dir else cache_root() / "train" / out.name
    work.mkdir(parents=True, exist_ok=True)
    meta_path = work / "meta.json"
    data_key = {"target": str(target_dir), "target_layer_ids": ids, "prompts_per_category": pc.prompts_per_category,
                "heldout_per_category": pc.heldout_per_category, "max_new_tokens": pc.max_new_tokens,
                "seed": pc.train.seed}
    if meta_path.exists():
        old = json.loads(meta_path.read_text())
        if old != data_key:
            raise ValueError(f"{work} holds data made with other settings ({old}); pass another --work-dir")
    else:
        meta_path.write_text(json.dumps(data_key, indent=1))

    # ---- 1+2: prompts and the target's own answers (with layer features) ----
    prompts = build_prompts(pc.prompts_per_category, pc.heldout_per_category, seed=pc.train.seed)
    by_cat = {c: [p for p in prompts if p.split == "train" and p.category == c] for c in CATEGORIES}
    order = [p for group in zip(*by_cat.values()) for p in group]  # categories interleaved
    responses = work / "responses.jsonl"
    t_gen = time.time()
    kw = dict(max_new_tokens=pc.max_new_tokens, batch_size=pc.gen_batch_size, device=pc.device,
              capture_layers=ids)
    generate_parallel(target_dir, order, responses, pc.gen_workers, **kw, **({} if pc.gen_workers > 1 else
                                                                          {"threads": pc.threads}))
    gen_s = time.time() - t_gen
    gc.collect()

    # ---- 3: data ----
    lm = load_model(target_dir, dtype="float32", device=pc.device)
    model, tok = lm.model, lm.tokenizer
    mask_id = pc.mask_token_id if pc.mask_token_id is not None else pick_mask_token(tok, tcfg.vocab_size)
    if not 0 <= mask_id < tcfg.vocab_size:
        raise ValueError(f"mask token id {mask_id} is not a row of the target's embedding table")
    samples = load_samples(responses, len(ids) * tcfg.hidden_size, tcfg.vocab_size, split="train")
    if any(mask_id in s.tokens.tolist() for s in samples):
        raise ValueError(f"mask token id {mask_id} occurs in the generated data; choose another --mask-token-id")
    train, val = _split_val(samples, pc.val_per_category)

    # ---- 4: drafter ----
    dc = DrafterConfig.for_target(tcfg, num_hidden_layers=pc.layers, mask_token_id=mask_id,
                                  block_size=pc.block_size, target_layer_ids=ids)
    torch.manual_seed(pc.train.seed)
    drafter = DFlashDrafter(dc)
    with torch.no_grad():
        for name, p in drafter.named_parameters():
            if p.dim() == 2:
                torch.nn.init.normal_(p, std=0.02)
        drafter.norm.weight.copy_(model.model.norm.weight)  # its output feeds the target's lm_head
    drafter = drafter.to(model.lm_head.weight.device)
    embed_w = model.model.embed_tokens.weight.detach()
    head_w = model.lm_head.weight.detach()
    del model
    gc.collect()
    pc.train.log_path = pc.train.log_path or str(work / "train_log.jsonl")
    state = train_drafter(drafter, embed_w, head_w, train, val, pc.train, work / "checkpoint.pt")
    final = estimate_tau(drafter, embed_w, head_w, val, dc.block_size, dc.mask_token_id, n_anchors=10_000,
                         seqs_per_batch=1)

    # ---- 5: output ----
    save_drafter(drafter.cpu(), out, dtype=torch.bfloat16)
    load_drafter(out, tcfg)  # the engine's loader accepts what we wrote
    n_tokens = sum(len(s.tokens) - s.prompt_len for s in samples)
    summary = {
        "target": str(target_dir), "drafter_layers": pc.layers, "block_size": dc.block_size,
        "target_layer_ids": ids, "mask_token_id": mask_id,
        "mask_token": tok.convert_ids_to_tokens(mask_id) if tok is not None else None,
        "train_sequences": len(train), "val_sequences": len(val), "response_tokens": n_tokens,
        "candidate_vocab": int(len(response_vocab(train))) + pc.train.n_negatives,
        "steps": state.step, "train_wall_s": round(state.elapsed_s, 1), "generation_wall_s": round(gen_s, 1),
        "total_wall_s": round(time.time() - t0, 1), "offline_tau": final,
        "machine": f"{platform.machine()} {torch.get_num_threads()} threads, "
                   f"{torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU'}",
        "train_config": asdict(pc.train), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    (work / "summary.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps({k: summary[k] for k in ("steps", "train_wall_s", "offline_tau")}, indent=1), file=sys.stderr)
    return summary
