"""The two commands' glue: ``specfleet make-corpus`` (prompts -> our engine -> token corpus) and
``specfleet train-drafter`` (token corpus -> DFlash drafter in the z-lab format, resumable, time-boxed).

Inputs are validated before any work: the corpus must have been made by this target (sha256 of weights +
tokenizer, vocabulary size), a checkpoint must belong to the same target and drafter shape, a warm-start drafter
must match exactly; each refusal names the mismatch. The output directory receives the drafter (config.json,
model.safetensors, each replaced atomically at every evaluation), training.json (settings, data, tau curve)
and a model card (README.md).
"""
from __future__ import annotations

import json
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from workers.training.generate import GenerationConfig
from workers.training.train import TrainConfig

MAX_DRAFTER_MB = 50


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


def choose_layer_ids(n_layers: int, num_features: int, given: list[int] | None) -> list[int]:
    from workers.models.dflash import default_target_layer_ids

    ids = list(given or default_target_layer_ids(n_layers, num_features))
    if not given and len(set(ids)) != len(ids):  # a shallow target: spread over all raw layers
        k = min(num_features, n_layers - 1)
        ids = sorted({round(i * (n_layers - 2) / max(1, k - 1)) for i in range(k)})
    if not ids or any(not 0 <= i < n_layers - 1 for i in ids) or len(set(ids)) != len(ids):
        raise ValueError(f"target_layer_ids {ids} must be distinct layers in [0, {n_layers - 2}] "
                         f"(the target has {n_layers} layers; its last output is normed, not raw)")
    return ids


# ------------------------------------------------------------------------------------------ corpus
@dataclass
class CorpusConfig:
    target: str
    out: str
    counts: dict[str, int] | None = None  # conversations per category (default prompts.DEFAULT_COUNTS)
    heldout: int = 40
    seed: int = 0
    gen: GenerationConfig = field(default_factory=GenerationConfig)
    threads: int | None = None


def run_make_corpus(cc: CorpusConfig, engine=None) -> dict:
    from workers.training.generate import generate_corpus
    from workers.training.prompts import DEFAULT_COUNTS, build_conversations, interleave

    if cc.threads:
        torch.set_num_threads(cc.threads)
    target_dir = resolve_target(cc.target)
    counts = dict(cc.counts or DEFAULT_COUNTS)
    convs = interleave(build_conversations(counts, cc.heldout, cc.seed))
    prompts = {"builder": "workers.training.prompts.build_conversations", "seed": cc.seed, "heldout": cc.heldout,
               "counts": counts, "conversations": len(convs), "turns": sum(len(c.turns) for c in convs)}
    m = generate_corpus(target_dir, cc.out, convs, prompts, cc.gen, target_name=cc.target, engine=engine)
    return {"corpus": cc.out, "records": m.num_records, "response_tokens": m.response_tokens, "by_category": m.counts()}


# ---------------------------------------------------------------------------------------- training
@dataclass
class RunConfig:
    target: str
    corpus: str
    out: str
    work_dir: str | None = None
    block_size: int = 16
    layers: int = 2
    num_features: int = 5
    target_layer_ids: list[int] | None = None
    mask_token_id: int | None = None
    init: str | None = None  # warm start: a z-lab drafter directory with the same shapes
    init_from_target: str | None = None  # "last" | "i,j,k": drafter layers copied from these target layers
    eval_per_category: int = 8  # held-out sequences per category in the periodic tau
    device: str = "auto"
    threads: int | None = None
    resume: bool = True
    command: str = ""  # the command line, for the model card
    train: TrainConfig = field(default_factory=TrainConfig)


def work_dir_for(rc: RunConfig) -> Path:
    from workers.hub import cache_root

    return Path(rc.work_dir).expanduser() if rc.work_dir else cache_root() / "train" / Path(rc.out).name


def _eval_set(samples, per_category: int):
    out, seen = [], {}
    for s in sorted(samples, key=lambda s: s.id):
        if seen.get(s.category, 0) < per_category:
            seen[s.category] = seen.get(s.category, 0) + 1
            out.append(s)
    return out


def export(drafter, out: Path, summary: dict) -> None:
    """z-lab drafter (bf16) + training.json + model card, each file replaced atomically."""
    from workers.models.dflash import save_drafter
    from workers.training.card import render_card

    out.mkdir(parents=True, exist_ok=True)
    tmp = out / ".export.tmp"
    save_drafter(drafter, tmp, dtype=torch.bfloat16)
    size_mb = (tmp / "model.safetensors").stat().st_size / 2**20
    if size_mb > MAX_DRAFTER_MB:
        print(f"warning: the drafter weighs {size_mb:.1f} MB (> {MAX_DRAFTER_MB} MB)", file=sys.stderr)
    summary = {**summary, "drafter_mb": round(size_mb, 1)}
    old = out / "training.json"
    if old.is_file():  # keep engine acceptance figures measured for an earlier export of this run
        prev = json.loads(old.read_text())
        if "engine_acceptance" in prev and prev.get("step") == summary.get("step"):
            summary["engine_acceptance"] = prev["engine_acceptance"]
    (tmp / "training.json").write_text(json.dumps(summary, indent=1) + "\n")
    (tmp / "README.md").write_text(render_card(summary))
    from workers.models.dflash import DRAFT_VOCAB_FILE

    for name in ("model.safetensors", "config.json", "training.json", "README.md", DRAFT_VOCAB_FILE):
        if (tmp / name).is_file():
            os.replace(tmp / name, out / name)
        elif name == DRAFT_VOCAB_FILE and (out / name).is_file():
            (out / name).unlink()  # this export drafts from the full vocabulary
    tmp.rmdir()


def run_training(rc: RunConfig) -> dict:
    from workers.models.dflash import DrafterConfig, load_drafter, validate_against_target
    from workers.models.config import ModelConfig
    from workers.models.loader import load_model
    from workers.training.corpus import check_target, read_manifest, read_records, target_fingerprint
    from workers.training.data import to_samples
    from workers.training.drafter_init import from_target_layers, parse_init_layers, random_drafter, warm_start
    from workers.training.train import train, use_autocast

    t0 = time.time()
    if rc.threads:
        torch.set_num_threads(rc.threads)
    target_dir = resolve_target(rc.target)
    try:
        tcfg = ModelConfig.from_hf(json.loads((target_dir / "config.json").read_text()))
    except ValueError as exc:
        raise ValueError(f"cannot hook target {target_dir}: {exc}") from exc
    ids = choose_layer_ids(tcfg.num_hidden_layers, rc.num_features, rc.target_layer_ids)
    if rc.block_size < 2:
        raise ValueError(f"block size must be >= 2, got {rc.block_size}")
    if rc.layers < 1:
        raise ValueError(f"the drafter needs at least one layer, got {rc.layers}")
    corpus = Path(rc.corpus).expanduser()
    manifest = read_manifest(corpus)
    sha = target_fingerprint(target_dir)
    check_target(manifest, sha, tcfg.vocab_size, f"corpus {corpus}")
    records = read_records(corpus, manifest)

    lm = load_model(target_dir, dtype="auto", device=rc.device)
    target, tok = lm.model, lm.tokenizer
    mask_id = rc.mask_token_id if rc.mask_token_id is not None else pick_mask_token(tok, tcfg.vocab_size)
    if not 0 <= mask_id < tcfg.vocab_size:
        raise ValueError(f"mask token id {mask_id} is not a row of the target's embedding table")
    if any(mask_id in r.prompt_ids or mask_id in r.response_ids for r in records):
        raise ValueError(f"mask token id {mask_id} occurs in the corpus; choose another --mask-token-id")
    train_samples = to_samples(records, "train")
    eval_samples = _eval_set(to_samples(records, "heldout"), rc.eval_per_category)

    dc = DrafterConfig.for_target(tcfg, num_hidden_layers=rc.layers, mask_token_id=mask_id,
                                  block_size=rc.block_size, target_layer_ids=ids)
    validate_against_target(dc, tcfg)
    work = work_dir_for(rc)
    work.mkdir(parents=True, exist_ok=True)
    ckpt = work / "checkpoint.pt"
    if not rc.resume and ckpt.exists():
        os.replace(ckpt, work / "checkpoint.pt.old")  # set aside, not deleted
    drafter = random_drafter(dc, target, rc.train.seed)
    init = "random"
    if not ckpt.exists():
        if rc.init:
            warm_start(drafter, rc.init, tcfg)
            init = f"warm start from {rc.init}"
        elif rc.init_from_target:
            layers = parse_init_layers(rc.init_from_target, rc.layers, tcfg.num_hidden_layers)
            from_target_layers(drafter, target, layers)
            init = f"layers copied from target layers {layers}"
    drafter = drafter.to(target.lm_head.weight.device)
    meta = {"target_sha256": sha, "vocab_size": tcfg.vocab_size, "corpus": str(corpus),
            "init": init if not ckpt.exists() else None}
    old_meta = {}
    if ckpt.exists():
        from workers.training.train import load_checkpoint

        old_meta = load_checkpoint(ckpt).get("meta", {})
        meta["init"] = old_meta.get("init", "unknown")
    if rc.train.loss_vocab == "draft":  # the run keeps the vocabulary it started with (the corpus may grow)
        from workers.training.draft_vocab import draft_vocab

        dv_ids, coverage, _ = draft_vocab(corpus, rc.train.draft_vocab_size)
        if old_meta.get("draft_vocab"):
            dv_ids = old_meta["draft_vocab"]["token_ids"]
            coverage = old_meta["draft_vocab"]["coverage"]
        meta["draft_vocab"] = {"token_ids": dv_ids, "coverage": round(coverage, 5)}
        drafter.draft_vocab = torch.tensor(dv_ids, dtype=torch.long, device=target.lm_head.weight.device)
    rc.train.log_path = rc.train.log_path or str(work / "train_log.jsonl")
    max_new = manifest.generation.get("max_new_tokens")
    counts = manifest.counts()
    out = Path(rc.out).expanduser()
    sizes: dict[str, int] = {}
    for s in train_samples:
        sizes[s.category] = sizes.get(s.category, 0) + 1

    def summary(state, ev: dict | None) -> dict:
        return {
            "out": str(out), "target": {"name": rc.target, "sha256": sha, "layers": tcfg.num_hidden_layers},
            "drafter": {"layers": rc.layers, "block_size": rc.block_size, "target_layer_ids": ids,
                        "draft_vocab": ({"size": len(meta["draft_vocab"]["token_ids"]),
                                         "coverage": meta["draft_vocab"]["coverage"]} if "draft_vocab" in meta else None),
                        "mask_token_id": mask_id, "mask_token": tok.convert_ids_to_tokens(mask_id) if tok else None,
                        "init": meta["init"]},
            "corpus": {"path": str(corpus), "records": manifest.num_records,
                       "response_tokens": manifest.response_tokens, "by_category": counts,
                       "generation": manifest.generation, "prompts": manifest.prompts},
            "data": {"train_sequences": len(train_samples), "eval_sequences": len(eval_samples),
                     "mix": rc.train.mix, "epochs": {c: round(e + cur / max(1, sizes.get(c, 1)), 3)
                                                     for c, (e, cur) in sorted(state.sampler.items())}},
            "train_config": asdict(rc.train), "step": state.step, "train_minutes": round(state.elapsed_s / 60, 2),
            "offline_tau": ev, "history": state.history, "command": rc.command,
            "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, "
                       f"{torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU'}, "
                       f"bf16 autocast {'on' if use_autocast(rc.train, target.lm_head.weight.device) else 'off'}",
            "load_average": Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").exists() else None,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        }

    last: dict = {}

    def on_eval(state, ev):
        last["ev"] = ev
        export(drafter, out, summary(state, ev))

    print(f"corpus {corpus}: {len(train_samples)} training sequences, {len(eval_samples)} held-out for tau; "
          f"drafter {rc.layers} layers, block {rc.block_size}, target layers {ids}, mask {mask_id}; init {meta['init']}",
          file=sys.stderr)
    state = train(drafter, target, train_samples, eval_samples, rc.train, ckpt, meta, max_new, on_eval, rc.resume)
    final = summary(state, last.get("ev") or (state.history[-1] if state.history else None))
    export(drafter, out, final)
    load_drafter(out, tcfg)  # the engine's loader accepts what we wrote
    final["total_wall_s"] = round(time.time() - t0, 1)
    return final
