"""The engine: add_request / step / abort over scheduler -> step (proposer -> runner -> verifier) -> KV commit.

One ``step()``: schedule; run the step (workers/engine/step.py: the proposer drafts a block for every
speculative sequence, one target forward over the flat batch, sample / verify, the proposer records the
committed tokens); roll the KV back past the rejected drafts; count acceptance (once, here); detokenize and
apply stop conditions. ``AsyncLLMEngine`` (workers/engine/async_engine.py) runs this loop off the event loop.
The engine builds its parts and hands each its dependencies: nothing holds a reference to the engine.
"""
from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import torch

from workers.engine.config import EngineConfig
from workers.engine.detokenize import IncrementalDetokenizer
from workers.engine.kv_cache import BlockManager, KVPool, blocks_for, kv_bytes_per_block, pool_budget_bytes
from workers.engine.params import (EngineStats, InvalidRequest, NoCapacity, RequestOutput, SamplingParams,
                                   SpecParams)
from workers.engine.runner import ModelRunner
from workers.engine.scheduler import ScheduledSeq, Scheduler, Sequence
from workers.engine.stats import StatsTracker, pure_step
from workers.engine.step import SeqResult, StepExecutor
from workers.models.loader import load_model, resolve_device, resolve_dtype
from workers.models.packed import can_pack, pack_for_cpu
from workers.speculative.proposer import Proposer, ProposerContext, build_proposer


def _eos_ids(model_cfg, tokenizer, model_path: str) -> list[int]:
    ids = set(model_cfg.eos_token_ids)
    if tokenizer is not None and getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(int(tokenizer.eos_token_id))
    gen = Path(model_path) / "generation_config.json" if model_path else None
    if gen is not None and gen.is_file():
        eos = json.loads(gen.read_text()).get("eos_token_id")
        ids.update([eos] if isinstance(eos, int) else (eos or []))
    return sorted(ids)


class LLMEngine:
    def __init__(self, cfg: EngineConfig, model=None, drafter=None, tokenizer=None):
        """Loads ``cfg.model`` and the proposer's network (``cfg.drafter``) unless already-built modules are
        passed (tests, TP ranks): ``drafter`` is the network of the proposer ``cfg.proposer`` names."""
        self.config = cfg
        self.device = resolve_device(cfg.device)
        # a model passed in (tests, TP ranks) keeps its own dtype under "auto"
        self.dtype = (next(model.parameters()).dtype if model is not None and cfg.dtype == "auto"
                      else resolve_dtype(cfg.dtype, self.device))
        if model is None:
            loaded = load_model(cfg.model, self.dtype, str(self.device))
            model, tokenizer = loaded.model, loaded.tokenizer
        self.model = model
        self.model_config = mc = model.config
        self.tokenizer = tokenizer
        self.proposer: Proposer | None = build_proposer(ProposerContext(cfg, model, self.dtype, self.device, drafter))
        drafter = self.drafter
        if cfg.cpu_packed_weights and can_pack(self.dtype, self.device):
            pack_for_cpu(model)
            if drafter is not None:
                pack_for_cpu(drafter)
        self.max_model_len = cfg.max_model_len or mc.max_position_embeddings
        if not 1 < self.max_model_len <= mc.max_position_embeddings:
            raise ValueError(f"max_model_len {self.max_model_len} must be in (1, {mc.max_position_embeddings}]")
        if cfg.max_num_seqs < 1 or cfg.max_num_batched_tokens < 1:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be >= 1")
        self.eos_token_ids = _eos_ids(mc, tokenizer, cfg.model)
        self.max_block = self.proposer.max_block if self.proposer is not None else 1
        bs = cfg.kv_block_size
        draft_layers = self.proposer.kv_layers if self.proposer is not None else []
        target_layers = [(layer.self_attn.num_kv_heads, layer.self_attn.head_dim) for layer in model.model.layers]
        per_block = kv_bytes_per_block(bs, target_layers + draft_layers, torch.empty((), dtype=self.dtype).element_size())
        budget = pool_budget_bytes(self.device, cfg.kv_cache_bytes, cfg.gpu_memory_utilization)
        useful = cfg.max_num_seqs * blocks_for(self.max_model_len + bs, bs)
        num_blocks = min(budget // per_block, useful)
        if num_blocks < 1:
            raise ValueError(f"KV budget of {budget} bytes holds no {bs}-token block ({per_block} bytes each)")
        self.blocks = BlockManager(num_blocks, bs)
        self.pool = KVPool(num_blocks, bs, target_layers, draft_layers, self.dtype, self.device)
        self.scheduler = Scheduler(self.blocks, cfg.max_num_seqs, cfg.max_num_batched_tokens,
                                   draft_slack=bs if self.proposer is not None else 0)
        self.tracker = self._new_tracker()
        self.generator = torch.Generator(device=self.device).manual_seed(cfg.seed)
        self.set_runner(ModelRunner(model, drafter, self.pool, bs, self.device))
        if cfg.cuda_graphs:
            self.use_graphs(warmup=self.device.type == "cuda")
        self._detok: dict[str, IncrementalDetokenizer] = {}
        self._generators: dict[str, torch.Generator] = {}
        self._pending: list[RequestOutput] = []
        self._structured = None  # workers/structured/decoding.py, built on the first constrained request
        self._structured_lock = threading.Lock()
        self.kernel_check: dict | None = None
        if cfg.check_cpu_kernels:  # before calibration: a failed check turns the kernels off, and times change
            from workers.engine.kernel_check import self_check

            self.kernel_check = self_check(self).to_dict()
        self.step_costs: dict | None = None
        if cfg.calibrate_step_costs:
            self.calibrate()

    def calibrate(self) -> dict:
        """Measure this engine's step costs (it must be idle), keep them for ``stats()``, start the stats afresh."""
        from workers.engine.calibrate import measure_step_costs

        self.step_costs = measure_step_costs(self).to_dict()
        self.tracker = self._new_tracker()  # calibration steps are not traffic
        return self.step_costs

    @property
    def drafter(self):
        """The proposer's network (the DFlash drafter), run by the model runner; None without one."""
        return self.proposer.network if self.proposer is not None else None

    # ---- the model runner: eager, or static-buffer graphs ----
    def set_runner(self, runner: ModelRunner) -> None:
        """Run the model through ``runner`` from the next step on (same model, proposer network and KV pool)."""
        self.runner = runner
        self.executor = StepExecutor(runner, self.blocks, self.proposer, self.generator_for, self.device,
                                     grammar=lambda: getattr(self, "_structured", None))

    def use_graphs(self, mode: str = "auto", fuse: bool = True, compile: bool = False, warmup: bool = False):
        """Switch to a GraphRunner (workers/engine/graph_runner.py) over the current runner's model and pool."""
        from workers.engine.graph_runner import graph_runner_over

        self.set_runner(graph_runner_over(self.runner, self.blocks, self.config.max_num_seqs, self.max_model_len,
                                          mode=mode, fuse=fuse, compile=compile, warmup=warmup))
        return self.runner

    def _new_tracker(self) -> StatsTracker:
        """Acceptance reported at the default block (what the replica calls block_size_default)."""
        return StatsTracker(max_block=max(self.max_block, 2), ref_block=self.default_spec().block_size)

    # ---- requests ----
    def default_spec(self) -> SpecParams:
        return SpecParams(enabled=self.proposer is not None,
                          block_size=max(2, min(self.config.spec_block_size, self.max_block)))

    def validate_request(self, request_id, prompt_token_ids, sampling: SamplingParams,
                         spec: SpecParams | None) -> tuple[list[int], SpecParams]:
        if not isinstance(request_id, str) or not request_id:
            raise InvalidRequest("request_id must be a non-empty string")
        if request_id in self.scheduler.by_id:
            raise InvalidRequest(f"request id {request_id!r} is already running")
        if not isinstance(sampling, SamplingParams):
            raise InvalidRequest("sampling must be a SamplingParams")
        sampling.validate()
        try:
            ids = [int(t) for t in prompt_token_ids]
        except (TypeError, ValueError):
            raise InvalidRequest("prompt_token_ids must be a list of integers") from None
        if not ids:
            raise InvalidRequest("the prompt is empty")
        vocab = self.model_config.vocab_size
        if min(ids) < 0 or max(ids) >= vocab:
            raise InvalidRequest(f"prompt token ids must be in [0, {vocab})")
        if len(ids) >= self.max_model_len:
            raise InvalidRequest(f"prompt of {len(ids)} tokens does not fit the context of {self.max_model_len}")
        if len(ids) + sampling.max_tokens > self.max_model_len:
            raise InvalidRequest(
                f"prompt ({len(ids)}) + max_tokens ({sampling.max_tokens}) exceeds the context of "
                f"{self.max_model_len} tokens; at most {self.max_model_len - len(ids)} new tokens fit")
        if sampling.stop and self.tokenizer is None:
            raise InvalidRequest("stop strings need a tokenizer; this model has none")
        spec = self.default_spec() if spec is None else spec
        if not isinstance(spec, SpecParams):
            raise InvalidRequest("spec must be a SpecParams")
        if spec.enabled and self.proposer is not None:
            spec.validate(self.max_block)
        return ids, spec

    def add_request(self, request_id: str, prompt_token_ids: list[int], sampling: SamplingParams,
                    spec: SpecParams | None = None, tags: dict[str, Any] | None = None) -> None:
        """Validate and admit; raises InvalidRequest / NoCapacity before any work."""
        ids, spec = self.validate_request(request_id, prompt_token_ids, sampling, spec)
        block = spec.block_size if (spec.enabled and self.proposer is not None) else 1
        tags = {str(k): str(v) for k, v in (tags or {}).items()}
        if sampling.structured is not None:  # acceptance of constrained turns, per kind and per session
            tags["constrained"] = sampling.structured.kind
            if "session" in tags:
                tags["constrained_session"] = tags["session"]
        seq = Sequence(request_id, ids, sampling, block, tags)
        need = self.scheduler.worst_case_tokens(seq)
        if blocks_for(need, self.blocks.block_size) > self.blocks.num_blocks:
            raise InvalidRequest(f"request needs {need} KV tokens; the whole pool holds {self.blocks.total_tokens}")
        if not self.blocks.can_reserve(need):
            raise NoCapacity(f"KV pool full: request needs {need} tokens, {self.blocks.free_tokens} free")
        if sampling.structured is not None:
            self.structured_for(sampling.structured).add(request_id, sampling.structured)  # InvalidRequest
        self.scheduler.add(seq)
        self._detok[request_id] = IncrementalDetokenizer(self.tokenizer, ids, tuple(sampling.stop))
        if sampling.seed is not None:
            self._generators[request_id] = torch.Generator(device=self.device).manual_seed(sampling.seed)

    @property
    def structured_decoder(self):
        """The grammar decoder, or None while no constrained request has come (the step hook's input)."""
        return self._structured

    def structured_for(self, spec):
        """The grammar decoder (built once: the tokenizer's vocabulary for xgrammar, ~0.2 s); InvalidRequest
        without a tokenizer."""
        with self._structured_lock:  # the async engine compiles from a worker thread too
            if self._structured is None:
                from workers.structured.decoding import build_decoder, require

                self._structured = require(build_decoder(self.tokenizer, self.model_config.vocab_size,
                                                         self.eos_token_ids), spec)
        return self._structured

    def generator_for(self, request_id: str) -> torch.Generator:
        return self._generators.get(request_id, self.generator)

    def abort(self, request_id: str) -> None:
        seq = self.scheduler.by_id.get(request_id)
        if seq is None:
            return
        self._finish(seq)
        detok = self._detok.pop(request_id, None)
        text = detok.flush() if detok is not None else ""
        self._pending.append(RequestOutput(request_id, [], text, finished=True, finish_reason="abort"))

    def _finish(self, seq: Sequence) -> None:
        self.scheduler.finish(seq)
        self._generators.pop(seq.request_id, None)
        if self._structured is not None:
            self._structured.remove(seq.request_id)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished() or bool(self._pending)

    # ---- one step ----
    def step(self) -> list[RequestOutput]:
        outputs, self._pending = self._pending, []
        sched = self.scheduler.schedule()
        if sched.empty:
            return outputs
        t0 = time.perf_counter()
        results = self.executor.run(sched.items)
        ms = (time.perf_counter() - t0) * 1e3
        if all(it.kind != "prefill" for it in sched.items):
            blocks = [it.num_query for it in sched.items]  # 1 per AR sequence, the block per speculative one
            committed = sum(len(r.tokens) for r in results.values() if isinstance(r, SeqResult))
            self.tracker.record_decode_step(ms, sum(blocks), committed)
            # only pure steps describe a step kind: all AR rows, or every row speculating at one block. A step
            # that mixes AR rows with a speculative row (or blocks cut short at max_tokens) costs neither, and read
            # as a speculative step it made speculation look cheap at high batch (never_slower c16, 2026-12-03)
            pure = pure_step(blocks)
            if pure is not None:
                self.tracker.record_step_time(ms, pure[1] if pure[1] > 1 else None)
        for it in sched.items:
            res = results.get(it.seq.request_id)
            out = self._apply(it, res)
            if out is not None:
                outputs.append(out)
        return outputs

    def _apply(self, it: ScheduledSeq, res: SeqResult | BaseException) -> RequestOutput | None:
        seq = it.seq
        rid = seq.request_id
        if isinstance(res, BaseException):
            self._finish(seq)
            self._detok.pop(rid, None)
            return RequestOutput(rid, [], finished=True, finish_reason="error", error=f"{type(res).__name__}: {res}")
        tokens = res.tokens
        remaining = seq.sampling.max_tokens - seq.num_output
        reason = None
        if not seq.sampling.ignore_eos:
            for i, t in enumerate(tokens):
                if t in self.eos_token_ids:
                    tokens, reason = tokens[: i + 1], "stop"
                    break
        if len(tokens) >= remaining and tokens:
            tokens, reason = tokens[:remaining], reason or "length"
        self.scheduler.commit(seq, res.num_computed, tokens)
        if res.proposed:  # acceptance is counted here, once: the step only reports it
            self.tracker.record_spec(res.proposed, res.accepted, seq.tags)
        if tokens:
            self.tracker.record_pass(len(tokens))
        if not tokens:
            return None
        detok = self._detok[rid]
        text, hit = detok.add(tokens)
        if hit:
            reason = "stop"
        if reason is not None:
            text += detok.flush()
            self._finish(seq)
            del self._detok[rid]
        # tokens a pass verified past EOS are not committed: tau counts only what the request keeps
        return RequestOutput(rid, tokens, text, finished=reason is not None, finish_reason=reason,
                             committed=[len(tokens)])

    def stats(self) -> EngineStats:
        s = self.scheduler
        st = self.tracker.snapshot(self.blocks.free_tokens, self.blocks.total_tokens, len(s.running), len(s.waiting))
        st.step_costs = self.step_costs
        st.kernel_check = self.kernel_check
        return st

