"""Tensor parallelism for our Llama / Qwen3 decoder (workers/models/llama.py), over torch.distributed.

Sharding (Megatron style, per rank r of tp):
  * q/k/v, gate/up: column-parallel (output rows split; heads divided by tp; KV heads replicated when
    there are fewer KV heads than ranks);
  * o_proj, down_proj: row-parallel (input columns split) followed by an all-reduce (the layer's
    ``all_reduce`` hook); a row-parallel bias is kept on rank 0 only so the sum adds it once;
  * embedding: vocab-parallel (each rank owns a contiguous slice of ceil(V/tp) rows; ids outside the slice
    give zeros; all-reduce); lm_head: vocab-parallel (local logits [.., V/tp], all-gathered to [.., V]).
After every all-reduce the residual stream is whole on every rank, so the drafter on rank 0 reads the
target features locally (no extra traffic).

Lock-step: rank 0 runs the engine. `drive(model, ctx)` wraps rank 0's collective entry points
(forward_paged / forward_hidden / embed / logits) so each call first broadcasts the op and its input
tensors; followers sit in `follow(model, ctx)` and run the same op on their shards. The KV caches are
per rank: followers allocate caches of the shape rank 0 uses (announced with each forward_paged).
Works with gloo on CPU and NCCL on CUDA.
"""
from __future__ import annotations

import dataclasses
import inspect
import threading
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from workers.models.attention import AttnMetadata
from workers.models.config import ModelConfig
from workers.models.llama import CausalLM


@dataclass
class TPContext:
    rank: int
    world: int
    device: torch.device
    group: Any = None  # a torch.distributed group; None = the default group

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(x, group=self.group)
        return x

    def all_gather_last(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., n] on every rank -> [..., world*n] (rank order)."""
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.world)]
        dist.all_gather(parts, x, group=self.group)
        return torch.cat(parts, dim=-1)

    def broadcast(self, x: torch.Tensor) -> torch.Tensor:
        dist.broadcast(x, src=0, group=self.group)
        return x


def check_tp(cfg: ModelConfig, world: int) -> None:
    """Raise ValueError when the model cannot be split `world` ways."""
    if world < 1:
        raise ValueError(f"tp must be >= 1, got {world}")
    if cfg.num_attention_heads % world:
        raise ValueError(f"{cfg.num_attention_heads} attention heads do not split {world} ways")
    kv = cfg.num_key_value_heads
    if kv % world and world % kv:
        raise ValueError(f"{kv} KV heads neither divide nor are divided by tp={world}")
    if cfg.intermediate_size % world:
        raise ValueError(f"intermediate_size {cfg.intermediate_size} does not split {world} ways")


def kv_heads_of(cfg: ModelConfig, rank: int, world: int) -> tuple[int, int]:
    """[start, end) of the KV heads rank `rank` holds (one replicated head when kv < world)."""
    kv = cfg.num_key_value_heads
    if kv >= world:
        n = kv // world
        return rank * n, (rank + 1) * n
    h = rank * kv // world
    return h, h + 1


class VocabParallelEmbedding(nn.Module):
    def __init__(self, weight_shard: torch.Tensor, start: int, vocab: int, ctx: TPContext):
        super().__init__()
        self.weight = nn.Parameter(weight_shard, requires_grad=False)  # [V/tp, H] (zero-padded at the end)
        self.start, self.vocab, self.ctx = start, vocab, ctx

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # ids [...] -> [..., H]
        local = ids - self.start
        inside = (local >= 0) & (local < self.weight.shape[0])
        out = F.embedding(torch.where(inside, local, torch.zeros_like(local)), self.weight)
        out = out * inside.unsqueeze(-1).to(out.dtype)
        return self.ctx.all_reduce(out)


class VocabParallelHead(nn.Module):
    def __init__(self, weight: nn.Parameter, vocab: int, ctx: TPContext):
        super().__init__()
        self.weight = weight  # [V/tp, H]; shared with the embedding when tied
        self.vocab, self.ctx = vocab, ctx

    def forward(self, h: torch.Tensor) -> torch.Tensor:  # [..., H] -> [..., V]
        local = F.linear(h, self.weight)  # [..., V/tp]
        return self.ctx.all_gather_last(local)[..., : self.vocab]


def _rows(lin: nn.Linear, start: int, end: int, device) -> nn.Linear:
    """Column-parallel: keep output rows [start, end)."""
    out = nn.Linear(lin.in_features, end - start, bias=lin.bias is not None, device="meta")
    out.weight = nn.Parameter(lin.weight.data[start:end].to(device).clone(), requires_grad=False)
    if lin.bias is not None:
        out.bias = nn.Parameter(lin.bias.data[start:end].to(device).clone(), requires_grad=False)
    return out


def _cols(lin: nn.Linear, start: int, end: int, keep_bias: bool, device) -> nn.Linear:
    """Row-parallel: keep input columns [start, end); the bias only where `keep_bias` (rank 0)."""
    out = nn.Linear(end - start, lin.out_features, bias=lin.bias is not None, device="meta")
    out.weight = nn.Parameter(lin.weight.data[:, start:end].to(device).clone(), requires_grad=False)
    if lin.bias is not None:
        b = lin.bias.data.to(device).clone()
        out.bias = nn.Parameter(b if keep_bias else torch.zeros_like(b), requires_grad=False)
    return out


def shard_causal_lm(model: CausalLM, ctx: TPContext, progress: Callable[[int, int], None] | None = None) -> CausalLM:
    """Shard a full model in place (weights move to ctx.device, shard by shard). Returns the model;
    its ``config`` becomes the per-rank view (heads / KV heads divided by tp)."""
    cfg, r, w, dev = model.config, ctx.rank, ctx.world, ctx.device
    check_tp(cfg, w)
    hd = cfg.head_dim
    nh = cfg.num_attention_heads // w
    kv0, kv1 = kv_heads_of(cfg, r, w)
    inter = cfg.intermediate_size // w
    n_layers = len(model.model.layers)
    for i, layer in enumerate(model.model.layers):
        at = layer.self_attn
        at.q_proj = _rows(at.q_proj, r * nh * hd, (r + 1) * nh * hd, dev)
        at.k_proj = _rows(at.k_proj, kv0 * hd, kv1 * hd, dev)
        at.v_proj = _rows(at.v_proj, kv0 * hd, kv1 * hd, dev)
        at.o_proj = _cols(at.o_proj, r * nh * hd, (r + 1) * nh * hd, r == 0, dev)
        at.num_heads, at.num_kv_heads = nh, kv1 - kv0
        mlp = layer.mlp
        mlp.gate_proj = _rows(mlp.gate_proj, r * inter, (r + 1) * inter, dev)
        mlp.up_proj = _rows(mlp.up_proj, r * inter, (r + 1) * inter, dev)
        mlp.down_proj = _cols(mlp.down_proj, r * inter, (r + 1) * inter, r == 0, dev)
        layer.to(dev)  # norms (replicated)
        layer.all_reduce = ctx.all_reduce
        if progress:
            progress(i + 1, n_layers)
    v = cfg.vocab_size
    per = -(-v // w)  # ceil
    start, end = r * per, min((r + 1) * per, v)

    def vocab_shard(weight: torch.Tensor) -> torch.Tensor:
        shard = torch.zeros(per, weight.shape[1], dtype=weight.dtype, device=dev)
        if end > start:
            shard[: end - start] = weight.data[start:end].to(dev)
        return shard

    emb = VocabParallelEmbedding(vocab_shard(model.model.embed_tokens.weight), start, v, ctx)
    if cfg.tie_word_embeddings:
        head = VocabParallelHead(emb.weight, v, ctx)
    else:
        head = VocabParallelHead(nn.Parameter(vocab_shard(model.lm_head.weight), requires_grad=False), v, ctx)
    model.model.embed_tokens, model.lm_head = emb, head
    model.model.norm.to(dev)
    model.rope = model.rope.to(dev)
    model.config = dataclasses.replace(cfg, num_attention_heads=nh, num_key_value_heads=kv1 - kv0)
    model.tp = ctx  # type: ignore[attr-defined]
    return model


# ---------------------------------------------------------------- lock-step: rank 0 drives, followers follow
OPS = ("forward_paged", "forward_hidden", "forward", "embed", "logits")


def _pack(obj: Any, tensors: list[torch.Tensor]) -> Any:
    """Replace tensors by ("__t", index) so the structure can go in a small header."""
    if isinstance(obj, torch.Tensor):
        tensors.append(obj)
        return ("__t", len(tensors) - 1)
    if isinstance(obj, AttnMetadata):
        return ("__meta", {f.name: _pack(getattr(obj, f.name), tensors) for f in dataclasses.fields(obj)})
    if isinstance(obj, (list, tuple)):
        return (type(obj).__name__, [_pack(x, tensors) for x in obj])
    if isinstance(obj, dict):
        return ("dict", {k: _pack(x, tensors) for k, x in obj.items()})
    return ("v", obj)


def _unpack(obj: Any, tensors: list[torch.Tensor]) -> Any:
    kind, val = obj
    if kind == "__t":
        return tensors[val]
    if kind == "__meta":
        return AttnMetadata(**{k: _unpack(x, tensors) for k, x in val.items()})
    if kind in ("list", "tuple"):
        items = [_unpack(x, tensors) for x in val]
        return items if kind == "list" else tuple(items)
    if kind == "dict":
        return {k: _unpack(x, tensors) for k, x in val.items()}
    return val


def _broadcast_header(ctx: TPContext, header: dict | None) -> dict:
    box = [header]
    dist.broadcast_object_list(box, src=0, group=ctx.group, device=ctx.device if ctx.device.type == "cuda" else None)
    return box[0]


def _broadcast_tensor(ctx: TPContext, t: torch.Tensor) -> torch.Tensor:
    if t.dtype == torch.bool:  # gloo has no bool collectives
        u = t.to(torch.uint8).contiguous()
        ctx.broadcast(u)
        return u.bool()
    t = t.contiguous()
    ctx.broadcast(t)
    return t


class _Driver:
    """Rank 0: each wrapped call broadcasts (op, inputs) before running; nested calls do not."""

    def __init__(self, model: CausalLM, ctx: TPContext):
        self.model, self.ctx = model, ctx
        self.lock = threading.RLock()
        self.depth = 0
        self.originals = {op: getattr(model, op) for op in OPS}
        self.sigs = {op: inspect.signature(fn) for op, fn in self.originals.items()}
        self.stopped = False

    def call(self, op: str, *args, **kwargs):
        with self.lock:
            if self.depth > 0:  # e.g. forward -> forward_hidden -> embed: followers do this themselves
                return self.originals[op](*args, **kwargs)
            if self.stopped:
                raise RuntimeError("tensor-parallel group is stopped")
            self.depth += 1
            try:
                bound = self.sigs[op].bind(*args, **kwargs).arguments  # everything by name
                kv = bound.pop("kv_caches", None)
                tensors: list[torch.Tensor] = []
                packed = _pack(dict(bound), tensors)
                kv_spec = None
                if kv is not None:
                    k0 = kv[0][0]
                    kv_spec = (id(kv), len(kv), tuple(k0.shape), str(k0.dtype).removeprefix("torch."))
                specs = [(tuple(t.shape), str(t.dtype).removeprefix("torch.")) for t in tensors]
                _broadcast_header(self.ctx, {"op": op, "args": packed, "specs": specs, "kv": kv_spec})
                for t in tensors:
                    _broadcast_tensor(self.ctx, t)
                return self.originals[op](*args, **kwargs)
            finally:
                self.depth -= 1

    def stop(self) -> None:
        with self.lock:
            if not self.stopped:
                self.stopped = True
                _broadcast_header(self.ctx, {"op": "stop"})


def drive(model: CausalLM, ctx: TPContext) -> _Driver:
    """Make rank 0's model broadcast its collective calls; returns the driver (call .stop() at shutdown)."""
    drv = _Driver(model, ctx)
    for op in OPS:
        setattr(model, op, (lambda o: lambda *a, **k: drv.call(o, *a, **k))(op))
    return drv


def follow(model: CausalLM, ctx: TPContext, on_step: Callable[[str], None] | None = None) -> int:
    """Follower loop: run every op rank 0 announces until it says stop. Returns the number of ops run."""
    caches: dict[tuple, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    n = 0
    with torch.inference_mode():
        while True:
            header = _broadcast_header(ctx, None)
            op = header["op"]
            if op == "stop":
                return n
            tensors = []
            for shape, dtype in header["specs"]:
                dt = getattr(torch, dtype)
                buf = torch.empty(shape, dtype=torch.uint8 if dt == torch.bool else dt, device=ctx.device)
                ctx.broadcast(buf)
                tensors.append(buf.bool() if dt == torch.bool else buf)
            kwargs = _unpack(header["args"], tensors)
            if header["kv"] is not None:
                key = header["kv"]
                if key not in caches:
                    caches.clear()  # rank 0 re-allocated its pool: drop ours
                    _, layers, shape, dtype = key
                    dt = getattr(torch, dtype)
                    caches[key] = [(torch.zeros(shape, dtype=dt, device=ctx.device),
                                    torch.zeros(shape, dtype=dt, device=ctx.device)) for _ in range(layers)]
                kwargs = dict(kwargs, kv_caches=caches[key])
            getattr(model, op)(**kwargs)
            n += 1
            if on_step:
                on_step(op)
