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
import json
import re
import socket
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
from tests.helpers.serving import mock_config, wait_healthy

pytestmark = [pytest.mark.ray, pytest.mark.slow]

CHAT = "/v1/chat/completions"
AUTH = {"authorization": "Bearer key-a"}
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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def app(mn, tmp_path_factory):
    from orchestrator.app import start_local, stop_local

    cfg = mock_config(
        tmp_path_factory.mktemp("multinode"), http={"port": _free_port()}, drain_timeout_s=5,
        limits={"retry_after_s": 2, "queue_timeout_s": 20},
        replicas=[{"count": REPLICAS, "tp": TP, "num_gpus": 1, "max_ongoing_requests": MAX_ONGOING,
                   "max_num_seqs": MAX_ONGOING,
                   "mock": {"step_ms": 30, "acceptance": 0.5, "vram_total_bytes": 288 * 10**9}}])
    t0 = time.monotonic()
    url = start_local(cfg, init_ray=False, proxy_location="HeadOnly")  # raylets here share one IP
    wait_healthy(url, 180)
    print(f"\nmultinode app: {REPLICAS} x TP{TP} replicas up {time.monotonic() - t0:.1f} s after start_local")
    yield url
    stop_local(shutdown_ray=False)


def placement() -> dict[str, dict]:
    """replica id -> {"ranks": [(node, gpu)], "bundle_nodes": [...]} from the running actors and the GCS."""
    import ray
    from ray.util import placement_group_table

    out: dict[str, dict] = {}
    for a in ray.util.list_named_actors(all_namespaces=True):
        m = re.fullmatch(r"specfleet-(\w+)-\w+-g\d+-rank(\d+)", a["name"])
        if not m:
            continue
        try:
            ping = ray.get(ray.get_actor(a["name"], namespace=a["namespace"]).ping.remote(), timeout=30)
        except Exception:  # dying with its node
            continue
        out.setdefault(m.group(1), {"ranks": {}, "bundle_nodes": []})["ranks"][int(m.group(2))] = (
            ping["node_id"], ping["gpu_ids"][0])
    for pg in placement_group_table().values():
        m = re.fullmatch(r"SERVE_REPLICA::\w+#ModelReplica#(\w+)", pg.get("name") or "")
        if m and m.group(1) in out and pg["state"] == "CREATED":
            out[m.group(1)]["bundle_nodes"] = sorted(set(pg["bundles_to_node_id"].values()))
    return out


def metric(text: str, name: str, **labels) -> float | None:
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            got = dict(re.findall(r'(\w+)="([^"]*)"', line.split(" ")[0]))
            if all(got.get(k) == v for k, v in labels.items()):
                return float(line.rsplit(" ", 1)[1])
    return None


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


async def _turn(c: httpx.AsyncClient, url: str, sid: str | None, text: str, max_tokens: int, stream: bool,
                out: dict | None = None) -> dict:
    """One turn; fills `out` as it goes (the replica as soon as the headers arrive); returns status,
    replica, events / body, end time; never raises."""
    headers = {**AUTH, **({"x-session-id": sid} if sid else {})}
    body = {"model": "specfleet-demo", "messages": [{"role": "user", "content": text}], "max_tokens": max_tokens,
            "stream": stream}
    out = {} if out is None else out
    out.update({"sid": sid, "status": None, "replica": None, "events": [], "error": None, "t0": time.monotonic()})
    try:
        if stream:
            async with c.stream("POST", url + CHAT, headers=headers, json=body) as r:
                out["status"], out["replica"] = r.status_code, r.headers.get("x-specfleet-replica")
                out["retry_after"] = r.headers.get("retry-after")
                async for line in r.aiter_lines():
                    if line.startswith("data: "):
                        out["events"].append(line[6:])
        else:
            r = await c.post(url + CHAT, headers=headers, json=body)
            out["status"], out["replica"] = r.status_code, r.headers.get("x-specfleet-replica")
            out["retry_after"] = r.headers.get("retry-after")
            out["body"] = r.json()
    except Exception as exc:
        out["error"] = repr(exc)
    out["t_end"] = time.monotonic()
    return out


def _replica_nodes() -> dict[str, str]:
    return {rid: next(iter(w["ranks"].values()))[0] for rid, w in placement().items()}


async def test_node_lost_under_load_then_rejoins(app, mn):
    import ray

    n_sessions = 12
    async with httpx.AsyncClient(timeout=httpx.Timeout(60.0)) as c:
        sids = [(await c.post(app + "/v1/sessions", json={"role": "coder"}, headers=AUTH)).json()["id"]
                for _ in range(n_sessions)]
        rep_node = _replica_nodes()
        ingress_before = {a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                          if "#Ingress#" in a["name"]}
        for sid in sids:  # each session gets a home replica
            assert (await _turn(c, app, sid, "warm up", 4, False))["status"] == 200

        # load: every session streams long turns back to back; after the kill, one short turn each
        kill_at: list[float] = []
        turns: list[dict] = []
        live: dict[str, dict] = {}

        async def session_loop(sid: str):
            i = 0
            while True:
                i += 1
                after = bool(kill_at)
                live[sid] = t = {}
                await _turn(c, app, sid, f"{sid} turn {i}", 8 if after else 240, stream=not after, out=t)
                t["after_kill"] = after
                turns.append(t)
                if after and t["status"] == 200:
                    return
                await asyncio.sleep(0.2 if after else 0.0)  # a 429 after the kill: try again shortly

        tasks = [asyncio.create_task(session_loop(s)) for s in sids]
        await asyncio.sleep(3.0)  # every session streaming
        # the victim: the worker node hosting the most replicas with streams in flight
        streaming = [t["replica"] for t in live.values() if t.get("replica") and t.get("events")]
        victim_node = max(set(rep_node.values()), key=lambda n: sum(rep_node.get(r) == n for r in streaming))
        victim = next(w for w in mn.workers if w.node_id == victim_node)
        survivor = next(w.node_id for w in mn.workers if w.node_id != victim_node)
        victims = {rid for rid, n in rep_node.items() if n == victim_node}
        t_kill = time.monotonic()
        kill_at.append(t_kill)
        mn.kill(victim)  # in the main thread: Ray's node teardown installs signal handlers

        # /health reports the lost capacity
        lost_seen = None
        extra: list[dict] = []
        while time.monotonic() - t_kill < 30:
            h = (await c.get(app + "/health")).json()
            if h["replicas"]["live"] == REPLICAS - len(victims) and h["nodes"]["lost"] == 1:
                lost_seen = time.monotonic() - t_kill
                break
            await asyncio.sleep(0.2)
        assert lost_seen is not None, h
        assert h["status"] == "degraded" and h["capacity"] == (REPLICAS - len(victims)) * MAX_ONGOING
        text = (await c.get(app + "/metrics")).text
        assert metric(text, "specfleet_fleet_replicas", state="live") == REPLICAS - len(victims)
        assert metric(text, "specfleet_node_lost", node=victim_node) == 1
        assert metric(text, "specfleet_node_replicas", node=victim_node) is None

        # admission: a burst beyond what the survivors hold is refused with 429 + Retry-After
        burst = await asyncio.gather(*[_turn(c, app, None, f"burst {i}", 120, False) for i in range(24)])
        extra += burst
        await asyncio.wait_for(asyncio.gather(*tasks), 60)
        # the node rejoins: the pending replicas are placed on it, traffic returns, the app is not restarted
        t_join = time.monotonic()
        new = mn.add_worker()  # main thread, as kill()
        back = traffic = None
        while time.monotonic() - t_join < 90:
            h = (await c.get(app + "/health")).json()
            if back is None and h["replicas"]["live"] == REPLICAS:
                back = time.monotonic() - t_join
            if back is not None:
                rep_node = _replica_nodes()
                rs = await asyncio.gather(*[_turn(c, app, None, f"rejoin {i}", 4, False) for i in range(8)])
                extra += rs
                if any(rep_node.get(r["replica"] or "") == new.node_id for r in rs if r["status"] == 200):
                    traffic = time.monotonic() - t_join
                    break
            await asyncio.sleep(0.5)
        ingress_after = {a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                         if "#Ingress#" in a["name"]}
        records = [(await c.get(f"{app}/v1/sessions/{sid}", headers=AUTH)) for sid in sids]
        where_after = placement()

    # ---- in-flight streams on the lost node: an error event within 5 s
    crossed = [t for t in turns if not t["after_kill"] and t["t_end"] > t_kill]
    on_victim = [t for t in crossed if t["replica"] in victims]
    assert on_victim, "no stream was running on the killed node"
    ends = [t["t_end"] - t_kill for t in on_victim]
    for t in on_victim:
        assert t["error"] is None and t["status"] == 200, t
        last = json.loads(t["events"][-1])
        assert last["error"]["code"] == "engine_error" and "replica failed mid-stream" in last["error"]["message"]
    assert max(ends) < 5.0, ends
    for t in crossed:
        if t["replica"] not in victims:  # streams on the surviving node are untouched
            assert t["events"][-1] == "[DONE]", t
    # ---- the affected sessions' next turns: served on the surviving node within 10 s
    affected = {t["sid"] for t in on_victim}
    served = {}
    for t in turns:
        if t["after_kill"] and t["sid"] in affected and t["status"] == 200:
            served.setdefault(t["sid"], (t["t_end"] - t_kill, t["replica"]))
    assert set(served) == affected, (affected, served)
    assert max(s for s, _ in served.values()) < 10.0, served
    assert all(r not in victims for _, r in served.values())
    # ---- no 5xx for new requests, 429 + Retry-After beyond the survivors' capacity
    after = [t for t in turns if t["after_kill"]] + extra
    codes = [t["status"] for t in after]
    assert all(t["error"] is None for t in after), [t["error"] for t in after if t["error"]][:3]
    assert not [s for s in codes if s >= 500], codes
    refused = [t for t in burst if t["status"] == 429]
    assert refused and all(int(t["retry_after"]) >= 1 for t in refused)
    assert all(t["body"]["error"]["code"] == "fleet_at_capacity" for t in refused)
    assert sum(t["status"] == 200 for t in burst) <= (REPLICAS - len(victims)) * MAX_ONGOING
    # ---- no session lost: every one is in the registry, the affected ones with the failed turn and the move
    assert all(r.status_code == 200 for r in records)
    for r in records:
        s = r.json()
        assert s["turns"] >= 3, s  # warm-up, the turn across the kill, the next one
        if s["id"] in affected:
            hist = [(h["replica"], h["finish_reason"]) for h in s["replica_history"]]
            assert any(rep in victims and fin == "error" for rep, fin in hist), hist
            assert hist[-1][0] not in victims and hist[-1][1] == "length", hist
    # ---- rejoin: capacity back and traffic on the new node within 60 s, no app restart
    assert back is not None and back < 60.0, back
    assert traffic is not None and traffic < 60.0, traffic
    assert ingress_after == ingress_before
    assert sorted(len(v) for v in _by_node(
        (next(iter(w["ranks"].values()))[0], rid) for rid, w in where_after.items()).values()) == [4, 4]
    print(f"\nnode-loss figures: {len(victims)} replicas on the killed node, {len(on_victim)} stream(s) on it "
          f"ended with an error event {min(ends):.2f}-{max(ends):.2f} s after the kill; /health showed the lost "
          f"capacity {lost_seen:.2f} s after it; the {len(affected)} affected sessions' next turns were served on "
          f"the surviving node {min(s for s, _ in served.values()):.2f}-{max(s for s, _ in served.values()):.2f} s "
          f"after it; {len(after)} requests after the kill: {codes.count(200)} x 200, {codes.count(429)} x 429, "
          f"0 x 5xx; {n_sessions}/{n_sessions} sessions kept; rejoin: {REPLICAS} replicas live again "
          f"{back:.1f} s and traffic on the new node {traffic:.1f} s after add_node; survivor {survivor[:8]}")
