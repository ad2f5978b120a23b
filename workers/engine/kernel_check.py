"""Start-up self-check of the CPU kernels on the engine's own weights and dtype, against the torch path.

The CPU kernels (workers/kernels/cpu.py) run every decode / verify step of a CPU engine. Their unit tests use
tiny fp32 models; a bug that only shows on a real model's shapes or dtype (a bf16 RoPE table read as fp32 made
every bf16 step decode garbage while every fp32 test passed) would otherwise go unnoticed until someone reads the
output. So a CPU engine, before it serves anything, runs a few teacher-forced rows both ways, through the kernels
and with them suspended (the torch path, always correct), on two sequences in its own KV blocks:

  * the prompts are prefilled once, through the torch path (the K/V both ways read);
  * one step, both ways: sequence A verifies a block of ``VERIFY`` tokens, sequence B decodes one (B's block table
    is reversed, so the scattered-cache path is read too): the target's logits on every row are compared;
  * the drafter (when it attends through the kernel): one block proposal per sequence over the context written
    from the prompts' features, through the kernel layout and through the gather + mask path.

A part passes when the greedy token of the kernel rows (through the argmax kernel) agrees with the torch rows' on
at least ``MIN_AGREE`` of the rows (a bf16 exact tie counts as agreeing, ``TIE``) and the worst row's relative
error ``|kernel - torch| / |torch|`` (L2 over the vocabulary) is within the dtype's ``TOLERANCE``. Otherwise the
engine logs what diverged and turns the kernels off for the process (``cpu_kernels.disable``: the torch path
serves, slower and correct); ``EngineStats.kernel_check`` reports the result either way. Nothing is left behind:
the KV blocks are freed, the check runs its own eager runner and no engine step (nothing counts as traffic).

Measured 2026-12-03 on the 2-core Zen 5 dev box (AVX512-BF16), load average 3.3 (another job on both cores), one
torch thread under nice -n 19: ``LLMEngine(EngineConfig(model=<smollm2-135m-instruct>, device="cpu",
dtype="bfloat16")).kernel_check``. Healthy kernels on SmolLM2-135M: worst relative error 0.075 in bf16 (16 of 17
rows exactly the same greedy token, the other an exact bf16 tie), 2.7e-6 in fp32; on the tiny head_dim-64 test
models about 0.01 in bf16 and 7e-7 in fp32. Broken ones on SmolLM2 bf16: the incident (the bf16 table read as
fp32) 1.5 with 24 % agreement, RoPE without rotation 2.8, RMSNorm without its weight 2.8, RMSNorm 5 % high 0.36.
(A random 4-layer model barely depends on positions: the incident gives it only 0.024, caught in fp32 but under
the bf16 tolerance, which is set for real models.) The check took 136 ms at start-up, 100-105 ms repeated, in
bf16 (290 ms in fp32); more threads on this loaded box were slower (time it again on a quiet machine).
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field

import torch

from workers.engine.runner import ModelRunner, SeqSlice, build_draft_inputs, build_step_inputs
from workers.kernels import cpu as cpu_kernels

log = logging.getLogger(__name__)

# worst row's relative L2 error of the logits, kernels vs torch (healthy: see "Measured" above)
TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 0.2}
MIN_AGREE = 0.75  # fraction of rows whose greedy token must agree
TIE = {torch.float32: 1e-4, torch.bfloat16: 1e-2}  # a logit this close (relative to the row's max) to it ties
TEXT = ("The quick brown fox jumps over the lazy dog. Paris is the capital of France, and Berlin is the "
        "capital of Germany. def add(a, b):\n    return a + b\n")
PROMPT_A, PROMPT_B_MAX, VERIFY = 8, 40, 16  # tokens
DRAFT_A, DRAFT_B = 8, 4  # drafter blocks (anchor + drafts), capped at the drafter's block size
_SEQ_IDS = ("__kernel_check_a__", "__kernel_check_b__")


@dataclass
class PartCheck:
    """One compared forward: ``rows`` logits rows through the kernels vs the torch path."""

    name: str  # "target" | "drafter"
    rows: int
    agree: float  # fraction of rows whose greedy token is the torch row's (or ties with it)
    exact: float  # fraction of rows whose greedy token is the torch row's argmax
    rel_err: float  # worst row's |kernel - torch| / |torch| (L2 over the vocabulary); inf if any is not finite
    tolerance: float
    min_agree: float
    error: str | None = None  # the kernel path raised this

    @property
    def ok(self) -> bool:
        return self.error is None and self.agree >= self.min_agree and self.rel_err <= self.tolerance

    def failure(self) -> str | None:
        if self.ok:
            return None
        if self.error is not None:
            return f"{self.name}: the kernel path raised {self.error}"
        return (f"{self.name}: greedy token agrees on {self.agree:.0%} of {self.rows} rows (need "
                f"{self.min_agree:.0%}), worst relative logits error {self.rel_err:.3g} (tolerance {self.tolerance:g})")


@dataclass
class KernelCheck:
    """What the self-check found: ``ok`` and one part per compared forward, or ``skipped`` (why it did not run;
    ``ok`` None)."""

    ok: bool | None
    skipped: str | None = None
    dtype: str | None = None
    parts: list[PartCheck] = field(default_factory=list)
    ms: float = 0.0
    kernels_on: bool = True  # after the check: False when it turned them off (or they were off already)

    @property
    def failures(self) -> list[str]:
        return [f for f in (p.failure() for p in self.parts) if f is not None]

    def to_dict(self) -> dict:
        """JSON-safe (EngineStats.kernel_check)."""
        d = asdict(self)
        for part in d["parts"]:  # JSON has no inf
            part["rel_err"] = part["rel_err"] if math.isfinite(part["rel_err"]) else None
        d["failures"] = self.failures
        return d


def compare(name: str, fast: torch.Tensor, plain: torch.Tensor, dtype: torch.dtype) -> PartCheck:
    """Logits rows [..., V] through the kernels (``fast``) and the torch path (``plain``) -> PartCheck. The fast
    rows' greedy tokens come from the argmax kernel (what serving uses). A row agrees when that token is the torch
    row's argmax or ties with it within ``TIE`` of the row's largest logit (bf16 logits tie exactly)."""
    fast_rows = fast.reshape(-1, fast.shape[-1])
    plain_rows = plain.reshape(-1, plain.shape[-1]).float()
    top_fast = cpu_kernels.argmax(fast_rows)
    best = plain_rows.max(-1).values
    at_fast = plain_rows.gather(-1, top_fast[:, None])[:, 0]
    tie = TIE.get(dtype, TIE[torch.float32])
    agree = (best - at_fast <= tie * best.abs()).float().mean().item()
    exact = (top_fast == plain_rows.argmax(-1)).float().mean().item()
    diff = (fast_rows.float() - plain_rows).norm(dim=-1) / plain_rows.norm(dim=-1).clamp_min(1e-6)
    rel = diff.max().item() if torch.isfinite(diff).all() else math.inf
    return PartCheck(name, fast_rows.shape[0], agree, exact, rel, TOLERANCE.get(dtype, TOLERANCE[torch.float32]),
                     MIN_AGREE)


def both_ways(name: str, run, dtype: torch.dtype, pick=lambda x: x) -> PartCheck:
    """``run(kernel)`` -> logits, first with the kernels suspended (the reference), then through them -> the
    comparison of ``pick`` of each. A kernel path that raises fails the part (the torch path serves instead)."""
    with cpu_kernels.suspended():
        plain = run(False)
    try:
        fast = run(True)
    except Exception as exc:  # noqa: BLE001 - any failure of the kernel path is a failed check, not a dead engine
        return PartCheck(name, 0, 0.0, 0.0, math.inf, TOLERANCE.get(dtype, TOLERANCE[torch.float32]), MIN_AGREE,
                         error=f"{type(exc).__name__}: {exc}")
    return compare(name, pick(fast), pick(plain), dtype)


def _ids(engine, n_a: int, n_b: int, n_cont: int) -> tuple[list[int], list[int], list[int], int]:
    """-> (prompt A, prompt B, A's verify block, B's decode token): a fixed text through the tokenizer when it
    gives enough distinct ids, else fixed ids spread over the vocabulary."""
    vocab = engine.model_config.vocab_size
    need = n_a + n_b + n_cont + 1
    ids: list[int] = []
    tok = engine.tokenizer
    if tok is not None:
        try:
            ids = list(tok.encode(TEXT * 2, add_special_tokens=False))
        except Exception:  # a tokenizer that cannot take plain text: the fixed ids below
            ids = []
    if len(ids) < need or len(set(ids[:need])) < need // 2 or not all(0 <= t < vocab for t in ids[:need]):
        ids = [(7 * i + 11) % vocab for i in range(need)]
    a, b = ids[:n_a], ids[n_a: n_a + n_b]
    cont = ids[n_a + n_b: n_a + n_b + n_cont]
    return a, b, cont, ids[need - 1]


def _skip_reason(engine) -> str | None:
    if engine.device.type != "cpu":
        return f"device {engine.device.type}: no CPU kernels"
    if cpu_kernels.disabled_reason() is not None:
        return f"CPU kernels already off in this process: {cpu_kernels.disabled_reason()}"
    if not cpu_kernels.available():
        return "CPU kernels unavailable"
    if engine.dtype not in (torch.float32, torch.bfloat16):
        return f"dtype {engine.dtype}: no CPU kernels"
    if any(getattr(layer, "all_reduce", None) is not None for layer in engine.model.model.layers):
        return "tensor parallel: follower ranks are not checked from rank 0"
    return None


def _prefill(runner: ModelRunner, seqs, bs: int, device, capture: bool):
    """Both prompts through the torch path (their K/V: what both ways of step 2 read) -> step 1's features or None."""
    step1 = [SeqSlice(p, 0, t, []) for p, _, t in seqs]
    with cpu_kernels.suspended():
        return runner.run_target(build_step_inputs(step1, bs, device, capture))[1]


def _step2(runner: ModelRunner, seqs, bs: int, device) -> torch.Tensor:
    """A's verify block and B's decode token (every row's logits) -> [R, V]; writes their K/V."""
    step2 = [SeqSlice(c, len(p), t, list(range(len(c)))) for p, c, t in seqs]
    return runner.run_target(build_step_inputs(step2, bs, device, False))[0]


def _drafter_part(engine, runner: ModelRunner, seqs, feats, bs: int, anchors: list[int]) -> PartCheck | None:
    proposer = engine.proposer
    if engine.drafter is None or not getattr(proposer, "use_kernel", False) or feats is None:
        return None
    blocks = [min(DRAFT_A, engine.max_block), min(DRAFT_B, engine.max_block)]
    if min(blocks) < 2:
        return None
    rows, positions, slots, row = [], [], [], 0
    for p, _, table in seqs:  # the prompts' features -> the drafter's context K/V
        for pos in range(len(p)):
            rows.append(row + pos)
            positions.append(pos)
            slots.append(table[pos // bs] * bs + pos % bs)
        row += len(p)
    runner.write_context(feats, rows, positions, slots)
    args = dict(anchors=anchors, ctx_lens=[len(p) for p, _, _ in seqs], blocks=blocks,
                tables=[t for _, _, t in seqs], mask_token_id=engine.drafter.config.mask_token_id, block_size=bs,
                device=engine.device)
    real_rows = lambda x: torch.cat([x[i, : n - 1] for i, n in enumerate(blocks)])  # noqa: E731 (past a block's
    # length: padding on both paths)
    return both_ways("drafter", lambda kernel: runner.propose_logits(build_draft_inputs(**args, kernel=kernel)),
                     engine.dtype, pick=real_rows)


def run_check(engine) -> KernelCheck:
    """Run the comparison on ``engine`` (idle; before it serves). Does not change the kernels' state."""
    reason = _skip_reason(engine)
    if reason is not None:
        return KernelCheck(ok=None, skipped=reason, kernels_on=cpu_kernels.available())
    t0 = time.perf_counter()
    bs, blocks = engine.blocks.block_size, engine.blocks
    n_b = min(PROMPT_B_MAX, bs + 2)  # two blocks or more: the reversed table is not one run
    draft = min(max(DRAFT_A, DRAFT_B), engine.max_block) if engine.drafter is not None else 0
    lengths = [max(PROMPT_A + VERIFY, PROMPT_A + draft), max(n_b + 1, n_b + draft)]
    if max(lengths) > engine.max_model_len:
        return KernelCheck(ok=None, skipped=f"context of {engine.max_model_len} tokens too short for the check")
    a, b, cont, decode = _ids(engine, PROMPT_A, n_b, VERIFY)
    try:
        for sid, n in zip(_SEQ_IDS, lengths):
            blocks.reserve(sid, n)
            blocks.ensure(sid, n)
    except MemoryError as exc:
        for sid in _SEQ_IDS:
            blocks.free(sid)
        return KernelCheck(ok=None, skipped=f"KV pool too small for the check ({exc})")
    try:
        runner = ModelRunner(engine.model, engine.drafter, engine.pool, bs, engine.device)
        seqs = [(a, cont, list(blocks.table(_SEQ_IDS[0]))), (b, [decode], list(reversed(blocks.table(_SEQ_IDS[1]))))]
        feats = _prefill(runner, seqs, bs, engine.device, bool(runner.capture_layers))
        # the second way rewrites the same K/V slots
        parts = [both_ways("target", lambda kernel: _step2(runner, seqs, bs, engine.device), engine.dtype)]
        drafter = _drafter_part(engine, runner, seqs, feats, bs, anchors=[cont[0], decode])
        if drafter is not None:
            parts.append(drafter)
    finally:
        for sid in _SEQ_IDS:
            blocks.free(sid)
    ms = (time.perf_counter() - t0) * 1e3
    return KernelCheck(ok=all(p.ok for p in parts), dtype=str(engine.dtype).removeprefix("torch."), parts=parts,
                       ms=ms)


def self_check(engine) -> KernelCheck:
    """``run_check``, then on disagreement log what diverged and turn the kernels off for this process. A check that
    cannot run (an error outside the kernel path) is logged and reported as skipped: it never stops the engine."""
    try:
        result = run_check(engine)
    except Exception as exc:  # noqa: BLE001
        log.warning("CPU kernel self-check could not run: %s: %s", type(exc).__name__, exc, exc_info=True)
        return KernelCheck(ok=None, skipped=f"the check could not run: {type(exc).__name__}: {exc}",
                           kernels_on=cpu_kernels.available())
    if result.skipped is not None:
        log.info("CPU kernel self-check skipped: %s", result.skipped)
        return result
    if result.ok:
        log.info("CPU kernel self-check passed (%s, %.0f ms): %s", result.dtype, result.ms,
                 "; ".join(f"{p.name} agree {p.agree:.0%} err {p.rel_err:.2g}" for p in result.parts))
        return result
    why = "; ".join(result.failures)
    log.error("CPU kernels disagree with the torch path on this model (%s): %s. Kernels are OFF for this process "
              "(the torch path serves; slower, correct)", result.dtype, why)
    cpu_kernels.disable(f"start-up self-check failed ({result.dtype}): {why}")
    result.kernels_on = False
    return result
