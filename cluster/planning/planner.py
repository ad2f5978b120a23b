"""Placement planner (pure, torch-free): which replica layout, which GPUs, and every GPU's memory budget.

For each layout R x TPt (R replicas of tensor-parallel degree t, t in 1, 2, 4, 8) the planner
budgets every GPU (see `budget_replica`), rejects layouts that do not fit (with the reason), predicts
decode throughput with the roofline in cluster/planning/roofline.py at the target concurrency, and picks the
layout with the highest predicted aggregate tokens/s (ties within 1%: fewer GPUs, then lower TP).
Impossible requests raise `PlanError` with the reason.

Several nodes (`num_nodes`): a layout is per node and the same on every node; a TP group never spans
nodes (its all-reduces need NVLink, which ends at the node). The concurrency is the cluster's, split
over the nodes (`node_shares`), and every node's replicas are budgeted at that node's share.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from cluster.planning.explain import explain, explain_nodes
from cluster.planning.presets import DrafterSpec, ModelSpec
from cluster.planning.roofline import LOGIT_BYTES, Throughput, replica_throughput
from cluster.planning.topology import GiB, NodeProfile

RUNTIME_RESERVE = 1.5 * GiB  # CUDA context, cuBLAS workspaces, CUDA-graph pool per GPU
NCCL_RESERVE = 0.5 * GiB  # NCCL buffers per GPU when tp > 1
TP_CHOICES = (1, 2, 4, 8)


class PlanError(ValueError):
    """The request cannot be planned on this node; the message says why."""

    def __init__(self, msg: str, rejected: list[tuple[str, str]] | None = None):
        super().__init__(msg)
        self.rejected = rejected or []


@dataclass
class Workload:
    concurrency: int = 64  # sequences decoding at once across the node
    max_model_len: int | None = None  # default: the model's max positions
    avg_context: int = 4096  # prompt + generated tokens of a typical sequence
    tau: float = 4.0  # expected committed tokens per verify (accepted + bonus): a prior
    block_size: int = 16
    speculative: bool = True
    gpu_memory_utilization: float = 0.90
    max_num_batched_tokens: int = 8192  # prefill chunk: sizes the activation reserve
    kv_block_size: int = 16

    def validate(self, model: ModelSpec) -> None:
        if self.concurrency < 1:
            raise PlanError(f"concurrency must be >= 1, got {self.concurrency}")
        if not 0.1 <= self.gpu_memory_utilization <= 1.0:
            raise PlanError(f"gpu_memory_utilization must be in [0.1, 1], got {self.gpu_memory_utilization}")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise PlanError(f"max_model_len must be >= 1, got {self.max_model_len}")
        if self.max_model_len is not None and self.max_model_len > model.max_position:
            raise PlanError(f"context too long: max_model_len {self.max_model_len} exceeds {model.name}'s "
                            f"{model.max_position} positions")
        if not 1.0 <= self.tau <= self.block_size:
            raise PlanError(f"tau must be in [1, block_size={self.block_size}], got {self.tau}")


@dataclass
class GpuBudget:
    gpu: int
    rank: int
    total: float
    weights: float  # this rank's shard of the target
    drafter: float  # drafter weights + drafter context KV of the pool's tokens (rank 0 only)
    kv_pool: float  # target KV shard for the pool's tokens (+ sliding-window layers' fixed part)
    activations: float  # runtime reserve + activation / logits peak
    headroom: float  # (1 - gpu_memory_utilization) * total, never allocated
    free: float  # left over after the pool is sized by the tightest rank

    @property
    def allocated(self) -> float:
        return self.weights + self.drafter + self.kv_pool + self.activations


@dataclass
class ReplicaPlan:
    index: int
    tp: int
    gpu_ids: list[int]
    drafter_gpu: int | None
    max_seqs: int  # running sequences this replica is planned for
    kv_pool_tokens: int
    memory: list[GpuBudget]
    throughput: Throughput
    node: int = 0  # the node of the cluster it sits on; gpu_ids are that node's GPU indices

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in asdict(self).items() if k not in ("throughput", "memory")}
        d["memory"] = [asdict(b) | {"allocated": b.allocated} for b in self.memory]
        d["throughput"] = self.throughput.to_dict()
        return d


@dataclass
class LayoutEval:
    layout: str  # per node, e.g. "4xTP2"
    num_replicas: int  # per node
    tp: int
    replicas: list[ReplicaPlan] = field(default_factory=list)  # every node's, node by node
    reason: str | None = None  # set when rejected
    num_nodes: int = 1

    @property
    def ok(self) -> bool:
        return self.reason is None

    @property
    def tokens_per_s(self) -> float:
        return sum(r.throughput.tokens_per_s for r in self.replicas)

    @property
    def num_gpus(self) -> int:  # per node
        return self.num_replicas * self.tp

    def on_node(self, node: int) -> list[ReplicaPlan]:
        return [r for r in self.replicas if r.node == node]


@dataclass
class Plan:
    node: NodeProfile
    model: ModelSpec
    drafter: DrafterSpec | None
    workload: Workload
    chosen: LayoutEval
    alternatives: list[LayoutEval]  # feasible layouts not chosen
    rejected: list[tuple[str, str]]  # (layout, reason)
    explanation: list[str]
    num_nodes: int = 1

    @property
    def replicas(self) -> list[ReplicaPlan]:  # every node's
        return self.chosen.replicas

    @property
    def layout(self) -> str:  # per node
        return self.chosen.layout

    @property
    def cluster_layout(self) -> str:
        """e.g. "2 nodes x 4xTP2 = 8 replicas" ("4xTP2" on one node)."""
        if self.num_nodes == 1:
            return self.layout
        return f"{self.num_nodes} nodes x {self.layout} = {len(self.replicas)} replicas"

    @property
    def tokens_per_s(self) -> float:
        return self.chosen.tokens_per_s

    def to_dict(self) -> dict[str, Any]:
        return {
            "node": self.node.to_dict(), "model": self.model.to_dict(),
            "drafter": self.drafter.to_dict() if self.drafter else None,
            "workload": asdict(self.workload), "layout": self.layout, "num_nodes": self.num_nodes,
            "cluster_layout": self.cluster_layout, "num_replicas": len(self.replicas),
            "node_concurrency": node_shares(self.workload.concurrency, self.num_nodes),
            "predicted_tokens_per_s": self.tokens_per_s,
            "replicas": [r.to_dict() for r in self.replicas],
            "alternatives": [{"layout": a.layout, "predicted_tokens_per_s": a.tokens_per_s,
                              "mode": a.replicas[0].throughput.mode} for a in self.alternatives],
            "rejected": [{"layout": l, "reason": r} for l, r in self.rejected],
            "explanation": self.explanation,
        }


def weight_shard_bytes(model: ModelSpec, tp: int) -> float:
    """One rank's target weights: matrices split tp ways, norms / router replicated, KV heads
    replicated when fewer than tp."""
    replicated = model.norm_params * model.weight_bytes + model.num_layers * model.router_params * model.weight_bytes
    sharded = model.weight_total_bytes - replicated
    extra_kv = 0.0
    if model.num_kv_heads < tp:  # each rank holds a whole KV head: 1 head instead of kv/tp
        kv_proj = 2 * model.hidden_size * model.head_dim * model.weight_bytes * model.num_layers
        extra_kv = kv_proj * (1 - model.num_kv_heads / tp)
    return sharded / tp + replicated + extra_kv


def activation_bytes(model: ModelSpec, tp: int, max_seqs: int, w: Workload) -> float:
    """Runtime reserve + the peak of one prefill chunk's activations + the logits of a verify step."""
    q_dim, kv_dim = model.num_heads * model.head_dim, model.num_kv_heads * model.head_dim
    mlp = model.intermediate_size or model.moe_intermediate_size * model.experts_per_token
    per_token = (4 * model.hidden_size + (q_dim + 2 * kv_dim) / tp + 2 * mlp / tp) * 2  # bf16
    logits_rows = max(max_seqs * (w.block_size if w.speculative else 1), 1)
    logits = logits_rows * model.vocab_size / tp * LOGIT_BYTES * 2  # logits + probabilities
    return RUNTIME_RESERVE + (NCCL_RESERVE if tp > 1 else 0) + w.max_num_batched_tokens * per_token + logits


def budget_replica(model: ModelSpec, drafter: DrafterSpec | None, node: NodeProfile, tp: int,
                   gpu_ids: list[int], max_seqs: int, w: Workload, max_len: int) -> tuple[list[GpuBudget], int]:
    """Memory of every rank; the KV pool is sized by the tightest rank (rank 0 carries the drafter).
    Returns (budgets, pool tokens). Raises PlanError when the replica cannot hold its sequences."""
    total = node.gpu.memory_bytes
    headroom = (1 - w.gpu_memory_utilization) * total
    weights = weight_shard_bytes(model, tp)
    act = activation_bytes(model, tp, max_seqs, w)
    kv_layer = model.kv_bytes_per_token_layer(tp)
    kv_token = kv_layer * model.num_full_layers  # per pooled token, this rank
    slide_fixed = 0.0
    if model.num_sliding_layers:
        slide_fixed = max_seqs * model.num_sliding_layers * kv_layer * min(max_len, (model.sliding_window or 0) + w.block_size)
    d_fixed, d_token = 0.0, 0.0
    if drafter is not None:  # it borrows the target's vocab-parallel embedding / lm_head: no copy
        d_fixed = drafter.weight_total_bytes
        d_token = drafter.kv_bytes_per_token
    avail = total - headroom - weights - act - slide_fixed
    if avail <= 0:
        raise PlanError(f"weights {weights / 1e9:.1f} GB + activations {act / 1e9:.1f} GB per GPU exceed "
                        f"the usable {(total - headroom) / 1e9:.1f} GB")
    tokens0 = (avail - d_fixed) / (kv_token + d_token) if kv_token + d_token else math.inf
    tokens_other = avail / kv_token if kv_token else math.inf
    tokens = int(min(tokens0, tokens_other) // w.kv_block_size * w.kv_block_size)
    if tokens < max_len:
        raise PlanError(f"KV pool holds {max(tokens, 0)} tokens per replica, less than one max_model_len "
                        f"sequence ({max_len}): context too long for this layout")
    need = max_seqs * min(w.avg_context, max_len)
    if tokens < need:
        raise PlanError(f"KV pool holds {tokens} tokens, {max_seqs} sequences x {min(w.avg_context, max_len)} "
                        f"avg context need {need}")
    budgets = []
    for rank, gpu in enumerate(gpu_ids):
        drafter_b = d_fixed + tokens * d_token if rank == 0 and drafter is not None else 0.0
        kv = tokens * kv_token + slide_fixed
        free = total - headroom - weights - act - drafter_b - kv
        budgets.append(GpuBudget(gpu, rank, total, weights, drafter_b, kv, act, headroom, free))
    return budgets, tokens


def _split(concurrency: int, n: int) -> list[int]:
    base, extra = divmod(concurrency, n)
    return [base + (1 if i < extra else 0) for i in range(n)]


def node_shares(concurrency: int, num_nodes: int) -> list[int]:
    """The cluster's concurrent sequences split over its nodes (the first nodes take the remainder)."""
    return _split(concurrency, num_nodes)


def evaluate_layout(model: ModelSpec, drafter: DrafterSpec | None, node: NodeProfile, n: int, tp: int,
                    w: Workload, max_len: int, num_nodes: int = 1) -> LayoutEval:
    """n replicas of TP tp on every one of num_nodes identical nodes, each node at its share of the
    concurrency; rejected (reason set) when any replica does not fit."""
    ev = LayoutEval(f"{n}xTP{tp}", n, tp, num_nodes=num_nodes)
    if model.num_heads % tp:
        ev.reason = f"{model.num_heads} attention heads do not split {tp} ways"
        return ev
    if model.num_kv_heads % tp and tp % model.num_kv_heads:
        ev.reason = f"{model.num_kv_heads} KV heads neither divide nor are divided by {tp}"
        return ev
    ctx = min(w.avg_context, max_len)
    d = drafter if w.speculative else None
    cache: dict[int, tuple[list[GpuBudget], int, Throughput]] = {}  # by max_seqs: nodes repeat
    for k, share in enumerate(node_shares(w.concurrency, num_nodes)):
        for i, seqs in enumerate(_split(share, n)):
            gpus = list(range(i * tp, (i + 1) * tp))
            try:
                if seqs not in cache:
                    mem, tokens = budget_replica(model, d, node, tp, list(range(tp)), max(seqs, 1), w, max_len)
                    cache[seqs] = (mem, tokens, replica_throughput(model, node, tp, seqs, ctx, d, w.block_size, w.tau))
            except PlanError as exc:
                ev.reason, ev.replicas = str(exc), []
                return ev
            mem, tokens, thr = cache[seqs]
            mem = [replace(b, gpu=g) for b, g in zip(mem, gpus)]
            ev.replicas.append(ReplicaPlan(k * n + i, tp, gpus, gpus[0] if d else None, seqs, tokens, mem, thr,
                                           node=k))
    return ev


def plan(node: NodeProfile, model: ModelSpec, drafter: DrafterSpec | None = None,
         workload: Workload | None = None, num_nodes: int = 1) -> Plan:
    """The best layout for `num_nodes` identical nodes (one node by default); see the module doc."""
    w = workload or Workload()
    w.validate(model)
    if num_nodes < 1:
        raise PlanError(f"nodes must be >= 1, got {num_nodes}")
    if w.concurrency < num_nodes:
        raise PlanError(f"concurrency {w.concurrency} is less than the {num_nodes} nodes: some nodes would "
                        "serve nothing (concurrency counts sequences across the whole cluster)")
    max_len = w.max_model_len or model.max_position
    if drafter is not None and drafter.hidden_size != model.hidden_size:
        raise PlanError(f"drafter hidden size {drafter.hidden_size} != target's {model.hidden_size}")
    evals: list[LayoutEval] = []
    for tp in TP_CHOICES:
        if tp > node.num_gpus:
            break
        for n in range(node.num_gpus // tp, 0, -1):
            evals.append(evaluate_layout(model, drafter, node, n, tp, w, max_len, num_nodes))
    ok = [e for e in evals if e.ok]
    full = {e.tp: e for e in evals if e.num_replicas == node.num_gpus // e.tp}
    rejected = [(e.layout, e.reason) for e in full.values() if not e.ok]
    if not ok:
        weights_max = weight_shard_bytes(model, max(full))
        usable = node.gpu.memory_bytes * w.gpu_memory_utilization
        span = (" (a tensor-parallel group never spans nodes, so more nodes do not make it fit)"
                if num_nodes > 1 else "")
        if weights_max > usable:
            raise PlanError(f"model too large for node: {model.name} needs {model.weight_total_bytes / 1e9:.1f} GB "
                            f"of weights, {weights_max / 1e9:.1f} GB per GPU at TP{max(full)}, more than the "
                            f"{usable / 1e9:.1f} GB usable per GPU on {node.name}{span}", rejected)
        reasons = "; ".join(f"{lay}: {why}" for lay, why in rejected)
        raise PlanError(f"no layout fits {model.name} on {node.name}: {reasons}", rejected)
    best = max(e.tokens_per_s for e in ok)
    top = [e for e in ok if e.tokens_per_s >= 0.99 * best]
    chosen = min(top, key=lambda e: (e.num_gpus, e.tp, -e.tokens_per_s))
    others = [e for e in full.values() if e.ok and e is not chosen]
    lines = explain(chosen, others, rejected, w)
    if num_nodes > 1:
        lines = lines[:1] + explain_nodes(chosen, node, w) + lines[1:]
    return Plan(node, model, drafter if w.speculative else None, w, chosen,
                alternatives=[e for e in ok if e is not chosen], rejected=rejected,
                explanation=lines, num_nodes=num_nodes)
