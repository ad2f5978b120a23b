"""Graph runner: the target forward (decode / verify / short prefill chunks), the drafter's block proposal and
the drafter-context write, run at bucketed shapes over static, preallocated buffers, replayed as CUDA graphs.

Same interface as ``ModelRunner`` (run_target / propose_logits / write_context) and a drop-in subclass of it;
steps that do not fit a bucket fall back to the eager path, which stays the reference.

Buckets: batch B -> Bp in ``batch_buckets`` (1, 2, 4, ... max_num_seqs); query run Tq -> Qp in ``q_buckets``
(1, 2, 4, 8, 16, plus the drafter's block size); context -> Kp KV blocks in ``ctx_buckets`` (powers of two up
to max_model_len / block_size). One graph per (kind, Bp, Qp, Kp[, capture]) is captured on first use (or
in ``warmup``) into one shared memory pool.

Padding, without host synchronisation (all index work is device-side, from the eager StepInputs):
  * a reserved scratch KV block (``reserve_scratch_block``) takes every padding row's K/V write;
  * padding rows inside a sequence (t >= its run length) repeat the sequence's last real position, so they
    see exactly what that row sees and write nothing real; padding sequences sit at position 0 with a
    block table of scratch blocks (they attend one scratch key: no empty softmax, no NaN);
  * the causal mask is computed inside the graph from the static positions (key position <= query
    position), the drafter mask from the context length and the per-row block visibility.
``mode="eager"`` runs the same static-buffer path by direct call (no capture): how it is tested on CPU.
"""
from __future__ import annotations

import bisect
from types import SimpleNamespace
from typing import Callable

import torch

from workers.engine.runner import DraftInputs, ModelRunner, StepInputs
from workers.models import fused
from workers.models.attention import AttnMetadata

SCRATCH_SEQ = "__graph_scratch__"


def reserve_scratch_block(blocks) -> int:
    """Take one KV block out of the BlockManager for the padding rows' writes; returns its id."""
    blocks.reserve(SCRATCH_SEQ, 1)
    return blocks.ensure(SCRATCH_SEQ, 1)[0]


def pow2_buckets(limit: int, extra: tuple[int, ...] = ()) -> tuple[int, ...]:
    """1, 2, 4, ... below ``limit``, then ``limit`` itself (+ any extra sizes <= limit)."""
    out, b = {limit, *[e for e in extra if 0 < e <= limit]}, 1
    while b < limit:
        out.add(b)
        b *= 2
    return tuple(sorted(out))


def bucket(n: int, buckets: tuple[int, ...]) -> int | None:
    """Smallest bucket >= n, or None if n exceeds them all."""
    i = bisect.bisect_left(buckets, n)
    return buckets[i] if i < len(buckets) else None


class StaticGraph:
    """``fn`` over static buffers: captured as a CUDA graph (mode "graph") or called directly (mode "eager")."""

    def __init__(self, fn: Callable[[], object], bufs: SimpleNamespace, mode: str, pool=None, device=None):
        self.fn, self.bufs, self.graph, self.out = fn, bufs, None, None
        if mode == "graph":
            s = torch.cuda.Stream(device)
            s.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(s):  # warm-up off the capture (allocator, cuBLAS handles, autotuning)
                for _ in range(2):
                    fn()
            torch.cuda.current_stream(device).wait_stream(s)
            self.graph = torch.cuda.CUDAGraph()
            # thread_local: CUDA calls from other threads (telemetry, the serving loop) do not break a capture
            with torch.cuda.graph(self.graph, pool=pool, capture_error_mode="thread_local"):
                self.out = fn()

    def __call__(self):
        if self.graph is None:
            return self.fn()
        self.graph.replay()
        return self.out  # static outputs: valid until this graph replays again


class GraphRunner(ModelRunner):
    def __init__(self, model, drafter, pool, block_size: int, device, scratch_block: int, max_num_seqs: int,
                 max_model_len: int, mode: str = "auto", fuse: bool = True, compile: bool = False,
                 max_pad_ratio: float = 4.0, max_q: int | None = None):
        super().__init__(model, drafter, pool, block_size, device)
        self.device = torch.device(device)
        self.mode = ("graph" if self.device.type == "cuda" else "eager") if mode == "auto" else mode
        if self.mode not in ("graph", "eager"):
            raise ValueError(f"mode must be auto, graph or eager, got {mode!r}")
        if self.mode == "graph" and self.device.type != "cuda":
            raise ValueError("CUDA graphs need a CUDA device; use mode='eager' on CPU")
        if self.mode == "graph" and ("forward_paged" in vars(model) or
                                     any(layer.all_reduce is not None for layer in model.model.layers)):
            raise ValueError("CUDA graphs are for tp == 1 (a tensor-parallel model broadcasts every step)")
        self.scratch_block = scratch_block
        self.scratch_slot = scratch_block * block_size
        # fused path: one QKV and one gate-up GEMM per layer (weights become views of one buffer each),
        # optionally torch.compile'd per layer piece; the model's own forward_paged otherwise
        self.fused = bool(fuse or compile) and fused.supports(model)
        if compile and not self.fused:
            raise ValueError("compile=True needs the fused path (a bias-free, single-rank model)")
        if self.fused:
            fused.fuse_projections(model)
        self.pieces = fused.compiled_pieces() if compile else (fused.layer_pre, fused.layer_post)
        self.compile = compile
        self.max_pad_ratio = max_pad_ratio
        dblock = drafter.block_size if drafter is not None else 1
        max_q = max_q or max(dblock, 1)
        self.batch_buckets = pow2_buckets(max_num_seqs)
        self.q_buckets = pow2_buckets(max_q, (dblock,))
        self.ctx_buckets = pow2_buckets(-(-(max_model_len + max_q) // block_size))
        self.row_buckets = pow2_buckets(max_num_seqs * max_q)
        self.graphs: dict[tuple, StaticGraph] = {}
        self.hits: dict[tuple, int] = {}
        self.fallbacks = 0
        self.mempool = torch.cuda.graph_pool_handle() if self.mode == "graph" else None
        self._idx_cache: dict[tuple, torch.Tensor] = {}

    # ---- helpers ----
    def _arange(self, n: int, clamp: int | None = None) -> torch.Tensor:
        key = (n, clamp)
        t = self._idx_cache.get(key)
        if t is None:
            t = torch.arange(n, device=self.device)
            t = t if clamp is None else t.clamp(max=clamp)
            self._idx_cache[key] = t
        return t

    def _graph(self, key: tuple, build: Callable[[], tuple[SimpleNamespace, Callable]]) -> StaticGraph:
        g = self.graphs.get(key)
        if g is None:
            bufs, fn = build()
            with torch.inference_mode():
                g = self.graphs[key] = StaticGraph(fn, bufs, self.mode, self.mempool, self.device)
        self.hits[key] = self.hits.get(key, 0) + 1
        return g

    def _long(self, *shape: int, fill: int = 0) -> torch.Tensor:
        return torch.full(shape, fill, dtype=torch.long, device=self.device)

    # ---- target: decode / verify / short chunks ----
    def _build_target(self, b: int, q: int, kp: int, capture: bool):
        n = b * q
        bufs = SimpleNamespace(
            ids=self._long(n), pos=self._long(n), slots=self._long(n, fill=self.scratch_slot),
            tables=self._long(b, kp, fill=self.scratch_block), q_index=None if b == 1 else self._long(n),
            keys=torch.arange(kp * self.block_size, device=self.device))
        if bufs.q_index is not None:
            bufs.q_index.copy_(torch.arange(n, device=self.device))  # padded layout == flat layout
        layers = tuple(self.capture_layers) if capture else ()

        def fn():
            mask = (bufs.keys[None, None, :] <= bufs.pos.view(b, q)[:, :, None])[:, None]  # [b, 1, q, K]
            meta = AttnMetadata(bufs.slots, bufs.tables, bufs.q_index, None, mask, b, q)
            if self.fused:
                return fused.forward_paged_fused(self.model, bufs.ids, bufs.pos, self.pool.target, meta, layers,
                                                 *self.pieces)
            return self.model.forward_paged(bufs.ids, bufs.pos, self.pool.target, meta, capture_layers=layers)

        return bufs, fn

    def target_key(self, inp: StepInputs) -> tuple | None:
        n, b, tq = inp.input_ids.shape[0], inp.attn.batch, inp.attn.q_len
        bp, qp = bucket(b, self.batch_buckets), bucket(tq, self.q_buckets)
        kp = bucket(inp.attn.block_tables.shape[1], self.ctx_buckets)
        if bp is None or qp is None or kp is None or bp * qp > self.max_pad_ratio * n + bp:
            return None
        return ("target", bp, qp, kp, bool(inp.capture and self.capture_layers))

    @torch.inference_mode()
    def run_target(self, inp: StepInputs) -> tuple[torch.Tensor, torch.Tensor | None]:
        key = self.target_key(inp)
        if key is None:
            self.fallbacks += 1
            return super().run_target(inp)
        _, bp, qp, kp, capture = key
        g = self._graph(key, lambda: self._build_target(bp, qp, kp, capture))
        s = g.bufs
        n, b, tq, nblk = inp.input_ids.shape[0], inp.attn.batch, inp.attn.q_len, inp.attn.block_tables.shape[1]
        qi = inp.attn.q_index if inp.attn.q_index is not None else self._arange(tq)  # [b*tq] flat row per slot
        oi = inp.attn.out_index if inp.attn.out_index is not None else self._arange(n)  # [n] slot per flat row
        src = qi.view(b, tq)[:, self._arange(qp, clamp=tq - 1)].reshape(-1)  # [b*qp] source flat row
        row = oi // tq * qp + oi % tq  # [n] row of each flat token in the padded layout
        m = b * qp
        s.ids[:m].copy_(inp.input_ids[src])
        s.ids[m:].zero_()
        s.pos[:m].copy_(inp.positions[src])
        s.pos[m:].zero_()
        s.slots.fill_(self.scratch_slot)
        s.slots.index_copy_(0, row, inp.attn.slot_mapping)
        s.tables.fill_(self.scratch_block)
        s.tables[:b, :nblk].copy_(inp.attn.block_tables)
        hidden, feats = g()  # [bp*qp, H], [bp*qp, F] | None
        logits = self.model.logits(hidden[row[inp.logits_index]])
        return logits, (None if feats is None else feats[row])

    # ---- drafter: one block proposal for every speculative sequence ----
    def _build_draft(self, b: int, q: int, kp: int):
        bufs = SimpleNamespace(
            ids=self._long(b, q, fill=self.drafter.config.mask_token_id),
            pos=torch.arange(q, device=self.device).repeat(b, 1), tables=self._long(b, kp, fill=self.scratch_block),
            own=torch.zeros(b, q, dtype=torch.bool, device=self.device),
            keys=torch.arange(kp * self.block_size, device=self.device))
        bufs.own[:, 0] = True

        def fn():
            ctx_vis = bufs.keys[None, :] < bufs.pos[:, :1]  # [b, K] cached context rows
            mask = torch.cat([ctx_vis, bufs.own], dim=1)[:, None, None, :].expand(b, 1, q, ctx_vis.shape[1] + q)
            emb = self.model.embed(bufs.ids)  # [b, q, H]
            return self.drafter.propose_hidden(emb, bufs.pos, self.pool.drafter, bufs.tables, mask)

        return bufs, fn

    @torch.inference_mode()
    def propose_logits(self, d: DraftInputs) -> torch.Tensor:
        b, q = d.block_ids.shape
        nblk = d.block_tables.shape[1]
        bp, qp, kp = bucket(b, self.batch_buckets), bucket(q, self.q_buckets), bucket(nblk, self.ctx_buckets)
        if bp is None or qp is None or kp is None:
            self.fallbacks += 1
            return super().propose_logits(d)
        g = self._graph(("draft", bp, qp, kp), lambda: self._build_draft(bp, qp, kp))
        s = g.bufs
        s.ids.fill_(self.drafter.config.mask_token_id)
        s.ids[:b, :q].copy_(d.block_ids)
        s.pos.copy_(self._arange(qp)[None, :].expand(bp, qp))
        s.pos[:b].add_(d.positions[:, :1]).clamp_(max=self.drafter.rope.shape[0] - 1)
        s.tables.fill_(self.scratch_block)
        s.tables[:b, :nblk].copy_(d.block_tables)
        s.own.zero_()
        s.own[:, 0] = True
        s.own[:b, :q].copy_(d.mask[:, 0, 0, nblk * self.block_size:])
        h = g()  # [bp, qp, H]
        return self.draft_logits(h[:b, 1:q])

    # ---- drafter context: committed tokens' features -> drafter K/V ----
    def _build_ctx(self, r: int, feat_dim: int, dtype):
        bufs = SimpleNamespace(feats=torch.zeros(r, feat_dim, dtype=dtype, device=self.device), pos=self._long(r),
                               slots=self._long(r, fill=self.scratch_slot))

        def fn():
            self.drafter.write_context(bufs.feats, bufs.pos, self.pool.drafter, bufs.slots)

        return bufs, fn

    @torch.inference_mode()
    def write_context(self, feats: torch.Tensor, rows: list[int], positions: list[int], slots: list[int]):
        r = len(rows)
        if not r:
            return
        rp = bucket(r, self.row_buckets)
        if rp is None:
            self.fallbacks += 1
            return super().write_context(feats, rows, positions, slots)
        g = self._graph(("ctx", rp, feats.dtype), lambda: self._build_ctx(rp, feats.shape[1], feats.dtype))
        s = g.bufs
        meta = torch.tensor([rows, positions, slots], dtype=torch.long).to(self.device, non_blocking=True)  # [3, r]
        s.feats[:r].copy_(feats[meta[0]])
        s.pos[:r].copy_(meta[1])
        s.pos[r:].zero_()
        s.slots.fill_(self.scratch_slot)
        s.slots[:r].copy_(meta[2])
        g()

    # ---- capture ahead of serving ----
    def warmup(self, batch_sizes=None, ctx_blocks=None, q_sizes=None, progress: bool = True) -> int:
        """Capture the target (and drafter) graphs for the given buckets now; returns the number captured."""
        from tqdm import tqdm

        bs = batch_sizes or self.batch_buckets
        ks = ctx_blocks or self.ctx_buckets
        qs = q_sizes or sorted({1, *([self.drafter.block_size] if self.drafter is not None else [])})
        cap = bool(self.capture_layers)
        todo = [("target", b, q, k, cap) for b in bs for q in qs for k in ks]
        if self.drafter is not None:
            todo += [("draft", b, self.drafter.block_size, k) for b in bs for k in ks]
        before = len(self.graphs)
        for key in tqdm(todo, desc=f"capturing {self.mode} graphs", disable=not progress):
            if key[0] == "target":
                self._graph(key, lambda k=key: self._build_target(*k[1:]))
            else:
                self._graph(key, lambda k=key: self._build_draft(*k[1:]))
            self.hits[key] -= 1
        return len(self.graphs) - before


def graph_runner_over(runner: ModelRunner, blocks, max_num_seqs: int, max_model_len: int, mode: str = "auto",
                      fuse: bool = True, compile: bool = False, warmup: bool = False) -> GraphRunner:
    """A GraphRunner over the same model, drafter and KV pool as ``runner`` (itself if it is one already);
    its padding rows write to a scratch block taken from ``blocks``. ``LLMEngine.use_graphs`` calls it."""
    if isinstance(runner, GraphRunner):
        return runner
    g = GraphRunner(runner.model, runner.drafter, runner.pool, runner.block_size, runner.device,
                    scratch_block=reserve_scratch_block(blocks), max_num_seqs=max_num_seqs,
                    max_model_len=max_model_len, mode=mode, fuse=fuse, compile=compile)
    if warmup:
        g.warmup()
    return g
