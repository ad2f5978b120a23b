"""Stage 1 of the trainer: OUR engine answers the prompt set; the answers are the drafter's training data.

``workers.engine.LLMEngine`` with continuous batching (``batch`` sequences in flight), greedy, the serving dtype
(auto: bf16 on CPUs with AMX / AVX512-BF16), stop at EOS or ``max_new_tokens``. A multi-turn conversation's
next turn is queued as soon as its previous answer is in, with the conversation so far as its prompt (the
previous answers decoded to text and re-encoded through the chat template, as an agent resends them).

Streams into a token corpus (workers/training/corpus.py). Resumable: a rerun reads the corpus, skips every
answered turn and continues each conversation from its last answered turn; only the records not yet flushed
when a run was killed are generated again.
"""
from __future__ import annotations

import sys
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from workers.training.corpus import (FORMAT, CorpusWriter, Manifest, Record, check_target, read_manifest,
                                     read_records, target_fingerprint, write_manifest)
from workers.training.prompts import Conversation, chat_ids


@dataclass
class GenerationConfig:
    max_new_tokens: int = 256
    batch: int = 64  # sequences in flight (the engine's max_num_seqs)
    max_model_len: int = 2048  # a turn whose prompt + max_new_tokens does not fit ends its conversation
    dtype: str = "auto"
    device: str = "auto"
    drafter: str | None = None  # speculation during generation (greedy output is the target's, up to numerics)
    flush_every: int = 256  # records per shard
    flush_s: float = 300.0  # ... or this many seconds, whichever comes first
    max_turns: int | None = None  # stop after this many new turns (smoke runs, cost measurements)

    def settings(self) -> dict:
        """What the corpus' content depends on (a resumed run must use the same)."""
        return {"max_new_tokens": self.max_new_tokens, "max_model_len": self.max_model_len, "temperature": 0.0,
                "dtype": self.dtype}


def answer_text(tokenizer, response_ids: list[int], eos_ids: list[int]) -> str:
    """The assistant message an API client gets back (EOS dropped, special tokens skipped)."""
    ids = response_ids[:-1] if response_ids and response_ids[-1] in eos_ids else response_ids
    if tokenizer is None:
        return " ".join(map(str, ids))
    return tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def open_corpus(out: Path, target_name: str, target_sha: str, vocab_size: int, eos_ids: list[int],
                prompts: dict, gc: GenerationConfig, dtype_name: str) -> tuple[Manifest, list[Record]]:
    """The existing corpus (checked against this target and these settings) or a new manifest."""
    gen = {**gc.settings(), "dtype": dtype_name, "engine": "workers.engine.LLMEngine", "greedy": True}
    if (out / "manifest.json").is_file():
        m = read_manifest(out)
        check_target(m, target_sha, vocab_size, str(out))
        for key in ("seed", "heldout"):
            if m.prompts.get(key) != prompts.get(key):
                raise ValueError(f"{out} was made with prompt {key} {m.prompts.get(key)!r}; this run asks for "
                                 f"{prompts.get(key)!r} (use another --out)")
        for key in ("max_new_tokens", "max_model_len", "temperature", "dtype"):
            if m.generation.get(key) != gen[key]:
                raise ValueError(f"{out} was generated with {key}={m.generation.get(key)!r}; this run asks for "
                                 f"{gen[key]!r} (use another --out, or the same setting)")
        m.prompts = prompts  # more conversations per category extend the set (a prefix of the larger one)
        m.generation = {**m.generation, **{k: v for k, v in gen.items() if k not in m.generation}}
        return m, read_records(out, m)
    m = Manifest(FORMAT, {"name": target_name, "sha256": target_sha, "vocab_size": vocab_size,
                          "eos_token_ids": eos_ids}, prompts, gen)
    return m, []


def generate_corpus(target_dir: str | Path, out: str | Path, conversations: list[Conversation], prompts: dict,
                    gc: GenerationConfig, target_name: str | None = None, engine=None) -> Manifest:
    """Answer every turn of ``conversations`` not yet in the corpus at ``out``; returns the final manifest.

    ``prompts`` describes the prompt set (seed, counts, heldout) for the manifest. ``engine``: an already
    built LLMEngine (tests); by default one is built from ``target_dir`` with ``gc``'s settings.
    """
    from tqdm import tqdm

    from workers.engine.config import EngineConfig

    from workers.engine.llm_engine import LLMEngine
    from workers.engine.params import InvalidRequest, NoCapacity, SamplingParams, SpecParams

    out = Path(out)
    target_dir = Path(target_dir)
    if engine is None:
        import dataclasses
        import json

        from workers.engine.kv_cache import kv_bytes_per_block
        from workers.models.config import ModelConfig

        mc = ModelConfig.from_hf(json.loads((target_dir / "config.json").read_text()))
        if gc.max_model_len > mc.max_position_embeddings:
            gc = dataclasses.replace(gc, max_model_len=mc.max_position_embeddings)
        per_tok = kv_bytes_per_block(1, [(mc.num_key_value_heads, mc.head_dim)] * mc.num_hidden_layers, 2)
        kv = min(8 << 30, max(256 << 20, int(1.2 * gc.batch * (gc.max_model_len + 32) * per_tok)))
        engine = LLMEngine(EngineConfig(model=str(target_dir), drafter=gc.drafter, dtype=gc.dtype, device=gc.device,
                                        max_num_seqs=gc.batch, max_model_len=gc.max_model_len, kv_cache_bytes=kv,
                                        max_num_batched_tokens=max(2048, 2 * gc.batch)))
    tok, eos = engine.tokenizer, list(engine.eos_token_ids)
    dtype_name = str(engine.dtype).removeprefix("torch.")
    m, done = open_corpus(out, target_name or target_dir.name, target_fingerprint(target_dir),
                          engine.model_config.vocab_size, eos, prompts, gc, dtype_name)
    answered: dict[str, dict[int, Record]] = {}
    for r in done:
        answered.setdefault(r.conversation, {})[r.turn] = r
    writer = CorpusWriter(out, m)
    if not m.shards:
        write_manifest(out, m)

    # the next unanswered turn of every conversation, with the answers so far
    queue: deque[tuple[Conversation, list[str]]] = deque()
    total_turns = 0
    for c in conversations:
        have = answered.get(c.id, {})
        k = 0
        while k in have:
            k += 1
        if k >= len(c.turns):
            continue
        queue.append((c, [answer_text(tok, have[i].response_ids, eos) for i in range(k)]))
        total_turns += len(c.turns) - k
    if gc.max_turns is not None:
        total_turns = min(total_turns, gc.max_turns)

    sampling = SamplingParams(temperature=0.0, max_tokens=gc.max_new_tokens)
    spec = SpecParams(enabled=engine.drafter is not None, block_size=max(2, engine.max_block))
    inflight: dict[str, tuple[Conversation, list[str], list[int]]] = {}
    outputs: dict[str, list[int]] = {}
    started = n_new = n_tok = 0
    skipped = 0
    t0 = last_flush = time.time()
    bar = tqdm(total=total_turns, desc="generate", unit="turn", file=sys.stderr, smoothing=0.05)
    try:
        while queue or inflight:
            while queue and len(inflight) < gc.batch and (gc.max_turns is None or started < gc.max_turns):
                conv, answers = queue[0]
                ids = chat_ids(tok, conv.messages(answers))
                rid = f"{conv.id}/{len(answers)}"
                try:
                    engine.add_request(rid, ids, sampling, spec, tags={"role": conv.category})
                except InvalidRequest:  # the conversation outgrew the context: it ends here
                    queue.popleft()
                    skipped += len(conv.turns) - len(answers)
                    bar.total -= len(conv.turns) - len(answers)
                    continue
                except NoCapacity:
                    break
                queue.popleft()
                inflight[rid] = (conv, answers, ids)
                outputs[rid] = []
                started += 1
            if not inflight:
                break
            for o in engine.step():
                if o.error:
                    raise RuntimeError(f"generation of {o.request_id} failed: {o.error}")
                outputs[o.request_id].extend(o.new_token_ids)
                n_tok += len(o.new_token_ids)
                if not o.finished:
                    continue
                conv, answers, ids = inflight.pop(o.request_id)
                resp = outputs.pop(o.request_id)
                finish = "stop" if o.finish_reason == "stop" else "length"
                writer.add(Record(conv.id, len(answers), conv.category, conv.split, ids, resp, finish))
                n_new += 1
                bar.update(1)
                nxt = len(answers) + 1
                if nxt < len(conv.turns):
                    queue.appendleft((conv, answers + [answer_text(tok, resp, eos)]))
            if len(writer.pending) >= gc.flush_every or (writer.pending and time.time() - last_flush > gc.flush_s):
                writer.flush()
                last_flush = time.time()
            bar.set_postfix(tok_s=f"{n_tok / max(1e-6, time.time() - t0):.0f}", inflight=len(inflight))
    finally:
        writer.flush()  # everything answered so far (a KeyboardInterrupt loses only the turns in flight)
        bar.close()
    wall = time.time() - t0
    print(f"generated {n_new} turns, {n_tok} tokens in {wall:.0f} s ({n_tok / max(wall, 1e-6):.1f} tok/s); "
          f"corpus {out}: {m.num_records} records, {m.response_tokens} response tokens"
          + (f"; {skipped} turns skipped (context full)" if skipped else ""), file=sys.stderr)
    return m
