"""A torch-free EngineClient (workers/engine/client.py), for serving / router / reliability tests.

Deterministic: the text is a fixed English corpus walked from an offset derived from the prompt
(and the seed when sampling), so the same request gives the same tokens. Speculation is simulated:
each target pass commits 1 + k tokens where k counts consecutive drafted positions accepted with
probability p (p per agent role from the MockProfile), capped at block_size - 1. KV accounting is
real: a request reserves prompt + max_tokens tokens at admission and `NoCapacity` is raised when
the pool cannot hold that; the reservation is released when the request ends.

Step costs: a target pass sleeps ``step_ms`` (AR) or ``step_ms x (1 + block / 32)`` (speculative), whatever the
batch. ``stats().step_costs`` reports that model as the table a calibrating real engine measures
(workers/engine/calibrate.py: AR and blocks 4 / 8 / 16 at batches 1 / 4 / 16 within max_num_seqs, plus the
drafter's own block), so routing over mock replicas takes the same measured-cost path as over real ones.
"""
from __future__ import annotations

import asyncio
import hashlib
import random
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from orchestrator.config import MockProfile
from workers.engine.acceptance import AcceptEntry, observe, tau_at_ref
from workers.engine.calibrate import DEFAULT_BATCHES, DEFAULT_BLOCKS, StepCosts
from workers.engine.params import (
    EngineError,
    EngineStats,
    InvalidRequest,
    NoCapacity,
    RequestOutput,
    SamplingParams,
    SpecParams,
)

_CORPUS = (
    "The quick brown fox jumps over the lazy dog. Speculative decoding drafts a block of tokens "
    "and the target model verifies them in one pass. A longer accepted prefix means fewer passes "
    "and more tokens per second. Agents in a team share a style, so their acceptance is similar. "
)
_EWMA = 0.2


class ByteTokenizer:
    """A tiny HF-like tokenizer: token id = byte value + 3; ids 0/1/2 are pad / bos / eos."""

    pad_token_id, bos_token_id, eos_token_id = 0, 1, 2
    vocab_size = 259
    chat_template = "byte-chat"

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        ids = [b + 3 for b in text.encode("utf-8")]
        return [self.bos_token_id, *ids] if add_special_tokens else ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        data = bytes(i - 3 for i in ids if 3 <= i < 259)
        return data.decode("utf-8", errors="replace")

    def apply_chat_template(self, messages, tokenize: bool = False, add_generation_prompt: bool = True, **_):
        text = "".join(f"<{m['role']}>{m.get('content') or ''}\n" for m in messages)
        if add_generation_prompt:
            text += "<assistant>"
        return self.encode(text) if tokenize else text


@dataclass
class _Request:
    request_id: str
    prompt_len: int
    sampling: SamplingParams
    spec: SpecParams
    tags: dict[str, str]
    reserved: int
    aborted: bool = False
    rng: random.Random = field(default_factory=random.Random)


class MockEngine:
    """Async engine surface (generate / abort / stats / check_health / shutdown) without torch."""

    def __init__(
        self,
        profile: MockProfile | None = None,
        *,
        block_size: int = 16,
        max_num_seqs: int = 16,
        speculative: bool = True,
    ):
        self.profile = profile or MockProfile()
        self.tokenizer = ByteTokenizer()
        self.max_model_len = self.profile.max_model_len
        self.eos_token_ids = [ByteTokenizer.eos_token_id]
        self.block_size = block_size
        self.speculative = speculative
        self.max_num_seqs = max_num_seqs
        self._slots = asyncio.Semaphore(max_num_seqs)
        self._requests: dict[str, _Request] = {}
        self._kv_used = 0
        self._waiting = 0
        self._tau: dict[str, dict[str, AcceptEntry]] = {}
        self._accept_all: AcceptEntry | None = None
        self._step_ms: dict[int, float] = {}
        self._step_ms_ar: float | None = None
        self._accept_pos = [0.0] * (block_size - 1)
        self._accept_n = 0
        self._tokens = 0
        self._passes = 0
        self._wedged = False
        self._admitted = 0
        self._closed = False
        self._last_progress = time.monotonic()
        self._step_costs = self.step_costs()

    # ---- fault injection (tests) ----
    def wedge(self) -> None:
        """Make the step loop hang: streams stop progressing and check_health() fails."""
        self._wedged = True

    # ---- admission ----
    def _admit(self, request_id, prompt_token_ids, sampling, spec, tags) -> _Request:
        if self._closed:
            raise EngineError("engine is shut down")
        if request_id in self._requests:
            raise InvalidRequest(f"request id {request_id!r} is already running")
        sampling.validate()
        if sampling.structured is not None:  # its corpus text cannot follow a grammar: say so, never fake it
            raise InvalidRequest("structured outputs (response_format json, tool calls) need a real engine; the mock "
                                 "engine has no grammar-constrained decoding", param=sampling.structured.param)
        spec = spec or SpecParams(enabled=self.speculative, block_size=self.block_size)
        if spec.enabled:
            spec.validate(self.block_size)
        n = len(prompt_token_ids)
        if n == 0:
            raise InvalidRequest("the prompt is empty")
        if n + sampling.max_tokens > self.max_model_len:
            raise InvalidRequest(
                f"prompt ({n} tokens) + max_tokens ({sampling.max_tokens}) exceeds the model's "
                f"context of {self.max_model_len} tokens"
            )
        need = n + sampling.max_tokens
        if self._kv_used + need > self.profile.kv_total_tokens:
            free = self.profile.kv_total_tokens - self._kv_used
            raise NoCapacity(f"KV cache full: the request needs {need} tokens, {free} free")
        self._kv_used += need
        digest = hashlib.sha256(bytes(str(prompt_token_ids[-64:]), "ascii")).digest()
        seed = int.from_bytes(digest[:8], "little") ^ ((sampling.seed or 0) if not sampling.greedy else 0)
        req = _Request(request_id, n, sampling, spec, dict(tags or {}), need, rng=random.Random(seed))
        self._requests[request_id] = req
        self._admitted += 1
        if self.profile.wedge_after_requests is not None and self._admitted > self.profile.wedge_after_requests:
            self.wedge()
        return req

    def _acceptance(self, tags: dict[str, str]) -> float:
        role = tags.get("role")
        return self.profile.acceptance_by_role.get(role, self.profile.acceptance) if role else self.profile.acceptance

    # ---- generation ----
    async def generate(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        sampling: SamplingParams,
        spec: SpecParams | None = None,
        tags: dict[str, str] | None = None,
    ) -> AsyncIterator[RequestOutput]:
        req = self._admit(request_id, list(prompt_token_ids), sampling, spec, tags)
        try:
            self._waiting += 1
            try:
                await self._slots.acquire()
            finally:
                self._waiting -= 1
            try:
                async for out in self._run(req):
                    yield out
            finally:
                self._slots.release()
        finally:
            self._requests.pop(request_id, None)
            self._kv_used -= req.reserved

    async def _run(self, req: _Request) -> AsyncIterator[RequestOutput]:
        offset = req.rng.randrange(len(_CORPUS))
        produced: list[int] = []
        text, emitted = "", 0  # all generated text; how much of it was sent
        p = self._acceptance(req.tags)
        block = req.spec.block_size if req.spec.enabled else 1
        while True:
            while self._wedged and not req.aborted:
                await asyncio.sleep(0.05)
            if req.aborted:
                yield RequestOutput(req.request_id, [], finished=True, finish_reason="abort")
                return
            k = 0
            while req.spec.enabled and k < block - 1 and req.rng.random() < p:
                k += 1
            step_ms = self.step_ms(block if req.spec.enabled else None)
            await asyncio.sleep(step_ms / 1000.0)
            n_new = min(1 + k, req.sampling.max_tokens - len(produced))
            new = [ord(_CORPUS[(offset + len(produced) + i) % len(_CORPUS)]) + 3 for i in range(n_new)]
            fail_at = self.profile.fail_after_tokens
            if fail_at is not None and len(produced) + n_new >= fail_at:
                yield RequestOutput(req.request_id, [], finished=True, finish_reason="error",
                                    error="mock engine fault injected (fail_after_tokens)")
                return
            produced += new
            self._record(req, k if req.spec.enabled else None, step_ms, block)
            text += self.tokenizer.decode(new)
            finish = None
            cuts = [c for c in (text.find(stop) for stop in req.sampling.stop if stop) if c != -1]
            if cuts:  # the earliest stop string ends the text before it
                end, finish = min(cuts), "stop"
            elif len(produced) >= req.sampling.max_tokens:
                end, finish = len(text), "length"
            else:  # hold back a tail that may begin a stop string: sent once the next tokens rule it out
                end = len(text) - _stop_prefix(text, req.sampling.stop)
            delta, emitted = text[emitted:end], max(emitted, end)
            yield RequestOutput(req.request_id, new, text=delta, finished=finish is not None,
                                finish_reason=finish, committed=[n_new])
            if finish:
                return

    def step_ms(self, block: int | None) -> float:
        """One target pass: AR (block None) or speculative at ``block``; the same at every batch."""
        return self.profile.step_ms * ((1.0 + block / 32.0) if block else 1.0)

    def step_costs(self) -> dict | None:
        """``step_ms`` as the table a calibrating engine reports (EngineStats.step_costs); None where a pass
        takes no time (``step_ms`` 0: nothing to measure)."""
        if self.profile.step_ms <= 0:
            return None
        batches = [b for b in DEFAULT_BATCHES if b <= self.max_num_seqs] or [self.max_num_seqs]
        blocks = sorted({k for k in DEFAULT_BLOCKS if 2 <= k <= self.block_size} | {self.block_size}) \
            if self.speculative and self.block_size >= 2 else []
        return StepCosts(ar_ms={b: self.step_ms(None) for b in batches},
                         spec_ms={k: {b: self.step_ms(k) for b in batches} for k in blocks}).to_dict()

    def _record(self, req: _Request, k: int | None, step_ms: float, block: int) -> None:
        self._last_progress = time.monotonic()
        self._passes += 1
        self._tokens += 1 + (k or 0)
        if k is None:
            self._step_ms_ar = _ewma(self._step_ms_ar, step_ms)
            return
        self._step_ms[block] = _ewma(self._step_ms.get(block), step_ms)
        # acceptance as per-position counts, whatever block this pass ran at; reported at block_size (stats())
        self._accept_all = observe(self._accept_all, block - 1, k, _EWMA)
        for key in ("session", "role", "team"):
            value = req.tags.get(key)
            if value:
                table = self._tau.setdefault(key, {})
                table[value] = observe(table.get(value), block - 1, k, _EWMA)
        self._accept_n += 1
        for i in range(len(self._accept_pos)):
            hit = 1.0 if i < k else 0.0
            self._accept_pos[i] += (hit - self._accept_pos[i]) / self._accept_n

    async def abort(self, request_id: str) -> None:
        req = self._requests.get(request_id)
        if req is not None:
            req.aborted = True

    def stats(self) -> EngineStats:
        total = self.profile.kv_total_tokens
        return EngineStats(
            kv_free_tokens=total - self._kv_used,
            kv_total_tokens=total,
            num_running=len(self._requests) - self._waiting,
            num_waiting=self._waiting,
            step_ms_ar=self._step_ms_ar if self._step_ms_ar is not None else self.profile.step_ms,
            step_ms_by_block=dict(self._step_ms),
            tau_by_tag={k: {v: (tau_at_ref(e, self.block_size), e[2]) for v, e in t.items()}
                        for k, t in self._tau.items()},
            tau_mean=tau_at_ref(self._accept_all, self.block_size) if self._accept_all else None,
            tau_block=self.block_size,
            accept_by_position=list(self._accept_pos) if self._accept_n else [],
            tokens_generated=self._tokens,
            target_passes=self._passes,
            step_costs=self._step_costs,
        )

    def telemetry(self) -> dict:
        total = self.profile.vram_total_bytes
        if not total:
            return {"gpus": []}
        used = int(total * 0.5 + (total * 0.4) * self._kv_used / max(1, self.profile.kv_total_tokens))
        return {"gpus": [{"index": 0, "name": "mock", "used_bytes": used, "free_bytes": total - used,
                          "total_bytes": total}]}

    def check_health(self) -> None:
        if self._closed:
            raise RuntimeError("engine is shut down")
        if self._wedged:
            raise RuntimeError(f"engine wedged: no progress for {time.monotonic() - self._last_progress:.1f} s")

    async def shutdown(self) -> None:
        self._closed = True
        for req in list(self._requests.values()):
            req.aborted = True


def _stop_prefix(text: str, stops) -> int:
    """Length of the longest tail of ``text`` that is a proper prefix of a stop string (0 if none)."""
    best = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:k]):
                best = k
                break
    return best


def _ewma(old: float | None, new: float) -> float:
    return new if old is None else (1 - _EWMA) * old + _EWMA * new


@dataclass
class MockEngineRecipe:
    """What a TP rank actor needs to run the mock engine (cluster/rank_worker.py builds it on rank 0; the
    other ranks only hold their GPU bundle): a replica of tp > 1 with engine: mock keeps the real rank-actor
    placement path while staying torch-free. Every rank reports one GPU of `profile.vram_total_bytes`
    (none when 0) under its logical GPU index."""

    profile: MockProfile
    block_size: int = 16
    max_num_seqs: int = 16
    speculative: bool = True

    def build(self) -> MockEngine:
        return MockEngine(self.profile, block_size=self.block_size, max_num_seqs=self.max_num_seqs,
                          speculative=self.speculative)

    def gpu_telemetry(self, gpu_index: int | None, engine: MockEngine | None) -> list[dict]:
        total = self.profile.vram_total_bytes
        if not total or gpu_index is None:
            return []
        gpus = engine.telemetry()["gpus"] if engine is not None else []
        used = gpus[0]["used_bytes"] if gpus else total // 2
        return [{"index": gpu_index, "name": "mock", "used_bytes": used, "free_bytes": total - used,
                 "total_bytes": total}]
