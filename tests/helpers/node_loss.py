"""The node-loss / rejoin scenario on a multi-node cluster (tests/helpers/multinode.py), shared by
tests/cpu/test_multinode.py (which asserts the goals) and benchmarks/node_loss.py (which repeats it and
prints the figures for docs/placement.md).

    cfg = fleet_config(tmp_path)                 # 8 x TP2 mock replicas, max_ongoing_requests 4
    url = start_fleet(cfg)                       # Serve on the cluster (ingress on the head node)
    run = await node_loss(url, mn)               # load, kill the busiest worker node, burst, rejoin
    run.figures()                                # the measured numbers

Timeline of `node_loss`: every session streams long turns back to back; after 3 s the worker node with
the most streams is killed; /health is polled until it shows the lost capacity; a burst of 24 requests
tests admission; each session then runs one short turn (retrying after a 429); the node rejoins (a new
raylet) and the scenario waits for all replicas to be live again and for a request to land on the new
node.
"""
from __future__ import annotations

import asyncio
import json
import re
import socket
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

from orchestrator.config import ServeConfig
from tests.helpers.serving import mock_config, wait_healthy

CHAT = "/v1/chat/completions"
AUTH = {"authorization": "Bearer key-a"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fleet_config(tmp_path, replicas: int = 8, tp: int = 2, max_ongoing: int = 4, step_ms: float = 30) -> ServeConfig:
    """Mock replicas of TP tp (real rank actors, one logical GPU each), `max_ongoing` requests each."""
    return mock_config(
        tmp_path, http={"port": free_port()}, drain_timeout_s=5,
        limits={"retry_after_s": 2, "queue_timeout_s": 20},
        replicas=[{"count": replicas, "tp": tp, "num_gpus": 1, "max_ongoing_requests": max_ongoing,
                   "max_num_seqs": max_ongoing,
                   "mock": {"step_ms": step_ms, "acceptance": 0.5, "vram_total_bytes": 288 * 10**9}}])


def start_fleet(cfg: ServeConfig, timeout_s: float = 180) -> str:
    from orchestrator.app import start_local

    url = start_local(cfg, init_ray=False, proxy_location="HeadOnly")  # the raylets here share one IP
    wait_healthy(url, timeout_s)
    return url


def placement() -> dict[str, dict]:
    """replica id -> {"ranks": {rank: (node id, GPU id)}, "bundle_nodes": [node ids]}, from the running
    rank actors (their own runtime context) and from the GCS (the replica's placement group)."""
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


def replica_nodes() -> dict[str, str]:
    return {rid: next(iter(w["ranks"].values()))[0] for rid, w in placement().items()}


def metric(text: str, name: str, **labels) -> float | None:
    """One sample of a Prometheus text exposition, by name and labels."""
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            got = dict(re.findall(r'(\w+)="([^"]*)"', line.split(" ")[0]))
            if all(got.get(k) == v for k, v in labels.items()):
                return float(line.rsplit(" ", 1)[1])
    return None


async def turn(c: httpx.AsyncClient, url: str, sid: str | None, text: str, max_tokens: int, stream: bool,
               out: dict | None = None) -> dict:
    """One chat turn; fills `out` as it goes (the replica as soon as the headers arrive); never raises."""
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


@dataclass
class NodeLossRun:
    replicas: int
    capacity_per_replica: int
    graceful: bool
    t_kill: float = 0.0
    victim_node: str = ""
    new_node: str = ""
    victims: set[str] = field(default_factory=set)  # replicas on the killed node
    turns: list[dict] = field(default_factory=list)  # session turns (after_kill set)
    burst: list[dict] = field(default_factory=list)
    rejoin_requests: list[dict] = field(default_factory=list)
    health_after: dict = field(default_factory=dict)  # /health once it showed the loss
    metrics_after: str = ""
    lost_seen_s: float | None = None  # kill -> /health shows the lost replicas and node
    back_s: float | None = None  # add_node -> every replica live again
    traffic_s: float | None = None  # add_node -> a request served by a replica on the new node
    sessions: list[dict] = field(default_factory=list)  # registry records at the end
    ingress_before: set[str] = field(default_factory=set)
    ingress_after: set[str] = field(default_factory=set)
    placement_after: dict = field(default_factory=dict)

    # ---------------------------------------------------------------- derived
    @property
    def crossed(self) -> list[dict]:
        """Session streams that were running when the node was killed."""
        return [t for t in self.turns if not t["after_kill"] and t["t_end"] > self.t_kill]

    @property
    def on_victim(self) -> list[dict]:
        return [t for t in self.crossed if t["replica"] in self.victims]

    @property
    def stream_end_s(self) -> list[float]:
        return [t["t_end"] - self.t_kill for t in self.on_victim]

    @property
    def affected(self) -> set[str]:
        return {t["sid"] for t in self.on_victim}

    @property
    def next_turn(self) -> dict[str, tuple[float, str]]:
        """Affected session -> (kill -> its next turn answered 200, the replica that served it)."""
        out: dict[str, tuple[float, str]] = {}
        for t in self.turns:
            if t["after_kill"] and t["sid"] in self.affected and t["status"] == 200:
                out.setdefault(t["sid"], (t["t_end"] - self.t_kill, t["replica"]))
        return out

    @property
    def after(self) -> list[dict]:
        """Every request sent after the kill."""
        return [t for t in self.turns if t["after_kill"]] + self.burst + self.rejoin_requests

    def figures(self) -> dict[str, Any]:
        codes = [t["status"] for t in self.after]
        nxt = [s for s, _ in self.next_turn.values()]
        return {
            "kill": "graceful (SIGTERM)" if self.graceful else "SIGKILL",
            "replicas_on_killed_node": len(self.victims),
            "streams_on_killed_node": len(self.on_victim),
            "stream_error_s": (min(self.stream_end_s), max(self.stream_end_s)) if self.stream_end_s else None,
            "health_shows_loss_s": self.lost_seen_s,
            "affected_sessions": len(self.affected),
            "next_turn_served_s": (min(nxt), max(nxt)) if nxt else None,
            "requests_after_kill": len(codes), "ok": codes.count(200), "429": codes.count(429),
            "5xx": sum(1 for s in codes if s and s >= 500), "transport_errors": sum(1 for t in self.after if t["error"]),
            "burst_429": sum(t["status"] == 429 for t in self.burst), "burst_200": sum(t["status"] == 200 for t in self.burst),
            "sessions_kept": sum(1 for s in self.sessions if s.get("id")), "sessions": len(self.sessions),
            "replicas_back_s": self.back_s, "traffic_on_new_node_s": self.traffic_s,
        }

    def summary(self) -> str:
        f = self.figures()
        rng = lambda v: f"{v[0]:.2f}-{v[1]:.2f} s" if v else "n/a"  # noqa: E731
        return (f"kill={f['kill']}: {f['replicas_on_killed_node']} replicas on the killed node, "
                f"{f['streams_on_killed_node']} stream(s) on it ended with an error event {rng(f['stream_error_s'])} "
                f"after the kill; /health showed the lost capacity {f['health_shows_loss_s']:.2f} s after it; the "
                f"{f['affected_sessions']} affected sessions' next turns were served on the surviving node "
                f"{rng(f['next_turn_served_s'])} after it; {f['requests_after_kill']} requests after the kill: "
                f"{f['ok']} x 200, {f['429']} x 429, {f['5xx']} x 5xx; {f['sessions_kept']}/{f['sessions']} sessions "
                f"kept; rejoin: all replicas live again {f['replicas_back_s']:.1f} s and traffic on the new node "
                f"{f['traffic_on_new_node_s']:.1f} s after add_node")


def _ingress_names() -> set[str]:
    import ray

    return {a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if "#Ingress#" in a["name"]}


async def node_loss(url: str, mn: Any, *, replicas: int = 8, capacity_per_replica: int = 4, sessions: int = 12,
                    graceful: bool = False, rejoin_timeout_s: float = 90.0) -> NodeLossRun:
    run = NodeLossRun(replicas, capacity_per_replica, graceful)
    async with httpx.AsyncClient(timeout=httpx.Timeout(60.0)) as c:
        sids = [(await c.post(url + "/v1/sessions", json={"role": "coder"}, headers=AUTH)).json()["id"]
                for _ in range(sessions)]
        rep_node = replica_nodes()
        run.ingress_before = _ingress_names()
        for sid in sids:  # each session gets a home replica
            warm = await turn(c, url, sid, "warm up", 4, False)
            assert warm["status"] == 200, warm

        live: dict[str, dict] = {}
        killed = asyncio.Event()

        async def session_loop(sid: str):
            i = 0
            while True:
                i += 1
                after = killed.is_set()
                live[sid] = t = {}
                await turn(c, url, sid, f"{sid} turn {i}", 8 if after else 240, stream=not after, out=t)
                t["after_kill"] = after
                run.turns.append(t)
                if after and t["status"] == 200:
                    return
                if after and t["status"] != 429:
                    return  # a failure: recorded, the test reports it
                await asyncio.sleep(0.2 if after else 0.0)  # a 429 after the kill: try again shortly

        tasks = [asyncio.create_task(session_loop(s)) for s in sids]
        await asyncio.sleep(3.0)  # every session streaming
        streaming = [t["replica"] for t in live.values() if t.get("replica") and t.get("events")]
        run.victim_node = max(sorted(set(rep_node.values())),
                              key=lambda n: sum(rep_node.get(r) == n for r in streaming))
        victim = next(w for w in mn.workers if w.node_id == run.victim_node)
        run.victims = {rid for rid, n in rep_node.items() if n == run.victim_node}
        run.t_kill = time.monotonic()
        killed.set()
        mn.kill(victim, graceful=graceful)  # main thread: Ray's node teardown installs signal handlers

        left = replicas - len(run.victims)
        while time.monotonic() - run.t_kill < 30:
            h = (await c.get(url + "/health")).json()
            if h["replicas"]["live"] == left and h["nodes"]["lost"] == 1:
                run.lost_seen_s = time.monotonic() - run.t_kill
                run.health_after = h
                break
            await asyncio.sleep(0.2)
        run.metrics_after = (await c.get(url + "/metrics")).text
        run.burst = list(await asyncio.gather(*[turn(c, url, None, f"burst {i}", 120, False) for i in range(24)]))
        await asyncio.wait_for(asyncio.gather(*tasks), 60)

        t_join = time.monotonic()
        new = mn.add_worker()  # main thread, as kill()
        run.new_node = new.node_id
        while time.monotonic() - t_join < rejoin_timeout_s:
            h = (await c.get(url + "/health")).json()
            if run.back_s is None and h["replicas"]["live"] == replicas:
                run.back_s = time.monotonic() - t_join
            if run.back_s is not None:
                rep_node = replica_nodes()
                rs = await asyncio.gather(*[turn(c, url, None, f"rejoin {i}", 4, False) for i in range(8)])
                run.rejoin_requests += rs
                if any(rep_node.get(r["replica"] or "") == new.node_id for r in rs if r["status"] == 200):
                    run.traffic_s = time.monotonic() - t_join
                    break
            await asyncio.sleep(0.5)
        run.ingress_after = _ingress_names()
        for sid in sids:
            r = await c.get(f"{url}/v1/sessions/{sid}", headers=AUTH)
            run.sessions.append(r.json() if r.status_code == 200 else {"status": r.status_code})
        run.placement_after = placement()
    return run


def last_event(t: dict) -> dict | str:
    ev = t["events"][-1] if t["events"] else ""
    return ev if ev == "[DONE]" else json.loads(ev)
