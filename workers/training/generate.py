"""Stage 2 of the trainer: the (frozen) target answers the prompts; the answers are the drafter's training data.

Greedy, chat template, batched HF ``generate`` with left padding. Output is an append-only JSONL (one record
per prompt: id, category, split, prompt_ids, response_ids, text); a rerun skips the ids already written, and a
torn last line from an interrupted run is cut off, so no finished work is lost.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Iterable

from workers.training.prompts import Prompt


def read_jsonl(path: Path) -> list[dict]:
    """Records of a JSONL written by this module; a torn last line is ignored, a torn middle line is an error."""
    if not path.exists():
        return []
    lines = path.read_text().split("\n")
    out = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError as exc:
            if i >= len(lines) - 2 and not path.read_text().endswith("\n"):  # torn tail of an interrupted write
                break
            raise ValueError(f"{path}: line {i + 1} is corrupted ({exc}); delete the file to regenerate") from exc
    return out


def _repair_tail(path: Path) -> None:
    """Cut a partial last line (no trailing newline) so appends start on a fresh line."""
    if not path.exists():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        path.write_bytes(data[: data.rfind(b"\n") + 1])


def chat_prompt_ids(tokenizer, text: str) -> list[int]:
    if not getattr(tokenizer, "chat_template", None):  # a base model / test tokenizer: the plain text
        return list(tokenizer(text)["input_ids"])
    ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                        tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):  # transformers 5 returns a BatchEncoding
        ids = ids["input_ids"]
    return list(ids)


def generate_responses(model_dir: str | Path, prompts: Iterable[Prompt], out_path: str | Path, *,
                       max_new_tokens: int = 192, batch_size: int = 16, device: str = "auto",
                       threads: int | None = None, capture_layers: list[int] | None = None) -> list[dict]:
    """Answer every prompt not yet in ``out_path``; returns all records (old and new).

    With ``capture_layers`` the raw outputs of those target layers (HF ``hidden_states[t+1]``), which the
    generation computes anyway, are saved for every position but the last of prompt+response as
    ``<out_path stem>.features/shard-NNNNN.safetensors`` (one bf16 tensor [T-1, n_layers*H] per record id),
    so the trainer never runs the target again. The shard is written before the JSONL lines that name it.
    """
    import torch
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    _repair_tail(out_path)
    done = {r["id"] for r in read_jsonl(out_path)}
    todo = [p for p in prompts if p.id not in done]
    if not todo:
        return read_jsonl(out_path)
    if threads:
        torch.set_num_threads(threads)
    dev = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    dtype = torch.bfloat16 if dev.startswith("cuda") else torch.float32
    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(dev).eval()
    eos = tok.eos_token_id
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos

    encoded = [(p, chat_prompt_ids(tok, p.text)) for p in todo]
    window = batch_size * 8  # sort by length inside windows: little padding, yet the given order (categories
    encoded = [pe for w in range(0, len(encoded), window)  # interleaved) holds if the run is stopped early
               for pe in sorted(encoded[w : w + window], key=lambda pe: len(pe[1]))]
    feat_dir = features_dir(out_path)
    if capture_layers:
        feat_dir.mkdir(exist_ok=True)
        n_layers = model.config.num_hidden_layers
        if not all(0 <= t < n_layers - 1 for t in capture_layers):  # the last entry of hidden_states is normed
            raise ValueError(f"capture layers {capture_layers} must lie in [0, {n_layers - 2}]")
    shard_no = len(list(feat_dir.glob("shard-*.safetensors"))) if capture_layers else 0
    t0, n_tok = time.time(), 0
    bar = tqdm(total=len(encoded), desc="generate", unit="prompt", file=sys.stderr)
    with open(out_path, "a") as f:
        for s in range(0, len(encoded), batch_size):
            chunk = encoded[s : s + batch_size]
            width = max(len(ids) for _, ids in chunk)
            input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for _, ids in chunk], device=dev)  # [b, T]
            attn = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for _, ids in chunk], device=dev)
            with torch.inference_mode():
                out = model.generate(input_ids=input_ids, attention_mask=attn, max_new_tokens=max_new_tokens,
                                     do_sample=False, eos_token_id=eos, pad_token_id=pad,
                                     return_dict_in_generate=True, output_hidden_states=bool(capture_layers))
            recs, feats = [], {}
            for i, ((p, ids), row) in enumerate(zip(chunk, out.sequences[:, width:].tolist())):
                resp = []
                for t in row:
                    resp.append(t)
                    if t == eos:
                        break
                n_tok += len(resp)
                rec = {"id": p.id, "category": p.category, "split": p.split, "prompt": p.text,
                       "prompt_ids": ids, "response_ids": resp,
                       "text": tok.decode(resp, skip_special_tokens=True)}
                if capture_layers:
                    feats[p.id] = _gather_features(out.hidden_states, i, width - len(ids), len(resp), capture_layers)
                    rec["features"] = f"shard-{shard_no:05d}.safetensors"
                recs.append(rec)
            if capture_layers:
                _save_shard(feats, feat_dir / f"shard-{shard_no:05d}.safetensors")
                shard_no += 1
            for rec in recs:
                f.write(json.dumps(rec) + "\n")
            f.flush()
            os.fsync(f.fileno())
            bar.update(len(chunk))
            bar.set_postfix(tok_s=f"{n_tok / (time.time() - t0):.0f}")
    bar.close()
    return read_jsonl(out_path)


def features_dir(out_path: Path) -> Path:
    return out_path.with_name(out_path.stem + ".features")


def _gather_features(hidden_states, row: int, pad: int, resp_len: int, layers: list[int]):
    """HF generate hidden states -> [P + resp_len - 1, n_layers*H] bf16 for one batch row.

    hidden_states[0][t+1] is [b, width, H] (prompt, left-padded); hidden_states[s][t+1] is [b, 1, H], the
    output for the token generated at step s-1; the last generated token is never fed back (not needed).
    """
    import torch

    prompt = torch.cat([hidden_states[0][t + 1][row, pad:] for t in layers], dim=-1)  # [P, n*H]
    steps = [torch.cat([hidden_states[s][t + 1][row] for t in layers], dim=-1) for s in range(1, resp_len)]
    return torch.cat([prompt, *steps], dim=0).to(torch.bfloat16)


def _save_shard(feats: dict, path: Path) -> None:
    from safetensors.torch import save_file

    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.contiguous() for k, v in feats.items()}, str(tmp))
    os.replace(tmp, path)


def worker_path(out_path: Path, k: int) -> Path:
    return out_path.with_name(f"{out_path.stem}-w{k}.jsonl")


def merge_worker_outputs(out_path: Path) -> int:
    """Append the records of ``<stem>-wK.jsonl`` files not yet in ``out_path`` (features paths made relative)."""
    _repair_tail(out_path)
    done = {r["id"] for r in read_jsonl(out_path)}
    added = 0
    with open(out_path, "a") as f:
        for wp in sorted(out_path.parent.glob(f"{out_path.stem}-w*.jsonl")):
            for rec in read_jsonl(wp):
                if rec["id"] in done:
                    continue
                if "features" in rec and "/" not in rec["features"]:
                    rec["features"] = f"{features_dir(wp).name}/{rec['features']}"
                f.write(json.dumps(rec) + "\n")
                done.add(rec["id"])
                added += 1
    return added


def _worker(args):
    model_dir, prompts, path, kw = args
    generate_responses(model_dir, prompts, path, threads=1, **kw)
    return str(path)


def generate_parallel(model_dir: str | Path, prompts: list[Prompt], out_path: str | Path, workers: int = 1,
                      **kw) -> list[dict]:
    """``workers`` single-threaded processes on disjoint slices (far better than one process with several
    intra-op threads on a busy shared CPU), then merged into ``out_path``. Resumable like the serial path."""
    out_path = Path(out_path)
    if workers <= 1:
        return generate_responses(model_dir, prompts, out_path, **kw)
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    out_path.parent.mkdir(parents=True, exist_ok=True)
    merge_worker_outputs(out_path)  # finished work of an interrupted run first, so slices never overlap
    done = {r["id"] for r in read_jsonl(out_path)}
    todo = [p for p in prompts if p.id not in done]
    if todo:
        jobs = [(str(model_dir), todo[k::workers], worker_path(out_path, k), kw) for k in range(workers)]
        with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as ex:
            list(ex.map(_worker, jobs))
        merge_worker_outputs(out_path)
    return read_jsonl(out_path)
