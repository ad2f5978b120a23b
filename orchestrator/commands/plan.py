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
    p.add_argument("--nodes", type=int, default=1,
                   help="identical nodes in the Ray cluster (the Helm chart's gpuWorkers.replicas); the layout "
                   "is per node, a TP group never spans nodes")
    p.add_argument("--model", required=True,
                   help="preset (qwen3-8b, qwen3-32b, llama-3.1-70b, gpt-oss-120b) or an HF dir / config.json")
    p.add_argument("--drafter", default="auto",
                   help="DFlash checkpoint dir, 'auto' (assumed 5-layer DFlash shape) or 'none'")
    p.add_argument("--max-model-len", type=int, default=None, help="default: the model's max positions")
    p.add_argument("--concurrency", type=int, default=64,
                   help="sequences decoding at once (cluster total, split over --nodes)")
    p.add_argument("--avg-context", type=int, default=4096, help="typical prompt + output tokens")
    p.add_argument("--tau", type=float, default=4.0, help="expected committed tokens per verify (prior)")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.90)
    p.add_argument("--dtype", default="auto", choices=("auto", "bfloat16", "float16", "float32", "fp8"),
                   help="weights/KV dtype; auto = the checkpoint's (MXFP4 experts stay MXFP4), float32 on --node cpu")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument("--helm-values", action="store_true",
                   help="print the Helm values for this plan (gpuWorkers size, serve.replicas) as YAML")
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
    return plan(node, model, drafter, w, num_nodes=args.nodes)


def helm_values(p) -> dict:
    """The chart values this plan asks for: one GPU worker pod per node with all its GPUs, and the
    replicas (one Serve deployment: every replica has the plan's tp)."""
    per_replica = max(r.max_seqs for r in p.replicas)
    return {
        "gpuWorkers": {"replicas": p.num_nodes, "gpusPerNode": p.node.num_gpus},
        "serve": {"replicas": [{"count": len(p.replicas), "tp": p.chosen.tp, "num_gpus": 1,
                                "gpu_memory_utilization": p.workload.gpu_memory_utilization,
                                "max_num_seqs": max(per_replica, 1)}]},
    }


def run(args: argparse.Namespace) -> int:
    p = build(args)
    if args.json:
        json.dump(p.to_dict(), sys.stdout, indent=2)
        print()
        return 0
    if args.helm_values:
        import yaml

        print(f"# specfleet plan --node {args.node} --nodes {p.num_nodes} --model {args.model}: {p.cluster_layout}")
        print(yaml.safe_dump(helm_values(p), sort_keys=False), end="")
        return 0
    from rich.console import Console
    from rich.table import Table

    con = Console(width=140)
    m, d = p.model, p.drafter
    multi = p.num_nodes > 1
    if multi:
        con.print(f"[bold]cluster[/bold] {p.num_nodes} nodes x {p.node.num_gpus} GPUs, the same layout on every node")
    con.print(f"[bold]node[/bold] {p.node.description}")
    con.print(f"[bold]model[/bold] {m.name}: {m.total_params / 1e9:.1f}B params ({m.active_params / 1e9:.1f}B active), "
              f"{_gb(m.weight_total_bytes)} GB weights, max_model_len {p.workload.max_model_len or m.max_position}")
    if d:
        con.print(f"[bold]drafter[/bold] {d.name}: {d.num_layers} layers, {d.params / 1e9:.2f}B params, "
                  f"block {p.workload.block_size}, tau prior {p.workload.tau:g}")
    where = f" over {p.num_nodes} nodes" if multi else ""
    t = Table(title=f"layouts per node at {p.workload.concurrency} concurrent sequences{where}, "
              f"avg context {p.workload.avg_context}")
    cols = ["layout", *(["replicas"] if multi else []), "mode", "tok/s (cluster)" if multi else "tok/s (node)",
            "tok/s per seq", "step ms", "bound", "KV tokens/replica", "status"]
    for col in cols:
        t.add_column(col, justify="right" if "tok" in col or "ms" in col or col == "replicas" else "left")
    shown = [p.chosen] + [a for a in p.alternatives if a.num_gpus == p.node.num_gpus and a is not p.chosen]
    for ev in sorted(shown, key=lambda e: e.tp):
        thr = ev.replicas[0].throughput
        t.add_row(ev.layout, *([str(len(ev.replicas))] if multi else []), thr.mode, f"{ev.tokens_per_s:,.0f}",
                  f"{thr.per_seq_tokens_per_s:,.0f}", f"{thr.step_s * 1e3:.2f}", thr.step.bound,
                  f"{ev.replicas[0].kv_pool_tokens:,}", "[green]CHOSEN[/green]" if ev is p.chosen else "")
    for layout, reason in p.rejected:
        t.add_row(layout, *(["-"] if multi else []), "-", "-", "-", "-", "-", "-", f"[red]rejected[/red]: {reason}")
    con.print(t)
    # nodes whose budgets equal an earlier node's are summarised, not repeated
    shown_nodes, same_as = [], {}
    for k in range(p.num_nodes):
        key = [(r.max_seqs, [(b.weights, b.drafter, b.kv_pool, b.activations) for b in r.memory])
               for r in p.chosen.on_node(k)]
        match = next((j for j in shown_nodes if same_as.get(("key", j)) == key), None)
        if match is None:
            shown_nodes.append(k)
            same_as[("key", k)] = key
        else:
            same_as.setdefault(match, []).append(k)
    mt = Table(title=f"memory per GPU, GB ({p.layout}{' on every node' if multi else ''}; "
               "headroom = 1 - gpu_memory_utilization)")
    for col in (*(["node"] if multi else []), "GPU", "replica", "rank", "weights", "drafter", "KV pool", "activations",
                "headroom", "free", "total"):
        mt.add_column(col, justify="right")
    for k in shown_nodes:
        group = [k, *same_as.get(k, [])]
        for r in p.chosen.on_node(k):
            replica = ", ".join(str(r.index + (j - k) * p.chosen.num_replicas) for j in group)
            for b in r.memory:
                mt.add_row(*([", ".join(map(str, group))] if multi else []), str(b.gpu), replica,
                           str(b.rank) + (" (drafter)" if b.gpu == r.drafter_gpu else ""),
                           _gb(b.weights), _gb(b.drafter), _gb(b.kv_pool), _gb(b.activations), _gb(b.headroom),
                           _gb(b.free), _gb(b.total))
    con.print(mt)
    con.print("[bold]why[/bold]")
    for line in p.explanation:
        con.print(f"  - {line}")
    return 0
