"""Stage 4 of the trainer: the DFlash recipe on cached target features.

Target frozen (only its embedding and lm_head are used here; its layer outputs were cached during
generation). Loss: cross-entropy on block rows k = 1..B-1, weighted by exp(-(k-1)/gamma), over a restricted
candidate vocabulary = every token that occurs in the training responses (all labels are among them) plus
``n_negatives`` other ids sampled afresh each step (pushes the rest of the 49k-row lm_head down at a fraction of
the cost). The periodic tau estimate uses the full vocabulary (greedy, teacher-forced on held-out sequences).
Checkpoints (drafter + AdamW + step) are written atomically; ``resume`` continues from the last one.
"""
from __future__ import annotations

import json
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from workers.training.data import IGNORE, Batch, Sample, make_batch, response_vocab


@dataclass
class TrainConfig:
    steps: int = 2000
    seqs_per_step: int = 4
    anchors_per_seq: int = 32
    lr: float = 6e-4
    warmup: int = 50
    weight_decay: float = 0.01
    gamma: float = 7.0  # loss weight exp(-(k-1)/gamma)
    n_negatives: int = 4096
    grad_clip: float = 1.0
    eval_every: int = 100
    eval_anchors: int = 16  # evenly spaced anchors per held-out sequence in the tau estimate
    ckpt_every: int = 50
    seed: int = 0
    max_minutes: float | None = None  # stop (and save) after this wall time
    log_path: str | None = None  # JSONL of loss / tau


@dataclass
class TrainState:
    step: int = 0
    elapsed_s: float = 0.0
    history: list[dict] = field(default_factory=list)


def lr_at(step: int, cfg: TrainConfig, elapsed_s: float = 0.0) -> float:
    """Linear warmup, then cosine to 10%; with ``max_minutes`` the decay follows whichever budget (steps or
    wall time) is used up faster, so a time-boxed run still ends at the low learning rate."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    frac = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    if cfg.max_minutes:
        frac = max(frac, elapsed_s / (60 * cfg.max_minutes))
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))


def block_loss(drafter, embed_w: torch.Tensor, head_w: torch.Tensor, batch: Batch, cand: torch.Tensor,
               cand_index: torch.Tensor, gamma: float, autocast: bool = False) -> torch.Tensor:
    """Weighted CE over the candidate vocabulary ``cand`` [Vc]; cand_index maps vocab id -> row of cand."""
    dev = embed_w.device
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        hidden = drafter(F.embedding(batch.block_ids.to(dev), embed_w), batch.ctx_features.to(dev),
                         batch.q_positions.to(dev), batch.ctx_positions.to(dev), batch.attn_mask.to(dev))  # [b,Q,H]
    labels = batch.labels.to(dev)
    sel = labels != IGNORE
    h = hidden[sel].float()  # [N, H]
    logits = h @ head_w[cand].T  # [N, Vc]
    target = cand_index[labels[sel]]
    w = torch.exp(-(batch.offsets.to(dev)[sel].float() - 1) / gamma)  # [N]
    ce = F.cross_entropy(logits, target, reduction="none")
    return (w * ce).sum() / w.sum()


@torch.no_grad()
def estimate_tau(drafter, embed_w, head_w, samples: list[Sample], block_size: int, mask_token_id: int,
                 n_anchors: int = 16, seqs_per_batch: int = 4) -> dict:
    """Greedy teacher-forced acceptance: tau = 1 + mean accepted prefix; per category and per position."""
    was_training = drafter.training
    drafter.eval()
    acc_len: dict[str, list[int]] = {}
    walk: dict[str, list[int]] = {}  # committed tokens per target pass along the greedy decoding trajectory
    pos_hits = torch.zeros(block_size - 1)
    pos_total = torch.zeros(block_size - 1)
    rng = random.Random(0)
    for s0 in range(0, len(samples), seqs_per_batch):
        chunk = samples[s0 : s0 + seqs_per_batch]
        b = make_batch(chunk, n_anchors, block_size, mask_token_id, rng, evenly=True)
        hidden = drafter(F.embedding(b.block_ids.to(embed_w.device), embed_w), b.ctx_features.to(embed_w.device),
                         b.q_positions.to(embed_w.device), b.ctx_positions.to(embed_w.device),
                         b.attn_mask.to(embed_w.device))
        pred = torch.cat([(hidden[:, i : i + 256].float() @ head_w.T).argmax(-1).cpu()  # [b, Q], in chunks
                          for i in range(0, hidden.shape[1], 256)], dim=1)
        for i, (cat, n) in enumerate(zip(b.categories, b.anchors_per_seq)):
            p = pred[i, : n * block_size].view(n, block_size)[:, 1:]
            lab = b.labels[i, : n * block_size].view(n, block_size)[:, 1:]
            valid = lab != IGNORE
            match = (p == lab) & valid
            prefix = torch.cumprod(match.int(), dim=1)  # 1 while every earlier row matched
            acc = prefix.sum(1).tolist()
            acc_len.setdefault(cat, []).extend(acc)
            if n == chunk[i].num_anchors:  # every position drafted: replay greedy speculative decoding
                j = 0
                while j < n:
                    walk.setdefault(cat, []).append(acc[j] + 1)
                    j += acc[j] + 1
            # position k counts if all rows <= k were checkable and matched
            pos_hits += prefix.sum(0).float()
            pos_total += torch.cumprod(valid.int(), dim=1).sum(0).float()
    if was_training:
        drafter.train()
    allv = [a for v in acc_len.values() for a in v]
    return {
        "tau": 1 + sum(allv) / max(1, len(allv)),
        "tau_by_category": {c: 1 + sum(v) / max(1, len(v)) for c, v in sorted(acc_len.items())},
        "accept_by_position": (pos_hits / pos_total.clamp(min=1)).tolist(),
        "n_blocks": len(allv),
        **({"tau_walk": sum(sum(v) for v in walk.values()) / sum(len(v) for v in walk.values()),
            "tau_walk_by_category": {c: sum(v) / len(v) for c, v in sorted(walk.items())}} if walk else {}),
    }


def _save_ckpt(path: Path, drafter, opt, state: TrainState, cfg: TrainConfig) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"drafter": drafter.state_dict(), "drafter_config": asdict(drafter.config), "opt": opt.state_dict(),
                "state": asdict(state), "train_config": asdict(cfg)}, tmp)
    os.replace(tmp, path)


def load_ckpt(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # a torn file cannot happen with atomic writes, but a copied one can
        raise ValueError(f"checkpoint {path} is unreadable ({exc}); delete it to start over") from exc


def train_drafter(drafter, embed_w: torch.Tensor, head_w: torch.Tensor, train: list[Sample], val: list[Sample],
                  cfg: TrainConfig, ckpt_path: Path, resume: bool = True) -> TrainState:
    """Train in place; returns the final state (history holds loss and tau estimates)."""
    from tqdm import tqdm

    if not train:
        raise ValueError("no training samples")
    dev = embed_w.device
    autocast = dev.type == "cuda"
    c = drafter.config
    cand_base = response_vocab(train).to(dev)
    vocab = embed_w.shape[0]
    opt = torch.optim.AdamW(drafter.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))
    state = TrainState()
    if resume and ckpt_path.is_file():
        ck = load_ckpt(ckpt_path)
        if ck["drafter_config"] != asdict(c):
            raise ValueError(f"{ckpt_path} was written for another drafter config; use a new work dir or delete it")
        drafter.load_state_dict(ck["drafter"])
        opt.load_state_dict(ck["opt"])
        state = TrainState(**ck["state"])
        print(f"resuming from step {state.step} ({ckpt_path})", file=sys.stderr)
    drafter.train()
    others = torch.ones(vocab, dtype=torch.bool, device=dev)
    others[cand_base] = False
    others = others.nonzero().squeeze(1)
    log = open(cfg.log_path, "a") if cfg.log_path else None
    bar = tqdm(total=cfg.steps, initial=state.step, desc="train", unit="step", file=sys.stderr)
    t_start, elapsed0 = time.time(), state.elapsed_s
    ema = None
    last_tau = state.history[-1].get("tau") if state.history else None
    while state.step < cfg.steps:
        rng = random.Random(cfg.seed * 1_000_003 + state.step)  # deterministic per step: resume-safe
        batch = make_batch(rng.sample(train, min(cfg.seqs_per_step, len(train))), cfg.anchors_per_seq,
                           c.block_size, c.mask_token_id, rng)
        g = torch.Generator(device="cpu").manual_seed(cfg.seed + state.step)
        neg = others[torch.randperm(len(others), generator=g)[: cfg.n_negatives].to(dev)]
        cand = torch.cat([cand_base, neg])
        cand_index = torch.full((vocab,), -1, dtype=torch.long, device=dev)
        cand_index[cand] = torch.arange(len(cand), device=dev)
        for group in opt.param_groups:
            group["lr"] = lr_at(state.step, cfg, state.elapsed_s)
        loss = block_loss(drafter, embed_w, head_w, batch, cand, cand_index, cfg.gamma, autocast)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(drafter.parameters(), cfg.grad_clip)
        opt.step()
        state.step += 1
        state.elapsed_s = elapsed0 + time.time() - t_start
        ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
        rec = {"step": state.step, "loss": round(loss.item(), 4), "lr": round(opt.param_groups[0]["lr"], 7),
               "elapsed_s": round(state.elapsed_s, 1)}
        done = state.step >= cfg.steps or (cfg.max_minutes and state.elapsed_s > 60 * cfg.max_minutes)
        if val and (state.step % cfg.eval_every == 0 or done):
            ev = estimate_tau(drafter, embed_w, head_w, val, c.block_size, c.mask_token_id, cfg.eval_anchors)
            rec.update(tau=round(ev["tau"], 3), tau_by_category={k: round(v, 3) for k, v in ev["tau_by_category"].items()})
            last_tau = ev["tau"]
            state.history.append(rec)
        bar.update(1)
        bar.set_postfix(loss=f"{ema:.3f}", tau=f"{last_tau:.2f}" if last_tau else "-")
        if log:
            log.write(json.dumps(rec) + "\n")
            log.flush()
        if state.step % cfg.ckpt_every == 0 or done:
            _save_ckpt(ckpt_path, drafter, opt, state, cfg)
        if done:
            break
    bar.close()
    if log:
        log.close()
    return state
