"""Why the planner's choice beats the alternatives: a sentence per layout. Pure and torch-free.

Each alternative is compared with the chosen layout in GPU-seconds per generated token, split into the
roofline terms (the max of memory / compute time, all-reduce, fixed step overhead, the drafter step);
the term with the largest excess names the reason.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from cluster.planning.planner import LayoutEval, Workload
    from cluster.planning.topology import NodeProfile


def _gpu_s_per_token(ev: "LayoutEval", w: "Workload") -> dict[str, float]:
    """GPU-seconds per generated token, split by roofline term (replica 0 is representative)."""
    r = ev.replicas[0]
    thr, s = r.throughput, r.throughput.step
    tokens_per_step = max(r.max_seqs, 1) * (w.tau if thr.mode == "spec" else 1.0)
    k = ev.tp / tokens_per_step
    return {"roofline": max(s.mem_s, s.compute_s) * k, "all-reduce": s.comm_s * k,
            "step overhead": s.overhead_s * k,
            "drafter": thr.draft.total_s * k if thr.mode == "spec" and thr.draft else 0.0}


_WHY = {
    "roofline-memory": "each GPU reads more weight/KV bytes per generated token",
    "roofline-compute": "more tensor-core time per generated token (the verify step is compute-bound)",
    "all-reduce": "all-reduce over the interconnect costs more per generated token",
    "step overhead": "the fixed per-step overhead is spread over fewer tokens per GPU",
    "drafter": "the drafter runs on one GPU while the replica's other GPUs wait",
}


def explain(chosen: "LayoutEval", others: list["LayoutEval"], rejected: list[tuple[str, str]], w: "Workload") -> list[str]:
    r0 = chosen.replicas[0]
    thr = r0.throughput
    lines = [
        f"chosen {chosen.layout}: {chosen.tokens_per_s:,.0f} tok/s predicted at {w.concurrency} concurrent "
        f"sequences ({r0.max_seqs} per replica, {'speculative, tau ' + format(w.tau, 'g') + ', block ' + str(w.block_size) if thr.mode == 'spec' else 'autoregressive'}); "
        f"{thr.per_seq_tokens_per_s:,.0f} tok/s per sequence; step {thr.step_s * 1e3:.2f} ms "
        f"({thr.step.bound}-bound)"]
    mine = _gpu_s_per_token(chosen, w)
    for ev in others:
        ratio = ev.tokens_per_s / chosen.tokens_per_s
        theirs = _gpu_s_per_token(ev, w)
        diff = {k: theirs[k] - mine[k] for k in mine}
        worst = max(diff, key=diff.get)
        t = ev.replicas[0].throughput
        share = diff[worst] / max(sum(theirs.values()), 1e-12)
        key = f"roofline-{t.step.bound}" if worst == "roofline" else worst
        why = _WHY[key] if diff[worst] > 0 else "no roofline term is worse; it is within the tie margin"
        lines.append(f"{ev.layout}: {ratio:.2f}x the chosen throughput ({ev.tokens_per_s:,.0f} tok/s, "
                     f"{ev.replicas[0].max_seqs} seq/replica, step {t.step_s * 1e3:.2f} ms, {t.mode}) - {why}"
                     f" (that excess is {share:.0%} of its GPU-time per token)")
    for layout, reason in rejected:
        lines.append(f"{layout}: rejected - {reason}")
    return lines


def explain_nodes(chosen: "LayoutEval", node: "NodeProfile", w: "Workload") -> list[str]:
    """The per-node layout of a multi-node plan and why no TP group spans two nodes."""
    n = chosen.num_nodes
    per_node = [chosen.on_node(k) for k in range(n)]
    shares = [sum(r.max_seqs for r in reps) for reps in per_node]
    same = len(set(shares)) == 1
    lines = [
        f"cluster: {n} x {node.name} ({n * node.num_gpus} GPUs) -> {len(chosen.replicas)} replicas of TP{chosen.tp}, "
        f"{chosen.num_replicas} on every node ({chosen.layout}, {chosen.num_gpus} of each node's {node.num_gpus} GPUs); "
        f"the {w.concurrency} concurrent sequences split "
        + (f"{shares[0]} per node" if same else "as " + " / ".join(map(str, shares)) + " over the nodes")]
    for k, reps in enumerate(per_node):
        gpus = ", ".join(f"replica {r.index}: GPUs {'+'.join(map(str, r.gpu_ids))}" for r in reps)
        lines.append(f"node {k}: {gpus} ({shares[k]} sequences)")
    link = f"{node.link_name} ({node.link_bw / 1e9:,.0f} GB/s per GPU one way)" if node.link_bw else node.link_name
    why = (f"tensor-parallel groups stay inside one node: a TP group all-reduces twice per layer over {link}, "
           "which ends at the node")
    if node.scaleout_bw:
        why += f"; between nodes the path is {node.scaleout_name}: {node.scaleout_bw / 1e9:,.0f} GB/s per GPU"
        if node.link_bw:
            why += f" ({node.link_bw / node.scaleout_bw:.0f}x less)"
    why += (f", so the largest TP is the node's {node.num_gpus} GPUs; replicas on different nodes share nothing but "
            "the router")
    lines.append(why)
    return lines
