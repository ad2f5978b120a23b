"""Node loss and rejoin on a multi-node Ray cluster on this machine (ray.cluster_utils.Cluster: a GPU-less
head with the ingress + 2 worker nodes of 8 logical GPUs; 8 mock replicas of TP2, real rank actors).

    python -m benchmarks.node_loss [--runs 1] [--graceful] [--json benchmarks/results/node_loss.json]
    python -m benchmarks.node_loss --spread 4      # only: where Serve puts 4 x TP2 replicas on 2 x 8 GPUs
    python -m benchmarks.node_loss --bare          # only Ray: a bare actor's stream vs its node's SIGKILL

Each run starts a fresh cluster and app, streams 12 sessions, kills the busiest worker node (SIGKILL of its
raylet and workers; --graceful: SIGTERM first, as a deleted pod), and reports: when the streams on it ended
(error event), when /health showed the lost capacity, when the affected sessions' next turns were served,
the status codes of every request after the kill, and after add_node when all replicas were live again
and a request reached the new node (tests/helpers/node_loss.py). Several raylets on 2 cores: run it on a
quiet machine (under the Ray lock where the machine is shared).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path


def one_run(graceful: bool) -> dict:
    from orchestrator.app import stop_local
    from tests.helpers.multinode import multinode_cluster
    from tests.helpers.node_loss import fleet_config, node_loss, start_fleet

    load = Path("/proc/loadavg").read_text().split()[:3]
    t0 = time.monotonic()
    with multinode_cluster(workers=2, gpus=8) as mn:
        url = start_fleet(fleet_config(Path(tempfile.mkdtemp(prefix="node_loss_"))))
        up = time.monotonic() - t0
        try:
            run = asyncio.run(node_loss(url, mn, graceful=graceful))
        finally:
            stop_local(shutdown_ray=False)
    print(run.summary(), flush=True)
    return {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "loadavg_at_start": load,
            "cluster_and_app_up_s": round(up, 1), **run.figures()}


def spread(replicas: int) -> dict:
    """Deploy `replicas` TP2 mock replicas on the 2-node cluster and count them per node (actual placement)."""
    from orchestrator.app import stop_local
    from tests.helpers.multinode import multinode_cluster
    from tests.helpers.node_loss import fleet_config, replica_nodes, start_fleet

    load = Path("/proc/loadavg").read_text().split()[:3]
    with multinode_cluster(workers=2, gpus=8) as mn:
        start_fleet(fleet_config(Path(tempfile.mkdtemp(prefix="spread_")), replicas=replicas))
        try:
            nodes = replica_nodes()
            per_node = {w.node_id[:8]: sum(n == w.node_id for n in nodes.values()) for w in mn.workers}
        finally:
            stop_local(shutdown_ray=False)
    return {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "loadavg_at_start": load,
            "replicas": replicas, "tp": 2, "per_node": per_node}


def bare() -> dict:
    """Ray alone, no Serve: an actor on a worker node streams; the node is SIGKILLed. When does the
    caller's stream fail, when does a new call fail, when does the GCS mark the node dead?"""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from tests.helpers.multinode import multinode_cluster

    @ray.remote(num_cpus=0)
    class Streamer:
        async def stream(self, n: int):
            for i in range(n):
                await asyncio.sleep(0.05)
                yield i

        def ping(self) -> int:
            return 1

    load = Path("/proc/loadavg").read_text().split()[:3]
    with multinode_cluster(workers=2, gpus=8) as mn:
        victim = mn.workers[0]
        actor = Streamer.options(scheduling_strategy=NodeAffinitySchedulingStrategy(victim.node_id, soft=False)).remote()
        ray.get(actor.ping.remote())

        async def scenario() -> dict:
            gen = actor.stream.options(num_returns="streaming").remote(100000)
            out: dict = {}

            async def consume():
                try:
                    async for ref in gen:
                        await ref
                except Exception as exc:
                    out["stream_error"] = type(exc).__name__

            task = asyncio.create_task(consume())
            await asyncio.sleep(1.0)
            t0 = time.monotonic()
            mn.kill(victim)
            await task
            out["stream_fails_s"] = time.monotonic() - t0
            t1 = time.monotonic()
            try:
                await asyncio.wait_for(actor.ping.remote(), 60)
            except Exception as exc:
                out["new_call_error"] = type(exc).__name__
            out["new_call_fails_s"] = time.monotonic() - t1
            while time.monotonic() - t0 < 120:
                if not {n["NodeID"]: n["Alive"] for n in ray.nodes()}.get(victim.node_id, True):
                    out["gcs_marks_node_dead_s"] = time.monotonic() - t0
                    break
                await asyncio.sleep(0.2)
            t2 = time.monotonic()
            mn.add_worker()
            out["add_node_s"] = time.monotonic() - t2
            return out

        figures = asyncio.run(scenario())
    return {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "loadavg_at_start": load, **figures}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--graceful", action="store_true", help="SIGTERM the node first (a pod deleted), not SIGKILL")
    ap.add_argument("--json", help="append the runs' figures to this JSON file")
    ap.add_argument("--spread", type=int, metavar="N", help="only deploy N TP2 replicas and count them per node")
    ap.add_argument("--bare", action="store_true", help="only Ray: a bare actor's stream when its node dies")
    args = ap.parse_args(argv)
    if args.bare:
        print(json.dumps(bare()))
        return 0
    if args.spread:
        print(json.dumps(spread(args.spread)))
        return 0
    runs = [one_run(args.graceful) for _ in range(args.runs)]
    print(json.dumps(runs, indent=1))
    if args.json:
        path = Path(args.json)
        old = json.loads(path.read_text()) if path.is_file() else []
        path.write_text(json.dumps(old + runs, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
