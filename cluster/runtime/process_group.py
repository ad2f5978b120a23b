"""torch.distributed set-up for one replica's TP ranks: backend choice, rendezvous address, init / teardown.

Rank 0's actor picks the rendezvous port (a free port on ITS node, where STRICT_PACK put every rank);
the driver hands (address, port) to all ranks, which then call `init_group` concurrently.
gloo on CPU, NCCL on CUDA. After a peer dies, survivors' collectives fail; `destroy_group` cleans up.
"""
from __future__ import annotations

import os
import socket
from datetime import timedelta

# Followers wait for rank 0's next step for as long as the replica is idle, so the collective timeout
# must not expire on an idle replica; failures are detected by the ReplicaGroup's monitor instead.
COLLECTIVE_TIMEOUT = timedelta(days=7)


def node_ip() -> str:
    try:
        import ray

        if ray.is_initialized():
            return ray.util.get_node_ip_address()
    except Exception:  # pragma: no cover - ray missing
        pass
    return "127.0.0.1"


def free_port(host: str = "") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((host, 0))
        return int(s.getsockname()[1])


def rendezvous_address() -> tuple[str, int]:
    ip = node_ip()
    return ip, free_port()


def backend_for(device_type: str) -> str:
    return "nccl" if device_type == "cuda" else "gloo"


def init_group(addr: str, port: int, rank: int, world: int, device_type: str):
    """Join the replica's process group; returns the torch device this rank computes on."""
    import torch
    import torch.distributed as dist

    if device_type == "cuda":
        device = torch.device("cuda", 0)  # Ray sets CUDA_VISIBLE_DEVICES to this rank's GPU
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world > 1:
        if dist.is_initialized():
            dist.destroy_process_group()
        if device_type != "cuda":
            os.environ.setdefault("GLOO_SOCKET_IFNAME", _loopback_ifname() if addr.startswith("127.") else "")
            if not os.environ["GLOO_SOCKET_IFNAME"]:
                os.environ.pop("GLOO_SOCKET_IFNAME")
        dist.init_process_group(backend_for(device_type), init_method=f"tcp://{addr}:{port}", rank=rank,
                                world_size=world, timeout=COLLECTIVE_TIMEOUT)
    return device


def _loopback_ifname() -> str:
    try:
        for _, name in socket.if_nameindex():
            if name.startswith("lo"):
                return name
    except OSError:  # pragma: no cover
        pass
    return "lo"


def destroy_group() -> None:
    try:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    except Exception:  # a broken group (dead peer) may refuse a clean teardown
        pass
