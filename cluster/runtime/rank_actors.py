"""Ray mechanics of one replica's ranks: reserve the bundles, start / ping / kill the rank actors, wait for
their start-up with per-rank progress bars. Used by cluster/runtime/replica_group.py (ReplicaGroup)."""
from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from workers.engine.params import NoCapacity


@dataclass
class RankInfo:
    rank: int
    bundle_index: int
    gpu_ids: list[str]
    node_ip: str
    pid: int
    actor_id: str = ""
    node_id: str = ""  # Ray node id (several Ray nodes may share one IP)


NODE_LABEL = "ray.io/node-id"  # the label Ray gives every node (its node id)


async def reserve_bundles(pg, tp: int, bundle: dict[str, float], name: str, timeout_s: float,
                          node_id: str | None = None) -> tuple[Any, bool]:
    """(placement group, created by us?): the given group, else the caller's current one when it has tp
    bundles (a Serve replica's), else a new STRICT_PACK group of tp bundles, on node `node_id` when
    given (a label selector on every bundle). Raises NoCapacity when it cannot be placed in time (an
    unplaceable group would otherwise stay PENDING forever)."""
    import ray
    from ray.util.placement_group import get_current_placement_group, placement_group

    own = False
    if pg is None:
        current = get_current_placement_group()
        if current is not None and len(current.bundle_specs) >= tp:
            pg = current
        else:
            selector = [{NODE_LABEL: node_id} for _ in range(tp)] if node_id else None
            pg, own = placement_group([dict(bundle) for _ in range(tp)], strategy="STRICT_PACK", name=name,
                                      bundle_label_selector=selector), True
    ready, _ = await asyncio.to_thread(ray.wait, [pg.ready()], timeout=timeout_s)
    if not ready:
        if own:
            remove_group(pg)
        where = f"node {node_id[:12]}" if node_id else "one node"
        raise NoCapacity(f"cannot place {tp} x {bundle} (STRICT_PACK) within {timeout_s:.0f} s: "
                         f"not enough free GPUs/CPUs on {where}")
    return pg, own


def bundle_nodes(pg) -> list[str]:
    """The node id of each bundle of a placed group, as Ray's GCS records it (ray.util.placement_group_table)."""
    from ray.util import placement_group_table

    table = placement_group_table(pg)
    where = table.get("bundles_to_node_id") or {}
    return [where.get(i, "") for i in range(len(table.get("bundles") or {}))]


def gpu_nodes(min_gpus: float = 1) -> list[str]:
    """Alive Ray nodes with at least min_gpus GPUs, by node id (the order place_plan maps plan nodes to)."""
    import ray

    return sorted(n["NodeID"] for n in ray.nodes() if n.get("Alive") and n["Resources"].get("GPU", 0) >= min_gpus)


def remove_group(pg) -> None:
    from ray.util.placement_group import remove_placement_group

    try:
        remove_placement_group(pg)
    except Exception:  # already gone
        pass


async def spawn_ranks(pg, bundle_indices: list[int], bundle: dict[str, float], threads: int,
                      name: str | None = None) -> tuple[list[Any], list[RankInfo]]:
    """One RankWorker per bundle index (rank r -> bundle_indices[r]), pinned to its bundle; pinged.
    With `name`, rank r is the named actor f"{name}-rank{r}" (visible in `ray list actors`)."""
    import ray
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from cluster.runtime.rank_worker import RankWorker

    cls = ray.remote(RankWorker)
    world = len(bundle_indices)
    actors = [
        cls.options(
            num_cpus=bundle.get("CPU", 0), num_gpus=bundle.get("GPU", 0),
            **({"name": f"{name}-rank{rank}"} if name else {}),
            scheduling_strategy=PlacementGroupSchedulingStrategy(
                placement_group=pg, placement_group_bundle_index=b, placement_group_capture_child_tasks=False),
        ).remote(rank, world, b, threads)
        for rank, b in enumerate(bundle_indices)
    ]
    pings = await asyncio.gather(*[a.ping.remote() for a in actors])
    ranks = [RankInfo(p["rank"], p["bundle_index"], p["gpu_ids"], p["node_ip"], p["pid"], p["actor_id"],
                      p.get("node_id", "")) for p in pings]
    return actors, ranks


async def kill_ranks(actors: list[Any]) -> None:
    """Kill every rank actor and wait until they are gone, so their bundles are free again."""
    import ray

    for a in actors:
        try:
            ray.kill(a, no_restart=True)
        except Exception:
            pass
    for a in actors:
        for _ in range(50):
            try:
                await asyncio.wait_for(a.ping.remote(), 0.2)
            except Exception:
                break
            await asyncio.sleep(0.1)


async def wait_with_progress(refs: list, actors: list[Any], name: str, show: bool) -> list:
    """Await every rank's setup; with `show`, one tqdm bar per rank (stage, layers sharded)."""
    bars = None
    if show:
        from tqdm.auto import tqdm

        bars = [tqdm(total=1, desc=f"{name} rank {r}", position=r, leave=False) for r in range(len(actors))]
    pending = asyncio.ensure_future(asyncio.gather(*refs))
    try:
        while not pending.done():
            await asyncio.wait([pending], timeout=0.25)
            for bar, a in zip(bars or [], actors):
                try:
                    p = await asyncio.wait_for(a.get_progress.remote(), 5)
                except Exception:
                    continue
                bar.total = max(p["total"], 1)
                bar.n = p["done"] if p["total"] else (1 if p["stage"] == "ready" else 0)
                bar.set_postfix_str(p["stage"], refresh=True)
        return pending.result()
    finally:
        for bar in bars or []:
            bar.close()
