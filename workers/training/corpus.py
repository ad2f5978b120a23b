"""The token corpus: the target's own answers as token ids (no features), compact, append-only, checked.

Layout of a corpus directory::

    manifest.json        format, target (name, sha256, vocab size, eos ids), prompt set, generation settings,
                         the shard list (file, sha256, records, tokens) and counts per category / split
    shard-00000.xz       xz(header + uint16 token ids): header = JSON index of its records

A record is one answered turn: conversation id, turn index, category, split, prompt ids (the conversation so
far through the chat template) and response ids (ending in EOS unless the length limit stopped it). Shards are
written whole (temp file, fsync, rename) and the manifest last, so a killed writer loses at most the records
of the shard it had not written yet; a shard the manifest does not list is ignored and overwritten. Readers
verify every shard's sha256 and refuse a corpus made for another target (hash, vocabulary).
"""
from __future__ import annotations

import hashlib
import json
import lzma
import os
import struct
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

FORMAT = "specfleet-token-corpus/1"
MAGIC = b"SFTOK1\n"


@dataclass
class Record:
    conversation: str
    turn: int
    category: str
    split: str
    prompt_ids: list[int]
    response_ids: list[int]
    finish: str  # "stop" (EOS) | "length"

    @property
    def id(self) -> str:
        return f"{self.conversation}/{self.turn}"


@dataclass
class Manifest:
    format: str
    target: dict  # name, sha256, vocab_size, eos_token_ids
    prompts: dict  # seed, counts, heldout
    generation: dict  # engine settings
    shards: list[dict] = field(default_factory=list)  # file, sha256, records, prompt_tokens, response_tokens

    def counts(self) -> dict:
        """records / response tokens per category and split, from the shard index."""
        out: dict = {}
        for s in self.shards:
            for key, n in s.get("by_category", {}).items():
                row = out.setdefault(key, {"records": 0, "response_tokens": 0})
                row["records"] += n["records"]
                row["response_tokens"] += n["response_tokens"]
        return dict(sorted(out.items()))

    @property
    def num_records(self) -> int:
        return sum(s["records"] for s in self.shards)

    @property
    def response_tokens(self) -> int:
        return sum(s["response_tokens"] for s in self.shards)


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def target_fingerprint(model_dir: str | Path) -> str:
    """sha256 over the target's weights, config and tokenizer files (what the token ids depend on)."""
    p = Path(model_dir)
    names = sorted(f.name for f in p.iterdir() if f.is_file() and (f.suffix in (".safetensors", ".json", ".jinja",
                   ".model", ".txt") and not f.name.startswith(".")))
    if not any(n.endswith(".safetensors") for n in names):
        raise ValueError(f"{p} holds no *.safetensors weights to fingerprint")
    h = hashlib.sha256()
    for n in names:
        h.update(n.encode() + b"\0" + file_sha256(p / n).encode() + b"\n")
    return h.hexdigest()


def token_dtype(vocab_size: int):
    return np.uint16 if vocab_size <= 1 << 16 else np.uint32


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def encode_shard(records: list[Record], vocab_size: int) -> bytes:
    index = [{"conversation": r.conversation, "turn": r.turn, "category": r.category, "split": r.split,
              "n_prompt": len(r.prompt_ids), "n_response": len(r.response_ids), "finish": r.finish} for r in records]
    head = json.dumps({"dtype": np.dtype(token_dtype(vocab_size)).name, "records": index}).encode()
    toks = np.fromiter((t for r in records for t in (*r.prompt_ids, *r.response_ids)), dtype=np.int64)
    if len(toks) and (toks.min() < 0 or toks.max() >= vocab_size):
        raise ValueError(f"token ids outside the vocabulary [0, {vocab_size})")
    body = MAGIC + struct.pack("<I", len(head)) + head + toks.astype(token_dtype(vocab_size)).tobytes()
    return lzma.compress(body, preset=6)


def decode_shard(data: bytes, name: str) -> list[Record]:
    try:
        body = lzma.decompress(data)
    except lzma.LZMAError as exc:
        raise ValueError(f"corpus shard {name} is corrupted ({exc})") from exc
    if not body.startswith(MAGIC):
        raise ValueError(f"corpus shard {name} is not a {FORMAT} shard")
    (n,) = struct.unpack_from("<I", body, len(MAGIC))
    off = len(MAGIC) + 4
    head = json.loads(body[off: off + n])
    toks = np.frombuffer(body[off + n:], dtype=head["dtype"]).astype(np.int64).tolist()
    out, i = [], 0
    for r in head["records"]:
        p, q = r["n_prompt"], r["n_response"]
        out.append(Record(r["conversation"], r["turn"], r["category"], r["split"], toks[i: i + p],
                          toks[i + p: i + p + q], r["finish"]))
        i += p + q
    if i != len(toks):
        raise ValueError(f"corpus shard {name} is corrupted (index and token count disagree)")
    return out


def _shard_summary(records: list[Record]) -> dict:
    by: dict = {}
    for r in records:
        row = by.setdefault(f"{r.category}/{r.split}", {"records": 0, "response_tokens": 0})
        row["records"] += 1
        row["response_tokens"] += len(r.response_ids)
    return {"records": len(records), "prompt_tokens": sum(len(r.prompt_ids) for r in records),
            "response_tokens": sum(len(r.response_ids) for r in records), "by_category": dict(sorted(by.items()))}


class CorpusWriter:
    """Append records shard by shard; ``flush`` makes everything added so far durable."""

    def __init__(self, path: str | Path, manifest: Manifest):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.manifest = manifest
        self.pending: list[Record] = []

    def add(self, rec: Record) -> None:
        self.pending.append(rec)

    def flush(self) -> None:
        if not self.pending:
            return
        name = f"shard-{len(self.manifest.shards):05d}.xz"
        data = encode_shard(self.pending, self.manifest.target["vocab_size"])
        _atomic_write(self.path / name, data)
        self.manifest.shards.append({"file": name, "sha256": hashlib.sha256(data).hexdigest(),
                                     **_shard_summary(self.pending)})
        write_manifest(self.path, self.manifest)
        self.pending = []


def write_manifest(path: Path, m: Manifest) -> None:
    d = asdict(m)
    d["totals"] = {"records": m.num_records, "response_tokens": m.response_tokens,
                   "prompt_tokens": sum(s["prompt_tokens"] for s in m.shards), "by_category": m.counts(),
                   "bytes": sum((path / s["file"]).stat().st_size for s in m.shards if (path / s["file"]).exists())}
    _atomic_write(path / "manifest.json", (json.dumps(d, indent=1) + "\n").encode())


def read_manifest(path: str | Path) -> Manifest:
    p = Path(path) / "manifest.json"
    if not p.is_file():
        raise FileNotFoundError(f"{Path(path)} is not a token corpus (no manifest.json); make one with "
                                "`specfleet make-corpus`")
    try:
        d = json.loads(p.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{p} is corrupted ({exc})") from exc
    if d.get("format") != FORMAT:
        raise ValueError(f"{p}: format {d.get('format')!r}, expected {FORMAT!r}")
    d.pop("totals", None)
    return Manifest(**d)


def read_records(path: str | Path, manifest: Manifest | None = None) -> list[Record]:
    """Every record of the corpus, each shard checked against the manifest's sha256."""
    path = Path(path)
    m = manifest or read_manifest(path)
    out: list[Record] = []
    for s in m.shards:
        f = path / s["file"]
        if not f.is_file():
            raise ValueError(f"corpus shard {f} is missing (the manifest lists it)")
        data = f.read_bytes()
        if hashlib.sha256(data).hexdigest() != s["sha256"]:
            raise ValueError(f"corpus shard {f} is corrupted (sha256 differs from the manifest); restore it from "
                             "git or delete it and its manifest entry to regenerate")
        recs = decode_shard(data, str(f))
        if len(recs) != s["records"]:
            raise ValueError(f"corpus shard {f} holds {len(recs)} records, the manifest says {s['records']}")
        out.extend(recs)
    return out


def check_target(m: Manifest, sha256: str | None, vocab_size: int, where: str) -> None:
    """Refuse a corpus made for another target, naming what differs."""
    t = m.target
    if t.get("vocab_size") != vocab_size:
        raise ValueError(f"{where} was made for a target with vocabulary {t.get('vocab_size')}; "
                         f"this target has {vocab_size}")
    if sha256 is not None and t.get("sha256") != sha256:
        raise ValueError(f"{where} was made for target {t.get('name')!r} with sha256 {str(t.get('sha256'))[:16]}...; "
                         f"this target's sha256 is {sha256[:16]}... (other weights or tokenizer)")
