"""Beyond one node (issue 19), on a real multi-node Ray cluster on this machine (ray.cluster_utils.Cluster:
a GPU-less head with the ingress, two worker nodes of 8 logical GPUs each), mock engines throughout.

1. The planner's 2-node layout (8 x TP2) placed as ReplicaGroups: every group's rank actors on one node
   (STRICT_PACK), 4 groups per node, as planned; checked from where the actors really run (their own
   runtime context) and from Ray's GCS (placement_group_table), not from the plan.
2. The Serve application with 8 TP2 replicas (rank actors in Serve's bundles): 4 per node, no TP group
   split, the ingress's router sees all 8 with their nodes; NVML (fake, per rank) and step cost per node
   in /metrics.
3. A worker node killed under load (SIGKILL of its raylet and workers): its in-flight streams end with an
   error event within 5 s, the affected sessions' next turns are served on the surviving node within
   10 s, no session is lost, no new request gets a 5xx, /health and /metrics report the lost capacity,
   admission answers 429 + Retry-After beyond the survivors' capacity. Then the node rejoins: the 4
   replicas are restored on it and traffic reaches it within 60 s, with no restart of the app.

Several raylets on 2 cores: run only under the Ray lock on a quiet machine (see COORDINATION.md).
The figures printed here are the ones in docs/placement.md ("Several nodes").
"""
from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from cluster.runtime.replica_group import place_plan
from cluster.planning.planner import Workload, plan
from cluster.planning.presets import PRESETS, default_drafter
from cluster.planning.topology import get_node
from orchestrator.config import MockProfile
from orchestrator.mock_engine import MockEngineRecipe
from tests.helpers.multinode import gpu_node_ids, multinode_cluster
from tests.helpers.node_loss import fleet_config, last_event, metric, node_loss, placement, start_fleet

pytestmark = [pytest.mark.ray, pytest.mark.slow]

REPLICAS, TP, MAX_ONGOING = 8, 2, 4


@pytest.fixture(scope="module")
def mn():
    with multinode_cluster(workers=2, gpus=8) as mn:
        yield mn


def _by_node(items):
    out: dict[str, list] = {}
    for node, item in items:
        out.setdefault(node, []).append(item)
    return out


async def test_two_node_plan_placed_one_node_per_group(mn):
    m = PRESETS["qwen3-32b"]
    p = plan(get_node("dgx-b300"), m, default_drafter(m), Workload(concurrency=128), num_nodes=2)
    assert p.cluster_layout == "2 nodes x 4xTP2 = 8 replicas"
    nodes = gpu_node_ids()
    groups = place_plan(p, MockEngineRecipe(MockProfile()), progress=False, place_timeout_s=120)
    try:
        await asyncio.gather(*[g.place() for g in groups])
        for g, rp in zip(groups, p.replicas):
            actual = {r.node_id for r in g.ranks}  # where each rank actor runs (its runtime context)
            assert len(actual) == 1, f"{g.name}: TP group split over nodes {actual}"
            assert set(g.bundle_nodes()) == actual  # Ray's GCS agrees on the bundles
            assert actual == {nodes[rp.node]}  # on the node the plan put it
        per_node = _by_node((g.ranks[0].node_id, g) for g in groups)
        assert sorted(len(v) for v in per_node.values()) == [4, 4]
        for node, gs in per_node.items():
            gpus = [r.gpu_ids[0] for g in gs for r in g.ranks]
            assert len(gpus) == len(set(gpus)) == 8, (node, gpus)  # the node's 8 GPUs, each once
    finally:
        await asyncio.gather(*[g.shutdown() for g in groups])


# --------------------------------------------------------------------------------------------
# the Serve application on the cluster


@pytest.fixture(scope="module")
def app(mn, tmp_path_factory):
    from orchestrator.app import stop_local

    t0 = time.monotonic()
    url = start_fleet(fleet_config(tmp_path_factory.mktemp("multinode"), REPLICAS, TP, MAX_ONGOING))
    print(f"\nmultinode app: {REPLICAS} x TP{TP} replicas up {time.monotonic() - t0:.1f} s after start_local")
    yield url
    stop_local(shutdown_ray=False)


def test_serve_replicas_four_per_node_and_the_router_sees_them_all(app, mn):
    where = placement()
    assert len(where) == REPLICAS, where
    for rid, w in where.items():
        nodes = {n for n, _ in w["ranks"].values()}
        assert len(w["ranks"]) == TP and len(nodes) == 1, f"replica {rid}: TP group split: {w}"
        assert w["bundle_nodes"] == sorted(nodes)  # GCS: the replica's bundles are on that node
    per_node = _by_node((next(iter(w["ranks"].values()))[0], rid) for rid, w in where.items())
    assert sorted(len(v) for v in per_node.values()) == [4, 4] and set(per_node) == set(gpu_node_ids())
    for node, rids in per_node.items():
        gpus = [g for rid in rids for _, g in where[rid]["ranks"].values()]
        assert len(set(gpus)) == 8

    # the ingress's view: every replica, on its node; NVML (per rank) and step cost per node
    deadline = time.monotonic() + 30
    while True:
        h = httpx.get(app + "/health", timeout=10).json()
        text = httpx.get(app + "/metrics", timeout=10).text
        ok = h["replicas"]["live"] == REPLICAS and all(
            metric(text, "specfleet_node_gpus", node=n) == 8 for n in per_node)
        if ok or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert h["status"] == "ok" and h["replicas"] == {"expected": 8, "live": 8, "suspect": 0}, h
    assert h["capacity"] == REPLICAS * MAX_ONGOING and h["nodes"] == {"live": 2, "lost": 0}
    for node in per_node:
        assert metric(text, "specfleet_node_replicas", node=node) == 4
        assert metric(text, "specfleet_node_gpus", node=node) == 8  # 4 replicas x 2 ranks, one GPU each
        assert metric(text, "specfleet_node_vram_total_bytes", node=node) == 8 * 288e9
        assert metric(text, "specfleet_node_step_ms", node=node, kind="ar") is not None


# --------------------------------------------------------------------------------------------
# node loss under load, then rejoin


async def test_node_lost_under_load_then_rejoins(app, mn):
    run = await node_loss(app, mn, replicas=REPLICAS, capacity_per_replica=MAX_ONGOING)
    print("\nnode-loss figures: " + run.summary())
    left = REPLICAS - len(run.victims)
    # ---- /health and /metrics report the lost capacity
    assert run.lost_seen_s is not None, run.health_after
    h = run.health_after
    assert h["status"] == "degraded" and h["capacity"] == left * MAX_ONGOING and h["nodes"]["lost"] == 1
    assert metric(run.metrics_after, "specfleet_fleet_replicas", state="live") == left
    assert metric(run.metrics_after, "specfleet_node_lost", node=run.victim_node) == 1
    assert metric(run.metrics_after, "specfleet_node_replicas", node=run.victim_node) is None
    # ---- in-flight streams on the lost node: an error event within 5 s
    assert run.on_victim, "no stream was running on the killed node"
    for t in run.on_victim:
        assert t["error"] is None and t["status"] == 200, t
        last = last_event(t)
        assert last["error"]["code"] == "engine_error" and "replica failed mid-stream" in last["error"]["message"]
    assert max(run.stream_end_s) < 5.0, run.stream_end_s
    for t in run.crossed:
        if t["replica"] not in run.victims:  # streams on the surviving node are untouched
            assert last_event(t) == "[DONE]", t
    # ---- the affected sessions' next turns: served on the surviving node within 10 s
    nxt = run.next_turn
    assert set(nxt) == run.affected, (run.affected, nxt)
    assert max(s for s, _ in nxt.values()) < 10.0, nxt
    assert all(r not in run.victims for _, r in nxt.values())
    # ---- no 5xx for new requests, 429 + Retry-After beyond the survivors' capacity
    codes = [t["status"] for t in run.after]
    assert all(t["error"] is None for t in run.after), [t["error"] for t in run.after if t["error"]][:3]
    assert not [s for s in codes if s >= 500], codes
    refused = [t for t in run.burst if t["status"] == 429]
    assert refused and all(int(t["retry_after"]) >= 1 for t in refused)
    assert all(t["body"]["error"]["code"] == "fleet_at_capacity" for t in refused)
    assert sum(t["status"] == 200 for t in run.burst) <= left * MAX_ONGOING
    # ---- no session lost: every one is in the registry, the affected ones with the failed turn and the move
    assert len(run.sessions) == 12
    for s in run.sessions:
        assert s.get("turns", 0) >= 3, s  # warm-up, the turn across the kill, the next one
        if s["id"] in run.affected:
            hist = [(x["replica"], x["finish_reason"]) for x in s["replica_history"]]
            assert any(rep in run.victims and fin == "error" for rep, fin in hist), hist
            assert hist[-1][0] not in run.victims and hist[-1][1] == "length", hist
    # ---- rejoin: capacity back and traffic on the new node within 60 s, no app restart
    assert run.back_s is not None and run.back_s < 60.0, run.back_s
    assert run.traffic_s is not None and run.traffic_s < 60.0, run.traffic_s
    assert run.ingress_after == run.ingress_before
    per_node = _by_node((next(iter(w["ranks"].values()))[0], rid) for rid, w in run.placement_after.items())
    assert sorted(len(v) for v in per_node.values()) == [4, 4] and run.new_node in per_node
