"""The ingress's fleet view (orchestrator/fleet.py), in process (no Ray): per-node aggregation, a failed
replica makes its node suspect, admission refuses (429 + Retry-After) beyond the live replicas'
capacity, /health and /metrics report the lost capacity. The same on a real multi-node Ray cluster:
tests/cpu/test_multinode.py."""
from __future__ import annotations

import asyncio

from orchestrator.api.server import create_app
from orchestrator.api.state import LocalBackend, ServerState
from orchestrator.fleet import Fleet, ReplicaSeen, fleet_view
from orchestrator.mock_engine import MockEngine
from orchestrator.replica import ReplicaCore
from orchestrator.routing.stats import RoutingStats
from tests.helpers.serving import asgi_client, mock_config

CHAT = "/v1/chat/completions"


def chat(content: str, **kw) -> dict:
    return {"model": "specfleet-demo", "messages": [{"role": "user", "content": content}], **kw}


def seen(rid: str, node: str, *, gpus: int = 2, step: float = 10.0, updated: float = 0.0) -> ReplicaSeen:
    st = RoutingStats(rid, kv_free_tokens=100, kv_total_tokens=200, vram_free_bytes=gpus * 10,
                      vram_total_bytes=gpus * 40, gpu_count=gpus, num_running=1, step_ms_ar=step,
                      step_ms_by_block={16: 2 * step}, updated_at=updated)
    return ReplicaSeen(rid, node, 4, st)


def test_fleet_view_aggregates_per_node():
    reps = [seen("a", "n1", step=10), seen("b", "n1", step=20), seen("c", "n2"), seen("d", "n2")]
    v = fleet_view(4, reps, set())
    assert (v.status, v.capacity, [n.node_id for n in v.nodes]) == ("ok", 16, ["n1", "n2"])
    n1 = v.nodes[0]
    assert (n1.replicas, n1.gpus, n1.vram_total_bytes, n1.vram_free_bytes) == (["a", "b"], 4, 160, 40)
    assert (n1.step_ms_ar, n1.step_ms_by_block, n1.num_running, n1.kv_free_tokens) == (15.0, {16: 30.0}, 2, 200)
    lost = fleet_view(4, reps[2:], set(), lost_nodes=["n1"])
    assert (lost.status, lost.capacity, lost.lost_nodes) == ("degraded", 8, ["n1"])
    assert lost.to_dict()["nodes"] == {"live": 1, "lost": 1}
    assert fleet_view(4, None, set()).status == "starting"
    assert fleet_view(4, [], set()).status == "unavailable"
    # suspicion of every replica is ignored: better a doubtful replica than none
    assert len(fleet_view(4, reps, {"a", "b", "c", "d"}).live) == 4


class Dir:
    def __init__(self, reps):
        self.reps = reps

    def replicas(self):
        return self.reps


def test_a_failure_makes_its_node_suspect_until_fresh_stats():
    clock = [100.0]
    d = Dir([seen("a", "n1", updated=99), seen("b", "n1", updated=99), seen("c", "n2", updated=99)])
    fleet = Fleet(d, 3, clock=lambda: clock[0], own_node="n2")
    fleet.mark_failed("a")
    assert fleet.avoid() == ["a", "b"]  # b shares a's node: doubted too
    v = fleet.view()
    assert ([r.replica_id for r in v.live], v.capacity, v.status) == (["c"], 4, "degraded")
    # b is alive: its next stats report clears it; a (dead) never reports again
    d.reps[1] = seen("b", "n1", updated=101)
    assert fleet.avoid() == ["a"]
    # the router drops a (Serve's controller saw it die): no longer a suspect, n1 still hosts b
    d.reps = d.reps[1:]
    assert fleet.avoid() == [] and fleet.view().lost_nodes == []
    # a failure on the ingress's own node doubts no node-mate (that node is evidently up)
    fleet.mark_failed("c")
    assert fleet.avoid() == ["c"]
    clock[0] += 61  # and suspicion expires
    assert fleet.avoid() == []


def _app(tmp_path, nodes, max_ongoing=2, step_ms=30):
    cfg = mock_config(tmp_path, limits={"retry_after_s": 3},
                      replicas=[{"count": len(nodes), "max_ongoing_requests": max_ongoing,
                                 "mock": {"step_ms": step_ms, "vram_total_bytes": 80 * 10**9}}])
    engines = [MockEngine(s.mock, block_size=16, max_num_seqs=s.max_num_seqs) for s in cfg.fleet()]
    cores = [ReplicaCore(e, s, replica_id=f"r{i}", rank=i, block_size=16, spec_available=True, telemetry=e.telemetry)
             for i, (e, s) in enumerate(zip(engines, cfg.fleet()))]
    state = ServerState.create(cfg, LocalBackend(cores, nodes))
    return create_app(state), state, cores


class Unreachable:
    """A replica whose node is gone: the call itself fails (as Ray's ActorUnavailableError does)."""

    def __init__(self, core):
        self.replica_id, self.spec = core.replica_id, core.spec
        self.last_stats = core.routing_stats()  # what the router still holds: the last report before the loss

    async def generate(self, **_):
        raise ConnectionError("actor unavailable: node gone")
        yield  # pragma: no cover

    def routing_stats(self):
        return self.last_stats


async def test_admission_refuses_beyond_live_capacity_and_health_reports_loss(tmp_path):
    app, state, cores = _app(tmp_path, ["n1", "n1", "n2", "n2"], max_ongoing=2)
    async with asgi_client(app) as c:
        h = (await c.get("/health")).json()
        assert h["replicas"] == {"expected": 4, "live": 4, "suspect": 0} and h["capacity"] == 8
        assert h["nodes"] == {"live": 2, "lost": 0}
        m = (await c.get("/metrics")).text
        assert 'specfleet_node_replicas{node="n1"} 2.0' in m and 'specfleet_node_gpus{node="n2"} 2.0' in m
        assert 'specfleet_node_step_ms{kind="ar",node="n1"}' in m

        # node n1 is lost: its replicas' calls fail; the next request is served by n2 (no 5xx)
        state.backend.cores[0] = Unreachable(cores[0])
        state.backend.cores[1] = Unreachable(cores[1])
        rs = [await c.post(CHAT, json=chat(f"after loss {i}", max_tokens=4)) for i in range(4)]
        assert [r.status_code for r in rs] == [200] * 4
        assert {r.headers["x-specfleet-replica"] for r in rs} <= {"r2", "r3"}
        h = (await c.get("/health")).json()
        assert h["status"] == "degraded" and h["replicas"]["live"] == 2 and h["capacity"] == 4
        assert h["nodes"] == {"live": 1, "lost": 1}

        # more concurrent requests than the survivors hold: 429 + Retry-After, never queued onto them
        async def one(i):
            return await c.post(CHAT, json=chat(f"burst {i}", max_tokens=40), timeout=30)

        burst = await asyncio.gather(*[one(i) for i in range(10)])
        codes = sorted(r.status_code for r in burst)
        assert set(codes) == {200, 429} and codes.count(200) <= 4, codes
        for r in burst:
            if r.status_code == 429:
                assert r.headers["retry-after"] == "3" and r.json()["error"]["code"] == "fleet_at_capacity"
                assert "2 of 4 live replicas" in r.json()["error"]["message"]
        m = (await c.get("/metrics")).text
        assert 'specfleet_fleet_replicas{state="live"} 2.0' in m
        assert 'specfleet_admission_refused_total{reason="fleet_capacity"}' in m
    assert state.in_flight == 0


def test_router_directory_reads_the_routers_replica_set_once_per_report():
    from types import SimpleNamespace as NS

    from orchestrator.fleet import RouterDirectory, RouterRegistry

    big = RoutingStats("x", kv_free_tokens=7, gpu_count=2, vram_total_bytes=80, step_ms_by_block={16: 3.0},
                       tau_by_session={f"s{i}": (3.0, 1) for i in range(5000)}, updated_at=5.0).to_dict()
    reps = {i: NS(replica_id=NS(unique_id=f"r{i}"), node_id=f"n{i % 2}", max_ongoing_requests=4,
                  routing_stats=big if i else {}) for i in range(3)}
    reg = RouterRegistry()
    assert RouterDirectory("app", "ModelReplica", reg).replicas() is None  # no router yet: unknown
    reg.attach(NS(_deployment_id=NS(app_name="app", name="ModelReplica"), curr_replicas=reps))
    d = RouterDirectory("app", "ModelReplica", reg)
    first = d.replicas()
    assert [(r.replica_id, r.node_id, r.max_ongoing_requests) for r in first] == [
        ("r0", "n0", 4), ("r1", "n1", 4), ("r2", "n0", 4)]
    assert first[0].stats is None  # not reported yet
    s1 = first[1].stats
    assert (s1.kv_free_tokens, s1.gpu_count, s1.step_ms_by_block, s1.tau_by_session) == (7, 2, {16: 3.0}, {})
    assert d.replicas()[1].stats is s1  # the same report is not parsed again (request path)
    reps[1].routing_stats = {**big, "kv_free_tokens": 1}
    assert d.replicas()[1].stats.kv_free_tokens == 1
