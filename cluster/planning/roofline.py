"""Roofline model of one engine step on one TP rank. Pure and torch-free.

    step = max(bytes_read / (HBM_bw * MEM_EFF), flops / (peak_bf16 * FLOP_EFF)) + comm + overhead

bytes_read per rank: the dense weights (attention, dense MLP, router, lm_head) / tp, the routed
experts the step's tokens touch / tp (uniform routing: a layer with E experts and top-k routing
touches E * (1 - (1 - k/E)^n) distinct experts for n tokens), and the KV cache of the batch / tp.
flops per rank: 2 * tokens * active params / tp plus attention (4 * tokens * context * q_dim per layer).
comm (tp > 1): two ring all-reduces of the residual stream per layer (after attention and after the
MLP), one all-gather of the vocab-parallel logits and the broadcast of the rows whose logits rank 0
needs (workers/parallel/tp.py); a collective costs alpha + its ring volume / NVLink one-way bandwidth.
A speculative step = the drafter's forward (its layers on rank 0, the borrowed vocab-parallel
embedding / lm_head on every rank) + a verify step over batch x block tokens; it commits tau tokens
per sequence.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from cluster.planning.presets import DrafterSpec, ModelSpec
from cluster.planning.topology import NodeProfile

MEM_EFF = 0.80  # achievable fraction of peak HBM bandwidth for decode GEMVs
FLOP_EFF = 0.60  # achievable fraction of peak dense tensor FLOP/s
ACT_BYTES = 2  # bf16 activations on the wire
LOGIT_BYTES = 4  # fp32 logits gathered for sampling


@dataclass
class StepTime:
    tokens: int  # tokens processed by the step (batch x tokens per sequence)
    bytes_read: float  # per rank
    flops: float  # per rank
    mem_s: float
    compute_s: float
    comm_s: float
    overhead_s: float

    @property
    def total_s(self) -> float:
        return max(self.mem_s, self.compute_s) + self.comm_s + self.overhead_s

    @property
    def bound(self) -> str:
        return "memory" if self.mem_s >= self.compute_s else "compute"

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(total_s=self.total_s, bound=self.bound)
        return d


def experts_touched(num_experts: int, top_k: int, tokens: int) -> float:
    """Expected distinct experts one layer reads for `tokens` tokens under uniform top-k routing."""
    if num_experts <= 0 or tokens <= 0:
        return 0.0
    return num_experts * (1.0 - (1.0 - top_k / num_experts) ** tokens)


def allreduce_s(nbytes: float, tp: int, node: NodeProfile) -> float:
    if tp <= 1:
        return 0.0
    return node.allreduce_latency_s + 2 * (tp - 1) / tp * nbytes / node.link_bw


def allgather_s(total_bytes: float, tp: int, node: NodeProfile) -> float:
    if tp <= 1:
        return 0.0
    return node.allreduce_latency_s + (tp - 1) / tp * total_bytes / node.link_bw


def kv_read_bytes(model: ModelSpec, tp: int, batch: int, context: int) -> float:
    per_layer = model.kv_bytes_per_token_layer(tp)
    slide = min(context, model.sliding_window or context)
    return batch * per_layer * (model.num_full_layers * context + model.num_sliding_layers * slide)


def target_step(model: ModelSpec, node: NodeProfile, tp: int, batch: int, tokens_per_seq: int,
                context: int) -> StepTime:
    """One forward of `batch` sequences x `tokens_per_seq` new tokens each, over `context` cached tokens."""
    return target_rows_step(model, node, tp, batch * tokens_per_seq, batch, context)


def target_rows_step(model: ModelSpec, node: NodeProfile, tp: int, rows: int, sequences: int,
                     context: int) -> StepTime:
    """One forward of `rows` new tokens spread over `sequences` sequences of `context` cached tokens each: the
    engine's flat batch, which may mix AR sequences (1 row) and speculative ones (their block). Weights touched,
    FLOPs and communication follow the rows, the KV read follows the sequences."""
    n = rows
    dense = (model.num_layers * model.dense_layer_params + model.lm_head_params) * model.weight_bytes
    touched = experts_touched(model.num_experts, model.experts_per_token, n)
    experts = model.num_layers * touched * model.expert_params * model.expert_bytes
    weights = (dense + experts) / tp
    kv = kv_read_bytes(model, tp, sequences, context)
    q_dim = model.num_heads * model.head_dim
    attn_ctx = model.num_full_layers * context + model.num_sliding_layers * min(context, model.sliding_window or context)
    flops = (2 * n * model.active_params + 4 * n * q_dim * attn_ctx) / tp
    comm = 0.0
    if tp > 1:
        comm = 2 * model.num_layers * allreduce_s(n * model.hidden_size * ACT_BYTES, tp, node)
        comm += allgather_s(n * model.vocab_size * LOGIT_BYTES, tp, node)
        comm += allgather_s(n * model.hidden_size * ACT_BYTES, tp, node)  # rank 0 broadcasts the logits rows
    bw, peak = node.gpu.hbm_bw * MEM_EFF, node.gpu.bf16_flops * FLOP_EFF
    return StepTime(n, weights + kv, flops, (weights + kv) / bw, flops / peak, comm, node.step_overhead_s)


def drafter_step(drafter: DrafterSpec, model: ModelSpec, node: NodeProfile, tp: int, batch: int, block: int,
                 context: int) -> StepTime:
    """The drafter's one pass for a block. Its layers run on rank 0 only (unsharded); the target's
    embedding and lm_head it borrows are vocab-parallel, so every rank joins those two calls
    (workers/parallel/tp.py mirrors them): embed all-reduce, hidden broadcast, logits all-gather."""
    n = batch * block
    head = model.lm_head_params * model.weight_bytes / tp
    weights = drafter.weight_total_bytes + head
    kv = batch * context * drafter.kv_bytes_per_token
    q_dim = drafter.num_heads * drafter.head_dim
    flops = (2 * n * drafter.params + 4 * n * q_dim * (context + block) * drafter.num_layers
             + 2 * n * model.lm_head_params / tp)
    comm = 0.0
    if tp > 1:
        act = n * model.hidden_size * ACT_BYTES
        comm = allreduce_s(act, tp, node) + allgather_s(act, tp, node) + \
            allgather_s(n * model.vocab_size * LOGIT_BYTES, tp, node)
    bw, peak = node.gpu.hbm_bw * MEM_EFF, node.gpu.bf16_flops * FLOP_EFF
    return StepTime(n, weights + kv, flops, (weights + kv) / bw, flops / peak, comm, 0.0)


@dataclass
class Throughput:
    mode: str  # "spec" or "ar"
    tokens_per_s: float  # aggregate decode tokens/s of the replica
    per_seq_tokens_per_s: float  # what one session sees
    step: StepTime  # AR step, or the verify step
    draft: StepTime | None
    ar_tokens_per_s: float
    spec_tokens_per_s: float | None

    @property
    def step_s(self) -> float:
        return self.step.total_s + (self.draft.total_s if self.draft and self.mode == "spec" else 0.0)

    def to_dict(self) -> dict:
        return {"mode": self.mode, "tokens_per_s": self.tokens_per_s,
                "per_seq_tokens_per_s": self.per_seq_tokens_per_s, "step_s": self.step_s,
                "ar_tokens_per_s": self.ar_tokens_per_s, "spec_tokens_per_s": self.spec_tokens_per_s,
                "step": self.step.to_dict(), "draft": self.draft.to_dict() if self.draft else None}


def replica_throughput(model: ModelSpec, node: NodeProfile, tp: int, batch: int, context: int,
                       drafter: DrafterSpec | None, block: int, tau: float) -> Throughput:
    """Decode tokens/s of one replica at `batch` running sequences; speculation if it pays."""
    ar = target_step(model, node, tp, batch, 1, context)
    ar_tps = batch / ar.total_s
    if drafter is None or batch == 0:
        return Throughput("ar", ar_tps, 1 / ar.total_s, ar, None, ar_tps, None)
    verify = target_step(model, node, tp, batch, block, context)
    draft = drafter_step(drafter, model, node, tp, batch, block, context)
    t = verify.total_s + draft.total_s
    spec_tps = batch * tau / t
    if spec_tps > ar_tps:
        return Throughput("spec", spec_tps, tau / t, verify, draft, ar_tps, spec_tps)
    return Throughput("ar", ar_tps, 1 / ar.total_s, ar, draft, ar_tps, spec_tps)
