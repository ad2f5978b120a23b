"""Stage 3 of the trainer: the DFlash recipe, target features recomputed on the fly, time-boxed and resumable.

One step: draw ``seqs_per_step`` sequences (data mix), ``anchors_per_seq`` random anchors each; target features
for their context (frozen target, no grad); the drafter's block-sparse forward (bf16 autocast on CPUs with
native bf16 and on CUDA, fp32 master weights); weighted cross-entropy on rows k >= 1, weight
exp(-(k-1)/gamma), through the target's lm_head over the full vocabulary (chunked, workers/training/loss.py)
or, with ``loss_vocab="restricted"``, over the response vocabulary + sampled negatives; AdamW.

Every ``eval_minutes`` the held-out tau (workers/training/evaluate.py, the engine's T=0 acceptance) is measured
and ``on_eval`` exports the drafter; every ``ckpt_minutes`` and at the end a checkpoint (drafter, AdamW, step,
elapsed, sampler state, history) is written atomically. A rerun resumes from it.
"""
from __future__ import annotations

import copy
import json
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from workers.training.block_forward import blocks_forward
from workers.training.data import IGNORE, MixSampler, Sample, make_batch, random_anchors
from workers.training.evaluate import offline_tau
from workers.training.features import context_features
from workers.training.loss import fused_linear_ce


@dataclass
class TrainConfig:
    minutes: float = 60.0  # training time of the run, cumulative over resumes (evaluations not counted)
    max_steps: int | None = None  # optional step budget (whichever ends first)
    seqs_per_step: int = 4
    anchors_per_seq: int = 64
    lr: float = 6e-4
    warmup: int = 100
    min_lr_frac: float = 0.1
    weight_decay: float = 0.01
    gamma: float = 7.0  # loss weight exp(-(k-1)/gamma)
    grad_clip: float = 1.0
    # draft: the drafter's own draft vocabulary (the draft_vocab_size most frequent response tokens, what it will
    # draft from when served; rows whose label is outside are not trained) | full | restricted (response
    # tokens + n_negatives sampled ids)
    loss_vocab: str = "draft"
    draft_vocab_size: int = 8192
    n_negatives: int = 4096
    loss_chunk: int = 256  # rows per lm_head chunk ([256, V] fp32 logits stay cache-sized)
    row_sampling: bool = False  # loss on rows drawn with probability exp(-(k-1)/gamma) instead of weighting all
    eval_minutes: float = 10.0
    ckpt_minutes: float = 5.0
    eval_every_steps: int | None = None  # overrides eval_minutes (tests, overfit runs)
    stop_at_tau: float | None = None  # end once the held-out tau reaches this (overfit runs)
    seed: int = 0
    mix: dict[str, float] | None = None  # category -> weight; None = as the corpus holds them
    autocast: str = "auto"  # auto | on | off (bf16)
    log_path: str | None = None

    def __post_init__(self):
        if self.loss_vocab not in ("draft", "full", "restricted"):
            raise ValueError(f"loss_vocab must be 'draft', 'full' or 'restricted', got {self.loss_vocab!r}")
        if self.draft_vocab_size < 2:
            raise ValueError(f"draft_vocab_size must be >= 2, got {self.draft_vocab_size}")
        if self.minutes <= 0 or self.seqs_per_step < 1 or self.anchors_per_seq < 1:
            raise ValueError("minutes, seqs_per_step and anchors_per_seq must be positive")


@dataclass
class TrainState:
    step: int = 0
    elapsed_s: float = 0.0
    sampler: dict = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)  # eval records
    last_eval_s: float = 0.0


def lr_at(state: TrainState, cfg: TrainConfig) -> float:
    """Linear warmup, then cosine to min_lr_frac over the budget (time, or steps if that ends first)."""
    if state.step < cfg.warmup:
        return cfg.lr * (state.step + 1) / cfg.warmup
    frac = state.elapsed_s / (60 * cfg.minutes)
    if cfg.max_steps:
        frac = max(frac, (state.step - cfg.warmup) / max(1, cfg.max_steps - cfg.warmup))
    lo = cfg.min_lr_frac
    return cfg.lr * (lo + (1 - lo) * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))


def use_autocast(cfg: TrainConfig, device: torch.device) -> bool:
    if cfg.autocast != "auto":
        return cfg.autocast == "on"
    from workers.models.loader import cpu_has_native_bf16

    return device.type == "cuda" or (device.type == "cpu" and cpu_has_native_bf16())


def step_loss(drafter, target, batch, cfg: TrainConfig, autocast: bool, vocab: torch.Tensor | None = None,
              generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict]:
    """Weighted block CE for one batch; -> (loss, metrics)."""
    dev = target.lm_head.weight.device
    c = drafter.config
    lengths = batch.anchors.max(dim=1).values.tolist()  # context positions < each sequence's last anchor
    feats = context_features(target, batch.tokens.to(dev), lengths, c.target_layer_ids)  # [b, C, F], no grad
    emb = F.embedding(batch.block_ids.to(dev), target.model.embed_tokens.weight).float()  # [b, NB, H]
    with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=autocast):
        hidden = blocks_forward(drafter, emb, feats.float(), batch.anchors.to(dev))  # [b, NB, H]
    labels = batch.labels.to(dev)
    k_all = (torch.arange(labels.shape[1], device=dev) % c.block_size).expand_as(labels)
    w_all = torch.exp(-(k_all.float() - 1) / cfg.gamma)
    sel = labels != IGNORE
    if cfg.row_sampling:  # keep row k with probability w_k, weight 1: the same expected loss, ~45% of the rows
        u = torch.rand(labels.shape, generator=generator).to(dev)
        sel &= u < w_all
        w_all = torch.ones_like(w_all)
    k, w = k_all[sel], w_all[sel]
    target_ids = labels[sel]
    head = target.lm_head.weight
    if cfg.loss_vocab == "draft" and drafter.draft_vocab is not None:  # the served draft vocabulary
        dv = drafter.draft_vocab.to(dev)
        index = torch.full((head.shape[0],), -1, dtype=torch.long, device=dev)
        index[dv] = torch.arange(len(dv), device=dev)
        inside = index[target_ids] >= 0  # a label outside the draft vocabulary cannot be drafted: not trained
        rows = sel.nonzero(as_tuple=True)
        sel = torch.zeros_like(sel)
        sel[rows[0][inside], rows[1][inside]] = True
        k, w, target_ids = k[inside], w[inside], index[target_ids[inside]]
        head = head[dv]
    elif vocab is not None:  # restricted: response vocabulary + fresh negatives
        others = torch.ones(head.shape[0], dtype=torch.bool, device=dev)
        others[vocab] = False
        others = others.nonzero().squeeze(1)
        neg = others[torch.randperm(len(others), generator=generator)[: cfg.n_negatives].to(dev)]
        cand = torch.cat([vocab, neg])
        index = torch.full((head.shape[0],), -1, dtype=torch.long, device=dev)
        index[cand] = torch.arange(len(cand), device=dev)
        head, target_ids = head[cand], index[target_ids]
    loss, correct = fused_linear_ce(hidden[sel], head, target_ids, w, cfg.loss_chunk,
                                    torch.bfloat16 if autocast else torch.float32)
    first = k == 1
    return loss, {"acc1": correct[first].float().mean().item() if first.any() else 0.0, "rows": int(sel.sum())}


def save_checkpoint(path: Path, drafter, opt, state: TrainState, cfg: TrainConfig, meta: dict) -> None:
    """Atomic: a temp file, fsync, rename (a kill mid-write leaves the previous checkpoint intact)."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"drafter": drafter.state_dict(), "drafter_config": asdict(drafter.config), "opt": opt.state_dict(),
                "state": asdict(state), "train_config": asdict(cfg), "meta": meta}, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # a copied or damaged file (our own writes are atomic)
        raise ValueError(f"checkpoint {path} is unreadable ({exc}); delete it to start over") from exc


def check_checkpoint(ck: dict, drafter_config: dict, meta: dict, path: Path) -> None:
    """Refuse a checkpoint for another target / drafter shape, naming the first difference."""
    for key in ("target_sha256", "vocab_size"):
        if ck.get("meta", {}).get(key) != meta.get(key):
            raise ValueError(f"checkpoint {path} was trained for {key}={ck.get('meta', {}).get(key)!r}; this run "
                             f"has {meta.get(key)!r}. Use another --work-dir or delete the checkpoint")
    old = ck["drafter_config"]
    for key in sorted(set(old) | set(drafter_config)):
        if key != "extra" and old.get(key) != drafter_config.get(key):
            raise ValueError(f"checkpoint {path} holds a drafter with {key}={old.get(key)!r}; this run asks for "
                             f"{drafter_config.get(key)!r}. Use another --work-dir or delete the checkpoint")


def train(drafter, target, train_samples: list[Sample], eval_samples: list[Sample], cfg: TrainConfig,
          ckpt_path: Path, meta: dict, max_new_tokens: int | None,
          on_eval: Callable[[TrainState, dict], None] | None = None, resume: bool = True) -> TrainState:
    """Train ``drafter`` in place until the time / step budget is spent; returns the final state."""
    from tqdm import tqdm

    if not train_samples:
        raise ValueError("no training sequences (is the corpus empty, or all held out?)")
    dev = target.lm_head.weight.device
    autocast = use_autocast(cfg, dev)
    opt = torch.optim.AdamW(drafter.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))
    sampler = MixSampler(train_samples, cfg.mix, cfg.seed)
    state = TrainState()
    if resume and ckpt_path.is_file():
        ck = load_checkpoint(ckpt_path)
        check_checkpoint(ck, asdict(drafter.config), meta, ckpt_path)
        drafter.load_state_dict(ck["drafter"])
        opt.load_state_dict(ck["opt"])
        state = TrainState(**ck["state"])
        sampler.state.update({c: v for c, v in state.sampler.items() if c in sampler.state})
        print(f"resuming {ckpt_path} at step {state.step} ({state.elapsed_s / 60:.1f} of {cfg.minutes:g} min)",
              file=sys.stderr)
    vocab = None
    if cfg.loss_vocab == "restricted":
        vocab = torch.unique(torch.cat([s.tokens[s.prompt_len:] for s in train_samples])).to(dev)
    drafter.train()
    log = open(cfg.log_path, "a") if cfg.log_path else None
    budget_s = 60 * cfg.minutes
    bar = tqdm(total=round(cfg.minutes, 2), initial=round(state.elapsed_s / 60, 2), desc="train", unit="min",
               file=sys.stderr, mininterval=2.0, bar_format="{l_bar}{bar}| {n:.1f}/{total:.1f} min [{elapsed}<{remaining}{postfix}]")
    ema = None
    last_tau = state.history[-1]["tau"] if state.history else None
    t_run, elapsed0, last_ckpt = time.time(), state.elapsed_s, time.time()

    def evaluate() -> dict:
        ev = offline_tau(drafter, target, eval_samples, max_new_tokens)
        rec = {"step": state.step, "elapsed_min": round(state.elapsed_s / 60, 2), "tau": ev["tau"],
               "p_first": ev["p_first"], "tau_by_category": {k: v["tau"] for k, v in ev["by_category"].items()},
               "loss": round(ema, 4) if ema is not None else None}
        state.history.append(rec)
        state.last_eval_s = state.elapsed_s
        if log:
            log.write(json.dumps({"eval": rec}) + "\n")
            log.flush()
        if on_eval:
            on_eval(state, ev)
        return ev

    try:
        if eval_samples and state.step == 0 and not state.history:  # the curve starts at minute 0
            last_tau = evaluate()["tau"]
            t_run = time.time()
        while True:
            done = state.elapsed_s >= budget_s or (cfg.max_steps is not None and state.step >= cfg.max_steps)
            if done:
                break
            t_step = time.time()
            rng_step = state.step
            seqs = sampler.draw(cfg.seqs_per_step, rng_step)
            arng = random.Random(cfg.seed * 7_919 + rng_step)
            batch = make_batch(seqs, [random_anchors(s, cfg.anchors_per_seq, arng) for s in seqs],
                               drafter.config.block_size, drafter.config.mask_token_id)
            for group in opt.param_groups:
                group["lr"] = lr_at(state, cfg)
            gen = torch.Generator().manual_seed(cfg.seed + rng_step)
            loss, m = step_loss(drafter, target, batch, cfg, autocast, vocab, gen)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            gnorm = torch.nn.utils.clip_grad_norm_(drafter.parameters(), cfg.grad_clip)
            opt.step()
            state.step += 1
            state.sampler = copy.deepcopy(sampler.state)  # a kill mid-step resumes with this step's draw
            state.elapsed_s = elapsed0 + time.time() - t_run
            lv = loss.item()
            ema = lv if ema is None else 0.98 * ema + 0.02 * lv
            if log and (state.step % 10 == 0 or state.step < 10):
                log.write(json.dumps({"step": state.step, "loss": round(lv, 4), "acc1": round(m["acc1"], 3),
                                      "rows": m["rows"], "lr": round(opt.param_groups[0]["lr"], 7),
                                      "grad_norm": round(float(gnorm), 3), "step_s": round(time.time() - t_step, 3),
                                      "elapsed_s": round(state.elapsed_s, 1)}) + "\n")
                log.flush()
            due = (state.step % cfg.eval_every_steps == 0) if cfg.eval_every_steps else \
                (state.elapsed_s - state.last_eval_s >= 60 * cfg.eval_minutes)
            if eval_samples and due:
                t_eval = time.time()
                last_tau = evaluate()["tau"]
                t_run += time.time() - t_eval  # the budget counts training time, not evaluations
                if cfg.stop_at_tau is not None and last_tau >= cfg.stop_at_tau:
                    break
            bar.n = round(min(state.elapsed_s, budget_s) / 60, 2)
            bar.set_postfix_str(f"step {state.step}, loss {ema:.3f}, acc1 {m['acc1']:.2f}, "
                                f"tau {last_tau if last_tau is not None else '-'}, lr {opt.param_groups[0]['lr']:.1e}")
            if time.time() - last_ckpt >= 60 * cfg.ckpt_minutes:
                save_checkpoint(ckpt_path, drafter, opt, state, cfg, meta)
                last_ckpt = time.time()
        if eval_samples and (not state.history or state.history[-1]["step"] != state.step):
            evaluate()
    finally:  # also on KeyboardInterrupt / kill -INT: nothing trained is lost
        save_checkpoint(ckpt_path, drafter, opt, state, cfg, meta)
        bar.close()
        if log:
            log.close()
    return state
