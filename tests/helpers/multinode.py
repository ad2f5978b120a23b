"""A multi-node Ray cluster on one machine for tests: `ray.cluster_utils.Cluster` (what Ray uses to test
itself) starts one raylet per node, each with its own logical GPUs and CPUs.

The head node has no GPUs and carries the custom resource `specfleet_state`, as the Helm chart's head
does: the ingress (it owns the SQLite session registry) is pinned there, and GPU nodes come and go.

    with multinode_cluster(workers=2, gpus=8) as mc:   # ray.init(address=...) done
        mc.workers            # [ray._private.node.Node]: remove_node / add_node through mc
        mc.kill(mc.workers[0])   # SIGKILL the node's raylet and workers (a node lost, not drained)
        mc.add_worker()          # a node (re)joins: a new raylet with a new node id

Several raylets on 2 cores need care: small logical CPU counts, no dashboard, and every cluster is
shut down (and its processes reaped) when the block ends.
"""
from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass, field
from typing import Any, Iterator

STATE_RESOURCE = "specfleet_state"


@dataclass
class MultiNode:
    cluster: Any
    gpus: int
    cpus: int
    workers: list[Any] = field(default_factory=list)

    def add_worker(self) -> Any:
        node = self.cluster.add_node(num_cpus=self.cpus, num_gpus=self.gpus, wait=True)
        self.workers.append(node)
        return node

    def kill(self, node: Any, graceful: bool = False) -> None:
        """The node disappears: raylet and all its workers SIGKILLed, as when a machine dies; or, with
        graceful, SIGTERMed first (a pod deleted / a node drained). Call from the main thread."""
        self.cluster.remove_node(node, allow_graceful=graceful)
        self.workers.remove(node)


@contextlib.contextmanager
def multinode_cluster(workers: int = 2, gpus: int = 8, cpus: int | None = None, head_cpus: int = 2,
                      attempts: int = 3) -> Iterator[MultiNode]:
    import ray
    from ray.cluster_utils import Cluster

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_agent_register_timeout_ms", "180000")  # a slow 2-core start, see test_placement
    cpus = gpus if cpus is None else cpus  # one logical CPU per TP-rank bundle {"CPU": 1, "GPU": 1}
    cluster = None
    for attempt in range(attempts):  # a loaded machine can miss Ray's start-up windows: retry
        try:
            cluster = Cluster(initialize_head=True, head_node_args=dict(
                num_cpus=head_cpus, num_gpus=0, resources={STATE_RESOURCE: 1}, include_dashboard=False))
            mn = MultiNode(cluster, gpus, cpus)
            for _ in range(workers):
                mn.add_worker()
            ray.init(address=cluster.address, log_to_driver=False, logging_level="WARNING")
            cluster.wait_for_nodes(timeout=120)
            break
        except Exception:
            ray.shutdown()
            if cluster is not None:
                cluster.shutdown()
                cluster = None
            if attempt == attempts - 1:
                raise
            time.sleep(5)
    try:
        yield mn
    finally:
        ray.shutdown()
        cluster.shutdown()


def gpu_node_ids() -> list[str]:
    import ray

    return sorted(n["NodeID"] for n in ray.nodes() if n.get("Alive") and n["Resources"].get("GPU", 0) > 0)
