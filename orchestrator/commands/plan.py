"""`specfleet plan`: choose a replica layout for a model on a node and explain the choice."""
from __future__ import annotations

import argparse
import json
import sys


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "plan", help="plan replica layout / TP degree / per-GPU memory for a model on a node",
        description="Budget every GPU and predict decode throughput (roofline) for each layout "
        "(8xTP1, 4xTP2, 2xTP4, 1xTP8, fewer replicas) and pick the best.")
    p.add_argument("--node", default="dgx-b300",
                   help="dgx-b300 | dgx-b200 | dgx-h200 | dgx-h100 | h100 | cpu | auto (discover via NVML)")
    p.add_argument("--model", required=True,
                   help="preset (qwen3-8b, qwen3-32b, llama-3.1-70b, gpt-oss-120b) or an HF dir / config.json")
    p.add_argument("--drafter", default="auto",
                   help="DFlash checkpoint dir, 'auto' (assumed 5-layer DFlash shape) or 'none'")
    p.add_argument("--max-model-len", type=int, default=None, help="default: the model's max positions")
    p.add_argument("--concurrency", type=int, default=64, help="sequences decoding at once (node total)")
    p.add_argument("--avg-context", type=int, default=4096, help="typical prompt + output tokens")
    p.add_argument("--tau", type=float, default=4.0, help="expected committed tokens per verify (prior)")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.90)
    p.add_argument("--dtype", default="auto", choices=("auto", "bfloat16", "float16", "float32", "fp8"),
                   help="weights/KV dtype; auto = the checkpoint's (MXFP4 experts stay MXFP4), float32 on --node cpu")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(func=run)


def _gb(x: float) -> str:
    return f"{x / 1e9:.1f}"


def with_dtype(model, dtype: str):
    """The model spec with its weights / KV cache in `dtype` (auto: unchanged)."""
    import dataclasses

    from cluster.planning.presets import DTYPE_BYTES

    if dtype == "auto":
        return model
    b = float(DTYPE_BYTES[dtype])
    return dataclasses.replace(model, weight_bytes=b, expert_bytes=b, kv_bytes=b)


def build(args: argparse.Namespace):
    from cluster.planning.nvml import discover
    from cluster.planning.planner import Workload, plan
    from cluster.planning.presets import default_drafter, drafter_from_config, resolve_model
    from cluster.planning.topology import get_node, node_from_inventory

    node = node_from_inventory(discover()) if args.node == "auto" else get_node(args.node)
    model = with_dtype(resolve_model(args.model), "float32" if args.dtype == "auto" and node.name == "cpu"
                       else args.dtype)
    spec = args.drafter.lower() != "none"
    drafter = None
    if spec:
        drafter = (default_drafter(model, args.block_size) if args.drafter.lower() == "auto"
                   else drafter_from_config(args.drafter))
    w = Workload(concurrency=args.concurrency, max_model_len=args.max_model_len, avg_context=args.avg_context,
                 tau=args.tau, block_size=args.block_size, speculative=spec,
                 gpu_memory_utilization=args.gpu_memory_utilization)
    return plan(node, model, drafter, w)


def run(args: argparse.Namespace) -> int:
    p = build(args)
    if args.json:
        json.dump(p.to_dict(), sys.stdout, indent=2)
        print()
        return 0
    from rich.console import Console
    from rich.table import Table

    con = Console(width=140)
    m, d = p.model, p.drafter
    con.print(f"[bold]node[/bold] {p.node.description}")
    con.print(f"[bold]model[/bold] {m.name}: {m.total_params / 1e9:.1f}B params ({m.active_params / 1e9:.1f}B active), "
              f"{_gb(m.weight_total_bytes)} GB weights, max_model_len {p.workload.max_model_len or m.max_position}")
    if d:
        con.print(f"[bold]drafter[/bold] {d.name}: {d.num_layers} layers, {d.params / 1e9:.2f}B params, "
                  f"block {p.workload.block_size}, tau prior {p.workload.tau:g}")
    t = Table(title=f"layouts at {p.workload.concurrency} concurrent sequences, avg context {p.workload.avg_context}")
    for col in ("layout", "mode", "tok/s (node)", "tok/s per seq", "step ms", "bound", "KV tokens/replica", "status"):
        t.add_column(col, justify="right" if "tok" in col or "ms" in col else "left")
    shown = [p.chosen] + [a for a in p.alternatives if a.num_gpus == p.node.num_gpus and a is not p.chosen]
    for ev in sorted(shown, key=lambda e: e.tp):
        thr = ev.replicas[0].throughput
        t.add_row(ev.layout, thr.mode, f"{ev.tokens_per_s:,.0f}", f"{thr.per_seq_tokens_per_s:,.0f}",
                  f"{thr.step_s * 1e3:.2f}", thr.step.bound, f"{ev.replicas[0].kv_pool_tokens:,}",
                  "[green]CHOSEN[/green]" if ev is p.chosen else "")
    for layout, reason in p.rejected:
        t.add_row(layout, "-", "-", "-", "-", "-", "-", f"[red]rejected[/red]: {reason}")
    con.print(t)
    mt = Table(title=f"memory per GPU, GB ({p.layout}; headroom = 1 - gpu_memory_utilization)")
    for col in ("GPU", "replica", "rank", "weights", "drafter", "KV pool", "activations", "headroom", "free", "total"):
        mt.add_column(col, justify="right")
    for r in p.replicas:
        for b in r.memory:
            mt.add_row(str(b.gpu), str(r.index), str(b.rank) + (" (drafter)" if b.gpu == r.drafter_gpu else ""),
                       _gb(b.weights), _gb(b.drafter), _gb(b.kv_pool), _gb(b.activations), _gb(b.headroom),
                       _gb(b.free), _gb(b.total))
    con.print(mt)
    con.print("[bold]why[/bold]")
    for line in p.explanation:
        con.print(f"  - {line}")
    return 0
